"""Command-line flags that can also come from the environment (SPEC §3): `--max-batch-size` is
also `SPURGUARD_MAX_BATCH_SIZE`, so that a container needs no command line.

The variable of every flag is derived from the flag itself when it is added, so a new flag gets
one without any code here. A flag on the command line wins over its variable; the variable wins
over the flag's default. A repeatable flag (action "append") takes a comma-separated list in its
variable. A value is checked like the flag's (type and choices), and a bad one is a usage error
naming the variable, not the flag.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

LIST_SEPARATOR = ","
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def variable_name(prefix: str, flag: str) -> str:
    """`--grace-s` -> `SPURGUARD_GRACE_S`: upper case, `-` -> `_`."""
    return prefix + flag.lstrip("-").upper().replace("-", "_")


class _Unset:
    """The default of a flag whose variable is set: it marks "not on the command line"."""


class EnvArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose long flags fall back on `PREFIX<FLAG>` variables of `environ`.

    `--help` names each flag's variable.
    """

    def __init__(self, *args: Any, env_prefix: str, environ: Mapping[str, str] = os.environ, **kwargs: Any) -> None:
        self.env_prefix = env_prefix
        self.environ = environ
        self._variables: dict[str, argparse.Action] = {}
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        flags = [flag for flag in action.option_strings if flag.startswith("--")]
        if flags and action.default is not argparse.SUPPRESS:  # not --help / --version
            name = variable_name(self.env_prefix, flags[0])
            self._variables[name] = action
            if action.help:
                action.help += f" [env {name}]"
        return action

    def variables(self) -> dict[str, str]:
        """Each variable and the flag it stands for."""
        return {name: action.option_strings[-1] for name, action in self._variables.items()}

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Parse as usual, with every flag absent from `args` taken from its variable when set."""
        given = {name: self.environ[name] for name in self._variables if name in self.environ}
        saved = {name: (self._variables[name].default, self._variables[name].required) for name in given}
        # The default while parsing marks a flag left off the command line. An "append" flag's
        # must be None: argparse extends a list default, and the command line replaces the variable.
        missing = {name: None if _repeatable(self._variables[name]) else _Unset() for name in given}
        for name in given:
            self._variables[name].default, self._variables[name].required = missing[name], False
        try:
            parsed, extra = super().parse_known_args(args, namespace)
        finally:
            for name, (default, required) in saved.items():
                self._variables[name].default, self._variables[name].required = default, required
        for name, text in given.items():
            action = self._variables[name]
            if getattr(parsed, action.dest) is missing[name]:
                setattr(parsed, action.dest, self._value(name, action, text))
        return parsed, extra

    def _value(self, name: str, action: argparse.Action, text: str) -> Any:
        """The variable's value as the flag would have parsed it; a usage error naming it if bad."""
        if action.nargs == 0:  # store_true / store_const: a switch
            word = text.strip().lower()
            if word not in _TRUE | _FALSE:
                self.error(f"{name}={text!r}: expected one of {', '.join(sorted(_TRUE | _FALSE - {''}))}")
            return action.const if word in _TRUE else action.default
        if not _repeatable(action):
            return self._item(name, action, text)
        items = [item.strip() for item in text.split(LIST_SEPARATOR)]
        if not all(items):
            self.error(f"{name}={text!r}: expected a list separated by {LIST_SEPARATOR!r} with no empty item")
        return [self._item(name, action, item) for item in items]

    def _item(self, name: str, action: argparse.Action, text: str) -> Any:
        try:
            value = text if action.type is None else action.type(text)
        except argparse.ArgumentTypeError as error:
            self.error(f"{name}={text!r}: {error}")
        except (TypeError, ValueError):
            self.error(f"{name}={text!r}: invalid {getattr(action.type, '__name__', 'value')} value")
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            self.error(f"{name}={text!r}: invalid choice (choose from {choices})")
        return value


def _repeatable(action: argparse.Action) -> bool:
    """A repeatable flag (action "append"): argparse names the action class only privately."""
    return isinstance(action, argparse._AppendAction)

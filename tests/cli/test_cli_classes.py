"""Classes by name (SPEC section 3: `--class` and `--classes` take indices or classes.txt names)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import cli_fakes as f
from cli_fakes import FakeClient, RunCli
from spurguard.client import cli

NAMED = f.model(classes=True)  # classes ant, bee, cat, star, "sea lion"


@pytest.mark.parametrize(
    ("argv", "method", "sent"),
    [
        (["components", "--class", "star"], "get_components", lambda args, kwargs: args[1]),
        (["label", "--class", "STAR", "--component", "0", "--as", "spurious"], "label", lambda args, kwargs: args[1]),
        (["visualize", "--class", "n00000003", "--component", "0", "--out", "{tmp}"], "visualize",
         lambda args, kwargs: args[1]),
        (["score", "--class", "star", "{tmp}/a.png"], "score", lambda args, kwargs: kwargs["class_index"]),
    ],
)
def test_class_names_and_wnids_become_indices(cli_run: RunCli, tmp_path: Path, argv: list[str], method: str,
                                              sent: object) -> None:
    (tmp_path / "a.png").write_bytes(b"png")
    fake = FakeClient(get_model=NAMED, get_components=f.components(3), visualize=[])
    outcome = cli_run(fake, *[a.format(tmp=tmp_path) for a in argv], "--model", "tiny")
    assert outcome.code == cli.EXIT_OK, outcome.err
    assert fake.called("get_model") == [(("tiny",), {})]
    ((args, kwargs),) = fake.called(method)
    assert sent(args, kwargs) == 3  # type: ignore[operator]


@pytest.mark.parametrize("command", ["fit", "evaluate"])
def test_class_lists_mix_indices_and_names(cli_run: RunCli, command: str) -> None:
    fake = FakeClient(get_model=NAMED, fit=[f.fit_summary()], evaluate=[f.evaluate_result()])
    where = ["--data", "d"] if command == "fit" else ["--clean", "c", "--spurious", "s"]
    outcome = cli_run(fake, command, "--model", "tiny", *where, "--classes", "0,star,sea_lion,Sea Lion")
    assert outcome.code == cli.EXIT_OK, outcome.err
    assert fake.called(command)[0][1]["classes"] == [0, 3, 4, 4]


def test_report_takes_a_class_name(cli_run: RunCli, tmp_path: Path) -> None:
    fake = FakeClient(get_model=f.model(fitted=(), classes=True))
    outcome = cli_run(fake, "report", "--model", "tiny", "--class", "bee", "--out", str(tmp_path))
    assert outcome.code == cli.EXIT_ERROR and "has no fit to report" in outcome.err  # got past the name


def test_indices_alone_ask_the_server_nothing_more(cli_run: RunCli) -> None:
    fake = FakeClient(get_components=f.components(3))
    assert cli_run(fake, "components", "--model", "tiny", "--class", "3").code == cli.EXIT_OK
    assert fake.called("get_model") == []


def test_an_unknown_class_name_is_a_usage_error_that_lists_some(cli_run: RunCli) -> None:
    fake = FakeClient(get_model=NAMED)
    outcome = cli_run(fake, "fit", "--model", "tiny", "--data", "d", "--classes", "0,dog")
    assert outcome.code == cli.EXIT_USAGE
    assert "model tiny has no class named 'dog'; its classes: ant, bee, cat, star, sea lion (or give the index)" in outcome.err
    assert fake.called("fit") == []


def test_models_shows_the_class_names(cli_run: RunCli) -> None:
    """ListModels sends no class names: each model is fetched with GetModel for them."""
    fake = FakeClient(list_models=[f.model()], get_model=NAMED)
    header, row = cli_run(fake, "models").out.splitlines()
    assert header.split()[-1] == "NAMES" and row.endswith("ant, bee, cat, … (+2)")
    (doc,) = json.loads(cli_run(fake, "models", "--json").out)
    assert doc["classes"][3] == {"index": 3, "name": "star", "wnid": "n00000003"}
    assert [args for args, _ in fake.called("get_model")] == [("tiny",), ("tiny",)]

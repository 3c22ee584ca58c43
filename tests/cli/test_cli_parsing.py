"""Argument parsing: global options on both sides of the command, env default, types, help, forwarding."""
from __future__ import annotations

import sys
import types

import pytest

from cli_fakes import FakeClient, RunCli, model
from spurguard.client import cli
from spurguard.client.cli import commands


def parse(*argv: str, environ: dict[str, str] | None = None) -> object:
    args, extra = cli.build_parser(environ or {}).parse_known_args(list(argv))
    assert extra == []
    return args


@pytest.mark.parametrize(
    "argv",
    [
        ["--server", "h:1", "--json", "--timeout", "5", "models"],
        ["models", "--server", "h:1", "--json", "--timeout", "5"],
        ["--server", "h:1", "models", "--json", "--timeout", "5"],
        ["--json", "score", "--model", "m", "a.png", "--server", "h:1", "--timeout", "5"],
    ],
)
def test_global_options_before_or_after_the_command(argv: list[str]) -> None:
    args = parse(*argv)
    assert (args.server, args.json, args.timeout) == ("h:1", True, 5.0)


def test_global_defaults_and_the_later_option_wins() -> None:
    args = parse("models")
    assert (args.server, args.json, args.timeout) == (cli.DEFAULT_SERVER, False, 60.0)
    assert parse("--server", "a:1", "models", "--server", "b:2").server == "b:2"


def test_tls_options_anywhere_and_in_the_hints() -> None:
    """The copy-paste commands of hints and the report must reach the same server the same way."""
    args = parse("--tls-ca", "my ca.pem", "models", "--server", "h:1", "--tls-cert", "c.pem", "--tls-key", "c.key")
    assert (args.tls, args.tls_ca, args.tls_cert, args.tls_key) == (False, "my ca.pem", "c.pem", "c.key")
    assert commands._server_option(args) == "--server h:1 --tls-ca 'my ca.pem' --tls-cert c.pem --tls-key c.key "
    assert commands._server_option(parse("models", "--tls")) == "--tls "
    assert commands._server_option(parse("models")) == ""
    assert cli.channel_credentials(parse("models")) is None


def test_server_default_comes_from_the_environment() -> None:
    assert parse("models", environ={cli.SERVER_ENV: "env:7"}).server == "env:7"
    assert parse("--server", "flag:1", "models", environ={cli.SERVER_ENV: "env:7"}).server == "flag:1"
    assert parse("models", environ={cli.SERVER_ENV: ""}).server == cli.DEFAULT_SERVER


def test_main_connects_to_the_env_server_with_the_timeout(cli_run: RunCli, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeClient(list_models=[model()], get_model=model())
    monkeypatch.setenv(cli.SERVER_ENV, "env:7")
    assert cli_run(fake, "models", "--timeout", "2.5").connects == [("env:7", 2.5)]
    assert cli_run(fake, "--timeout", "0", "models").connects == [("env:7", None)]  # 0: no deadline
    assert fake.closed


def test_token_from_the_flag_on_either_side_else_the_environment(
    cli_run: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeClient(list_models=[model()], get_model=model())
    assert cli_run(fake, "models").tokens == [None]
    assert cli_run(fake, "--token", "before", "models").tokens == ["before"]
    assert cli_run(fake, "models", "--token", "after").tokens == ["after"]
    monkeypatch.setenv(cli.TOKEN_ENV, "from-env")
    assert cli_run(fake, "models").tokens == ["from-env"]
    assert cli_run(fake, "models", "--token", "flag").tokens == ["flag"]
    monkeypatch.setenv(cli.TOKEN_ENV, "")
    assert cli_run(fake, "models").tokens == [None]


def test_the_token_stays_out_of_help_and_hints(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["models", "--help"]):
        with pytest.raises(SystemExit):
            cli.build_parser({cli.TOKEN_ENV: "s3cret"}).parse_args(argv)
        out = capsys.readouterr().out
        assert "--token" in out and "s3cret" not in out
    assert commands._server_option(parse("models", "--server", "h:1", "--token", "s3cret")) == "--server h:1 "


def test_index_lists_and_repeatable_components() -> None:
    assert parse("fit", "--model", "m", "--data", "d", "--classes", "0, 3,7").classes == [0, 3, 7]
    assert parse("fit", "--model", "m", "--data", "d").classes == []
    args = parse("visualize", "--model", "m", "--class", "1", "--component", "1,2", "--component", "5", "--out", "o")
    assert args.component == [1, 2, 5]
    assert parse("evaluate", "--model", "m", "--clean", "c", "--spurious", "s", "--classes", "4").classes == [4]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit", "--model", "m", "--data", "d", "--classes", "0,,3"], "comma-separated"),
        (["fit", "--model", "m", "--data", "d", "--classes", "0,-1"], "must be >= 0"),
        (["fit", "--model", "m", "--data", "d", "--components", "0"], "must be >= 1"),
        (["components", "--model", "m", "--class", "-1"], "must be >= 0"),
        (["components", "--model", "m", "--class", " "], "expected a class index or name"),
        (["label", "--model", "m", "--class", "1", "--component", "0", "--as", "bad"], "invalid choice"),
        (["score", "--model", "m", "--spufix", "other", "a.png"], "invalid choice"),
        (["score", "--model", "m"], "required: IMAGE"),
        (["visualize", "--model", "m", "--class", "1", "--component", "0", "--out", "o", "--eps", "0"], "positive"),
        (["models", "--timeout", "-1"], "must be >= 0"),
        (["models", "extra"], "unrecognized arguments: extra"),
        (["report", "--model", "m"], "required: --out"),
        (["report", "--model", "m", "--out", "o", "--top", "0"], "must be >= 1"),
    ],
)
def test_usage_errors_exit_2(cli_run: RunCli, argv: list[str], message: str) -> None:
    outcome = cli_run(FakeClient(), *argv)
    assert outcome.code == cli.EXIT_USAGE
    assert message in outcome.err
    assert outcome.connects == []  # nothing was called


TOO_LARGE = [  # every integer option at its proto field's maximum, which parses, and one above, which does not
    (["fit", "--model", "m", "--data", "d", "--classes"], cli.INT32_MAX),
    (["fit", "--model", "m", "--data", "d", "--components"], cli.UINT32_MAX),
    (["fit", "--model", "m", "--data", "d", "--batch-size"], cli.UINT32_MAX),
    (["components", "--model", "m", "--top", "1", "--class"], cli.INT32_MAX),
    (["components", "--model", "m", "--class", "1", "--top"], cli.UINT32_MAX),
    (["label", "--model", "m", "--class", "1", "--as", "spurious", "--component"], cli.UINT32_MAX),
    (["visualize", "--model", "m", "--component", "0", "--out", "o", "--class"], cli.INT32_MAX),
    (["visualize", "--model", "m", "--class", "1", "--out", "o", "--component"], cli.UINT32_MAX),
    (["visualize", "--model", "m", "--class", "1", "--component", "0", "--out", "o", "--steps"], cli.UINT32_MAX),
    (["visualize", "--model", "m", "--class", "1", "--component", "0", "--out", "o", "--top-k"], cli.UINT32_MAX),
    (["visualize", "--model", "m", "--class", "1", "--component", "0", "--out", "o", "--frame-every"], cli.UINT32_MAX),
    (["visualize", "--model", "m", "--class", "1", "--component", "0", "--out", "o", "--seed"], cli.UINT64_MAX),
    (["report", "--model", "m", "--out", "o", "--class"], cli.INT32_MAX),
    (["report", "--model", "m", "--out", "o", "--top"], cli.UINT32_MAX),
    (["report", "--model", "m", "--out", "o", "--steps"], cli.UINT32_MAX),
    (["report", "--model", "m", "--out", "o", "--top-k"], cli.UINT32_MAX),
    (["score", "--model", "m", "a.png", "--class"], cli.INT32_MAX),
    (["score", "--model", "m", "a.png", "--top"], cli.UINT32_MAX),
    (["score", "--model", "m", "a.png", "--batch-size"], cli.UINT32_MAX),
    (["evaluate", "--model", "m", "--clean", "c", "--spurious", "s", "--classes"], cli.INT32_MAX),
    (["evaluate", "--model", "m", "--clean", "c", "--spurious", "s", "--batch-size"], cli.UINT32_MAX),
]


@pytest.mark.parametrize(("argv", "maximum"), TOO_LARGE, ids=[f"{argv[0]} {argv[-1]}" for argv, _ in TOO_LARGE])
def test_integer_options_are_bounded_by_their_proto_field(cli_run: RunCli, argv: list[str], maximum: int) -> None:
    """`--top 99999999999` was protobuf's ValueError and a traceback; now it is a usage error."""
    parse(*argv, str(maximum))
    outcome = cli_run(FakeClient(), *argv, str(maximum + 1))
    assert outcome.code == cli.EXIT_USAGE
    assert f"must be <= {maximum}, got {maximum + 1}" in outcome.err and "Traceback" not in outcome.err
    assert outcome.connects == []


def test_an_argument_the_client_cannot_send_is_a_usage_error(cli_run: RunCli) -> None:
    fake = FakeClient()
    fake.error = ValueError("bad top=99999999999 for GetComponentsRequest: Value out of range: 99999999999")
    outcome = cli_run(fake, "components", "--model", "m", "--class", "1")
    assert outcome.code == cli.EXIT_USAGE
    assert outcome.err.endswith("spurguard components: error: bad top=99999999999 for GetComponentsRequest: "
                                "Value out of range: 99999999999\n")


# The flags SPEC section 3 names per command (plus the global ones every client command takes).
SPEC_FLAGS = {
    "models": [],
    "fit": ["--model", "--data", "--classes", "--components", "--batch-size", "--job-id", "--extend", "--detach"],
    "components": ["--model", "--class", "--top"],
    "label": ["--model", "--class", "--component", "--as", "spurious", "not_spurious", "inconsistent", "unlabeled", "--note"],
    "visualize": ["--model", "--class", "--component", "--out", "--steps", "--eps"],
    "score": ["--model", "--class", "--top", "--spufix", "paper", "floor", "IMAGE"],
    "report": ["--model", "--class", "--out", "--top", "--steps", "--eps", "--top-k"],
    "evaluate": ["--model", "--clean", "--spurious", "--spufix", "--classes"],
    "watch": ["JOB", "--cancel-on-interrupt"],
    "jobs": ["--model"],
    "cancel": ["JOB"],
}


@pytest.mark.parametrize("command", sorted(SPEC_FLAGS))
def test_help_of_each_client_command(cli_run: RunCli, command: str) -> None:
    outcome = cli_run(FakeClient(), command, "--help")
    assert outcome.code == 0
    assert outcome.out.startswith(f"usage: spurguard {command} ")
    for flag in SPEC_FLAGS[command] + ["--server", "--json", "--timeout"]:
        assert flag in outcome.out, flag


def test_top_level_help_lists_every_command_and_the_exit_codes(cli_run: RunCli) -> None:
    out = cli_run(FakeClient(), "--help").out
    for command in [*SPEC_FLAGS, *cli.FORWARDED]:
        assert f"\n    {command} " in out, command
    assert cli.SERVER_ENV in out
    for code in (cli.EXIT_ERROR, cli.EXIT_USAGE, cli.EXIT_PARTIAL, cli.EXIT_INTERRUPTED):
        assert f"\n  {code} " in out


@pytest.mark.parametrize("command", sorted(cli.FORWARDED))
def test_serve_and_demo_forward_every_argument(cli_run: RunCli, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    received: list[list[str]] = []
    fake_module = types.ModuleType(cli.FORWARDED[command])
    fake_module.main = lambda argv: received.append(argv) or 4  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, cli.FORWARDED[command], fake_module)
    argv = ["--model", "a", "--server", "x:1", "--json", "--help", "pos", "--port=0"]
    outcome = cli_run(FakeClient(), "--server", "ignored:1", command, *argv)
    assert received == [argv]
    assert outcome.code == 4  # the forwarded program's status
    assert outcome.connects == []


@pytest.mark.parametrize("command", sorted(cli.FORWARDED))
def test_serve_without_the_server_extra_says_what_to_install(
    cli_run: RunCli, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.setitem(sys.modules, cli.FORWARDED[command], None)  # makes the import fail
    outcome = cli_run(FakeClient(), command, "--port", "1")
    assert outcome.code == cli.EXIT_USAGE
    assert outcome.err.startswith("spurguard: error: ")
    assert "pip install 'spurguard[server]'" in outcome.err
    assert outcome.err.count("\n") == 1

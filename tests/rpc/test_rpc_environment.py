"""`spurguard serve` configured by SPURGUARD_* variables (SPEC §3), `--log-format json`, and the
`spurguard health` probe a container and Kubernetes run."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spurguard.server.rpc import probe
from spurguard.server.rpc.app import build_parser, config_from_args, main
from spurguard.server.rpc.envargs import EnvArgumentParser, variable_name
from spurguard.server.rpc.logformat import JsonFormatter
from spurguard.server.rpc.process import READY_PREFIX

CLI = "import sys; from spurguard.client.cli import main; sys.exit(main())"  # the `spurguard` console script


def _config(argv: list[str], environ: dict[str, str]):  # noqa: ANN202
    return config_from_args(build_parser(environ=environ).parse_args(argv))


def test_every_serve_flag_has_its_variable_named_in_help() -> None:
    parser = build_parser(environ={})
    flags = sorted(flag for action in parser._actions for flag in action.option_strings
                   if flag.startswith("--") and flag != "--help")
    assert sorted(parser.variables().values()) == flags
    assert all(name == variable_name("SPURGUARD_", flag) for name, flag in parser.variables().items())
    assert parser.variables()["SPURGUARD_MAX_BATCH_SIZE"] == "--max-batch-size"
    text = parser.format_help()
    assert all(f"[env {name}]" in " ".join(text.split()) for name in parser.variables())


def test_variables_alone_configure_the_server_as_the_flags_would() -> None:
    flags = ["--model", "demo", "--model", "/models/my cnn", "--store", "/var/store", "--host", "0.0.0.0",
             "--port", "6000", "--metrics-port", "9100", "--data-root", "/data/a", "--data-root", "/data/b",
             "--runtime", "torch", "--drain-delay-s", "7.5", "--max-batch-size", "16", "--spufix-default", "paper"]
    environ = {"SPURGUARD_MODEL": "demo, /models/my cnn", "SPURGUARD_STORE": "/var/store", "SPURGUARD_HOST": "0.0.0.0",
               "SPURGUARD_PORT": "6000", "SPURGUARD_METRICS_PORT": "9100", "SPURGUARD_DATA_ROOT": "/data/a,/data/b",
               "SPURGUARD_RUNTIME": "torch", "SPURGUARD_DRAIN_DELAY_S": "7.5", "SPURGUARD_MAX_BATCH_SIZE": "16",
               "SPURGUARD_SPUFIX_DEFAULT": "paper", "SPURGUARD_SERVER": "ignored:1"}  # the client's variable
    from_env = _config([], environ)
    assert from_env == _config(flags, {})
    assert from_env.models == ("demo", "/models/my cnn") and from_env.data_roots == (Path("/data/a"), Path("/data/b"))
    assert from_env.port == 6000 and from_env.drain_delay_s == 7.5 and from_env.grace_s == 10.0  # unset: default


def test_a_flag_wins_over_its_variable_and_a_list_flag_replaces_the_list() -> None:
    environ = {"SPURGUARD_MODEL": "demo,efficientnet_lite0", "SPURGUARD_STORE": "/s", "SPURGUARD_PORT": "6000",
               "SPURGUARD_DATA_ROOT": "/a,/b"}
    config = _config(["--model", "mine", "--port", "7000", "--data-root", "/c"], environ)
    assert (config.models, config.port, config.data_roots, config.store) == (("mine",), 7000, (Path("/c"),), Path("/s"))
    parser = build_parser(environ=environ)
    parser.parse_args([])
    assert parser.parse_args(["--store", "/t"]).store == Path("/t")  # parsing twice: defaults restored
    assert build_parser(environ={}).parse_args(["--model", "m", "--store", "s"]).data_roots == []


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("SPURGUARD_PORT", "http", "invalid _port value"),
        ("SPURGUARD_PORT", "70000", "must be a port number 0-65535, got 70000"),
        ("SPURGUARD_MAX_MESSAGE_MB", "16", "must be >= 64"),
        ("SPURGUARD_RUNTIME", "tensorrt", "invalid choice (choose from auto, torch, onnxruntime, openvino)"),
        ("SPURGUARD_LOG_FORMAT", "xml", "invalid choice (choose from text, json)"),
        ("SPURGUARD_DATA_ROOT", "/a,,/b", "with no empty item"),
        ("SPURGUARD_MODEL", "", "with no empty item"),
    ],
)
def test_a_bad_variable_is_a_usage_error_naming_it(name: str, value: str, said: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    environ = {"SPURGUARD_MODEL": "demo", "SPURGUARD_STORE": "/s", name: value}
    with pytest.raises(SystemExit) as caught:
        build_parser(environ=environ).parse_args([])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and f"error: {name}={value!r}: " in err and said in err


def test_a_bad_variable_under_its_flag_is_not_read() -> None:
    """The command line wins: a broken variable it overrides does no harm."""
    assert _config(["--port", "1"], {"SPURGUARD_MODEL": "m", "SPURGUARD_STORE": "s", "SPURGUARD_PORT": "x"}).port == 1


def test_new_flags_get_their_variable_switches_included(capsys: pytest.CaptureFixture[str]) -> None:
    parser = EnvArgumentParser(prog="p", env_prefix="APP_", environ={"APP_DRY_RUN": "yes", "APP_LEVEL": "3"})
    parser.add_argument("--dry-run", action="store_true", help="nothing written")
    parser.add_argument("--level", type=int, default=1)
    parser.add_argument("positional", nargs="?")
    assert parser.variables() == {"APP_DRY_RUN": "--dry-run", "APP_LEVEL": "--level"}
    args = parser.parse_args([])
    assert (args.dry_run, args.level) == (True, 3)
    parser.environ = {"APP_DRY_RUN": "0"}
    assert parser.parse_args([]).dry_run is False and parser.parse_args(["--dry-run"]).dry_run is True
    parser.environ = {"APP_DRY_RUN": "maybe"}
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert "APP_DRY_RUN='maybe': expected one of" in capsys.readouterr().err


def test_json_formatter_writes_one_object_with_the_exception_as_text() -> None:
    try:
        raise ValueError("broken weights")
    except ValueError:
        record = logging.getLogger("spurguard.test").makeRecord(
            "spurguard.test", logging.ERROR, __file__, 1, "model %s failed", ("m",), sys.exc_info())
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert "\n" not in line and set(entry) == {"time", "level", "logger", "message", "exception"}
    assert (entry["level"], entry["logger"], entry["message"]) == ("ERROR", "spurguard.test", "model m failed")
    assert entry["exception"].startswith("Traceback") and "ValueError: broken weights" in entry["exception"]
    assert entry["time"].endswith("+00:00")


def test_json_logs_of_a_failed_start_are_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tmp_path / "missing"), "--store", str(tmp_path / "s"), "--port", "0",
                 "--log-format", "json"]) == 2
    out, err = capsys.readouterr()
    entries = [json.loads(line) for line in err.splitlines()]
    assert out == "" and entries and entries[-1]["level"] == "ERROR" and "neither a built-in model" in entries[-1]["message"]
    logging.basicConfig(force=True, handlers=[logging.NullHandler()])  # no handler left on the captured stream


def test_a_server_configured_only_by_variables_logs_json_and_answers_its_probe(tmp_path: Path) -> None:
    """The container's way: no command line. stdout has only the ready line, stderr only JSON
    records, and `spurguard health` sees liveness and readiness SERVING, then nothing listening."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPURGUARD_MODEL": "demo", "SPURGUARD_STORE": str(tmp_path / "store"),
           "SPURGUARD_PORT": "0", "SPURGUARD_HOST": "127.0.0.1", "SPURGUARD_RUNTIME": "torch",
           "SPURGUARD_DEVICE": "cpu", "SPURGUARD_DRAIN_DELAY_S": "0", "SPURGUARD_LOG_FORMAT": "json"}
    with open(tmp_path / "err", "w") as err:
        server = subprocess.Popen([sys.executable, "-c", CLI, "serve"], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=err)
        try:
            assert server.stdout is not None
            ready = server.stdout.readline()
            assert ready.startswith(READY_PREFIX), ready
            target = ready[len(READY_PREFIX):].strip()
            for service in ("liveness", "", "spurguard.v1.Spurguard", "demo"):
                assert probe.main(["--server", target, "--service", service]) == probe.EXIT_SERVING
            assert probe.check(target, "no-such-model", 5) == "NOT_FOUND"
        finally:
            server.terminate()
            rest = server.communicate(timeout=30)[0]
    assert server.returncode == 0 and rest == ""
    entries = [json.loads(line) for line in (tmp_path / "err").read_text().splitlines()]
    assert {"model demo ready", "server stopped"} <= {entry["message"].split(" (")[0] for entry in entries}
    assert probe.main(["--server", target, "--timeout", "1"]) == probe.EXIT_NOT_SERVING
    assert probe.check(target, "", 1) == "UNAVAILABLE"


def test_probe_defaults_to_the_containers_own_server() -> None:
    assert probe.default_target({}) == "127.0.0.1:50051"
    assert probe.default_target({"SPURGUARD_PORT": "6000"}) == "127.0.0.1:6000"
    assert probe.default_target({"SPURGUARD_SERVER": "h:1", "SPURGUARD_PORT": "6000"}) == "h:1"

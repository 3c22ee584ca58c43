"""`cli` runs `spurguard.client.cli.main` in-process against a FakeClient and captures its output."""
from __future__ import annotations

import pytest

from cli_fakes import FakeClient, Outcome, RunCli
from spurguard.client import cli


@pytest.fixture
def cli_run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> RunCli:
    """cli_run(fake, *argv) -> Outcome; argparse exits (usage errors, --help) become the exit code."""
    monkeypatch.delenv(cli.SERVER_ENV, raising=False)
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)

    def run(fake: FakeClient, *argv: str) -> Outcome:
        connects: list[tuple[str, float | None]] = []
        tokens: list[str | None] = []

        def factory(target: str, timeout: float | None, credentials: object, token: str | None) -> FakeClient:
            connects.append((target, timeout))
            tokens.append(token)
            return fake

        try:
            code = cli.main(list(argv), client_factory=factory)  # type: ignore[arg-type]
        except SystemExit as stop:
            code = int(stop.code or 0)
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err, connects, tokens)

    return run

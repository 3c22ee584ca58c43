"""`spurguard`'s entry point: parse, connect, run the command, map what went wrong to an exit status.

Only grpcio, protobuf, numpy and the standard library are imported, so the CLI works from
`pip install spurguard` without the server extra; `serve`, `demo`, `export-triton`, `health` and
`fit --store` (a fit in this process, no server) import the server lazily. The client comes from a
factory that tests replace.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import closing

import grpc

from spurguard import vocab as t
from spurguard.client.cli import format as fmt
from spurguard.client.cli.commands import COMMANDS, os_error_code, resolve_classes
from spurguard.client.cli.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CliError, UsageError
from spurguard.client.cli.parser import build_parser, split_command
from spurguard.client.client import Client, SpurguardClientError, tls_credentials

# Commands whose arguments belong to another program: everything after the name is passed on.
FORWARDED = {
    "serve": "spurguard.server.rpc.app",
    "demo": "spurguard.server.demo.__main__",
    "export-triton": "spurguard.server.backends.triton_repo",
    "health": "spurguard.server.rpc.probe",
}
# `fit` with --store: the fit runs here, with no server (whole, one shard, or the shards' merge).
OFFLINE_FIT = "spurguard.server.serving.offline"

ClientFactory = Callable[[str, float | None, grpc.ChannelCredentials | None, str | None], Client]


def connect(
    target: str, timeout: float | None, credentials: grpc.ChannelCredentials | None, token: str | None
) -> Client:
    return Client(target, timeout=timeout, credentials=credentials, token=token)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise UsageError(f"cannot read the {what} {path}: {error.strerror or error}") from None


def channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS from --tls / --tls-ca / --tls-cert / --tls-key (any of them turns it on); None: plaintext."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("give both --tls-cert and --tls-key (a client certificate and its key), or neither")
    return tls_credentials(
        ca=_read(args.tls_ca, "CA certificate") if args.tls_ca else None,
        cert=_read(args.tls_cert, "client certificate") if args.tls_cert else None,
        key=_read(args.tls_key, "client key") if args.tls_key else None,
    )


# ---- entry point ----


def _forward(command: str, argv: list[str], module_name: str | None = None) -> int:
    """Run a server-side program (serve, demo, export-triton, health, fit --store) with the remaining arguments."""
    try:
        module = importlib.import_module(module_name or FORWARDED[command])
    except ImportError as error:
        print(
            f"spurguard: error: `spurguard {command}` needs the server ({error}); "
            "install it with: pip install 'spurguard[server]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    status = module.main(argv)
    return EXIT_OK if status is None else int(status)


def _failed(args: argparse.Namespace, code: grpc.StatusCode, message: str, line: str) -> int:
    """A failed command: `line` on stderr and, with --json, SPEC section 3's error document on
    stdout too, so that a script reading stdout sees the failure and its code."""
    if args.json:
        print(fmt.json_document({"error": t.ErrorStatus(code.name, message)}), flush=True)
    print(f"spurguard: error: {line}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None, *, client_factory: ClientFactory = connect) -> int:
    """Parse `argv` (default sys.argv[1:]), run the command and return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    given, command, rest = split_command(argv)
    if command == "fit" and any(arg == "--store" or arg.startswith("--store=") for arg in rest):
        connection = sorted(f"--{name.replace('_', '-')}" for name in given if name != "json")
        if connection:
            print(f"spurguard fit: error: {', '.join(connection)}: a fit with --store runs here, with no server",
                  file=sys.stderr)
            return EXIT_USAGE
        return _forward("fit", ["--json"] * bool(given.get("json")) + rest, OFFLINE_FIT)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in FORWARDED:
        return _forward(args.command, extra)
    if extra:
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        client = client_factory(args.server, args.timeout or None, channel_credentials(args), args.token or None)
        with closing(client):
            resolve_classes(args, client)
            return int(COMMANDS[args.command](args, client))
    except SpurguardClientError as error:
        where = f" (server {args.server})" if error.code == grpc.StatusCode.UNAVAILABLE else ""
        message = f"{' '.join(error.details.split())}{where}"
        return _failed(args, error.code, message, f"{error.code.name}: {message}")
    except (UsageError, ValueError) as error:  # the client raises ValueError for arguments it cannot send
        args.command_parser.error(str(error))
    except KeyboardInterrupt:
        print("spurguard: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `spurguard score --json … | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except CliError as error:
        return _failed(args, error.code, str(error), str(error))
    except OSError as error:
        return _failed(args, os_error_code(error), str(error), str(error))
    return EXIT_ERROR

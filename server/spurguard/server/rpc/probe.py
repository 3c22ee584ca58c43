"""`spurguard health`: one `grpc.health.v1` check of a server, exit 0 when SERVING and 1 otherwise.

What a container HEALTHCHECK or a Kubernetes exec probe runs (native `grpc:` probes do the same
check but speak no TLS). The service names are the server's (SPEC §3): `liveness`, `""` or
`spurguard.v1.Spurguard` for readiness, a model's name for that model. The address defaults to
the one the container's own server listens on: $SPURGUARD_SERVER, else 127.0.0.1 with
$SPURGUARD_PORT (else 50051).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXIT_SERVING, EXIT_NOT_SERVING = 0, 1


def default_target(environ: Mapping[str, str]) -> str:
    """The server a probe inside the server's container checks."""
    return environ.get("SPURGUARD_SERVER") or f"127.0.0.1:{environ.get('SPURGUARD_PORT') or 50051}"


def check(target: str, service: str, timeout: float, credentials: grpc.ChannelCredentials | None = None,
          server_name: str | None = None) -> str:
    """The service's status name (SERVING, NOT_SERVING, ...), or the gRPC code of a failed call
    (UNAVAILABLE: nothing listens; NOT_FOUND: the server has no such service name)."""
    options = [] if server_name is None else [("grpc.ssl_target_name_override", server_name)]
    channel = (grpc.insecure_channel(target, options=options) if credentials is None
               else grpc.secure_channel(target, credentials, options=options))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def build_parser(environ: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spurguard health",
        description="Check a spurguard server's gRPC health service once: exit 0 if SERVING, else 1.",
    )
    target = default_target(environ)
    p.add_argument("--server", default=target, metavar="HOST:PORT", help=f"the server (default {target})")
    p.add_argument("--service", default="", metavar="NAME",
                   help='health service name: "" (default) or spurguard.v1.Spurguard for readiness, liveness, '
                        "or a model's name")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S", help="deadline of the check (default 5)")
    p.add_argument("--tls-ca", type=Path, metavar="PEM",
                   help="speak TLS to a server started with --tls-cert, trusting this CA (default: plaintext)")
    p.add_argument("--tls-server-name", metavar="NAME",
                   help="the name the server's certificate must carry, when it is not the address's host")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    credentials = None
    if args.tls_ca is not None:
        try:
            credentials = grpc.ssl_channel_credentials(root_certificates=args.tls_ca.read_bytes())
        except OSError as error:
            print(f"spurguard health: cannot read the CA {args.tls_ca}: {error.strerror or error}", file=sys.stderr)
            return 2
    status = check(args.server, args.service, args.timeout, credentials, args.tls_server_name)
    service = args.service or '""'
    print(f"{args.server} {service}: {status}")
    return EXIT_SERVING if status == "SERVING" else EXIT_NOT_SERVING


if __name__ == "__main__":
    sys.exit(main())

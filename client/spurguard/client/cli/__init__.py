"""The `spurguard` command line (SPEC §3): a front over the thin client.

`run` is the entry point (parse, connect, run, exit status), `parser` the arguments, `commands`
one function per command, `errors` the exit statuses; `format` (tables), `progress` (stderr),
`visualize` (PNG files) and `report` (the HTML report) are what the commands write.
"""
from spurguard.client.cli.commands import expand_images
from spurguard.client.cli.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE
from spurguard.client.cli.parser import (
    DEFAULT_SERVER,
    INT32_MAX,
    SERVER_ENV,
    TOKEN_ENV,
    UINT32_MAX,
    UINT64_MAX,
    build_parser,
    version,
)
from spurguard.client.cli.run import FORWARDED, channel_credentials, main

__all__ = [
    "DEFAULT_SERVER",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_USAGE",
    "FORWARDED",
    "INT32_MAX",
    "SERVER_ENV",
    "TOKEN_ENV",
    "UINT32_MAX",
    "UINT64_MAX",
    "build_parser",
    "channel_credentials",
    "expand_images",
    "main",
    "version",
]

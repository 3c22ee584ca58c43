"""Bearer tokens with roles (SPEC section 3, Auth): one interceptor checks every call, unary and
streaming, of every service on the port against `serve --auth-tokens FILE`.

Why this shape:
- The file holds only each token's sha256, so it can be backed up or templated without handing
  out secrets. A presented token's digest is compared with every entry in constant time
  (`hmac.compare_digest`, no early exit), so timing does not tell how close a guess was.
- The role each RPC needs is one explicit table per served service (`SERVICE_ROLES`); a test
  checks it names every method the server serves, and a method it does not name needs `admin`
  (fail closed), so a new RPC cannot be left open by forgetting it.
- The file is re-read when its stat (mtime, size, inode) changes, looked at no more than every
  `RELOAD_CHECK_S` on the call path: rotation needs no restart and no file-watching dependency.
  A rewrite that does not parse keeps the last good tokens and is logged.
- Who is calling (`caller()`, the matched token's name, which labels record as their author) is
  a ContextVar set by the interceptor: grpc.aio runs each call, its interceptors and then its
  handler, in an asyncio task of its own, and a task runs in its own copy of the context, so the
  value is that call's alone (and `asyncio.to_thread` carries it along). The servicer passes it
  on explicitly; the data plane never reads it.
"""
from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import tempfile
import time
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from spurguard.server.errors import InvalidInput, PermissionDenied, SpurguardError, Unauthenticated
from spurguard.server.rpc import inference
from spurguard.server.rpc.status import status_of
from spurguard.v1 import spurguard_pb2 as pb

log = logging.getLogger("spurguard.server")

RoleName = Literal["score", "label", "admin"]
ROLES: tuple[RoleName, ...] = ("score", "label", "admin")  # each includes the ones before it
RELOAD_CHECK_S = 1.0  # how often, at most, the token file's stat is compared with the last load's
METADATA_KEY = "authorization"
_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("spurguard_caller", default="")

# Each served service's methods -> the least role that may call them; None: open to anyone
# (health, reflection and the Open Inference Protocol's probes, for load balancers).
SERVICE_ROLES: dict[str, dict[str, RoleName | None]] = {
    pb.DESCRIPTOR.services_by_name["Spurguard"].full_name: {
        "ListModels": "score", "GetModel": "score", "GetComponents": "score", "ListLabels": "score",
        "WatchLabels": "score",
        "Score": "score", "ScoreStream": "score",
        "Label": "label", "Visualize": "label",
        "Fit": "admin", "WatchJob": "admin", "GetJob": "admin", "ListJobs": "admin", "CancelJob": "admin",
        "Evaluate": "admin", "Transfer": "admin",
    },
    inference.SERVICE_NAME: {
        "ServerLive": None, "ServerReady": None, "ModelReady": None,
        "ServerMetadata": "score", "ModelMetadata": "score", "ModelConfig": "score", "ModelInfer": "score",
        # UNIMPLEMENTED here: scoring-like ones answer that to any caller, Triton's management ones stay admin's
        "ModelStreamInfer": "score", "ModelStatistics": "score",
        "RepositoryIndex": "admin", "RepositoryModelLoad": "admin", "RepositoryModelUnload": "admin",
        "SystemSharedMemoryStatus": "admin", "SystemSharedMemoryRegister": "admin",
        "SystemSharedMemoryUnregister": "admin", "CudaSharedMemoryStatus": "admin",
        "CudaSharedMemoryRegister": "admin", "CudaSharedMemoryUnregister": "admin",
        "TraceSetting": "admin", "LogSettings": "admin",
    },
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name: {"Check": None, "Watch": None},
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name: {"ServerReflectionInfo": None},
}
# gRPC's method path (/package.Service/Method) -> its role
METHOD_ROLES: dict[str, RoleName | None] = {
    f"/{service}/{method}": role for service, methods in SERVICE_ROLES.items() for method, role in methods.items()
}


# ---- the token file ----


@dataclass(frozen=True)
class Token:
    """One `[[token]]` table: who (`name`, for messages and logs), what it may do, its digest."""

    name: str
    role: RoleName
    digest: bytes  # sha256 of the token

    @classmethod
    def of(cls, name: str, role: RoleName, token: str) -> Token:
        """The entry for `token`, which itself is not kept."""
        return cls(name, role, _digest(token))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _token_entry(entry: object, number: int, path: Path) -> Token:
    where = f"{path}: [[token]] {number}"
    if not isinstance(entry, dict):
        raise InvalidInput(f"{where} must be a table")
    keys = {"name", "role", "sha256"}
    if set(entry) != keys:
        wrong = sorted(set(entry) - keys) or sorted(keys - set(entry))
        raise InvalidInput(f"{where} must have exactly name, role and sha256 (wrong or missing: {', '.join(wrong)})")
    name, role, digest = entry["name"], entry["role"], entry["sha256"]
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{where}: name must be a non-empty string")
    if role not in ROLES:
        raise InvalidInput(f"{where} ({name}): role must be one of {', '.join(ROLES)}, got {role!r}")
    try:
        raw = bytes.fromhex(digest) if isinstance(digest, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != hashlib.sha256().digest_size:
        raise InvalidInput(f"{where} ({name}): sha256 must be 64 hex digits, the sha256 of the token")
    return Token(name, role, raw)


def load_tokens(path: Path) -> tuple[Token, ...]:
    """The tokens of a token file; InvalidInput says what is wrong with it, and where."""
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InvalidInput(f"cannot read the token file {path}: {error.strerror or error}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise InvalidInput(f"{path} is not valid TOML: {error}") from None
    if set(table) - {"token"}:
        raise InvalidInput(f"{path}: unknown keys {', '.join(sorted(set(table) - {'token'}))}; only [[token]] tables")
    entries = table.get("token")
    if not isinstance(entries, list) or not entries:
        raise InvalidInput(f"{path} has no [[token]] tables (each with name, role and sha256)")
    tokens = tuple(_token_entry(entry, number, path) for number, entry in enumerate(entries, 1))
    for field, key in (("name", "name"), ("digest", "sha256")):
        values = [getattr(token, field) for token in tokens]
        if len(set(values)) != len(values):
            raise InvalidInput(f"{path}: two [[token]] tables have the same {key}")
    return tokens


def write_tokens(path: Path, tokens: Sequence[Token]) -> None:
    """Write a token file, private to its owner (0600) whatever was there: a new file renamed
    over the old one, so that a server reloading it never reads half a file."""
    tables = [f'[[token]]\nname = {_toml_string(t.name)}\nrole = "{t.role}"\nsha256 = "{t.digest.hex()}"\n'
              for t in tokens]
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write("\n".join(tables))
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, but for DEL, which TOML wants escaped too
    (and astral characters stay literal: TOML has no surrogate-pair escapes)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is edited or replaced; None while it is missing."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class TokenFile:
    """The tokens of one file, re-read when it changes; a bad file at start raises InvalidInput."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stat = _stat_key(path)
        self.tokens = load_tokens(path)
        self._checked = time.monotonic()

    async def refresh(self) -> None:
        """Re-read the file if it changed, looking no more often than every RELOAD_CHECK_S."""
        now = time.monotonic()
        if now - self._checked >= RELOAD_CHECK_S:
            self._checked = now  # before the await: calls meanwhile use the tokens as they are
            await asyncio.to_thread(self._reload_if_changed)

    def _reload_if_changed(self) -> None:
        stat = _stat_key(self.path)
        if stat == self._stat:
            return
        self._stat = stat
        try:
            self.tokens = load_tokens(self.path)
        except InvalidInput as error:
            log.error("auth: %s; keeping the last good tokens (%d)", error, len(self.tokens))
        else:
            log.info("auth: reloaded %d tokens from %s", len(self.tokens), self.path)

    def find(self, token: str) -> Token | None:
        """The entry whose digest is the token's: every entry compared, in constant time each."""
        digest = _digest(token)
        found = None
        for entry in self.tokens:
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        return found


# ---- the check ----


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The token of the call's `authorization: Bearer TOKEN`, or why there is none."""
    values = [value for key, value in metadata or () if key == METADATA_KEY]
    if not values:
        raise Unauthenticated(
            "this server needs a token: send metadata `authorization: Bearer TOKEN` "
            "(spurguard --token or $SPURGUARD_TOKEN; Client(token=...))"
        )
    scheme, _, token = str(values[0]).partition(" ")
    if len(values) > 1 or scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("send one `authorization: Bearer TOKEN` metadata entry")
    return token.strip()


def check(tokens: TokenFile, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> Token | None:
    """The call's token if it may call `method` (None for a method open to anyone); raises
    Unauthenticated or PermissionDenied otherwise."""
    needed = METHOD_ROLES.get(method, "admin")
    if needed is None:
        return None
    caller = tokens.find(_bearer(metadata))
    if caller is None:
        raise Unauthenticated("unknown token")
    if ROLES.index(caller.role) < ROLES.index(needed):
        raise PermissionDenied(f"token {caller.name!r} has role {caller.role}; {method.lstrip('/')} needs {needed}")
    return caller


def caller() -> str:
    """The name of the token the current call came with: "" on a server without --auth-tokens
    and on methods open to anyone. Per call (see the module's docstring)."""
    return _CALLER.get()


_HANDLER_KINDS: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def refusal(handler: grpc.RpcMethodHandler, error: SpurguardError, method: str) -> grpc.RpcMethodHandler:
    """A handler of the method's own kind (unary or streaming either way) that only aborts."""
    status = status_of(error, method)

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(status.code, status.message)

    kind = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    return kind(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class RefusingInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that may refuse a call before its handler runs: `refuse` says why (or
    None to let it through); the refusal is an abort of the method's own kind."""

    async def refuse(self, details: grpc.HandlerCallDetails) -> SpurguardError | None:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # no such method: grpc answers UNIMPLEMENTED, which tells nothing
            return handler
        error = await self.refuse(handler_call_details)
        return handler if error is None else refusal(handler, error, handler_call_details.method)


class AuthInterceptor(RefusingInterceptor):
    """Every call's token checked against the method's role before its handler runs; the call
    then runs as its token's name (`caller()`)."""

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    async def refuse(self, details: grpc.HandlerCallDetails) -> SpurguardError | None:
        await self.tokens.refresh()
        try:
            token = check(self.tokens, details.method, details.invocation_metadata)
        except SpurguardError as error:
            return error
        _CALLER.set("" if token is None else token.name)  # in the call's own task: its handler sees it
        return None


# ---- who can reach the port ----


def is_loopback(host: str) -> bool:
    """Whether `--host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to may be reachable from elsewhere


def exposure_warning(host: str, *, auth: bool, tls: bool) -> str | None:
    """What the log should say at start about who may use a port on `host`, if anything."""
    if is_loopback(host):
        return None
    if not auth:
        return (f"no --auth-tokens and listening on {host}: anyone who can connect may score, label, "
                "fit and evaluate")
    if not tls:
        return (f"--auth-tokens without TLS on {host}: tokens travel in plaintext; "
                "give --tls-cert and --tls-key")
    return None

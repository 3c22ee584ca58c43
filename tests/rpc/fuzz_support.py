"""Hypothesis strategies for the request fuzzer (test_rpc_fuzz.py): any protobuf request message,
built from its descriptor, and mutations of valid image files.

Why from descriptors: hypothesis cannot infer proto messages, and a hand-written strategy per
message would drift from the proto. Each field gets values by its type, chosen for breaking
things: integers at their limits, NaN / inf / subnormal floats, empty, 1 MiB, unicode and
path-like strings, unknown enum numbers, repeated fields empty and oversized, every oneof
member. `realistic` values (the served model's name, its class indices, the data root's
folders) are mixed in per field, so that requests get past the first name check into the code
behind it.
"""
from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st
from PIL import Image

Realistic = Mapping[str, st.SearchStrategy[Any]]  # "Message.field" or "field" -> values a server knows
HUGE = 2**20  # a 1 MiB string or bytes field
OVERSIZED = 1025  # one more than the server's default max_request_images
_F = FieldDescriptor
_UNSET = object()  # a field left out of the message

_INT_RANGES = {
    **dict.fromkeys((_F.TYPE_INT32, _F.TYPE_SINT32, _F.TYPE_SFIXED32), (-(2**31), 2**31 - 1)),
    **dict.fromkeys((_F.TYPE_INT64, _F.TYPE_SINT64, _F.TYPE_SFIXED64), (-(2**63), 2**63 - 1)),
    **dict.fromkeys((_F.TYPE_UINT32, _F.TYPE_FIXED32), (0, 2**32 - 1)),
    **dict.fromkeys((_F.TYPE_UINT64, _F.TYPE_FIXED64), (0, 2**64 - 1)),
}
_FLOAT_EDGES = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, 1e308, -1e308, 5e-324, 1e-45, 3.4e38, 2.0**63)
PATHS = (
    ".", "..", "/", "../../etc/passwd", "/etc/passwd", "/proc/self/environ", "train/../../..", "~", "~root/x",
    "x\x00y", "\x00", "a" * 300, "/" + "a/" * 3000, "*", "?", "train/*", "C:\\Windows", "\\\\server\\share",
)
STRINGS = ("", " ", "\n", "\t\r", "ünïcødé ✓ 😀", "\u202e\u200b", "%s%n{0}", "-1", "NaN", "null", "'; DROP TABLE labels; --")


def integers(field_type: int) -> st.SearchStrategy[int]:
    """An integer field's values: its limits and their neighbours, small numbers, anything in range."""
    low, high = _INT_RANGES[field_type]
    edges = {low, high, low + 1, high - 1, 0, 1, 2, -1, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**53}
    return st.one_of(st.sampled_from(sorted(e for e in edges if low <= e <= high)), st.integers(low, high))


def floats(width: int) -> st.SearchStrategy[float]:
    edges = [f for f in _FLOAT_EDGES if width == 64 or not math.isfinite(f) or abs(f) < 3.4e38]
    return st.one_of(st.sampled_from(edges), st.floats(width=width))


def texts(huge: bool) -> st.SearchStrategy[str]:
    """Strings: special ones, path-like ones, any unicode, and (where a message can take it) 1 MiB."""
    special = (*STRINGS, *PATHS, *(("a" * HUGE,) if huge else ()))
    return st.one_of(st.sampled_from(special), st.text(st.characters(codec="utf-8"), max_size=40))


def binaries(huge: bool) -> st.SearchStrategy[bytes]:
    special = (b"", b"\x00", b"\xff" * 7, *((b"\x00" * HUGE,) if huge else ()))
    return st.one_of(st.sampled_from(special), st.binary(max_size=64))


def _realistic(realistic: Realistic, descriptor: Descriptor, fd: FieldDescriptor) -> st.SearchStrategy[Any] | None:
    return realistic.get(f"{descriptor.name}.{fd.name}", realistic.get(fd.name))


def _generic(fd: FieldDescriptor, realistic: Realistic, huge: bool, depth: int) -> st.SearchStrategy[Any]:
    """One value of a (non-repeated) field by its type alone."""
    if fd.type in _INT_RANGES:
        return integers(fd.type)
    if fd.type == _F.TYPE_ENUM:
        known = [value.number for value in fd.enum_type.values]
        return mostly(st.sampled_from(known), st.sampled_from([max(known) + 1, -1, 2**31 - 1, -(2**31)]))
    if fd.type in (_F.TYPE_DOUBLE, _F.TYPE_FLOAT):
        return floats(64 if fd.type == _F.TYPE_DOUBLE else 32)
    if fd.type == _F.TYPE_BOOL:
        return st.booleans()
    if fd.type == _F.TYPE_STRING:
        return texts(huge)
    if fd.type == _F.TYPE_BYTES:
        return binaries(huge)
    if fd.type == _F.TYPE_MESSAGE:
        return _messages(fd.message_type, realistic, huge, depth + 1)
    raise TypeError(f"no strategy for field {fd.full_name} of type {fd.type}")


def mostly(likely: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`likely` about four times in five. Why weights: hypothesis avoids repeating an example, so
    a realistic strategy with few values (one model name) would soon give way to the generic one
    (and st.one_of(a, a, a, a, b) does not weigh: about half a)."""
    return st.sampled_from([True] * 4 + [False]).flatmap(lambda take: likely if take else other)


def _value(descriptor: Descriptor, fd: FieldDescriptor, realistic: Realistic, huge: bool, depth: int) -> st.SearchStrategy[Any]:
    """One value of a field: mostly the realistic ones, where the server knows some, else by type."""
    generic = _generic(fd, realistic, huge, depth)
    known = _realistic(realistic, descriptor, fd)
    return generic if known is None else mostly(known, generic)


def _field(descriptor: Descriptor, fd: FieldDescriptor, realistic: Realistic, huge: bool, depth: int) -> st.SearchStrategy[Any]:
    """What the message constructor takes for a field: a value, a list, or a dict for a map."""
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        key = _value(fd.message_type, fd.message_type.fields_by_name["key"], realistic, False, depth)
        value = _value(fd.message_type, fd.message_type.fields_by_name["value"], realistic, False, depth)
        return st.dictionaries(key, value, max_size=4)
    if not fd.is_repeated:
        return _value(descriptor, fd, realistic, huge, depth)
    item = _value(descriptor, fd, realistic, False, depth)  # no 1 MiB elements: a list of them would be GiBs
    known = _realistic(realistic, descriptor, fd)
    lists = st.one_of(st.just([]), st.lists(item, max_size=4), item.map(lambda v: [v] * OVERSIZED))
    return lists if known is None else mostly(st.lists(known, min_size=1, max_size=4, unique=True), lists)


def _in_oneof(fd: FieldDescriptor) -> bool:
    """In a real oneof, not the one-field oneof that proto3 `optional` makes (named _<field>)."""
    oneof = fd.containing_oneof
    return oneof is not None and oneof.name != f"_{fd.name}"


@st.composite
def _oneof_member(draw: st.DrawFn, options: list[tuple[str, st.SearchStrategy[Any]]]) -> dict[str, Any]:
    index = draw(st.integers(-1, len(options) - 1))  # -1: none set
    return {} if index < 0 else {options[index][0]: draw(options[index][1])}


def _messages(descriptor: Descriptor, realistic: Realistic, huge: bool, depth: int) -> st.SearchStrategy[Message]:
    message_class: type[Message] = message_factory.GetMessageClass(descriptor)
    whole = realistic.get(descriptor.name)  # a consistent whole message (e.g. an image with its pixels)
    if depth > 3:
        return st.just(message_class())
    plain = {fd.name: _maybe(descriptor, fd, realistic, huge, depth) for fd in descriptor.fields if not _in_oneof(fd)}
    oneofs = [_oneof_member([(fd.name, _field(descriptor, fd, realistic, huge, depth)) for fd in oneof.fields])
              for oneof in descriptor.oneofs if _in_oneof(oneof.fields[0])]
    parts = st.tuples(st.fixed_dictionaries(plain), *oneofs)
    built = parts.map(lambda dicts: message_class(**{k: v for d in dicts for k, v in d.items() if v is not _UNSET}))
    return built if whole is None else mostly(whole, built)


def _maybe(descriptor: Descriptor, fd: FieldDescriptor, realistic: Realistic, huge: bool, depth: int) -> st.SearchStrategy[Any]:
    """A field's value or _UNSET: half the time for a field the server has no realistic values
    for, one time in five for one it has (the request should mostly get past its checks)."""
    value, unset = _field(descriptor, fd, realistic, huge, depth), st.just(_UNSET)
    return st.one_of(unset, value) if _realistic(realistic, descriptor, fd) is None else mostly(value, unset)


def _kept(fd: FieldDescriptor, value: Any) -> Any:
    """A field value of a message as its constructor takes it again."""
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        return dict(value)
    return list(value) if fd.is_repeated else value


def _change(descriptor: Descriptor, fd: FieldDescriptor, realistic: Realistic) -> st.SearchStrategy[Any]:
    """A changed value of a base request's field: a scalar's half the time by its type alone
    (the edge values are what a change of one field is for), else as any other field's."""
    value = _field(descriptor, fd, realistic, True, 0)
    return value if fd.message_type is not None else st.one_of(value, _field(descriptor, fd, {}, True, 0))


def _varied(base: Message, realistic: Realistic) -> st.SearchStrategy[Message]:
    """`base` with some of its fields changed: each set field kept four times in five, each
    unset one left unset as often, so most examples differ from a valid request in a field or two."""
    descriptor, kept = base.DESCRIPTOR, {fd.name: _kept(fd, value) for fd, value in base.ListFields()}
    fields = {fd.name: mostly(st.just(kept[fd.name]) if fd.name in kept else st.just(_UNSET), _change(descriptor, fd, realistic))
              for fd in descriptor.fields}
    return st.fixed_dictionaries(fields).map(
        lambda values: type(base)(**{k: v for k, v in values.items() if v is not _UNSET})
    )


def messages(message_class: type[Message], realistic: Realistic | None = None,
             base: Message | None = None) -> st.SearchStrategy[Message]:
    """Requests of `message_class`: every field by its type, mixed with `realistic` values;
    mostly variations of `base` (a valid request, so that the examples get deep), if given."""
    built = _messages(message_class.DESCRIPTOR, realistic or {}, True, 0)
    return built if base is None else mostly(_varied(base, realistic or {}), built)


# ---- image files and their mutations ----


def encode(pixels: np.ndarray, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


# (offset, size) of header fields: PNG's IHDR length, width, height, bit depth and colour type and
# the next chunk's length; WebP's RIFF size, first chunk size, VP8 frame tag and width and height.
_PNG_FIELDS = [(8, 4), (16, 4), (20, 4), (24, 1), (25, 1), (33, 4)]
_WEBP_FIELDS = [(4, 4), (16, 4), (21, 3), (26, 2), (28, 2)]


def _jpeg_fields(data: bytes) -> list[tuple[int, int]]:
    """The SOF segment's length, precision, height, width and component count, and the DQT's length."""
    sof = next((i for i in range(2, len(data) - 10) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2)), 2)
    dqt = max(data.find(b"\xff\xdb"), 0)
    return [(sof + 2, 2), (sof + 4, 1), (sof + 5, 2), (sof + 7, 2), (sof + 9, 1), (dqt + 2, 2)]


def header_fields(data: bytes) -> list[tuple[int, int]]:
    """Where the header fields of a PNG, JPEG or WebP file are (nothing for other bytes)."""
    fields = (_PNG_FIELDS if data.startswith(b"\x89PNG") else _WEBP_FIELDS if data.startswith(b"RIFF")
              else _jpeg_fields(data) if data.startswith(b"\xff\xd8") else [])
    return [(offset, size) for offset, size in fields if offset + size <= len(data)]


def fix_png_crc(data: bytearray) -> None:
    """Recompute IHDR's CRC, so a changed header field is read, not refused as a broken chunk."""
    if data.startswith(b"\x89PNG") and len(data) >= 33:
        length = struct.unpack(">I", data[8:12])[0]
        if length == 13:
            data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))


@st.composite
def mutation(draw: st.DrawFn, data: bytearray) -> None:
    """One change to an image file, in place: a bit flip, a truncation, a header field set to an
    edge value, bytes inserted, deleted or a slice repeated."""
    kind = draw(st.sampled_from(["flip", "truncate", "header", "insert", "delete", "repeat"]))
    if not data:
        data.extend(draw(st.binary(min_size=1, max_size=16)))
        return
    at = draw(st.integers(0, len(data) - 1))
    if kind == "flip":
        data[at] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del data[at:]
    elif kind == "header" and header_fields(data):
        offset, size = draw(st.sampled_from(header_fields(data)))
        limit = 256**size - 1
        value = draw(st.one_of(st.sampled_from([0, 1, 2, 3, limit, limit // 2, limit // 2 + 1, 50_000 % (limit + 1)]),
                               st.integers(0, limit)))
        data[offset : offset + size] = value.to_bytes(size, "big" if not data.startswith(b"RIFF") else "little")
        if draw(st.booleans()):
            fix_png_crc(data)
    elif kind == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=32))
    elif kind == "delete":
        del data[at : at + draw(st.integers(1, 64))]
    else:
        data[at:at] = data[at : at + draw(st.integers(1, 64))] * draw(st.integers(1, 8))


@st.composite
def mutated(draw: st.DrawFn, bases: list[bytes]) -> bytes:
    """A valid image file from `bases` with up to three mutations (none: the valid file itself)."""
    data = bytearray(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(0, 3))):
        draw(mutation(data))
    return bytes(data)


def base_images(pixels: np.ndarray) -> list[bytes]:
    """Valid files to mutate: `pixels` (HxWx3 uint8) as PNG, JPEG (baseline and progressive) and
    WebP (lossy and lossless), and small odd ones (1x1, gray + alpha, palette, 16-bit)."""
    odd = np.arange(3 * 5 * 2, dtype=np.uint8).reshape(3, 5, 2)
    return [
        encode(pixels, "PNG"), encode(pixels, "JPEG", quality=80), encode(pixels, "JPEG", progressive=True),
        encode(pixels, "WEBP", quality=60), encode(pixels, "WEBP", lossless=True),
        encode(pixels[:1, :1], "PNG"), encode(odd, "PNG"), encode(pixels[:7, :9], "GIF"),
        encode((pixels[:, :, 0].astype(np.uint16) * 257), "PNG"),
    ]

"""The one converter between the vocabulary (spurguard.vocab) and the proto messages, each way.

Both sides use it: the client to build requests and read results, the server's rpc layer to
read requests and build results. It works by name, so a field added to a message and to its
dataclass needs no converter code:
- a dataclass is the message of the same name (one exception, `_MESSAGES`) and each field the
  message's field of the same name; a field the message lacks comes from the enclosing message
  (`job_id` of a FitUpdate for its FitProgress, `component` of a VisualizeUpdate);
- enum values are their lowercase names ("not_spurious"); a zero `*_DEFAULT` / `*_UNSPECIFIED`
  is None; optional fields and unset messages are None; repeated fields are tuples;
- Timestamp is a datetime (UTC), Tensor a float32 numpy array, PngImage the PNG's bytes (its
  width and height are read from the PNG), ErrorStatus.code a status name.
A value the message cannot hold (an unknown enum name or number, an integer out of range)
raises ValueError naming the field (a value of the wrong type: TypeError); the server answers
a request's INVALID_ARGUMENT.
"""
from __future__ import annotations

import dataclasses
import functools
import struct
import typing
from datetime import datetime, timezone
from types import UnionType
from typing import Any, TypeVar, Union

import numpy as np
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from spurguard import vocab
from spurguard.v1 import spurguard_pb2 as pb
from spurguard.vocab.names import STATUS_CODES

_T = TypeVar("_T")
_M = TypeVar("_M", bound=Message)

_MESSAGES: dict[type, type[Message]] = {vocab.Components: pb.GetComponentsResponse}
_ENUM_ALIASES = {"HEATMAP_NONE": "none"}  # the proto's prefix keeps NONE apart from proto keywords
_DEFAULT_SUFFIXES = ("_DEFAULT", "_UNSPECIFIED")
_STATUS_NUMBERS = {name: number for number, name in enumerate(STATUS_CODES)}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def message_type(cls: type) -> type[Message]:
    """The message class a vocabulary dataclass travels as."""
    return _MESSAGES.get(cls) or getattr(pb, cls.__name__)


# ---- enums ----


def _enum_name(enum: EnumDescriptor, number: int, where: str) -> str | None:
    value = enum.values_by_number.get(number)
    if value is None:
        raise ValueError(f"{where}: unknown {enum.name} value {number}")
    if number == 0 and value.name.endswith(_DEFAULT_SUFFIXES):
        return None
    return _ENUM_ALIASES.get(value.name, value.name.lower())


@functools.cache
def _enum_numbers(enum: EnumDescriptor) -> dict[str | None, int]:
    numbers: dict[str | None, int] = {}
    for value in enum.values:
        numbers[_enum_name(enum, value.number, enum.name)] = value.number
    return numbers


def _enum_number(enum: EnumDescriptor, name: str | None, where: str) -> int:
    numbers = _enum_numbers(enum)
    if name not in numbers:
        allowed = ", ".join(n for n in numbers if n is not None)
        allowed += " or None" if None in numbers else ""
        raise ValueError(f"{where} must be one of {allowed}; got {name!r}")
    return numbers[name]


# ---- special message types ----


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header chunk."""
    if data[:8] != _PNG_SIGNATURE or len(data) < 24:
        raise ValueError("not a PNG image")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _tensor_to_array(tensor: pb.Tensor) -> np.ndarray:
    shape = tuple(int(n) for n in tensor.shape)
    if len(tensor.data) != 4 * int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"tensor of shape {shape} has {len(tensor.data)} bytes")
    return np.frombuffer(tensor.data, dtype="<f4").astype(np.float32).reshape(shape)


def _array_to_tensor(array: np.ndarray) -> pb.Tensor:
    data = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(data=data.tobytes(), shape=list(data.shape))


def _timestamp(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


# (message -> Python, Python -> message) for messages that are a plain value in the vocabulary
_VALUES: dict[str, tuple[Any, Any]] = {
    Timestamp.DESCRIPTOR.full_name: (lambda m: m.ToDatetime(tzinfo=timezone.utc), _timestamp),
    pb.Tensor.DESCRIPTOR.full_name: (_tensor_to_array, _array_to_tensor),
    pb.PngImage.DESCRIPTOR.full_name: (
        lambda m: m.data,
        lambda data: pb.PngImage(data=data, width=_png_size(data)[0], height=_png_size(data)[1]),
    ),
}
# scalar fields whose vocabulary value is another spelling: (message, field) -> (from, to)
_SCALARS: dict[tuple[str, str], tuple[Any, Any]] = {
    (pb.ErrorStatus.DESCRIPTOR.full_name, "code"): (
        lambda number: STATUS_CODES[number] if 0 <= number < len(STATUS_CODES) else f"CODE_{number}",
        lambda name: _STATUS_NUMBERS[name],
    ),
}


# ---- dataclass field types ----


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds: `X`, `X | None` and `tuple[X, ...]` give X."""
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    origin = typing.get_origin(hint)
    if origin in (Union, UnionType, tuple):
        for arg in typing.get_args(hint):
            found = _dataclass_in(arg)
            if found is not None:
                return found
    return None


# ---- message -> vocabulary ----


def from_message(message: Message, cls: type[_T], inherited: Message | None = None) -> _T:
    """The `cls` dataclass of `message`; fields `message` lacks are read from `inherited`."""
    descriptor: Descriptor = message.DESCRIPTOR
    values: dict[str, Any] = {}
    hints = _field_types(cls)
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        fd = descriptor.fields_by_name.get(field.name)
        if fd is None:
            if inherited is None or field.name not in inherited.DESCRIPTOR.fields_by_name:
                raise TypeError(f"{cls.__name__}.{field.name} is in no message field of {descriptor.full_name}")
            values[field.name] = getattr(inherited, field.name)
            continue
        values[field.name] = _read_field(message, fd, hints[field.name])
    return cls(**values)


def _read_field(message: Message, fd: FieldDescriptor, hint: Any) -> Any:
    where = f"{message.DESCRIPTOR.name}.{fd.name}"
    raw = getattr(message, fd.name)
    if fd.message_type is not None:
        if not fd.is_repeated and not message.HasField(fd.name):
            return None
        items = raw if fd.is_repeated else [raw]
        special = _VALUES.get(fd.message_type.full_name)
        if special is not None:
            converted = [special[0](item) for item in items]
        else:
            cls = _dataclass_in(hint)
            if cls is None:
                raise TypeError(f"{where}: no dataclass in the field's type {hint}")
            converted = [from_message(item, cls, message) for item in items]
        return tuple(converted) if fd.is_repeated else converted[0]
    if fd.has_presence and not fd.is_repeated and not message.HasField(fd.name):
        return None
    items = list(raw) if fd.is_repeated else [raw]
    if fd.enum_type is not None:
        items = [_enum_name(fd.enum_type, item, where) for item in items]
    spelling = _SCALARS.get((message.DESCRIPTOR.full_name, fd.name))
    if spelling is not None:
        items = [spelling[0](item) for item in items]
    return tuple(items) if fd.is_repeated else items[0]


def from_update(message: Message, union: Any) -> Any:
    """The member of `union` (e.g. vocab.FitUpdate) that a oneof envelope message carries."""
    (oneof,) = message.DESCRIPTOR.oneofs
    kind = message.WhichOneof(oneof.name)
    if kind is None:
        raise ValueError(f"{message.DESCRIPTOR.name} carries none of its {oneof.name} fields")
    inner = getattr(message, kind)
    for cls in typing.get_args(union):
        if message_type(cls).DESCRIPTOR is inner.DESCRIPTOR:
            return from_message(inner, cls, message)
    raise TypeError(f"{message.DESCRIPTOR.name}.{kind} is no member of {union}")


# ---- vocabulary -> message ----


def to_message(value: Any, cls: type[_M] | None = None) -> _M:
    """The message of a vocabulary dataclass (`cls`: its message type, if not the default).

    Fields the message lacks are left to the enclosing message (see `to_update`).
    """
    message = (cls or message_type(type(value)))()
    for field in dataclasses.fields(value):
        fd = message.DESCRIPTOR.fields_by_name.get(field.name)
        item = getattr(value, field.name)
        if fd is not None and item is not None:
            _write_field(message, fd, item)
    return message  # type: ignore[return-value]


def _write_field(message: Message, fd: FieldDescriptor, value: Any) -> None:
    where = f"{message.DESCRIPTOR.name}.{fd.name}"
    items = list(value) if fd.is_repeated else [value]
    if fd.message_type is not None:
        special = _VALUES.get(fd.message_type.full_name)
        converted = [special[1](item) if special else to_message(item, _message_class(fd)) for item in items]
        if fd.is_repeated:
            getattr(message, fd.name).extend(converted)
        else:
            getattr(message, fd.name).CopyFrom(converted[0])
        return
    if fd.enum_type is not None:
        items = [_enum_number(fd.enum_type, item, where) for item in items]
    spelling = _SCALARS.get((message.DESCRIPTOR.full_name, fd.name))
    if spelling is not None:
        items = [spelling[1](item) for item in items]
    try:
        if fd.is_repeated:
            getattr(message, fd.name).extend(items)
        else:
            setattr(message, fd.name, items[0])
    except (ValueError, TypeError) as error:  # e.g. an integer out of the field's range
        raise type(error)(f"{where}: {error}") from None


def _message_class(fd: FieldDescriptor) -> type[Message]:
    return getattr(pb, fd.message_type.name)


def to_update(value: Any, envelope: type[_M]) -> _M:
    """A oneof envelope (e.g. pb.FitUpdate) carrying `value`, with the envelope's own fields
    (job_id, component) taken from `value`."""
    (oneof,) = envelope.DESCRIPTOR.oneofs
    inner = to_message(value)
    message = envelope()
    for fd in envelope.DESCRIPTOR.fields:
        if fd.containing_oneof is oneof:
            if fd.message_type is inner.DESCRIPTOR:
                getattr(message, fd.name).CopyFrom(inner)
        else:
            _write_field(message, fd, getattr(value, fd.name))
    if message.WhichOneof(oneof.name) is None:
        raise TypeError(f"{type(value).__name__} fits none of {envelope.DESCRIPTOR.name}.{oneof.name}")
    return message

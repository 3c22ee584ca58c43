"""The one converter between the vocabulary (spurguard.vocab) and the proto messages, each way.

Both sides use it: the client to build requests and read results, the server's rpc layer to
read requests and build results. It works by name, so a field added to a message and to its
dataclass needs no converter code:
- a dataclass is the message of the same name (the exceptions: `_MESSAGES`) and each field the
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
from collections.abc import Callable
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

_MESSAGES: dict[type, type[Message]] = {vocab.Components: pb.GetComponentsResponse,
                                       vocab.LabelList: pb.ListLabelsResponse}
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
# Each (message type, dataclass) pair gets a reader compiled once: a list of field readers, so
# converting a result costs a few dict lookups per field, not a walk over descriptors and hints.

_Read = Callable[[Message, Message | None], Any]


def _scalar_reader(descriptor: Descriptor, fd: FieldDescriptor) -> Callable[[Any], Any]:
    """Raw value -> vocabulary value for one scalar field (enums by name, special spellings)."""
    where = f"{descriptor.name}.{fd.name}"
    if fd.enum_type is not None:
        enum = fd.enum_type
        names = {value.number: _enum_name(enum, value.number, where) for value in enum.values}

        def enum_name(number: int) -> str | None:
            return names[number] if number in names else _enum_name(enum, number, where)  # the latter raises

        return enum_name
    spelling = _SCALARS.get((descriptor.full_name, fd.name))
    return spelling[0] if spelling is not None else (lambda raw: raw)


def _field_reader(descriptor: Descriptor, fd: FieldDescriptor, hint: Any) -> _Read:
    name = fd.name
    if fd.message_type is not None:
        special = _VALUES.get(fd.message_type.full_name)
        if special is not None:
            item: Callable[[Message, Message], Any] = lambda sub, _parent, convert=special[0]: convert(sub)
        else:
            cls = _dataclass_in(hint)
            if cls is None:
                raise TypeError(f"{descriptor.name}.{name}: no dataclass in the field's type {hint}")
            read = _reader(getattr(pb, fd.message_type.name), cls)
            item = lambda sub, parent: read(sub, parent)  # noqa: E731
        if fd.is_repeated:
            return lambda m, _inherited: tuple(item(sub, m) for sub in getattr(m, name))
        return lambda m, _inherited: item(getattr(m, name), m) if m.HasField(name) else None
    convert = _scalar_reader(descriptor, fd)
    if fd.is_repeated:
        return lambda m, _inherited: tuple(convert(raw) for raw in getattr(m, name))
    if fd.has_presence:
        return lambda m, _inherited: convert(getattr(m, name)) if m.HasField(name) else None
    return lambda m, _inherited: convert(getattr(m, name))


def _inherited_reader(cls: type, descriptor: Descriptor, name: str) -> _Read:
    def read(_message: Message, inherited: Message | None) -> Any:
        if inherited is None or name not in inherited.DESCRIPTOR.fields_by_name:
            raise TypeError(f"{cls.__name__}.{name} is in no message field of {descriptor.full_name}")
        return getattr(inherited, name)

    return read


@functools.cache
def _reader(message_class: type[Message], cls: type) -> _Read:
    descriptor = message_class.DESCRIPTOR
    hints = typing.get_type_hints(cls)
    fields = [
        (field.name, _field_reader(descriptor, descriptor.fields_by_name[field.name], hints[field.name])
         if field.name in descriptor.fields_by_name else _inherited_reader(cls, descriptor, field.name))
        for field in dataclasses.fields(cls)  # type: ignore[arg-type]
    ]
    return lambda message, inherited: cls(**{name: read(message, inherited) for name, read in fields})


def from_message(message: Message, cls: type[_T], inherited: Message | None = None) -> _T:
    """The `cls` dataclass of `message`; fields `message` lacks are read from `inherited`."""
    return _reader(type(message), cls)(message, inherited)  # type: ignore[no-any-return]


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
# Likewise compiled once per (dataclass, message type): the message is built by one constructor
# call from converted keyword arguments, the fastest way protobuf offers.

_Write = Callable[[Any], Any]


def _field_writer(descriptor: Descriptor, fd: FieldDescriptor) -> _Write:
    """Vocabulary value -> what the message constructor takes for one field."""
    where = f"{descriptor.name}.{fd.name}"
    if fd.message_type is not None:
        special = _VALUES.get(fd.message_type.full_name)
        if special is not None:
            item: _Write = special[1]
        else:
            message_class: type[Message] = getattr(pb, fd.message_type.name)
            item = lambda value: to_message(value, message_class)  # noqa: E731
    elif fd.enum_type is not None:
        enum = fd.enum_type
        item = lambda name: _enum_number(enum, name, where)  # noqa: E731
    else:
        spelling = _SCALARS.get((descriptor.full_name, fd.name))
        item = spelling[1] if spelling is not None else (lambda value: value)
    if fd.is_repeated:
        return lambda values: [item(value) for value in values]
    return item


@functools.cache
def _writer(cls: type, message_class: type[Message]) -> Callable[[Any], Message]:
    descriptor = message_class.DESCRIPTOR
    fields = [
        (field.name, _field_writer(descriptor, descriptor.fields_by_name[field.name]))
        for field in dataclasses.fields(cls)  # type: ignore[arg-type]
        if field.name in descriptor.fields_by_name  # the others travel in the enclosing message
    ]

    def write(value: Any) -> Message:
        values = {name: convert(item) for name, convert in fields if (item := getattr(value, name)) is not None}
        try:
            return message_class(**values)
        except (ValueError, TypeError) as error:  # e.g. an integer out of its field's range
            raise _field_error(message_class, values, error) from None

    return write


def _field_error(message_class: type[Message], values: dict[str, Any], error: Exception) -> Exception:
    """The constructor's error again, naming the field that caused it."""
    for name, value in values.items():
        try:
            message_class(**{name: value})
        except (ValueError, TypeError) as field_error:
            return type(field_error)(f"{message_class.DESCRIPTOR.name}.{name}: {field_error}")
    return error


def to_message(value: Any, cls: type[_M] | None = None) -> _M:
    """The message of a vocabulary dataclass (`cls`: its message type, if not the default).

    Fields the message lacks are left to the enclosing message (see `to_update`).
    """
    return _writer(type(value), cls or message_type(type(value)))(value)  # type: ignore[return-value]


def to_update(value: Any, envelope: type[_M]) -> _M:
    """A oneof envelope (e.g. pb.FitUpdate) carrying `value`, with the envelope's own fields
    (job_id, component) taken from `value`."""
    (oneof,) = envelope.DESCRIPTOR.oneofs
    inner = to_message(value)
    fields: dict[str, Any] = {}
    for fd in envelope.DESCRIPTOR.fields:
        if fd.containing_oneof is oneof:
            if fd.message_type is inner.DESCRIPTOR:
                fields[fd.name] = inner
        else:
            fields[fd.name] = _field_writer(envelope.DESCRIPTOR, fd)(getattr(value, fd.name))
    if len(fields) == len(envelope.DESCRIPTOR.fields) - len(oneof.fields):
        raise TypeError(f"{type(value).__name__} fits none of {envelope.DESCRIPTOR.name}.{oneof.name}")
    return envelope(**fields)

"""spurguard.wire: every vocabulary type survives a trip through its message, the vocabulary's
names are the proto's, and values a message cannot hold are errors that name the field."""
from __future__ import annotations

import dataclasses
import random
import struct
import typing
import zlib
from datetime import datetime, timezone
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import grpc
import numpy as np
import pytest

from spurguard import vocab, wire
from spurguard.v1 import spurguard_pb2 as pb


def _png(width: int, height: int) -> bytes:
    """A minimal valid PNG header (the converter reads only IHDR's size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def _sample(hint: Any, rng: random.Random, field: str) -> Any:
    """A random value of a field's type, never None where None is allowed (None is tested apart)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        return _sample(next(a for a in args if a is not type(None)), rng, field)
    if origin is Literal:
        return rng.choice(args)
    if origin is tuple:
        return tuple(_sample(args[0], rng, field) for _ in range(rng.randint(1, 3)))
    if dataclasses.is_dataclass(hint):
        return _instance(hint, rng)
    if hint is bool:
        return rng.random() < 0.5
    if hint is int:
        return rng.randint(0, 1000)
    if hint is float:
        return rng.uniform(-5, 5)
    if hint is str:
        return rng.choice(vocab.STATUS_CODES) if field == "code" else f"{field}-{rng.randint(0, 99)}"
    if hint is bytes:
        return _png(rng.randint(1, 64), rng.randint(1, 64))
    if hint is datetime:
        return datetime.fromtimestamp(rng.randint(0, 2**31), tz=timezone.utc)
    if hint is np.ndarray:
        return np.asarray(np.random.default_rng(rng.randint(0, 99)).normal(size=(2, 3)), np.float32)
    raise AssertionError(f"no sample for {hint}")


def _instance(cls: type, rng: random.Random) -> Any:
    hints = typing.get_type_hints(cls)
    value = cls(**{f.name: _sample(hints[f.name], rng, f.name) for f in dataclasses.fields(cls)})
    if cls is vocab.Job:  # a job's progress and summary carry the job's own id (the message has it once)
        same = {"job_id": value.job_id}
        value = dataclasses.replace(value, progress=dataclasses.replace(value.progress, **same),
                                    summary=dataclasses.replace(value.summary, **same),
                                    transfer_summary=dataclasses.replace(value.transfer_summary, **same))
    return value


def _vocabulary_types() -> list[type]:
    return [getattr(vocab, name) for name in vocab.__all__
            if dataclasses.is_dataclass(getattr(vocab, name)) and isinstance(getattr(vocab, name), type)]


def _equal(a: Any, b: Any) -> bool:
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(_equal(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


ENVELOPES = {vocab.FitUpdate: pb.FitUpdate, vocab.TransferUpdate: pb.TransferUpdate,
             vocab.VisualizeUpdate: pb.VisualizeUpdate, vocab.EvaluateUpdate: pb.EvaluateUpdate}
INSIDE_ENVELOPES = {cls for union in ENVELOPES for cls in get_args(union)}


@pytest.mark.parametrize("cls", _vocabulary_types(), ids=lambda cls: cls.__name__)
def test_every_type_round_trips_through_its_message(cls: type) -> None:
    rng = random.Random(cls.__name__)
    for _ in range(5):
        value = _instance(cls, rng)
        if cls in INSIDE_ENVELOPES:  # its envelope carries job_id / component
            union = next(union for union in ENVELOPES if cls in get_args(union))
            back = wire.from_update(wire.to_update(value, ENVELOPES[union]), union)
        elif cls is vocab.FitProgress or cls is vocab.FitSummary:
            continue  # covered through FitUpdate
        else:
            back = wire.from_message(wire.to_message(value), cls)
        assert _equal(back, value), (value, back)


def test_unset_fields_come_back_as_none() -> None:
    result = wire.from_message(pb.ScoreResult(image_id="x"), vocab.ScoreResult)
    assert (result.error, result.bias_term, result.residual, result.spufix) == (None, None, None, None)
    request = wire.from_message(pb.VisualizeRequest(model="m", components=[1]), vocab.VisualizeRequest)
    assert (request.steps, request.eps, request.seed, request.heatmap, request.fit_id) == (None,) * 5
    assert wire.to_message(vocab.ScoreOptions()) == pb.ScoreOptions()  # None: left unset, the server's default


def test_png_sizes_are_read_from_the_png() -> None:
    message = wire.to_message(vocab.AttackFrame(0, 1, 0.5, 0.25, _png(17, 9)))
    assert (message.png.width, message.png.height) == (17, 9)
    with pytest.raises(ValueError, match="not a PNG"):
        wire.to_message(vocab.AttackFrame(0, 1, 0.5, 0.25, b"not a png"))


def test_vocabulary_names_are_the_protos() -> None:
    def names(enum: Any) -> set[str]:
        return {v.name for v in enum.DESCRIPTOR.values if not v.name.endswith(("_DEFAULT", "_UNSPECIFIED"))}

    assert {label.upper() for label in vocab.LABELS} == names(pb.ComponentLabel)
    assert {mode.upper() for mode in vocab.SPUFIX_MODES} == names(pb.SpufixMode)
    assert {method.upper() for method in vocab.HEATMAP_METHODS} == names(pb.HeatmapMethod) - {"HEATMAP_NONE"} | {"NONE"}
    assert {state.upper() for state in get_args(vocab.JobStateName)} == names(pb.JobState)
    assert vocab.STATUS_CODES == tuple(code.name for code in sorted(grpc.StatusCode, key=lambda c: c.value[0]))


def test_values_a_message_cannot_hold_name_their_field() -> None:
    with pytest.raises(ValueError, match=r"^ScoreOptions.spufix must be one of paper, floor or None; got 'nope'"):
        wire.to_message(vocab.ScoreOptions(spufix="nope"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^ScoreOptions.top: .*out of range"):
        wire.to_message(vocab.ScoreOptions(top=2**32))
    with pytest.raises(ValueError, match=r"^ScoreOptions.spufix: unknown SpufixMode value 7"):
        wire.from_message(pb.ScoreOptions(spufix=7), vocab.ScoreOptions)  # e.g. a newer client's mode
    with pytest.raises(ValueError, match="carries none"):
        wire.from_update(pb.FitUpdate(job_id="j"), vocab.FitUpdate)

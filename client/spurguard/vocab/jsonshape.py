"""The `--json` shape of every result (SPEC §3), in one place.

A result's JSON is its fields by name, with two keys spelled as SPEC spells them ("class" for
`class_index`, "image" for `image_id`); PNG bytes stay out (the CLI writes them as files),
arrays are lists, times ISO 8601. Three shapes are the contract's own: a failed
image is {image, error}, a component has a "source" only when it was transferred from another
model, and an evaluation puts its baseline table at the top level beside "spufix": {mode, ...}. NaN and infinities become null, because JSON has neither (an AUC of a
class without negatives, for example).
"""
from __future__ import annotations

import dataclasses
import math
from datetime import datetime
from typing import Any

import numpy as np

from spurguard.vocab.results import ComponentAlpha, EvaluateResult, ScoreResult

JSON_KEYS = {"class_index": "class", "image_id": "image"}


def to_json(value: Any) -> Any:
    """`value` (a result, or lists and dicts of them) as plain JSON-ready data."""
    if isinstance(value, ScoreResult) and value.error is not None:
        return {"image": value.image_id, "error": to_json(value.error)}
    if isinstance(value, EvaluateResult):
        return _evaluation(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for field in dataclasses.fields(value):
            item = getattr(value, field.name)
            if isinstance(item, bytes) or (isinstance(value, ScoreResult) and field.name == "error"):
                continue  # PNGs are files; a scored image has no error key
            if isinstance(value, ComponentAlpha) and field.name == "source" and not item:
                continue  # an own component names no source
            out[JSON_KEYS.get(field.name, field.name)] = to_json(item)
        return out
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    if isinstance(value, np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _evaluation(result: EvaluateResult) -> dict[str, Any]:
    """`evaluate --json`: the baseline's fields, "spufix": {mode, ...same fields}, the model,
    the fit, the set sizes and the kept copy's id."""
    out = to_json(result.baseline)
    if result.spufix is not None:
        out["spufix"] = {"mode": result.spufix_mode, **to_json(result.spufix)}
    out.update(
        model=result.model,
        fit_id=result.fit_id,
        clean_images=result.clean_images,
        spurious_images=result.spurious_images,
        skipped_images=result.skipped_images,
        evaluation_id=result.evaluation_id,
        directions=result.directions,
        transfer_id=result.transfer_id,
        spurious_directions=to_json(result.spurious_directions),
    )
    return out

"""Pure formatting for the `spurguard` CLI: `--json` documents and human tables.

Kept apart from argument parsing and I/O so that every output shape is testable from the
client's dataclasses alone. JSON keys follow SPEC section 3 (the client's `to_dict()` where a
result has one); non-finite floats become null, because NaN is not JSON (an AUC of a class
without negatives, for example).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from spurguard.client import types as t

MISSING = "-"  # a table cell with no value


# ---- JSON ----


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def json_document(value: Any) -> str:
    """One indented JSON document (what a single-result command prints)."""
    return json.dumps(json_safe(value), indent=2, allow_nan=False)


def json_line(value: Any) -> str:
    """One compact JSON line (what streaming commands print, one per item)."""
    return json.dumps(json_safe(value), separators=(",", ":"), allow_nan=False)


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def model_to_dict(model: t.ModelInfo) -> dict[str, Any]:
    """A `models --json` entry; `classes` only when the server sent them (GetModel)."""
    out: dict[str, Any] = {
        "name": model.name,
        "num_classes": model.num_classes,
        "feature_dim": model.feature_dim,
        "input_size": model.input_size,
        "backend": model.backend,
        "device": model.device,
        "ready": model.ready,
        "supports_gradients": model.supports_gradients,
        "max_batch_size": model.max_batch_size,
        "digest": model.digest,
        "fit_id": model.fit_id,
        "fitted_classes": list(model.fitted_classes),
    }
    if model.classes:
        out["classes"] = [{"index": c.index, "name": c.name, "wnid": c.wnid} for c in model.classes]
    return out


def error_to_dict(error: t.ErrorInfo) -> dict[str, str]:
    """{code, message}: a failed job's error, and the --json document of a failed command."""
    return {"code": error.code, "message": error.message}


def fit_progress_to_dict(progress: t.FitProgress) -> dict[str, Any]:
    return {
        "phase": progress.phase,
        "images_done": progress.images_done,
        "images_total": progress.images_total,
        "classes_done": progress.classes_done,
        "classes_total": progress.classes_total,
        "elapsed_s": progress.elapsed_s,
    }


def fit_summary_to_dict(summary: t.FitSummary) -> dict[str, Any]:
    """`fit --json`: the committed fit."""
    return {
        "job_id": summary.job_id,
        "fit_id": summary.fit_id,
        "model": summary.model,
        "digest": summary.digest,
        "images": summary.images,
        "skipped_images": summary.skipped_images,
        "classes": [
            {"class": c.class_index, "images": c.images, "num_components": c.num_components}
            for c in summary.classes
        ],
        "elapsed_s": summary.elapsed_s,
    }


def job_to_dict(job: t.Job) -> dict[str, Any]:
    """`jobs --json` entries, and what `cancel` and `fit --detach` print."""
    request = job.request
    return {
        "job_id": job.job_id,
        "model": job.model,
        "state": job.state,
        "request": {
            "model": request.model,
            "dataset": request.dataset,
            "classes": list(request.classes),
            "num_components": request.num_components,
            "batch_size": request.batch_size,
            "extend": request.extend,
        },
        "progress": None if job.progress is None else fit_progress_to_dict(job.progress),
        "summary": None if job.summary is None else fit_summary_to_dict(job.summary),
        "error": None if job.error is None else error_to_dict(job.error),
        "created": _iso(job.created),
        "updated": _iso(job.updated),
    }


def label_to_dict(record: t.LabelRecord) -> dict[str, Any]:
    """`label --json`: the stored label."""
    return {
        "model": record.model,
        "fit_id": record.fit_id,
        "class": record.class_index,
        "component": record.component,
        "label": record.label,
        "note": record.note,
        "updated": _iso(record.updated),
    }


def components_to_dict(components: t.ClassComponents) -> dict[str, Any]:
    """`components --json`: SPEC's {model, class, images, components}, plus the fit's context."""
    out = components.to_dict()
    for entry, component in zip(out["components"], components.components):
        entry["note"] = component.note
    out.update(
        fit_id=components.fit_id,
        num_components=components.num_components,
        floor_percentile=components.floor_percentile,
        bias_term=components.bias_term,
    )
    return out


# ---- tables ----


def number(value: float | None, digits: int = 4) -> str:
    """A float in `digits` significant digits; MISSING for None or NaN."""
    if value is None or math.isnan(value):
        return MISSING
    return f"{value:.{digits}g}"


def fraction(value: float | None) -> str:
    """A probability or share in [0, 1], three decimals."""
    if value is None or math.isnan(value):
        return MISSING
    return f"{value:.3f}"


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> str:
    """Columns padded to their widest cell, two spaces apart; `right` are right-aligned columns."""
    body = [list(row) for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *body)]
    right_aligned = set(right)

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.rjust(width) if index in right_aligned else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(cells, widths))
        )
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers)] + [line(row) for row in body])


def index_ranges(indices: Sequence[int], limit: int = 40) -> str:
    """Sorted class indices as compact ranges ("0-2,5,7-9"), cut after `limit` characters."""
    parts: list[str] = []
    ordered = sorted(indices)
    start = 0
    while start < len(ordered):
        end = start
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        first, last = ordered[start], ordered[end]
        parts.append(str(first) if first == last else f"{first}-{last}")
        start = end + 1
    text = ",".join(parts)
    return text if len(text) <= limit else text[: limit - 1].rsplit(",", 1)[0] + ",…"


def class_names(classes: Sequence[t.ClassInfo], shown: int = 3) -> str:
    """The first `shown` class names and how many more, for a table cell or a hint."""
    if not classes:
        return MISSING
    names = ", ".join(c.name for c in classes[:shown])
    return names + (f", … (+{len(classes) - shown})" if len(classes) > shown else "")


def models_table(models: Sequence[t.ModelInfo]) -> str:
    if not models:
        return "no models loaded"
    rows = [
        [
            m.name,
            str(m.num_classes),
            str(m.feature_dim),
            str(m.input_size),
            m.backend,
            m.device,
            "yes" if m.ready else "no",
            f"{len(m.fitted_classes)} ({index_ranges(m.fitted_classes)})" if m.fitted_classes else MISSING,
            class_names(m.classes),
        ]
        for m in models
    ]
    headers = ["MODEL", "CLASSES", "FEATURE_DIM", "INPUT_SIZE", "BACKEND", "DEVICE", "READY", "FITTED_CLASSES", "NAMES"]
    return render_table(headers, rows, right=(1, 2, 3))


def components_table(components: t.ClassComponents) -> str:
    head = (
        f"model {components.model}  class {components.class_index}  fit {components.fit_id}  "
        f"images {components.images}  components {components.num_components}  "
        f"bias term {number(components.bias_term)}  floor: {number(components.floor_percentile)}th percentile"
    )
    rows = [
        [
            str(c.index),
            number(c.eigenvalue),
            f"{100 * c.explained_variance:.1f}%",
            number(c.alpha_mean),
            number(c.alpha_floor),
            number(c.alpha_max),
            c.label,
            c.note,
        ]
        for c in components.components
    ]
    headers = ["INDEX", "EIGENVALUE", "EXPLAINED", "ALPHA_MEAN", "ALPHA_FLOOR", "ALPHA_MAX", "LABEL", "NOTE"]
    return head + "\n" + render_table(headers, rows, right=range(6))


def label_line(record: t.LabelRecord) -> str:
    text = (
        f"model {record.model}  class {record.class_index}  component {record.component}: "
        f"{record.label}  (fit {record.fit_id})"
    )
    return f"{text}  note: {record.note}" if record.note else text


def fit_summary_table(summary: t.FitSummary) -> str:
    head = (
        f"fit {summary.fit_id} committed for model {summary.model} (job {summary.job_id}): "
        f"{summary.images} images, {summary.skipped_images} skipped, "
        f"{len(summary.classes)} classes, {summary.elapsed_s:.1f} s"
    )
    rows = [[str(c.class_index), str(c.images), str(c.num_components)] for c in summary.classes]
    return head + "\n" + render_table(["CLASS", "IMAGES", "COMPONENTS"], rows, right=(0, 1, 2))


def _job_progress(job: t.Job) -> str:
    if job.progress is None:
        return MISSING
    p = job.progress
    return f"{p.phase} {p.images_done}/{p.images_total} images {p.classes_done}/{p.classes_total} classes"


def jobs_table(jobs: Sequence[t.Job]) -> str:
    if not jobs:
        return "no jobs"
    rows = [
        [
            job.job_id,
            job.model,
            job.state,
            _job_progress(job),
            MISSING if job.updated is None else job.updated.strftime("%Y-%m-%d %H:%M:%S"),
            (f"fit {job.summary.fit_id}" if job.summary else "")
            + (f"{job.error.code}: {job.error.message}" if job.error else ""),
        ]
        for job in jobs
    ]
    return render_table(["JOB", "MODEL", "STATE", "PROGRESS", "UPDATED", "RESULT"], rows)


def _top1(predictions: Sequence[t.Prediction]) -> str:
    return f"{predictions[0].name} ({predictions[0].prob:.3f})" if predictions else MISSING


def score_table(results: Sequence[t.ScoreResult]) -> str:
    """One row per image: top-1 with probability, trigger, spurious evidence, top-1 after SpuFix.

    A failed image's row names only its status code (the CLI prints the message on stderr), so
    one long message does not stretch the table.
    """
    rows = []
    for r in results:
        if r.error is not None:
            rows.append([r.image, f"error: {r.error.code}"] + [MISSING] * 4)
            continue
        top = r.predictions[0] if r.predictions else None
        rows.append(
            [
                r.image,
                MISSING if top is None else top.name,
                MISSING if top is None else fraction(top.prob),
                "yes" if r.trigger else "no",
                number(r.spurious_alpha),
                MISSING if r.spufix is None else _top1(r.spufix.predictions),
            ]
        )
    return render_table(["IMAGE", "PREDICTED", "PROB", "TRIGGER", "SPURIOUS_ALPHA", "SPUFIX"], rows, right=(2, 4))


_EVALUATE_COLUMNS = (
    ("AUC", "auc"),
    ("AP", "ap"),
    ("CLEAN_PROB", "clean_mean_prob"),
    ("SPURIOUS_PROB", "spurious_mean_prob"),
    ("CLEAN_PREDICTED", "clean_frac_predicted"),
    ("SPURIOUS_PREDICTED", "spurious_frac_predicted"),
)


def _pair(before: object, after: object | None, field: str) -> str:
    """`field` of `before` and, when there is a SpuFix row, of `after`: "0.630 → 0.763"."""
    text = fraction(getattr(before, field))
    return text if after is None else f"{text} → {fraction(getattr(after, field))}"


def evaluate_table(result: t.EvaluateResult) -> str:
    """The spurious score per class, each cell "without → with SpuFix"."""
    base, fixed = result.baseline, result.spufix
    fixed_rows = {c.class_index: c for c in fixed.classes} if fixed is not None else {}
    mode = f"with SpuFix ({result.spufix_mode})" if fixed is not None else "no SpuFix table"
    head = (
        f"spurious score  model {result.model}  fit {result.fit_id}  "
        f"{result.clean_images} clean, {result.spurious_images} spurious images"
        + (f", {result.skipped_images} unreadable left out" if result.skipped_images else "")
        + f"  (without → {mode})"
    )
    rows = [
        [str(c.class_index)] + [_pair(c, fixed_rows.get(c.class_index), field) for _, field in _EVALUATE_COLUMNS]
        for c in base.classes
    ]
    means = [_pair(base, fixed, "mean_auc"), _pair(base, fixed, "mean_ap")]
    rows.append(["mean", *means] + [""] * (len(_EVALUATE_COLUMNS) - len(means)))
    headers = ["CLASS"] + [header for header, _ in _EVALUATE_COLUMNS]
    tail = (
        f"clean accuracy {_pair(base, fixed, 'clean_accuracy')}; spurious images predicted as "
        f"their class {_pair(base, fixed, 'spurious_frac_predicted')}"
        + (f"\nkept in the server's store as evaluation {result.evaluation_id}" if result.evaluation_id else "")
    )
    return "\n".join([head, render_table(headers, rows, right=(0,)), tail])


def visualize_table(summary: dict[str, Any]) -> str:
    """Per component of a `visualize --json` summary: the attack's outcome and where the PNGs are."""
    rows = [
        [
            str(c["index"]),
            number(c["start_alpha"]),
            number(c["final_alpha"]),
            fraction(c["final_prob"]),
            str(len(c["top_images"])),
            c["attack_image"] or MISSING,
        ]
        for c in summary["components"]
    ]
    headers = ["COMPONENT", "START_ALPHA", "FINAL_ALPHA", "FINAL_PROB", "TOP_IMAGES", "ATTACK_IMAGE"]
    return f"model {summary['model']}  class {summary['class']}\n" + render_table(headers, rows, right=range(5))

"""Pure formatting for the `spurguard` CLI: `--json` documents and human tables.

Kept apart from argument parsing and I/O so that every output shape is testable from the
vocabulary's dataclasses alone. The JSON shapes themselves are spurguard.vocab.jsonshape's.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

from spurguard import vocab as t
from spurguard.vocab import to_json

MISSING = "-"  # a table cell with no value
# Relative size below which a value is rounding: float32 alphas and their float64 sums agree to
# about 1e-7 of the alphas' size.
ROUNDING = 1e-6


# ---- JSON ----


def json_document(value: Any) -> str:
    """One indented JSON document (what a single-result command prints): results in their
    `--json` shape (spurguard.vocab.to_json)."""
    return json.dumps(to_json(value), indent=2, allow_nan=False)


def json_line(value: Any) -> str:
    """One compact JSON line (what streaming commands print, one per item)."""
    return json.dumps(to_json(value), separators=(",", ":"), allow_nan=False)


# ---- tables ----


def number(value: float | None, digits: int = 4, *, scale: float = 0.0) -> str:
    """A float in `digits` significant digits; MISSING for None or NaN. A value that is zero up to
    rounding, next to `scale` (the size of the numbers it was computed from), prints as 0, and so
    does -0: a mean of centred alphas is 0 exactly and must not show as 1.2e-17 or -0."""
    if value is None or math.isnan(value):
        return MISSING
    if abs(value) <= ROUNDING * abs(scale):
        return "0"
    return f"{value:.{digits}g}"


def alpha_statistics(component: t.Component) -> tuple[str, str, str]:
    """A component's alpha mean, floor and max as shown; the mean, 0 in exact arithmetic (alphas
    are centred on the fit images), is measured against the spread of the others."""
    c = component
    scale = max(abs(c.alpha_floor), abs(c.alpha_max))
    return number(c.alpha_mean, scale=scale), number(c.alpha_floor), number(c.alpha_max)


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
            m.runtime or MISSING,
            m.device,
            "yes" if m.ready else "no",
            f"{len(m.fitted_classes)} ({index_ranges(m.fitted_classes)})" if m.fitted_classes else MISSING,
            class_names(m.classes),
        ]
        for m in models
    ]
    headers = ["MODEL", "CLASSES", "FEATURE_DIM", "INPUT_SIZE", "BACKEND", "RUNTIME", "DEVICE", "READY", "FITTED_CLASSES",
               "NAMES"]
    transfers = [transfer_line(m.name, m.transfer) for m in models if m.transfer is not None]
    return "\n".join([render_table(headers, rows, right=(1, 2, 3)), *transfers])


def transfer_line(model: str, transfer: t.TransferInfo) -> str:
    """Which transfer a model applies and from which labels: they do not follow the source's relabelling."""
    labels = ", ".join(f"{r.class_index}/{r.component}" for r in transfer.labels)
    when = "" if transfer.created is None else f", made {transfer.created:%Y-%m-%d %H:%M}"
    return (f"{model} applies transfer {transfer.transfer_id} from {transfer.source_model} (fit {transfer.source_fit}, "
            f"spurious class/component {labels}{when})")


def components_table(components: t.Components) -> str:
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
            *alpha_statistics(c),
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
    text += f"  by {record.author}" if record.author else ""
    return f"{text}  note: {record.note}" if record.note else text


def fit_summary_table(summary: t.FitSummary) -> str:
    head = (
        f"fit {summary.fit_id} committed for model {summary.model} (job {summary.job_id}): "
        f"{summary.images} images, {summary.skipped_images} skipped, "
        f"{len(summary.classes)} classes, {summary.elapsed_s:.1f} s"
    )
    rows = [[str(c.class_index), str(c.images), str(c.num_components)] for c in summary.classes]
    table = head + "\n" + render_table(["CLASS", "IMAGES", "COMPONENTS"], rows, right=(0, 1, 2))
    return table + _label_carry(summary)


def _label_carry(summary: t.FitSummary) -> str:
    """What the refit did with the replaced fit's labels; the ones left behind one line each."""
    if not summary.labels_from_fit:
        return ""
    text = (f"\nlabels of fit {summary.labels_from_fit}: {len(summary.labels_carried)} carried to the matching "
            f"component, {len(summary.labels_not_carried)} not carried")
    for lost in summary.labels_not_carried:
        text += f"\n  not carried: class {lost.class_index} component {lost.component} {lost.label}: {lost.reason}"
    return text


def transfer_summary_table(summary: t.TransferSummary) -> str:
    head = (
        f"transfer {summary.transfer_id} from {summary.source_model} (fit {summary.source_fit}, labels "
        f"{summary.labels_snapshot}) to {summary.target_model} (job {summary.job_id}): "
        + (f"{summary.images} images, {summary.skipped_images} skipped" if summary.images else "already stored")
        + f", {len(summary.classes)} classes, {summary.elapsed_s:.1f} s; now applied by {summary.target_model}"
    )
    rows = [[str(c.class_index), str(d.source_component), number(d.covariance), number(d.alpha_floor), str(c.images)]
            for c in summary.classes for d in c.directions]
    return head + "\n" + render_table(["CLASS", "SOURCE_COMPONENT", "COVARIANCE", "FLOOR", "IMAGES"], rows,
                                       right=range(5))


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
            + (f"transfer {job.transfer_summary.transfer_id}" if job.transfer_summary else "")
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
            rows.append([r.image_id, f"error: {r.error.code}"] + [MISSING] * 4)
            continue
        top = r.predictions[0] if r.predictions else None
        rows.append(
            [
                r.image_id,
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
        + _directions_line(result)
        + (f"\nkept in the server's store as evaluation {result.evaluation_id}" if result.evaluation_id else "")
    )
    return "\n".join([head, render_table(headers, rows, right=(0,)), tail])


def _directions_line(result: t.EvaluateResult) -> str:
    """Which spurious directions SpuFix removed: own components as class/component, transferred ones by source."""
    if result.directions is None:
        return ""
    own = [f"{d.class_index}/{d.component}" for d in result.spurious_directions if not d.source]
    moved = [d.source for d in result.spurious_directions if d.source]
    parts = [f"own {', '.join(own)}" if own else "", f"transferred ({result.transfer_id}) {', '.join(moved)}" if moved else ""]
    removed = "; ".join(p for p in parts if p) or "none"
    return f"\nSpuFix removed ({result.directions}): {removed}"


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

"""Client dataclass values and a fake client for the CLI's unit tests (no server, no torch).

The fake implements only the Client methods the CLI calls, records each call, and fails every
call with `error` when it is set, so exit codes and error printing are testable offline.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import grpc

from spurguard.client import SpurguardClientError
from spurguard import vocab as t

CORRUPT = b"corrupt"  # image bytes the fake answers with a per-image INVALID_ARGUMENT
WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


CLASS_NAMES = ("ant", "bee", "cat", "star", "sea lion")  # classes.txt of the fake model's first classes


def model(name: str = "tiny", fitted: tuple[int, ...] = (0, 1, 2, 5), classes: bool = False) -> t.ModelInfo:
    """A ModelInfo as ListModels sends it, or as GetModel does (with `classes`: the class names)."""
    return t.ModelInfo(
        name=name,
        backend="torch",
        device="cpu",
        num_classes=10,
        feature_dim=8,
        input_size=16,
        digest="d" * 64,
        ready=True,
        supports_gradients=True,
        fit_id="fit-1" if fitted else None,
        fitted_classes=fitted,
        max_batch_size=32,
        classes=tuple(t.ClassInfo(k, name, f"n{k:08d}") for k, name in enumerate(CLASS_NAMES)) if classes else (),
        runtime="onnxruntime",
    )


def components(class_index: int = 3) -> t.Components:
    return t.Components(
        model="tiny",
        class_index=class_index,
        fit_id="fit-1",
        images=40,
        num_components=2,
        floor_percentile=5.0,
        bias_term=1.5,
        components=(
            t.Component(0, 4.0, 0.5, 0.0, -1.25, 3.5, "spurious", "watermark"),
            t.Component(1, 2.0, 0.25, 0.0, -0.5, 1.75, "unlabeled", ""),
        ),
        vectors=None,
        mean=None,
    )


def predictions(first: str = "cat", second: str = "dog") -> tuple[t.Prediction, ...]:
    return (t.Prediction(3, first, 0.75, 4.0), t.Prediction(5, second, 0.125, 2.0))


def score_result(image: str, trigger: bool = True) -> t.ScoreResult:
    return t.ScoreResult(
        image_id=image,
        error=None,
        predictions=predictions(),
        class_index=3,
        logit=4.0,
        bias_term=1.5,
        residual=0.25,
        components=(t.ComponentAlpha(0, 2.0, "spurious"), t.ComponentAlpha(1, 0.25, "unlabeled")),
        spurious_alpha=3.25,
        trigger=trigger,
        spufix=t.SpufixResult("floor", 0.75, predictions("dog", "cat")),
        fit_id="fit-1",
    )


def failed_result(image: str, code: str = "INVALID_ARGUMENT", message: str = "cannot decode") -> t.ScoreResult:
    return t.ScoreResult(image, t.ErrorStatus(code, message), (), -1, 0.0, None, None, (), 0.0, False, None, "")


def class_score(class_index: int, auc: float, shift: float = 0.0) -> t.ClassScore:
    return t.ClassScore(class_index, auc, auc - 0.05, 0.8 - shift / 5, 0.4 - shift, 0.9, 0.3 - shift)


def evaluate_result(auc: float = 0.625) -> t.EvaluateResult:
    baseline = t.ScoreTable(auc, auc - 0.05, (class_score(3, auc), class_score(7, auc)), 0.75, 0.3)
    fixed = t.ScoreTable(0.875, 0.825, (class_score(3, 0.875, 0.25), class_score(7, 0.875, 0.25)), 0.7, 0.05)
    return t.EvaluateResult("tiny", "fit-1", baseline, fixed, "floor", 20, 12, skipped_images=1, evaluation_id="ev-1")


def fit_progress(job_id: str = "job-1", done: int = 10, phase: str = "features") -> t.FitProgress:
    return t.FitProgress(job_id, phase, done, 40, 1, 4, 2.0)


def fit_summary(job_id: str = "job-1") -> t.FitSummary:
    classes = (t.FitClass(0, 20, 2), t.FitClass(1, 20, 2))
    return t.FitSummary(job_id, "fit-1", "tiny", "d" * 64, 40, 1, classes, 4.0)


def job(job_id: str = "job-1", state: str = "running") -> t.Job:
    request = t.FitRequest("tiny", "/data/train", (0, 1), 2, None, job_id, False)
    summary = fit_summary(job_id) if state == "succeeded" else None
    return t.Job(job_id, "tiny", state, request, fit_progress(job_id), summary, None, WHEN, WHEN)


def transfer_summary(job_id: str = "job-2") -> t.TransferSummary:
    directions = (t.TransferDirection(0, 0.5, -0.25), t.TransferDirection(2, 0.125, 0.0))
    return t.TransferSummary(job_id, "transfer-abc", "robust", "fit-r", "tiny", "d" * 64, "snap-1",
                             (t.TransferClass(3, 40, directions),), 40, 0, 3.0)


def transfer_info() -> t.TransferInfo:
    labels = (t.LabelRecord("robust", "fit-r", 3, 0, "spurious", "frame", WHEN),
              t.LabelRecord("robust", "fit-r", 3, 2, "spurious", "", WHEN))
    return t.TransferInfo("transfer-abc", "robust", "e" * 64, "fit-r", "snap-1", labels, (3,), WHEN)


def visualize_updates(component: int = 2, eps: float = 8.6, parameterization: str = "pixel") -> list[t.VisualizeUpdate]:
    return [
        t.TopImage(component, 0, "3/a.png", "/data/train/3/a.png", 5.0, b"top0"),
        t.TopImage(component, 1, "3/b.png", "/data/train/3/b.png", 4.0, b"top1"),
        t.Heatmap(component, 1, "3/b.png", "/data/train/3/b.png", 4.0, "grad_cam", b"heat1"),
        t.Heatmap(component, 0, "3/a.png", "/data/train/3/a.png", 5.0, "grad_cam", b"heat0"),
        t.AttackFrame(component, 0, 0.5, 0.1, b"frame0"),
        t.AttackFrame(component, 10, 6.0, 0.6, b"frame10"),
        t.AttackResult(component, 0.5, 7.0, 0.7, 20, eps, b"attack", parameterization),
    ]


class Interrupt:
    """A stream item that makes the fake stream raise KeyboardInterrupt, as Ctrl-C would."""


class FakeClient:
    """Records (method, args, kwargs) in `calls`; canned answers; raises `error` if set."""

    def __init__(self, **answers: Any) -> None:
        self.answers = answers
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.error: Exception | None = None  # a SpurguardClientError, or the ValueError of a bad argument
        self.closed = False

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((name, args, kwargs))
        if self.error is not None:
            raise self.error
        return self.answers.get(name)

    def called(self, name: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        return [(args, kwargs) for method, args, kwargs in self.calls if method == name]

    def _stream(self, name: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """Like the real client: the call starts when iteration does, items may raise."""
        self.calls.append((name, args, kwargs))
        if self.error is not None:
            raise self.error
        for item in self.answers.get(name, []):
            if isinstance(item, Interrupt):
                raise KeyboardInterrupt
            if isinstance(item, SpurguardClientError):
                raise item
            yield item

    def close(self) -> None:
        self.closed = True

    def list_models(self) -> list[t.ModelInfo]:
        return self._call("list_models")

    def get_model(self, model: str) -> t.ModelInfo:
        return self._call("get_model", model)

    def get_job(self, job_id: str) -> t.Job:
        return self._call("get_job", job_id)

    def list_jobs(self, model: str | None = None) -> list[t.Job]:
        return self._call("list_jobs", model)

    def cancel_job(self, job_id: str) -> t.Job:
        return self._call("cancel_job", job_id)

    def get_components(self, model: str, class_index: int, **kwargs: Any) -> t.Components:
        return self._call("get_components", model, class_index, **kwargs)

    def label(self, model: str, class_index: int, component: int, label: str, **kwargs: Any) -> t.LabelRecord:
        self._call("label", model, class_index, component, label, **kwargs)
        return t.LabelRecord(model, "fit-1", class_index, component, label, kwargs.get("note", ""), WHEN)

    def list_labels(self, model: str, **kwargs: Any) -> list[t.LabelRecord]:
        return self._call("list_labels", model, **kwargs)

    def fit(self, model: str, dataset: str, **kwargs: Any) -> Iterator[t.FitUpdate]:
        return self._stream("fit", model, dataset, **kwargs)

    def watch_job(self, job_id: str) -> Iterator[t.FitUpdate]:
        return self._stream("watch_job", job_id)

    def transfer(self, source_model: str, target_model: str, **kwargs: Any) -> Iterator[t.TransferUpdate]:
        return self._stream("transfer", source_model, target_model, **kwargs)

    def visualize(self, model: str, class_index: int, components: Iterable[int], **kwargs: Any) -> Iterator[Any]:
        return self._stream("visualize", model, class_index, list(components), **kwargs)

    def evaluate(self, model: str, clean: str, spurious: str, **kwargs: Any) -> Iterator[t.EvaluateUpdate]:
        return self._stream("evaluate", model, clean, spurious, **kwargs)

    def score(self, model: str, images: Iterable[tuple[str, bytes]], **kwargs: Any) -> list[t.ScoreResult]:
        items = list(images)
        self._call("score", model, items, **kwargs)
        return [failed_result(path) if data == CORRUPT else score_result(path) for path, data in items]


def unavailable() -> SpurguardClientError:
    return SpurguardClientError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")


@dataclass
class Outcome:
    """What one in-process `spurguard` run did (the `cli_run` fixture's result)."""

    code: int
    out: str
    err: str
    connects: list[tuple[str, float | None]] = field(default_factory=list)  # (target, timeout) per client made
    tokens: list[str | None] = field(default_factory=list)  # the token each client was made with


RunCli = Callable[..., Outcome]

"""What each page of `spurguard ui` shows, read from spurguard through the public client only.

Why a layer of its own: the web app must work against any spurguard (replicas, TLS, tokens), so
it knows nothing of the server's code; every function here makes the gRPC calls one page or
one action needs and returns plain JSON-able dicts, which the templates render and the page's
script receives unchanged. A failed call becomes a `Problem`: the words a labeller reads (what
happened and what to do about it), the status code, and the server's own message.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from spurguard import vocab as t
from spurguard.client import Client, SpurguardClientError, Stream
from spurguard.client.cli.format import alpha_statistics, number
from spurguard.vocab import LABELS, UNLABELED

# code -> (HTTP status of the page or API answer, what it means for the person at the page)
_MEANINGS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.PERMISSION_DENIED: (
        403, "Not allowed: the token this page uses may not do that. Labelling and feature attacks need "
             "a token with role label (or admin); restart spurguard ui with such a --token."),
    grpc.StatusCode.UNAUTHENTICATED: (
        401, "The server wants a token: restart spurguard ui with --token TOKEN (or SPURGUARD_TOKEN), "
             "a token of role label."),
    grpc.StatusCode.UNAVAILABLE: (
        503, "The spurguard server cannot be reached or is not ready yet; the page tries again."),
    grpc.StatusCode.NOT_FOUND: (404, "Not found on the server."),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "Not possible yet."),
    grpc.StatusCode.INVALID_ARGUMENT: (400, "The server refused the request."),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "The server is busy; the page tries again shortly."),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "The server took too long to answer."),
}
_OTHER = (502, "The server failed to answer.")
CLASS_PAGE_WORKERS = 8  # GetComponents calls in flight for one classes page


class Problem(Exception):
    """A failed call as the page shows it: `words` for the labeller, `code` and `details` from the server."""

    def __init__(self, status: int, code: str, words: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.status = status  # HTTP
        self.code = code  # the gRPC status code's name
        self.words = words
        self.details = details

    @classmethod
    def of(cls, error: SpurguardClientError, server: str) -> Problem:
        status, words = _MEANINGS.get(error.code, _OTHER)
        details = " ".join(error.details.split())
        if error.code == grpc.StatusCode.UNAVAILABLE:
            details = f"{details} (server {server})"
        return cls(status, error.code.name, words, details)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "error": self.words, "details": self.details}


def calling(client: Client, call: Callable[[], Any]) -> Any:
    """`call()`, with a failed call turned into a Problem."""
    try:
        return call()
    except SpurguardClientError as error:
        raise Problem.of(error, client.target) from None


def _label(record: t.LabelRecord) -> dict[str, Any]:
    return {
        "component": record.component,
        "label": record.label,
        "note": record.note,
        "author": record.author,
        "updated": None if record.updated is None else record.updated.isoformat(),
    }


def _class_name(info: t.ModelInfo, index: int) -> str:
    return info.classes[index].name if 0 <= index < len(info.classes) else str(index)


def _transfer(info: t.ModelInfo) -> dict[str, Any] | None:
    transfer = info.transfer
    if transfer is None:
        return None
    return {
        "source_model": transfer.source_model,
        "source_fit": transfer.source_fit,
        "created": None if transfer.created is None else f"{transfer.created:%Y-%m-%d %H:%M:%S} UTC",
        "classes": list(transfer.classes),
        "labels": [dict(_label(r), class_index=r.class_index) for r in transfer.labels],
    }


def _model(info: t.ModelInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "backend": info.backend,
        "runtime": info.runtime,
        "device": info.device,
        "ready": info.ready,
        "supports_gradients": info.supports_gradients,
        "fit_id": info.fit_id,
        "num_classes": info.num_classes,
        "fitted_classes": list(info.fitted_classes),
        "input_size": info.input_size,
        "transfer": _transfer(info),
    }


# ---- pages ----


def models_page(client: Client) -> dict[str, Any]:
    """Every served model and the state of its fit."""
    return {"models": [_model(info) for info in calling(client, client.list_models)]}


def model_page(client: Client, model: str, top: int) -> dict[str, Any]:
    """A model's fitted classes with labelling progress: of each class's first `top` components,
    how many are labelled and how many are spurious (own labels; transferred ones counted apart)."""
    info = calling(client, lambda: client.get_model(model))
    labels = calling(client, lambda: client.list_labels(model)) if info.fit_id else []
    by_class: dict[int, list[t.LabelRecord]] = {}
    for record in labels:
        by_class.setdefault(record.class_index, []).append(record)

    kept_counts = [c.num_components for c in info.fit_classes] or _kept_counts(client, model, info.fitted_classes)
    transfer = _transfer(info)
    transferred = {k: 0 for k in info.fitted_classes}
    for record in (transfer or {}).get("labels", []):
        if record["class_index"] in transferred:
            transferred[record["class_index"]] += 1
    classes = []
    for k, num_components in zip(info.fitted_classes, kept_counts):
        shown = min(top, num_components)
        mine = [r for r in by_class.get(k, []) if r.component < shown]
        classes.append({
            "index": k,
            "name": _class_name(info, k),
            "num_components": num_components,
            "shown": shown,
            "labelled": sum(r.label != UNLABELED for r in mine),
            "spurious": [r.component for r in mine if r.label == "spurious"],
            "transferred": transferred[k],
        })
    return {"model": _model(info), "classes": classes, "top": top}


def _kept_counts(client: Client, model: str, classes: tuple[int, ...]) -> list[int]:
    """Components kept per class from a server whose GetModel predates `fit_classes`: a call each."""

    def kept(k: int) -> int:
        return calling(client, lambda: client.get_components(model, k, top=1).num_components)

    with ThreadPoolExecutor(CLASS_PAGE_WORKERS) as pool:
        return list(pool.map(kept, classes))


def class_page(client: Client, model: str, class_index: int, top: int) -> dict[str, Any]:
    """One class: its first `top` components with their statistics, the labels (with history),
    the transferred labels that apply to it, and the neighbouring fitted classes."""
    info = calling(client, lambda: client.get_model(model))
    if not 0 <= class_index < info.num_classes:
        raise Problem(404, "NOT_FOUND", "Not found on the server.",
                      f"model {model} has classes 0 to {info.num_classes - 1}, not {class_index}")
    components = calling(client, lambda: client.get_components(model, class_index, top=top))
    fitted = list(info.fitted_classes)
    position = fitted.index(class_index) if class_index in fitted else None
    transfer = _transfer(info)
    if transfer is not None:
        transfer["labels"] = [r for r in transfer["labels"] if r["class_index"] == class_index]
        if class_index not in transfer["classes"]:
            transfer = None
    return {
        "model": _model(info),
        "class": {"index": class_index, "name": _class_name(info, class_index)},
        "fit_id": components.fit_id,
        "images": components.images,
        "num_components": components.num_components,
        "floor_percentile": components.floor_percentile,
        "components": [_component(c) for c in components.components],
        "labels": labels_snapshot(client, model, class_index),
        "transfer": transfer,
        "previous": None if not position else _neighbour(info, fitted[position - 1]),
        "next": None if position is None or position + 1 >= len(fitted) else _neighbour(info, fitted[position + 1]),
    }


def _neighbour(info: t.ModelInfo, index: int) -> dict[str, Any]:
    return {"index": index, "name": _class_name(info, index)}


def _component(component: t.Component) -> dict[str, Any]:
    mean, floor, peak = alpha_statistics(component)
    return {
        "index": component.index,
        "eigenvalue": number(component.eigenvalue),
        "explained_variance": f"{100 * component.explained_variance:.1f}%",
        "alpha_mean": mean,
        "alpha_floor": floor,
        "alpha_max": peak,
    }


# ---- labels ----


def snapshot(labels: Iterable[t.LabelRecord], writes: Iterable[t.LabelRecord]) -> dict[str, Any]:
    """A class's labels and every write to them, as the page renders them and as its live view
    compares them (a change anywhere in it is news)."""
    history: dict[str, list[dict[str, Any]]] = {}
    for record in writes:
        history.setdefault(str(record.component), []).append(_label(record))
    return {"labels": {str(r.component): _label(r) for r in labels if r.label != UNLABELED}, "history": history}


def labels_snapshot(client: Client, model: str, class_index: int) -> dict[str, Any]:
    """A class's snapshot now (ListLabels)."""
    current = calling(client, lambda: client.list_labels(model, class_index=class_index))
    return snapshot(current, calling(client, lambda: client.label_history(model, class_index=class_index)))


def watch_labels(client: Client, model: str, class_index: int) -> Stream[t.LabelList]:
    """A class's labels and history as the server pushes them (WatchLabels); see `snapshot_of`."""
    return client.watch_labels(model, class_index=class_index, history=True)


def snapshot_of(pushed: t.LabelList) -> dict[str, Any]:
    return snapshot(pushed.labels, pushed.history)


def set_label(client: Client, model: str, class_index: int, component: int, label: str, note: str) -> dict[str, Any]:
    """Label one component of the current fit; the stored record as the page shows it."""
    if label not in LABELS:
        raise Problem(400, "INVALID_ARGUMENT", "The server refused the request.",
                      f"label must be one of {', '.join(LABELS)}, not {label!r}")
    record = calling(client, lambda: client.label(model, class_index, component, label, note=note))  # type: ignore[arg-type]
    return _label(record)

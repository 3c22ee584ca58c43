"""A model's fitted components and human labels, ready to score production images.

Results are the vocabulary's dataclasses (`spurguard.vocab`), so the server, the client and
the CLI share one definition of a result and of its `score --json` line.

Why a snapshot: scoring must see one consistent (fit, labels, transfer) for a whole batch, while
labels change under it. A Guard never changes; after a Label, a committed fit or a transfer the
server builds a new one and swaps the reference, so in-flight batches finish on the old one.

Transferred directions (serving.transferring) join SpuFix beside the own spurious labels; a
score's components name them with `source`, and an Evaluate may apply either kind alone
(`with_directions`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spurguard.server.backends.base import Backend
from spurguard.server.engine import DEFAULT_FLOOR_PERCENTILE, ClassComponents, Decomposer, SpuFix, SpuFixResult
from spurguard.server.errors import InvalidInput
from spurguard.server.serving.options import check_class
from spurguard.server.serving.transferring import source_name
from spurguard.server.store import Store, StoredTransfer
from spurguard.vocab import (
    SPURIOUS,
    UNLABELED,
    ComponentAlpha,
    Prediction,
    ScoreResult,
    SpufixModeName,
    SpufixResult,
    SpuriousDirection,
    SpuriousDirectionsName,
)

TOP_PREDICTIONS = 5
DEFAULT_TOP_COMPONENTS = 5


@dataclass(frozen=True)
class Inference:
    """A batch's scores as whole arrays (the Open Inference Protocol's outputs), where a
    ScoreResult has the top predictions only: the full head logits and the fixed logits."""

    logits: np.ndarray  # float32 [N, C]
    prediction: np.ndarray  # int32 [N]: top-1 class of `logits`
    class_index: np.ndarray  # int32 [N]: the analysed class
    spurious_alpha: np.ndarray  # float32 [N]
    trigger: np.ndarray  # bool [N]
    spufix_logits: np.ndarray  # float32 [N, C], in the requested SpuFix mode

    def row(self, i: int) -> Inference:
        """Image i alone (views, no copies): one batcher result per image."""
        return Inference(*(array[i : i + 1] for array in self._arrays()))

    @classmethod
    def concatenate(cls, parts: Sequence[Inference]) -> Inference:
        """Rows back into one batch, in order."""
        return cls(*(np.concatenate(arrays) for arrays in zip(*(part._arrays() for part in parts))))

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (self.logits, self.prediction, self.class_index, self.spurious_alpha, self.trigger, self.spufix_logits)


class Guard:
    """Decomposition plus SpuFix for one model, one fit, one set of labels and the transfer in use.

    `directions` says which spurious directions SpuFix removes: the own labels' ("own"), the
    transfer's ("transferred") or both (what Score applies)."""

    def __init__(
        self,
        *,
        class_names: Sequence[str],
        weight: torch.Tensor,
        bias: torch.Tensor,
        components: dict[int, ClassComponents],
        labels: dict[tuple[int, int], str],
        fit_id: str | None,
        floor_percentile: float = DEFAULT_FLOOR_PERCENTILE,
        transfer: StoredTransfer | None = None,
        directions: SpuriousDirectionsName = "both",
    ) -> None:
        self._arguments = dict(class_names=class_names, weight=weight, bias=bias, components=components, labels=labels,
                               fit_id=fit_id, floor_percentile=floor_percentile, transfer=transfer)
        self.fit_id = fit_id
        self.transfer = transfer
        self.directions = directions
        self.class_names = list(class_names)
        self.labels = dict(labels)
        self.num_components = {k: c.num_components for k, c in components.items()}
        self.images = {k: c.count for k, c in components.items()}  # fit images per class
        spurious: dict[int, list[int]] = {}
        for (k, component), label in sorted(self.labels.items()):
            if label == SPURIOUS:
                spurious.setdefault(k, []).append(component)
        self.spurious = spurious
        self.decomposer = Decomposer(components, weight, bias)
        moved = transfer is not None and directions != "own"
        self.transfer_id = transfer.transfer_id if moved else None  # type: ignore[union-attr]
        self.spufix = SpuFix(
            components, {} if directions == "transferred" else spurious, weight,
            transferred=transfer.classes if moved else None,  # type: ignore[union-attr]
            floor_percentile=floor_percentile,
        )
        # class -> (its SpuFix row, the source component, ComponentAlpha.source) of each transferred direction
        self._transferred: dict[int, list[tuple[int, int, str]]] = {}
        for row, entry in enumerate(self.spufix.entries):
            if entry.transferred:
                assert transfer is not None
                where = source_name(transfer.settings, entry.class_index, entry.component)
                self._transferred.setdefault(entry.class_index, []).append((row, entry.component, where))

    def with_directions(self, directions: SpuriousDirectionsName) -> Guard:
        """The same snapshot with SpuFix removing only these directions (Evaluate's choice)."""
        return self if directions == self.directions else Guard(**self._arguments, directions=directions)  # type: ignore[arg-type]

    def applied_directions(self) -> tuple[SpuriousDirection, ...]:
        """Every direction SpuFix removes, by class: own components, then transferred ones."""
        sources = {row: where for moved in self._transferred.values() for row, _, where in moved}
        return tuple(SpuriousDirection(e.class_index, e.component, sources.get(row, ""))
                     for row, e in enumerate(self.spufix.entries))

    @classmethod
    def load(cls, backend: Backend, store: Store, *, fit_id: str | None = None) -> Guard:
        """The model's current fit (or `fit_id`) with its labels, and its transfer in use; no fit
        yet gives a Guard that still predicts but decomposes nothing (transferred directions apply
        all the same)."""
        weight, bias = backend.head()
        fit_id = fit_id or store.current_fit_id(backend.name, backend.digest)
        components: dict[int, ClassComponents] = {}
        labels: dict[tuple[int, int], str] = {}
        if fit_id is not None:
            fit = store.load_fit(backend.name, backend.digest, fit_id)
            components = {k: fit.components(k) for k in fit.classes}
            labels = store.label_map(backend.name, backend.digest, fit_id)
        transfer_id = store.current_transfer_id(backend.name, backend.digest)
        return cls(
            transfer=None if transfer_id is None else store.load_transfer(backend.name, backend.digest, transfer_id),
            class_names=backend.class_names,
            weight=weight,
            bias=bias,
            components=components,
            labels=labels,
            fit_id=fit_id,
        )

    @property
    def num_classes(self) -> int:
        return self.decomposer.num_classes

    @property
    def fitted_classes(self) -> list[int]:
        return self.decomposer.fitted_classes

    def check_class(self, class_index: int) -> int:
        """NOT_FOUND for a class the model does not have."""
        return check_class(class_index, self.num_classes)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits [N, C] of the head."""
        return self.decomposer.logits(features)

    def fixed_logits(self, features: torch.Tensor, mode: SpufixModeName) -> torch.Tensor:
        """Logits after SpuFix in `mode` (unchanged for classes without spurious labels)."""
        return self.spufix.apply(features, self.decomposer.logits(features), mode)

    def _analyse(
        self, features: torch.Tensor, class_index: int | None, mode: SpufixModeName
    ) -> tuple[torch.Tensor, torch.Tensor, SpuFixResult]:
        """(features as the decomposer's matrix, head logits, SpuFix of the analysed classes):
        the part of scoring that Score's results and OIP's arrays share."""
        x = self.decomposer.features(features)
        logits = self.decomposer.logits(x)
        return x, logits, self.spufix.score(x, logits, mode, class_index=class_index)

    def infer(self, features: torch.Tensor, *, class_index: int | None = None, mode: SpufixModeName = "floor") -> Inference:
        """A batch of features [N, d] as arrays; options as in score_features, trusted."""
        _, logits, fix = self._analyse(features, class_index, mode)
        return Inference(
            logits=logits.cpu().numpy().astype(np.float32, copy=False),
            prediction=logits.argmax(dim=1).cpu().numpy().astype(np.int32),
            class_index=fix.class_index.cpu().numpy().astype(np.int32),
            spurious_alpha=fix.spurious_alpha.cpu().numpy().astype(np.float32, copy=False),
            trigger=fix.trigger.cpu().numpy().astype(bool, copy=False),
            spufix_logits=fix.logits.cpu().numpy().astype(np.float32, copy=False),
        )

    def score_features(
        self,
        features: torch.Tensor,
        image_ids: Sequence[str],
        *,
        class_index: int | None = None,
        top: int | None = DEFAULT_TOP_COMPONENTS,
        mode: SpufixModeName = "floor",
    ) -> list[ScoreResult]:
        """Score a batch of features [N, d]; `top` components by alpha (0: all kept ones), plus
        the analysed class's spurious-labelled ones and its transferred directions.

        The options are trusted (serving.options checked them); the engine checks the mode.
        """
        if features.shape[0] != len(image_ids):
            raise InvalidInput(f"{features.shape[0]} feature rows for {len(image_ids)} image ids")
        x, logits, fix = self._analyse(features, class_index, mode)
        index = fix.class_index
        fitted = torch.tensor([int(k) in self.num_components for k in index.tolist()], dtype=torch.bool)
        decomposition = None
        if fitted.any():
            rows = fitted.nonzero().squeeze(1)
            decomposition = self.decomposer.decompose(x[rows], index[rows], logits[rows])
        probs, fixed_probs = logits.softmax(dim=1), fix.logits.softmax(dim=1)
        results: list[ScoreResult] = []
        row_in_decomposition = 0
        for i, image_id in enumerate(image_ids):
            k = int(index[i])
            bias_term = residual = None
            components: tuple[ComponentAlpha, ...] = self._transferred_components(k, fix.alphas[i])
            if fitted[i]:
                assert decomposition is not None
                j = row_in_decomposition
                row_in_decomposition += 1
                bias_term = float(decomposition.bias_term[j])
                residual = float(decomposition.residual[j])
                components = self._top_components(k, decomposition.alphas[j], top) + components
            results.append(
                ScoreResult(
                    image_id=image_id,
                    error=None,
                    predictions=self._predictions(probs[i], logits[i]),
                    class_index=k,
                    logit=float(logits[i, k]),
                    bias_term=bias_term,
                    residual=residual,
                    components=components,
                    spurious_alpha=float(fix.spurious_alpha[i]),
                    trigger=bool(fix.trigger[i]),
                    spufix=SpufixResult(
                        mode, float(fix.logits[i, k]), self._predictions(fixed_probs[i], fix.logits[i])
                    ),
                    fit_id=self.fit_id or "",
                    transfer_id=self.transfer_id or "",
                )
            )
        return results

    def _top_components(self, k: int, alphas: torch.Tensor, top: int | None) -> tuple[ComponentAlpha, ...]:
        """The `top` components by alpha (0: all kept ones), then the class's spurious-labelled
        components not among them, by alpha: a trigger must be explainable from the result
        even when the spurious component's alpha is small next to the others'."""
        kept = alphas[: self.num_components[k]]
        count = kept.shape[0] if top == 0 else min(DEFAULT_TOP_COMPONENTS if top is None else top, kept.shape[0])
        order = torch.argsort(kept, descending=True, stable=True).tolist()
        spurious = set(self.spurious.get(k, ()))
        shown = order[:count] + [l for l in order[count:] if l in spurious]
        return tuple(
            ComponentAlpha(l, float(kept[l]), self.labels.get((k, l), UNLABELED)) for l in shown
        )

    def _transferred_components(self, k: int, alphas: torch.Tensor) -> tuple[ComponentAlpha, ...]:
        """Class k's transferred directions with their contributions (SpuFix's alphas), largest first."""
        moved = [ComponentAlpha(c, float(alphas[row]), SPURIOUS, where) for row, c, where in self._transferred.get(k, ())]
        return tuple(sorted(moved, key=lambda c: -c.alpha))

    def _predictions(self, probs: torch.Tensor, logits: torch.Tensor) -> tuple[Prediction, ...]:
        values, classes = probs.topk(min(TOP_PREDICTIONS, probs.shape[0]))
        return tuple(
            Prediction(int(c), self.class_names[int(c)], float(p), float(logits[int(c)]))
            for p, c in zip(values.tolist(), classes.tolist())
        )


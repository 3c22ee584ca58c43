"""A model's fitted components and human labels, ready to score production images.

Results are the vocabulary's dataclasses (`spurguard.vocab`), so the server, the client and
the CLI share one definition of a result and of its `score --json` line.

Why a snapshot: scoring must see one consistent (fit, labels) pair for a whole batch, while
labels change under it. A Guard never changes; after a Label or a committed fit the server
builds a new one and swaps the reference, so in-flight batches finish on the old one.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from spurguard.server.backends.base import Backend
from spurguard.server.engine import DEFAULT_FLOOR_PERCENTILE, ClassComponents, Decomposer, SpuFix
from spurguard.server.errors import InvalidInput
from spurguard.server.serving.options import check_class
from spurguard.server.store import Store
from spurguard.vocab import SPURIOUS, UNLABELED, ComponentAlpha, Prediction, ScoreResult, SpufixModeName, SpufixResult

TOP_PREDICTIONS = 5
DEFAULT_TOP_COMPONENTS = 5


class Guard:
    """Decomposition plus SpuFix for one model, one fit and one set of labels."""

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
    ) -> None:
        self.fit_id = fit_id
        self.class_names = list(class_names)
        self.labels = dict(labels)
        self.num_components = {k: c.num_components for k, c in components.items()}
        spurious: dict[int, list[int]] = {}
        for (k, component), label in sorted(self.labels.items()):
            if label == SPURIOUS:
                spurious.setdefault(k, []).append(component)
        self.spurious = spurious
        self.decomposer = Decomposer(components, weight, bias)
        self.spufix = SpuFix(components, spurious, weight, floor_percentile=floor_percentile)

    @classmethod
    def load(cls, backend: Backend, store: Store, *, fit_id: str | None = None) -> Guard:
        """The model's current fit (or `fit_id`) with its labels; no fit yet gives a Guard that
        still predicts but decomposes nothing."""
        weight, bias = backend.head()
        fit_id = fit_id or store.current_fit_id(backend.name, backend.digest)
        components: dict[int, ClassComponents] = {}
        labels: dict[tuple[int, int], str] = {}
        if fit_id is not None:
            fit = store.load_fit(backend.name, backend.digest, fit_id)
            components = {k: fit.components(k) for k in fit.classes}
            labels = store.label_map(backend.name, backend.digest, fit_id)
        return cls(
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
        the analysed class's spurious-labelled ones.

        The options are trusted (serving.options checked them); the engine checks the mode.
        """
        x = self.decomposer.features(features)
        if x.shape[0] != len(image_ids):
            raise InvalidInput(f"{x.shape[0]} feature rows for {len(image_ids)} image ids")
        logits = self.decomposer.logits(x)
        if class_index is not None:
            index = torch.full((x.shape[0],), class_index, dtype=torch.int64, device=logits.device)
        else:
            index = logits.argmax(dim=1)
        fix = self.spufix.score(x, logits, mode, class_index=index)
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
            components: tuple[ComponentAlpha, ...] = ()
            if fitted[i]:
                assert decomposition is not None
                j = row_in_decomposition
                row_in_decomposition += 1
                bias_term = float(decomposition.bias_term[j])
                residual = float(decomposition.residual[j])
                components = self._top_components(k, decomposition.alphas[j], top)
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

    def _predictions(self, probs: torch.Tensor, logits: torch.Tensor) -> tuple[Prediction, ...]:
        values, classes = probs.topk(min(TOP_PREDICTIONS, probs.shape[0]))
        return tuple(
            Prediction(int(c), self.class_names[int(c)], float(p), float(logits[int(c)]))
            for p, c in zip(values.tolist(), classes.tolist())
        )


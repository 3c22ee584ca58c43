"""SpuFix: remove labelled spurious components from the logits, without retraining.

paper: logit'_k = logit_k - sum_{l in S_k} max(alpha_l, 0)
floor: logit'_k = logit_k - sum_{l in S_k} max(alpha_l - f_l, 0), f_l = q-th percentile of
       alpha_l over the class's fit images (the level of the component with the feature absent).
Directions transferred from another model (engine.transfer) join S_k with their contribution in
place of alpha_l and their floor over the images they came from; a class may have both kinds,
and then both are removed.

Why stacked: every class's spurious directions go into one [M, d] matrix, so fixing all C
logits of a batch is one matmul for the M alphas and one for summing penalties per class
(an [M, C] 0/1 assignment: deterministic, unlike an atomic scatter on a GPU).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from spurguard.server.engine.components import DEFAULT_FLOOR_PERCENTILE, ClassComponents
from spurguard.server.engine.decompose import (
    ClassIndex,
    as_logits,
    check_components,
    class_projection,
    resolve_class_index,
)
from spurguard.server.engine.npca import as_matrix
from spurguard.server.engine.transfer import TransferredClass
from spurguard.server.errors import FailedPrecondition, InvalidInput
from spurguard.vocab import SPUFIX_MODES, SpufixModeName


@dataclass(frozen=True)
class SpuFixResult:
    """One batch under SpuFix, with the per-image spurious evidence for its analysed class."""

    mode: str
    class_index: torch.Tensor  # [N] analysed class (top-1 of the unfixed logits by default)
    logits: torch.Tensor  # [N, C] after the fix
    spurious_alpha: torch.Tensor  # [N] floor-mode sum over S_k of the analysed class
    trigger: torch.Tensor  # [N] bool: predicted k, and the fix moves top-1 away from k
    alphas: torch.Tensor  # [N, M] every spurious direction's alpha (SpuFix.entries says whose)


@dataclass(frozen=True)
class SpuriousEntry:
    """One row of SpuFix's stacked directions: a class's own component, or a transferred direction
    (then `component` is the source fit's component it came from)."""

    class_index: int
    component: int
    transferred: bool


class SpuFix:
    """The fix for one head, given each class's components and spurious component indices S_k."""

    def __init__(
        self,
        components: Mapping[int, ClassComponents],
        spurious: Mapping[int, Iterable[int]],
        weight: torch.Tensor | np.ndarray,
        *,
        transferred: Mapping[int, TransferredClass] | None = None,
        floor_percentile: float = DEFAULT_FLOOR_PERCENTILE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if not 0.0 <= floor_percentile <= 100.0:
            raise InvalidInput(f"floor percentile must lie in [0, 100], got {floor_percentile}")
        weight64 = as_matrix(weight, "weight", dtype=torch.float64, device="cpu")
        num_classes, dim = weight64.shape
        check_components(components, num_classes, dim)
        self.dtype, self.dim, self.num_classes = dtype, dim, num_classes
        directions, offsets, floors = [], [], []
        self.entries: list[SpuriousEntry] = []
        self._classes_without_floor: list[int] = []
        for k in sorted(spurious):
            indices = sorted({int(i) for i in spurious[k]})
            if not indices:
                continue
            comp = self._spurious_class(components, k, indices)
            projection = class_projection(comp, weight64[k], rows=indices, dtype=torch.float64)
            directions.append(projection.directions)
            offsets.append(projection.offsets)
            if comp.alphas.shape[0] == 0:
                self._classes_without_floor.append(k)
            floors.append(torch.as_tensor(comp.alpha_floor(floor_percentile)[indices]))
            self.entries += [SpuriousEntry(k, l, False) for l in indices]
        for k, moved in sorted((transferred or {}).items()):
            if moved.class_index != k or not 0 <= k < num_classes or moved.mean.shape != (dim,):
                raise InvalidInput(f"transferred directions keyed {k} do not fit class {k} of a head with d={dim}")
            projection = moved.projection(weight64[k], dtype=torch.float64)
            directions.append(projection.directions)
            offsets.append(projection.offsets)
            floors.append(torch.as_tensor(moved.alpha_floor(floor_percentile)))
            self.entries += [SpuriousEntry(k, l, True) for l in moved.source_components]
        owners = [entry.class_index for entry in self.entries]
        self._directions = _stack(directions, (0, dim), dtype, device)  # [M, d]
        self._offsets = _stack(offsets, (0,), dtype, device)  # [M]
        self._floors = _stack(floors, (0,), dtype, device)  # [M]
        self.device = self._directions.device
        self._owners = torch.as_tensor(owners, dtype=torch.int64, device=self.device)  # [M]
        self._assign = torch.zeros(len(owners), num_classes, dtype=dtype, device=self.device)
        self._assign[torch.arange(len(owners), device=self.device), self._owners] = 1.0
        self.spurious_classes: list[int] = sorted(set(owners))

    @staticmethod
    def _spurious_class(
        components: Mapping[int, ClassComponents], k: int, indices: list[int]
    ) -> ClassComponents:
        """The components a spurious label refers to; labels must point at kept components."""
        comp = components.get(k)
        if comp is None:
            raise FailedPrecondition(f"class {k} has spurious labels but no fitted components")
        if indices[0] < 0 or indices[-1] >= comp.num_components:
            raise InvalidInput(
                f"class {k}: spurious component indices {indices} outside [0, {comp.num_components})"
            )
        if comp.alphas.shape[0] and comp.alphas.shape[1] != comp.num_components:
            raise InvalidInput(
                f"class {k}: alphas have {comp.alphas.shape[1]} columns for {comp.num_components} components"
            )
        return comp

    def apply(
        self,
        features: torch.Tensor | np.ndarray,
        logits: torch.Tensor | np.ndarray,
        mode: SpufixModeName = "floor",
    ) -> torch.Tensor:
        """Fixed logits [N, C]; classes without spurious components are returned unchanged."""
        x, full = self._inputs(features, logits)
        return full - self._penalties(self._alphas(x), mode) @ self._assign

    def score(
        self,
        features: torch.Tensor | np.ndarray,
        logits: torch.Tensor | np.ndarray,
        mode: SpufixModeName = "floor",
        class_index: ClassIndex = None,
    ) -> SpuFixResult:
        """Fixed logits plus spurious_alpha and trigger for each image's analysed class."""
        x, full = self._inputs(features, logits)
        index = resolve_class_index(class_index, full)
        alphas = self._alphas(x)
        floor_penalties = self._penalties(alphas, "floor")
        penalties = floor_penalties if mode == "floor" else self._penalties(alphas, mode)
        fixed = full - penalties @ self._assign
        own = self._owners[None, :] == index[:, None]  # [N, M]: directions of the analysed class
        spurious_alpha = (floor_penalties * own).sum(dim=1)
        trigger = (full.argmax(dim=1) == index) & (fixed.argmax(dim=1) != index)
        return SpuFixResult(mode, index, fixed, spurious_alpha, trigger, alphas)

    def _inputs(
        self, features: torch.Tensor | np.ndarray, logits: torch.Tensor | np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = as_matrix(features, "features", cols=self.dim, dtype=self.dtype, device=self.device)
        return x, as_logits(logits, x.shape[0], self.num_classes, self.dtype, self.device)

    def _alphas(self, x: torch.Tensor) -> torch.Tensor:
        """Alphas [N, M] of every spurious component of every class."""
        return x @ self._directions.T - self._offsets

    def _penalties(self, alphas: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "paper":
            return alphas.clamp(min=0)
        if mode == "floor":
            if self._classes_without_floor:
                raise FailedPrecondition(
                    f"classes {self._classes_without_floor} have no fit-image alphas, "
                    "so their floor (and floor-mode SpuFix) is undefined"
                )
            return (alphas - self._floors).clamp(min=0)
        raise InvalidInput(f"unknown SpuFix mode {mode!r}; expected one of {SPUFIX_MODES}")


def _stack(
    parts: list[torch.Tensor], empty_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None
) -> torch.Tensor:
    """Concatenate per-class float64 parts, cast once; the right empty shape when no class is spurious."""
    whole = torch.cat(parts) if parts else torch.zeros(empty_shape, dtype=torch.float64)
    return whole.to(dtype=dtype, device=device)

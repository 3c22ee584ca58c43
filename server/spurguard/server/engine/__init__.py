"""The method as pure tensor math: neural PCA fit, decomposition, SpuFix, spurious score.

No gRPC, no files, no images: everything here takes features, heads and components and is
tested against float64 references. The machinery (input checks, projections) stays in the
modules; this is the surface the rest of the server uses.
"""
from spurguard.server.engine.components import DEFAULT_FLOOR_PERCENTILE, ClassComponents
from spurguard.server.engine.decompose import Decomposer, Decomposition, fit_alphas
from spurguard.server.engine.metrics import (
    average_precision,
    roc_auc,
    softmax,
    spurious_score_table,
)
from spurguard.server.engine.npca import (
    DEFAULT_NUM_COMPONENTS,
    ClassStatistics,
    NeuralPCAFit,
    fit_components,
    top_eigenpairs,
)
from spurguard.server.engine.spufix import SpuFix, SpuFixResult, SpuriousEntry
from spurguard.server.engine.transfer import MaxCovAccumulator, TransferredClass, transfer_alphas

__all__ = [
    "DEFAULT_FLOOR_PERCENTILE",
    "DEFAULT_NUM_COMPONENTS",
    "ClassComponents",
    "ClassStatistics",
    "Decomposer",
    "Decomposition",
    "MaxCovAccumulator",
    "NeuralPCAFit",
    "SpuFix",
    "SpuFixResult",
    "SpuriousEntry",
    "TransferredClass",
    "average_precision",
    "fit_alphas",
    "fit_components",
    "roc_auc",
    "softmax",
    "spurious_score_table",
    "top_eigenpairs",
    "transfer_alphas",
]

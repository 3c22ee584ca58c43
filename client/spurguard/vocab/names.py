"""The spelling of every enumerated value, once: what the CLI, JSON, the store and both sides'
Python code write. The proto's enum value names are these upper-cased (spurguard.wire maps
them); a request that leaves an enum unset is None here ("the server's default").
"""
from __future__ import annotations

from typing import Literal

LabelName = Literal["unlabeled", "spurious", "not_spurious", "inconsistent"]
SpufixModeName = Literal["paper", "floor"]
HeatmapMethodName = Literal["grad_cam", "integrated_gradients", "input_gradient", "none"]
AttackParameterizationName = Literal["pixel", "low_frequency", "jitter"]
JobStateName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JobKindName = Literal["fit", "transfer"]
# Which spurious directions an Evaluate's SpuFix removes: the model's own labels, the transfer
# in use, or both (what Score applies, and the default).
SpuriousDirectionsName = Literal["own", "transferred", "both"]

UNLABELED: LabelName = "unlabeled"
SPURIOUS: LabelName = "spurious"
LABELS: tuple[LabelName, ...] = ("spurious", "not_spurious", "inconsistent", "unlabeled")
SPUFIX_MODES: tuple[SpufixModeName, ...] = ("paper", "floor")
# "none": no heatmaps. grad_cam falls back to integrated_gradients where layers cannot be hooked.
HEATMAP_METHODS: tuple[HeatmapMethodName, ...] = ("grad_cam", "integrated_gradients", "input_gradient", "none")
DEFAULT_HEATMAP_METHOD: HeatmapMethodName = "grad_cam"
# How a feature attack moves the image: every pixel freely; through a coarse grid upsampled
# (smooth images); every pixel, with the image shifted at random at each step (no single-pixel
# tricks). Which one shows a feature best on which model: bench/run.py attack_readability.
ATTACK_PARAMETERIZATIONS: tuple[AttackParameterizationName, ...] = ("pixel", "low_frequency", "jitter")
DEFAULT_ATTACK_PARAMETERIZATION: AttackParameterizationName = "pixel"
SPURIOUS_DIRECTIONS: tuple[SpuriousDirectionsName, ...] = ("own", "transferred", "both")
FINISHED_JOB_STATES: frozenset[JobStateName] = frozenset({"succeeded", "failed", "cancelled"})

# google.rpc.Code by number: a status travels as a number inside messages (ErrorStatus.code)
# and as its name everywhere else. Kept here so that nothing torch- or grpc-free needs grpc.
STATUS_CODES: tuple[str, ...] = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)

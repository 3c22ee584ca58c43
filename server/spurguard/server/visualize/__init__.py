"""What a human looks at to label a component (SPEC §1): top fit images, feature attacks, heatmaps.

Gradient work (attacks, heatmaps) needs a backend with `features_with_grad` (a local torch
backend); others get FailedPrecondition. PNG encoding happens here, never in the attack loop.
"""
from spurguard.server.visualize.attack import (
    DEFAULT_FRAME_EVERY,
    DEFAULT_STEPS,
    AttackFrame,
    AttackResult,
    apgd_checkpoints,
    default_eps,
    feature_attack,
)
from spurguard.server.visualize.heatmap import (
    Heatmaps,
    capture_layer,
    component_heatmaps,
    overlay,
    overlay_pngs,
)
from spurguard.server.visualize.topimages import (
    TopImage,
    fit_image_path,
    thumbnail_pngs,
    top_images,
)

__all__ = [
    "DEFAULT_FRAME_EVERY",
    "DEFAULT_STEPS",
    "AttackFrame",
    "AttackResult",
    "Heatmaps",
    "TopImage",
    "apgd_checkpoints",
    "capture_layer",
    "component_heatmaps",
    "default_eps",
    "feature_attack",
    "fit_image_path",
    "overlay",
    "overlay_pngs",
    "thumbnail_pngs",
    "top_images",
]

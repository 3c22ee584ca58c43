"""The planted-spurious demo (SPEC §4): a generator of shape images with three planted spurious
features, and the small CNN trained on them that ships as the built-in model "demo" (and,
adversarially trained, as "demo_robust").

Kept free of torch and of the backends so that backends/builtins.py can find the shipped model
directory without an import cycle; the CNN and its training script live in `model` and `train`.
"""
from pathlib import Path

from spurguard.server.demo.generator import (
    CLASSES,
    FEATURE_SPECS,
    DemoDataset,
    FeatureInstance,
    FeatureSpec,
    GeneratorConfig,
    GroundTruth,
    ImageTruth,
    PlantedFeature,
    dataset_paths,
    generate,
    load_ground_truth,
    without_feature,
)

DEMO_MODEL_DIR = Path(__file__).with_name("model")
DEMO_ROBUST_MODEL_DIR = Path(__file__).with_name("model_robust")  # the built-in "demo_robust"

__all__ = [
    "CLASSES",
    "DEMO_MODEL_DIR",
    "DEMO_ROBUST_MODEL_DIR",
    "FEATURE_SPECS",
    "DemoDataset",
    "FeatureInstance",
    "FeatureSpec",
    "GeneratorConfig",
    "GroundTruth",
    "ImageTruth",
    "PlantedFeature",
    "dataset_paths",
    "generate",
    "load_ground_truth",
    "without_feature",
]

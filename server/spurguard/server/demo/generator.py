"""The planted-spurious image set of the demo (SPEC §4), deterministic from a seed.

Six shape classes on varied backgrounds (solid, gradient, smooth noise). Three spurious features
of different kinds are each planted in most training images of one class and a few of the others:

- ``watermark`` (local artefact, tied to star): a "STOCK" stamp, cyan text on a dark box, in a
  random corner;
- ``stripes`` (background pattern, tied to circle): diagonal stripes over the whole background;
- ``flower`` (co-occurring object, tied to triangle): a small magenta-and-yellow flower beside
  the main object.

Why procedural: the ground truth is exact (which image carries which feature, and where), so
tests can check that neural PCA finds each feature and that SpuFix removes it. Every image has
its own random stream derived from (seed, split, group, index), so the output is byte-identical
for a seed and does not depend on the order images are drawn in.

Layout under ``root`` (the SPEC §2 dataset layouts)::

    classes.txt                      class names, one per line
    ground_truth.json                generator settings, features, per-image truth
    train/<class>/NNNN.png           features planted at RATE_IN_CLASS / RATE_ELSEWHERE
    clean_test/<class>/NNNN.png      no planted feature anywhere
    spurious_test/spurious_imagenet_<k>_<feature>_0/NNNN.png
                                     class k's feature without a class-k object: even images show
                                     no object, odd ones a smaller object of another class
    masks/<split>/<folder>/NNNN_<feature>.png   where each planted feature instance lies

The last token of a spurious folder name is the component index, which is only known after a
fit: 0 is a placeholder. `evaluate` takes the class from token 2 and the component is only a
label, so the folders can be evaluated as they are.
"""
from __future__ import annotations

import colorsys
import json
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
# Share of the tied class's training images that carry its feature, and of every other class's.
# The few counterexamples elsewhere keep the feature a shortcut the model takes, not a rule.
RATE_IN_CLASS = 0.85
RATE_ELSEWHERE = 0.01
# Objects in the spurious test are this much smaller than training objects: a spurious feature
# is usually seen beside other, less prominent content.
SPURIOUS_OBJECT_SCALE = 0.6
GROUND_TRUTH = "ground_truth.json"
CLASSES_TXT = "classes.txt"
SPLITS = ("train", "clean_test", "spurious_test")
Drawer = Callable[[ImageDraw.ImageDraw, float], None]  # paints onto a canvas scaled by the factor
Circle = tuple[float, float, float]  # cx, cy, r
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)

_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges
# A 3x5 pixel font for the watermark, so the stamp never depends on which fonts are installed.
_WATERMARK_TEXT = "STOCK"
_GLYPHS = {
    "S": ("111", "100", "111", "001", "111"),
    "T": ("111", "010", "010", "010", "010"),
    "O": ("111", "101", "101", "101", "111"),
    "C": ("111", "100", "100", "100", "111"),
    "K": ("101", "101", "110", "101", "101"),
}
# Colours only the features use (objects and backgrounds avoid these hues), so a feature has
# units of its own in a model instead of sharing them with the objects it sits beside.
_TEXT = np.array([0.0, 1.0, 1.0], np.float32)  # cyan
_PETAL = np.array([1.0, 0.15, 0.75], np.float32)  # magenta
_CENTRE = np.array([1.0, 0.9, 0.1], np.float32)
_CYAN_HUES = (0.45, 0.55)
_MAGENTA_HUE = 0.78  # hues from here to 1 (violet to pink) are the flower's
# Backgrounds and objects sit on opposite sides of mid brightness, so every object is visible.
_DARK, _LIGHT = (0.12, 0.42), (0.62, 0.95)


@dataclass(frozen=True)
class FeatureSpec:
    """A planted feature: its name (a folder-name token, so no '_'), kind and tied class."""

    name: str
    kind: str
    class_index: int


FEATURE_SPECS = (
    FeatureSpec("watermark", "local_artefact", CLASSES.index("star")),
    FeatureSpec("stripes", "background_pattern", CLASSES.index("circle")),
    FeatureSpec("flower", "co_occurring_object", CLASSES.index("triangle")),
)


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything the images depend on besides the code; in ground_truth.json to regenerate them."""

    seed: int = 0
    train_per_class: int = 800
    test_per_class: int = 100
    spurious_per_feature: int = 100
    size: int = 64


@dataclass(frozen=True)
class PlantedFeature:
    """A planted feature with its rates as measured on the generated training set."""

    name: str
    kind: str
    class_index: int
    rate_in_class: float
    rate_elsewhere: float
    spurious_folder: str  # relative to the dataset root


@dataclass(frozen=True)
class FeatureInstance:
    """One feature in one image: `mask` is a 1-bit PNG relative to the root (white = the feature)."""

    name: str
    kind: str
    class_index: int
    mask: str
    bbox: Box


@dataclass(frozen=True)
class ImageTruth:
    """What an image shows: its object's class (None: no object) and its planted features."""

    split: str
    class_index: int | None
    features: tuple[FeatureInstance, ...]

    def has(self, name: str) -> bool:
        return any(f.name == name for f in self.features)


@dataclass(frozen=True)
class GroundTruth:
    """ground_truth.json, parsed; `images` is keyed by image id (path relative to the root)."""

    config: GeneratorConfig
    classes: tuple[str, ...]
    features: tuple[PlantedFeature, ...]
    images: dict[str, ImageTruth]


@dataclass(frozen=True)
class DemoDataset:
    """A generated dataset: its class names, features, and the paths of its parts."""

    root: Path
    classes: tuple[str, ...]
    features: tuple[PlantedFeature, ...]
    paths: dict[str, Path]  # train, clean_test, spurious_test, masks, classes, ground_truth


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def _colour(rng: np.random.Generator, value: tuple[float, float], saturation: tuple[float, float]) -> np.ndarray:
    """A random colour whose hue is none of the features' hues."""
    cyan_width = _CYAN_HUES[1] - _CYAN_HUES[0]
    hue = rng.uniform(0.0, _MAGENTA_HUE - cyan_width)
    hue += cyan_width * (hue >= _CYAN_HUES[0])
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(*saturation), rng.uniform(*value)), np.float32)


def _background(rng: np.random.Generator, size: int, dark: bool) -> np.ndarray:
    """Solid, linear gradient or smooth noise in the dark or the light brightness band, [H,W,3]."""
    band = _DARK if dark else _LIGHT
    kind = rng.integers(3)
    base = _colour(rng, band, (0.1, 0.8))
    if kind == 0:
        return np.broadcast_to(base, (size, size, 3)).copy()
    if kind == 1:
        other = _colour(rng, band, (0.1, 0.8))
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
        t = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)
        t = ((t - t.min()) / (t.max() - t.min()))[..., None]
        return base * (1 - t) + other * t
    coarse = rng.uniform(-1, 1, (3, 6, 6)).astype(np.float32)
    smooth = np.stack(
        [np.asarray(Image.fromarray(c).resize((size, size), Image.Resampling.BICUBIC)) for c in coarse], axis=-1
    )
    grain = rng.normal(0, 0.03, (size, size, 3)).astype(np.float32)
    return np.clip(base + 0.12 * smooth + grain, band[0] - 0.1, band[1] + 0.05)


def _alpha(size: int, draw: Drawer) -> np.ndarray:
    """Coverage [H,W] in [0,1] of what `draw` paints, anti-aliased by supersampling."""
    canvas = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
    draw(ImageDraw.Draw(canvas), _SUPERSAMPLE)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), np.float32) / 255.0


def _polygon(points: Sequence[tuple[float, float]], cx: float, cy: float, r: float, angle: float) -> Drawer:
    """Unit-radius `points`, rotated by `angle`, scaled by r and centred at (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)

    def draw(d: ImageDraw.ImageDraw, k: float) -> None:
        d.polygon([((cx + r * (x * c - y * s)) * k, (cy + r * (x * s + y * c)) * k) for x, y in points], fill=255)

    return draw


def _disc(cx: float, cy: float, r: float, hole: float = 0.0) -> Drawer:
    """A disc of radius r, with a hole of radius hole * r when hole > 0."""
    def draw(d: ImageDraw.ImageDraw, k: float) -> None:
        d.ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k], fill=255)
        if hole:
            h = r * hole
            d.ellipse([(cx - h) * k, (cy - h) * k, (cx + h) * k, (cy + h) * k], fill=0)

    return draw


def _regular(n: int, radii: Sequence[float] = (1.0,)) -> list[tuple[float, float]]:
    """Vertices of a regular n-gon (or a star, cycling through `radii`), first vertex up."""
    return [
        (radii[i % len(radii)] * math.sin(2 * math.pi * i / n), -radii[i % len(radii)] * math.cos(2 * math.pi * i / n))
        for i in range(n)
    ]


_ARM = 0.34
_CROSS = [(_ARM, 1), (_ARM, _ARM), (1, _ARM), (1, -_ARM), (_ARM, -_ARM), (_ARM, -1),
          (-_ARM, -1), (-_ARM, -_ARM), (-1, -_ARM), (-1, _ARM), (-_ARM, _ARM), (-_ARM, 1)]
_SHAPES: dict[str, Callable[[float, float, float, float], Drawer]] = {  # (cx, cy, r, angle) -> drawer
    "circle": lambda cx, cy, r, a: _disc(cx, cy, 0.85 * r),
    "square": lambda cx, cy, r, a: _polygon(_regular(4), cx, cy, r, a),
    "triangle": lambda cx, cy, r, a: _polygon(_regular(3), cx, cy, r, a),
    "star": lambda cx, cy, r, a: _polygon(_regular(10, (1.0, 0.45)), cx, cy, r, a),
    "cross": lambda cx, cy, r, a: _polygon(_CROSS, cx, cy, r, a),
    "ring": lambda cx, cy, r, a: _disc(cx, cy, r, hole=0.55),
}


def _paint(image: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    image *= 1 - alpha[..., None]
    image += alpha[..., None] * colour


STRIPE_PERIODS = (0.1, 0.16)  # the stripes' period, as a share of the side
STRIPE_ANGLES = (math.pi / 4, 3 * math.pi / 4)  # their wave vector's direction, each ± STRIPE_ANGLE_SPREAD
STRIPE_ANGLE_SPREAD = 0.2


def _stripes(rng: np.random.Generator, image: np.ndarray, dark: bool) -> None:
    """Diagonal stripes over the background, pushed away from mid brightness (objects keep contrast)."""
    size = image.shape[0]
    period = rng.uniform(*STRIPE_PERIODS) * size
    angle = rng.choice(STRIPE_ANGLES) + rng.uniform(-STRIPE_ANGLE_SPREAD, STRIPE_ANGLE_SPREAD)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period + rng.uniform()
    on = ((phase % 1.0) < 0.5).astype(np.float32)[..., None]
    shifted = image * 0.35 if dark else image + (1 - image) * 0.75
    image[:] = image * (1 - on) + shifted * on


def _flower(cx: float, cy: float, r: float) -> tuple[Drawer, Drawer]:
    """(petals, centre) drawers of a five-petal flower of outer radius r."""
    petal_r = 0.38 * r
    petals = [
        (cx + (r - petal_r) * math.sin(2 * math.pi * i / 5), cy - (r - petal_r) * math.cos(2 * math.pi * i / 5))
        for i in range(5)
    ]

    def draw_petals(d: ImageDraw.ImageDraw, k: float) -> None:
        for px, py in petals:
            _disc(px, py, petal_r)(d, k)

    return draw_petals, _disc(cx, cy, 0.36 * r)


def _stamp_shape(size: int) -> tuple[int, int, int]:
    """(pixel scale, width, height) of the watermark stamp."""
    scale = size // 64
    return scale, (4 * len(_WATERMARK_TEXT) + 3) * scale, 9 * scale


def _apart(a: Circle, b: Circle) -> bool:
    return math.hypot(a[0] - b[0], a[1] - b[1]) >= a[2] + b[2] + 1


def _clear_of_box(c: Circle, box: Box) -> bool:
    nearest_x, nearest_y = min(max(c[0], box[0]), box[2]), min(max(c[1], box[1]), box[3])
    return math.hypot(c[0] - nearest_x, c[1] - nearest_y) >= c[2] + 1


def _layout(
    rng: np.random.Generator, size: int, object_r: float | None, flower_r: float | None, stamp: bool
) -> tuple[Circle | None, Circle | None, Box | None]:
    """Positions of the object, the flower and the stamp such that none covers another.

    Why: an object partly hidden whenever a feature is planted would tie the feature to the
    object in the model's features; kept apart, each one's evidence adds up on its own. Sizes
    are drawn before and kept, so only positions are resampled.
    """
    scale, box_w, box_h = _stamp_shape(size)
    margin = 2 * scale

    def centre(r: float) -> Circle:
        return rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1), r

    for _ in range(10_000):
        obj = None if object_r is None else centre(object_r)
        flower = None if flower_r is None else centre(flower_r)
        box = None
        if stamp:
            x0 = margin if rng.integers(2) == 0 else size - margin - box_w
            y0 = margin if rng.integers(2) == 0 else size - margin - box_h
            box = (x0, y0, x0 + box_w, y0 + box_h)
        circles = [c for c in (obj, flower) if c is not None]
        if (len(circles) < 2 or _apart(*circles)) and (box is None or all(_clear_of_box(c, box) for c in circles)):
            return obj, flower, box
    raise RuntimeError("no layout keeps the object and the features apart")


def _watermark(image: np.ndarray, box: Box) -> None:
    """The 'STOCK' stamp, cyan text on a darkened box, at `box`."""
    scale = _stamp_shape(image.shape[0])[0]
    x0, y0, x1, y1 = box
    region = image[y0:y1, x0:x1]
    region *= 0.3
    for i, letter in enumerate(_WATERMARK_TEXT):
        for row, bits in enumerate(_GLYPHS[letter]):
            for col, bit in enumerate(bits):
                if bit == "1":
                    ty, tx = (2 + row) * scale, (2 + 4 * i + col) * scale
                    region[ty:ty + scale, tx:tx + scale] = _TEXT


def render(
    rng: np.random.Generator,
    size: int,
    class_index: int | None,
    features: Sequence[str],
    object_scale: float = 1.0,
    hidden: Collection[str] = (),
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One image (uint8 [H,W,3]) with its object (None: none) and features, and each painted
    feature's mask.

    Drawn bottom up: background, stripes, object, flower, stamp. The stripes' mask is where they
    show (not covered by the object, the flower or the stamp). Features in `hidden` are laid out
    but not painted: the same image without them, the counterfactual that tells whether a
    feature is what a prediction stands on.
    """
    dark = bool(rng.integers(2))
    image = _background(rng, size, dark)
    if "stripes" in features:
        _stripes(rng, image.copy() if "stripes" in hidden else image, dark)
    object_r = None if class_index is None else rng.uniform(0.2, 0.3) * size * object_scale
    flower_r = rng.uniform(0.12, 0.16) * size if "flower" in features else None
    obj, flower, box = _layout(rng, size, object_r, flower_r, "watermark" in features)
    covered = np.zeros((size, size), bool)
    masks: dict[str, np.ndarray] = {}
    if obj is not None:
        alpha = _alpha(size, _SHAPES[CLASSES[class_index]](*obj, rng.uniform(0, 2 * math.pi)))
        _paint(image, alpha, _colour(rng, _LIGHT if dark else _DARK, (0.4, 1.0)))
        covered |= alpha > 0.5
    if flower is not None and "flower" not in hidden:
        petals, centre = _flower(*flower)
        petal_alpha, centre_alpha = _alpha(size, petals), _alpha(size, centre)
        _paint(image, petal_alpha, _PETAL)
        _paint(image, centre_alpha, _CENTRE)
        masks["flower"] = np.maximum(petal_alpha, centre_alpha) > 0.5
        covered |= masks["flower"]
    if box is not None and "watermark" not in hidden:
        _watermark(image, box)
        masks["watermark"] = np.zeros((size, size), bool)
        masks["watermark"][box[1]:box[3], box[0]:box[2]] = True
        covered |= masks["watermark"]
    if "stripes" in features and "stripes" not in hidden:
        masks["stripes"] = ~covered
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), masks


def _bbox(mask: np.ndarray) -> Box:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _train_plan(seed: int, n: int) -> list[list[list[str]]]:
    """plan[k][i]: the features planted in training image i of class k (exact counts, random images)."""
    plan: list[list[list[str]]] = [[[] for _ in range(n)] for _ in CLASSES]
    for f_index, spec in enumerate(FEATURE_SPECS):
        for k in range(len(CLASSES)):
            rate = RATE_IN_CLASS if k == spec.class_index else RATE_ELSEWHERE
            for i in sorted(_rng(seed, 100, f_index, k).permutation(n)[: round(rate * n)]):
                plan[k][i].append(spec.name)
    return plan


class _Writer:
    """Writes images and masks under the root and collects their ground truth."""

    def __init__(self, root: Path, config: GeneratorConfig) -> None:
        self.root, self.config = root, config
        self.images: dict[str, dict[str, Any]] = {}

    def write(self, split: str, folder: str, index: int, key: tuple[int, ...], class_index: int | None,
              features: Sequence[str], object_scale: float = 1.0) -> None:
        pixels, masks = render(_rng(self.config.seed, *key), self.config.size, class_index, features, object_scale)
        image_id = f"{split}/{folder}/{index:04d}.png"
        (self.root / split / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(self.root / image_id)
        instances = []
        for spec in FEATURE_SPECS:
            if spec.name in masks:
                mask_id = f"masks/{split}/{folder}/{index:04d}_{spec.name}.png"
                (self.root / mask_id).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(masks[spec.name]).save(self.root / mask_id)
                instances.append({**asdict(spec), "mask": mask_id, "bbox": list(_bbox(masks[spec.name]))})
        self.images[image_id] = {"split": split, "class_index": class_index, "features": instances}


def generate(
    root: Path,
    seed: int = 0,
    *,
    train_per_class: int = GeneratorConfig.train_per_class,
    test_per_class: int = GeneratorConfig.test_per_class,
    spurious_per_feature: int = GeneratorConfig.spurious_per_feature,
    size: int = GeneratorConfig.size,
) -> DemoDataset:
    """Write the dataset under `root` (absent or empty); the same arguments give the same bytes."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; the demo dataset is written into a fresh folder")
    if min(train_per_class, test_per_class, spurious_per_feature) < 1 or size < 64:
        raise ValueError("need at least one image per class and per feature, and size >= 64")
    config = GeneratorConfig(seed, train_per_class, test_per_class, spurious_per_feature, size)
    root.mkdir(parents=True, exist_ok=True)
    writer = _Writer(root, config)
    plan = _train_plan(seed, train_per_class)
    for k, name in enumerate(CLASSES):
        for i in range(train_per_class):
            writer.write("train", name, i, (0, k, i), k, plan[k][i])
        for i in range(test_per_class):
            writer.write("clean_test", name, i, (1, k, i), k, ())
    features = []
    for f_index, spec in enumerate(FEATURE_SPECS):
        folder = _spurious_folder(spec)
        for i in range(spurious_per_feature):
            writer.write("spurious_test", folder, i, (2, f_index, i), _spurious_object(seed, f_index, i),
                         (spec.name,), SPURIOUS_OBJECT_SCALE)
        elsewhere = sum(spec.name in p for k, images in enumerate(plan) if k != spec.class_index for p in images)
        features.append(
            PlantedFeature(
                name=spec.name,
                kind=spec.kind,
                class_index=spec.class_index,
                rate_in_class=sum(spec.name in p for p in plan[spec.class_index]) / train_per_class,
                rate_elsewhere=elsewhere / (train_per_class * (len(CLASSES) - 1)),
                spurious_folder=f"spurious_test/{folder}",
            )
        )
    (root / CLASSES_TXT).write_text("".join(f"{name}\n" for name in CLASSES), encoding="utf-8")
    truth = {
        "generator": asdict(config),
        "classes": list(CLASSES),
        "features": [asdict(f) for f in features],
        "images": writer.images,
    }
    (root / GROUND_TRUTH).write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return DemoDataset(root, CLASSES, tuple(features), dataset_paths(root))


def _spurious_folder(spec: FeatureSpec) -> str:
    """The Spurious ImageNet folder of a feature: class index as token 2, component placeholder 0."""
    return f"spurious_imagenet_{spec.class_index}_{spec.name}_0"


def _spurious_object(seed: int, f_index: int, i: int) -> int | None:
    """The object beside spurious-test image i of feature f_index: none on even images, a
    class other than the feature's on odd ones."""
    if i % 2 == 0:
        return None
    others = [k for k in range(len(CLASSES)) if k != FEATURE_SPECS[f_index].class_index]
    return int(_rng(seed, 3, f_index, i).choice(others))


def without_feature(config: GeneratorConfig, image_id: str) -> np.ndarray:
    """Spurious-test image `image_id` (as in ground_truth.json) re-rendered without its planted
    feature, everything else identical: what the model would see if the feature were absent."""
    split, folder, name = image_id.split("/")
    spec_index = next((i for i, s in enumerate(FEATURE_SPECS) if folder == _spurious_folder(s)), None)
    if split != "spurious_test" or spec_index is None:
        raise ValueError(f"{image_id!r} is not a spurious-test image")
    i = int(Path(name).stem)
    feature = FEATURE_SPECS[spec_index].name
    pixels, _ = render(
        _rng(config.seed, 2, spec_index, i), config.size, _spurious_object(config.seed, spec_index, i), (feature,),
        SPURIOUS_OBJECT_SCALE, hidden=(feature,),
    )
    return pixels


def dataset_paths(root: Path) -> dict[str, Path]:
    """The parts of a dataset root, by name."""
    root = Path(root)
    return {
        **{split: root / split for split in SPLITS},
        "masks": root / "masks",
        "classes": root / CLASSES_TXT,
        "ground_truth": root / GROUND_TRUTH,
    }


def load_ground_truth(root: Path) -> GroundTruth:
    """Parse ROOT/ground_truth.json as written by `generate`."""
    raw = json.loads((Path(root) / GROUND_TRUTH).read_text(encoding="utf-8"))
    images = {
        image_id: ImageTruth(
            entry["split"],
            entry["class_index"],
            tuple(FeatureInstance(**{**f, "bbox": tuple(f["bbox"])}) for f in entry["features"]),
        )
        for image_id, entry in raw["images"].items()
    }
    return GroundTruth(
        GeneratorConfig(**raw["generator"]),
        tuple(raw["classes"]),
        tuple(PlantedFeature(**f) for f in raw["features"]),
        images,
    )

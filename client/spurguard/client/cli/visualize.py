"""Where `spurguard visualize` puts the PNGs of a Visualize stream, and its `--json` summary.

Each PNG is written as soon as it arrives, so an interrupted or failed stream still leaves what
was made. Layout under `--out` (stable, so `report` and scripts can rely on it):

    class_<K>/component_<L>/top_<rank>.png       a fit image with one of the largest alphas
    class_<K>/component_<L>/heatmap_<rank>.png   where alpha comes from in that image
    class_<K>/component_<L>/frame_<step>.png     the feature attack in progress
    class_<K>/component_<L>/attack.png           the attack's final image
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from spurguard import vocab as t


def png_path(out: Path, class_index: int, update: t.VisualizeUpdate) -> Path:
    """The file an update's PNG goes to (see the module docstring)."""
    folder = out / f"class_{class_index}" / f"component_{update.component}"
    if isinstance(update, t.TopImage):
        return folder / f"top_{update.rank:02d}.png"
    if isinstance(update, t.Heatmap):
        return folder / f"heatmap_{update.rank:02d}.png"
    if isinstance(update, t.AttackFrame):
        return folder / f"frame_{update.step:04d}.png"
    return folder / "attack.png"


class VisualizeWriter:
    """Writes each update's PNG under `out` and gathers the `visualize --json` summary."""

    def __init__(self, out: Path, class_index: int) -> None:
        self.out = out
        self.class_index = class_index
        self._components: dict[int, dict[str, Any]] = {}  # in order of first appearance
        self._top_images: dict[int, dict[int, dict[str, Any]]] = {}  # component -> rank -> entry

    def add(self, update: t.VisualizeUpdate) -> Path:
        """Write the update's PNG; returns its path."""
        path = png_path(self.out, self.class_index, update)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(update.png)
        entry = self._components.setdefault(
            update.component,
            {
                "index": update.component,
                "start_alpha": None,
                "final_alpha": None,
                "final_prob": None,
                "steps": None,
                "eps": None,
                "parameterization": None,
                "attack_image": None,
                "frames": [],
            },
        )
        if isinstance(update, (t.TopImage, t.Heatmap)):
            ranks = self._top_images.setdefault(update.component, {})
            top = ranks.setdefault(update.rank, {
                "image": update.path, "image_id": update.image_id, "alpha": update.alpha,
                "heatmap": None, "heatmap_method": None, "png": None,
            })
            if isinstance(update, t.Heatmap):
                top.update(heatmap=str(path), heatmap_method=update.method)
            else:
                top["png"] = str(path)
        elif isinstance(update, t.AttackFrame):
            entry["frames"].append({"step": update.step, "alpha": update.alpha, "prob": update.prob, "png": str(path)})
        else:
            entry.update(
                start_alpha=update.start_alpha,
                final_alpha=update.final_alpha,
                final_prob=update.final_prob,
                steps=update.steps,
                eps=update.eps,
                parameterization=update.parameterization,
                attack_image=str(path),
            )
        return path

    def summary(self, model: str) -> dict[str, Any]:
        """`visualize --json`: {model, class, components: [{index, start_alpha, final_alpha,
        final_prob, attack_image, top_images: [{image, alpha, heatmap}]}]}, `image` the fit image's
        path as the server read it; `image_id` (relative to the fit's dataset), `png` (the top
        image's copy), `heatmap_method`, `steps`, `eps`, `parameterization` and `frames` are extra keys."""
        components = []
        for index, entry in self._components.items():
            ranks = self._top_images.get(index, {})
            components.append({**entry, "top_images": [ranks[rank] for rank in sorted(ranks)]})
        return {"model": model, "class": self.class_index, "components": components}

"""Image-folder datasets in the two layouts of SPEC §2.

`root/<class>/<image>`, where `<class>` is a class index, an ImageNet wnid or a class name; and
the Spurious ImageNet layout, whose folder names carry the class index as token 2 and the
component index as the last token (`spurious_imagenet_<class>_..._<component>`). Listing is
sorted and grouped by class so a fit can finish one class before it starts the next.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from spurguard.server.errors import InvalidInput, NotFound
from spurguard.vocab import IMAGE_SUFFIXES


@dataclass(frozen=True)
class ImageEntry:
    """One image of a dataset: where it is, which class it belongs to, and its id in the store."""

    path: Path
    class_index: int
    image_id: str  # path relative to the dataset root, with forward slashes


class ClassResolver:
    """Maps a folder name to a class index: index, ImageNet wnid or class name (SPEC §2)."""

    def __init__(self, class_names: Sequence[str], class_wnids: Sequence[str | None] = ()) -> None:
        self.num_classes = len(class_names)
        self._by_name: dict[str, int] = {}
        for index, name in enumerate(class_names):
            for key in {name, name.replace(" ", "_")}:
                self._by_name.setdefault(key.lower(), index)
        self._by_wnid = {wnid: i for i, wnid in enumerate(class_wnids) if wnid}

    def resolve(self, folder: str) -> int:
        if folder.isdigit():
            index = int(folder)
            if index >= self.num_classes:
                raise InvalidInput(
                    f"class folder {folder!r}: index out of range for a model with {self.num_classes} classes"
                )
            return index
        if folder in self._by_wnid:
            return self._by_wnid[folder]
        if folder.lower() in self._by_name:
            return self._by_name[folder.lower()]
        raise InvalidInput(
            f"class folder {folder!r} is neither a class index, a wnid nor a class name of the model"
        )


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _require_dir(root: Path) -> None:
    if not root.is_dir():
        raise NotFound(f"dataset folder {str(root)!r} does not exist or is not a folder")


def list_image_folder(
    root: str | os.PathLike[str],
    resolver: ClassResolver,
    classes: Sequence[int] | None = None,
) -> list[ImageEntry]:
    """All images of `root/<class>/<image>`, grouped by class index (ascending), then by name.

    `classes` restricts the listing; a requested class with no folder is an error rather than a
    silently empty fit.
    """
    root = Path(root)
    _require_dir(root)
    by_class: dict[int, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        index = resolver.resolve(folder.name)
        by_class.setdefault(index, []).extend(_images_in(folder))
    wanted = sorted(by_class) if classes is None else sorted(set(classes))
    missing = [k for k in wanted if not by_class.get(k)]
    if missing:
        raise InvalidInput(f"dataset {str(root)!r} has no images for class(es) {missing}")
    if not wanted:
        raise InvalidInput(f"dataset {str(root)!r} has no class folders with images")
    return [
        ImageEntry(path, k, path.relative_to(root).as_posix())
        for k in wanted
        for path in sorted(by_class[k])
    ]


@dataclass(frozen=True)
class SpuriousEntry(ImageEntry):
    """An image of the Spurious ImageNet layout: it shows class k's spurious feature, not class k."""

    component_index: int = -1


def parse_spurious_folder(name: str) -> tuple[int, int]:
    """(class index, component index) of a Spurious ImageNet folder name."""
    tokens = name.split("_")
    try:
        return int(tokens[2]), int(tokens[-1])
    except (IndexError, ValueError):
        raise InvalidInput(
            f"folder {name!r} does not follow the Spurious ImageNet layout "
            "spurious_imagenet_<class>_..._<component>"
        ) from None


def list_spurious_folder(
    root: str | os.PathLike[str], num_classes: int
) -> list[SpuriousEntry]:
    """All images of a Spurious ImageNet folder, grouped by class index."""
    root = Path(root)
    _require_dir(root)
    entries: list[SpuriousEntry] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        class_index, component = parse_spurious_folder(folder.name)
        if class_index >= num_classes:
            raise InvalidInput(
                f"folder {folder.name!r}: class {class_index} out of range for {num_classes} classes"
            )
        entries.extend(
            SpuriousEntry(path, class_index, path.relative_to(root).as_posix(), component)
            for path in _images_in(folder)
        )
    if not entries:
        raise InvalidInput(f"dataset {str(root)!r} has no spurious_imagenet_* folders with images")
    entries.sort(key=lambda e: (e.class_index, e.image_id))
    return entries

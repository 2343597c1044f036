"""Dataset references: parsing only, torch-free (the HTTP layer validates with it).

Grammar::

    fashion-mnist[:ROOT]        original idx files (default root /usr/share/datasets/fashion-mnist)
    cifar10[:ROOT] ... imagenet[:ROOT]   torchvision datasets (see TORCHVISION_DATASETS)
    imagefolder:PATH            PATH/train + PATH/val (or PATH/test), or one folder split
    digits                      scikit-learn's bundled 8x8 digits
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flow_compress.errors import InvalidDatasetError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
DEFAULT_TORCHVISION_ROOT = "~/.cache/flow-compress/datasets"

# name -> number of classes (None where it depends on the data on disk)
TORCHVISION_DATASETS: dict[str, int | None] = {
    "cifar10": 10,
    "cifar100": 100,
    "flowers102": 102,
    "food101": 101,
    "oxford-iiit-pet": 37,
    "stanford-cars": 196,
    "fer2013": 7,
    "inaturalist": None,
    "imagenet": 1000,
}
BUILTIN_DATASETS = ("fashion-mnist", "digits", "imagefolder", *TORCHVISION_DATASETS)

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


@dataclass(frozen=True)
class DatasetRef:
    """A parsed reference: ``name`` is one of ``BUILTIN_DATASETS``; ``root`` may be None."""

    name: str
    root: str | None
    raw: str


def parse_dataset_ref(ref: str) -> DatasetRef:
    """Parse a reference; unknown names or a missing imagefolder path raise InvalidDatasetError."""
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidDatasetError("dataset reference is empty")
    raw = ref.strip()
    name, sep, root = raw.partition(":")
    name = name.strip().lower()
    if not _NAME.match(name) or name not in BUILTIN_DATASETS:
        raise InvalidDatasetError(
            f"unknown dataset {name!r}; valid: {', '.join(BUILTIN_DATASETS)} "
            "(imagefolder:PATH for your own images)"
        )
    root_value = root.strip() if sep else None
    if name == "imagefolder" and not root_value:
        raise InvalidDatasetError("imagefolder needs a path: imagefolder:/path/to/images")
    if name == "digits" and root_value:
        raise InvalidDatasetError("digits is bundled with scikit-learn and takes no root")
    if root_value is not None and ("\x00" in root_value or not root_value):
        raise InvalidDatasetError("dataset root is not a valid path")
    return DatasetRef(name=name, root=root_value, raw=raw)


def known_num_classes(ref: DatasetRef) -> int | None:
    """Classes known from the name alone (None for imagefolder/inaturalist)."""
    if ref.name in ("fashion-mnist", "digits"):
        return 10
    return TORCHVISION_DATASETS.get(ref.name)


__all__ = [
    "BUILTIN_DATASETS",
    "FASHION_MNIST_ROOT",
    "TORCHVISION_DATASETS",
    "DatasetRef",
    "known_num_classes",
    "parse_dataset_ref",
]

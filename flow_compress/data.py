"""Datasets by reference, split into train / validation / test, fed as normalised batches.

Contract:
- The validation split is carved from the training data with a fixed generator
  (``SPLIT_SEED``), independent of the run seed, so every run and every method sees the same
  validation images. Calibration, the accuracy budget and all selections use it.
- The test split is read only for the final report.
- Datasets yield ``uint8`` CHW tensors; resizing to the model's input size, grey→RGB (or
  RGB→grey), augmentation and normalisation happen per batch in ``BatchTransform``, which is
  built from the splits' ``InputContract`` (``flow_compress.contract``): the preprocessing
  every artifact states is, by construction, the one the model was fed.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from flow_compress.config import DataConfig
from flow_compress.contract import (
    InputContract,
    Normalization,
    NormalizationSource,
    build_contract,
)
from flow_compress.errors import DatasetNotFoundError, InvalidConfigError, InvalidDatasetError
from flow_compress.refs import (
    DEFAULT_TORCHVISION_ROOT,
    FASHION_MNIST_ROOT,
    DatasetRef,
    parse_dataset_ref,
)

SPLIT_SEED = 20251125
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGITS_CLASSES = tuple(str(i) for i in range(10))

Batch = tuple[torch.Tensor, torch.Tensor]


class TensorImages(Dataset[tuple[torch.Tensor, int]]):
    """In-memory images: ``images`` uint8 N×C×H×W, ``labels`` int64 N."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise InvalidDatasetError("images must be uint8 N×C×H×W with one label each")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


@dataclass
class DataSplits:
    """Train / validation / test datasets of one reference, and how to feed them."""

    ref: DatasetRef
    train: Dataset[tuple[torch.Tensor, int]]
    val: Dataset[tuple[torch.Tensor, int]]
    test: Dataset[tuple[torch.Tensor, int]]
    num_classes: int
    in_chans: int
    input_size: int
    hflip: bool
    config: DataConfig
    contract: InputContract

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}  # type: ignore[arg-type]

    def transform(self, augment: bool) -> BatchTransform:
        return BatchTransform(self.contract, augment=augment, hflip=self.hflip)

    def _uint8_batches(
        self, split: str, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Generator]]:
        """The split's uint8 images as stored, in batches (with the generator that shuffled
        them, for the augmentation to continue drawing from)."""
        dataset = {"train": self.train, "val": self.val, "test": self.test}[split]
        gen = torch.Generator().manual_seed(seed)
        fast = _as_tensor_images(dataset)
        if fast is not None:
            images, labels = fast
            n = len(images)
            order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
            stop = n - n % batch_size if drop_last and n >= batch_size else n
            for s in range(0, stop, batch_size):
                idx = order[s : s + batch_size]
                yield images[idx], labels[idx], gen
            return
        dl = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=gen,
            num_workers=self.config.num_workers,
            drop_last=drop_last,
        )
        for x, y in dl:
            yield x, y, gen

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """One pass over a split, yielding normalised float batches (on CPU)."""
        tf = self.transform(augment and self.config.augment)
        for x, y, gen in self._uint8_batches(
            split, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last
        ):
            yield tf(x, gen), y

    def forever(self, batch_size: int, *, seed: int = 0, augment: bool = True) -> Iterator[Batch]:
        """Endless shuffled training batches, reshuffled every epoch (iteration-based loops)."""
        epoch = 0
        while True:
            yielded = False
            for batch in self.loader(
                "train",
                batch_size,
                shuffle=True,
                augment=augment,
                seed=seed * 100_003 + epoch,
                drop_last=True,
            ):
                yielded = True
                yield batch
            if not yielded:
                raise InvalidDatasetError("training split is smaller than one batch")
            epoch += 1

    def calibration_batches(self, n_batches: int, batch_size: int) -> list[Batch]:
        """The first ``n_batches`` validation batches (fixed order: scores are reproducible)."""
        out: list[Batch] = []
        for batch in self.loader("val", batch_size):
            out.append(batch)
            if len(out) >= n_batches:
                break
        return out

    def sample_inputs(self, n: int, split: str = "val") -> torch.Tensor:
        """``n`` real, normalised inputs (for export parity and the guarantee check)."""
        xs: list[torch.Tensor] = []
        got = 0
        for x, _ in self.loader(split, min(n, 256)):
            xs.append(x)
            got += len(x)
            if got >= n:
                break
        return torch.cat(xs)[:n]

    def raw_samples(self, n: int, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` images of a split as a deployment receives them after its resize
        (and crop): uint8, N × H × W × C at the contract's input size, with their labels.
        ``BatchTransform.normalise_raw`` of them is what the model is fed."""
        tf = self.transform(augment=False)
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        got = 0
        for x, y, _ in self._uint8_batches(
            split, min(n, 256), shuffle=False, seed=0, drop_last=False
        ):
            xs.append(to_uint8_nhwc(tf.geometry(x)))
            ys.append(y)
            got += len(x)
            if got >= n:
                break
        return torch.cat(xs)[:n], torch.cat(ys)[:n]


def to_uint8_nhwc(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] (N × C × H × W) as rounded uint8 N × H × W × C."""
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _as_tensor_images(ds: object) -> tuple[torch.Tensor, torch.Tensor] | None:
    if isinstance(ds, TensorImages):
        return ds.images, ds.labels
    if isinstance(ds, Subset):
        inner = _as_tensor_images(ds.dataset)
        if inner is not None:
            idx = torch.as_tensor(list(ds.indices), dtype=torch.long)
            return inner[0][idx], inner[1][idx]
    return None


class BatchTransform:
    """uint8 batch → float batch prepared as ``contract`` says (channels, resize, crop,
    normalisation), with the training augmentation in between when ``augment``."""

    def __init__(self, contract: InputContract, *, augment: bool, hflip: bool) -> None:
        self.contract = contract
        self.input_size = contract.height
        self.in_chans = contract.channels
        self.augment = augment
        self.hflip = hflip

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        x = self.geometry(x)
        if self.augment:
            x = self._augment(x, gen)
        return self.normalise(x)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] at the input size (N × C × H × W) → the model's input."""
        mean = torch.tensor(self.contract.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.contract.std).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()

    def normalise_raw(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N × H × W × C images already at the input size (``DataSplits.raw_samples``)
        → the model's input, as ``model.raw.onnx`` computes it in its graph."""
        x = images.permute(0, 3, 1, 2).float().div(self.contract.pixel_divisor)
        return self.normalise(x)

    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images → float images in [0, 1] with the contract's channels, resized and
        cropped to the input size (not normalised)."""
        c = self.contract
        x = x.float().div_(c.pixel_divisor)
        channels = x.shape[1]
        if channels != c.channels:
            if channels == 1:
                x = x.expand(-1, c.channels, -1, -1)
            elif c.channels == 1:
                x = x[:, :3].mean(dim=1, keepdim=True)
            else:
                raise InvalidDatasetError(f"cannot map {channels} image channels to {c.channels}")
        size = c.resize.size
        if tuple(x.shape[-2:]) != size:
            mode = c.resize.interpolation
            down = x.shape[-1] > size[1] or x.shape[-2] > size[0]
            x = F.interpolate(
                x,
                size=size,
                mode=mode,
                align_corners=None if mode == "nearest" else c.resize.align_corners,
                antialias=down and mode != "nearest" and c.resize.antialias,
            )
            # Bicubic overshoots; a deployment resizing uint8 images clips the same way.
            x = x.clamp_(*c.value_range)
        if c.crop is not None:
            h, w = c.crop
            top = round((size[0] - h) / 2)
            left = round((size[1] - w) / 2)
            x = x[:, :, top : top + h, left : left + w]
        return x

    def _augment(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        # Random crop with zero padding of 1/8 of the side, and horizontal flips where the
        # classes are flip-invariant: the standard CIFAR/Fashion-MNIST recipe.
        n, _, h, w = x.shape
        pad = max(1, self.input_size // 8)
        padded = F.pad(x, (pad, pad, pad, pad))
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)
        bidx = torch.arange(n).view(n, 1, 1, 1)
        out = padded[bidx, torch.arange(x.shape[1]).view(1, -1, 1, 1), rows, cols]
        if self.hflip:
            flip = torch.rand(n, generator=gen) < 0.5
            out[flip] = out[flip].flip(-1)
        return out


# --------------------------------------------------------------------------- loading


def load_dataset(
    ref: str | DatasetRef,
    *,
    input_size: int,
    in_chans: int = 3,
    config: DataConfig | None = None,
    normalization: Normalization | None = None,
) -> DataSplits:
    """Resolve a reference into splits. Missing data → DatasetNotFoundError (with the fix).

    The splits' ``contract`` (``flow_compress.contract.build_contract``) uses
    ``normalization`` when given (an architecture's published preprocessing, resolved by the
    caller: ``flow_compress.arch.models.pretrained_normalization``; its source is then
    ``pretrained``), else ``config.custom_normalization`` (source ``config``), else the
    default. ``config.normalization == "pretrained"`` without ``normalization`` is an
    ``InvalidConfigError``: only the caller knows the architecture.
    """
    config = config or DataConfig()
    source: NormalizationSource = "default"
    if normalization is not None:
        source = "pretrained"
    elif config.custom_normalization is not None:
        normalization, source = config.custom_normalization, "config"
    elif config.normalization == "pretrained":
        raise InvalidConfigError(
            "data.normalization=pretrained: the caller must resolve the architecture's "
            "preprocessing (flow_compress.arch.models.pretrained_normalization) and pass it"
        )
    parsed = ref if isinstance(ref, DatasetRef) else parse_dataset_ref(ref)
    try:
        contract = build_contract(input_size, in_chans, normalization, source=source)
    except ValueError as exc:
        raise InvalidConfigError(f"normalisation: {exc}") from exc
    stored = contract.resize.size[0]
    interp = contract.resize.interpolation
    hflip = True
    if parsed.name == "fashion-mnist":
        train_full, test, num_classes = _fashion_mnist(Path(parsed.root or FASHION_MNIST_ROOT))
        names: tuple[str, ...] | None = FASHION_MNIST_CLASSES
    elif parsed.name == "digits":
        train_full, test, num_classes = _digits()
        names = DIGITS_CLASSES
        hflip = False
    elif parsed.name == "imagefolder":
        train_full, test, num_classes = _imagefolder(Path(str(parsed.root)), stored, interp)
        names = _class_names(train_full, num_classes)
    else:
        root = Path(parsed.root or DEFAULT_TORCHVISION_ROOT).expanduser()
        train_full, test, num_classes = _torchvision(parsed.name, root, stored, interp, config)
        names = _class_names(train_full, num_classes)
    contract = contract.model_copy(update={"class_names": names})
    train, val = split_train_val(train_full, config.val_fraction)
    if config.max_train_samples is not None:
        train = Subset(train, range(min(config.max_train_samples, len(train))))
    if config.max_eval_samples is not None:
        val = Subset(val, range(min(config.max_eval_samples, len(val))))
        test = Subset(test, range(min(config.max_eval_samples, len(test))))  # type: ignore[arg-type]
    train, val, test = (_materialise(d) for d in (train, val, test))
    return DataSplits(
        parsed, train, val, test, num_classes, in_chans, input_size, hflip, config, contract
    )


def _class_names(ds: object, num_classes: int) -> tuple[str, ...] | None:
    """The dataset's class names (ImageFolder folders, torchvision ``classes``) when it has
    one per class."""
    classes = getattr(ds, "classes", None)
    if classes is None and isinstance(ds, Subset):
        classes = getattr(ds.dataset, "classes", None)
    if classes and len(classes) == num_classes and all(isinstance(c, str) for c in classes):
        return tuple(classes)
    return None


def _materialise(ds: Dataset[tuple[torch.Tensor, int]]) -> Dataset[tuple[torch.Tensor, int]]:
    """Turn subsets of in-memory images into contiguous tensors once (fast batch slicing)."""
    fast = _as_tensor_images(ds)
    return TensorImages(*fast) if fast is not None else ds


def split_train_val(
    ds: Dataset[tuple[torch.Tensor, int]], val_fraction: float
) -> tuple[Subset[tuple[torch.Tensor, int]], Subset[tuple[torch.Tensor, int]]]:
    n = len(ds)  # type: ignore[arg-type]
    n_val = max(1, round(n * val_fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    return Subset(ds, sorted(order[n_val:])), Subset(ds, sorted(order[:n_val]))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:  # type: ignore[operator]
        data = fh.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise InvalidDatasetError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = math.prod(dims)
    if len(data) - offset != expected:
        raise InvalidDatasetError(f"{path} is truncated ({len(data) - offset} of {expected} bytes)")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for candidate in (
        root / stem,
        root / f"{stem}.gz",
        root / "raw" / stem,
        root / "raw" / f"{stem}.gz",
    ):
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found under {root}; install it with "
        "'apt-get install -y dataset-fashion-mnist' or pass fashion-mnist:/path/to/idx-files"
    )


def _fashion_mnist(root: Path) -> tuple[TensorImages, TensorImages, int]:
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"Fashion-MNIST folder {root} does not exist; install it with "
            "'apt-get install -y dataset-fashion-mnist' or pass fashion-mnist:/path"
        )
    splits = []
    for prefix in ("train", "t10k"):
        images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise InvalidDatasetError(f"Fashion-MNIST {prefix} images and labels disagree")
        splits.append(
            TensorImages(
                torch.from_numpy(images.copy()).unsqueeze(1),
                torch.from_numpy(labels.astype(np.int64)),
            )
        )
    return splits[0], splits[1], 10


def _digits() -> tuple[TensorImages, TensorImages, int]:
    """scikit-learn's 1,797 8×8 digits; a fixed 20 % is held out as the test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy((bunch.images * (255.0 / 16.0)).round().astype(np.uint8))
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = len(images) // 5
    test_idx, train_idx = order[:n_test], order[n_test:]
    full = images.unsqueeze(1)
    return (
        TensorImages(full[train_idx], labels[train_idx]),
        TensorImages(full[test_idx], labels[test_idx]),
        10,
    )


class _PilToUint8:
    """PIL image → uint8 CHW at a fixed square size (so images of any size can be batched):
    the contract's resize, done by PIL on the stored image."""

    def __init__(self, size: int, interpolation: str = "bilinear") -> None:
        self.size = size
        self.interpolation = interpolation

    def __call__(self, img: object) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        mode = InterpolationMode(self.interpolation)
        img = TF.resize(img, [self.size, self.size], interpolation=mode, antialias=True)  # type: ignore[arg-type]
        t = TF.pil_to_tensor(img)  # type: ignore[arg-type]
        return t[:3] if t.shape[0] == 4 else t


def _imagefolder(root: Path, size: int, interpolation: str) -> tuple[Dataset, Dataset, int]:  # type: ignore[type-arg]
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} does not exist")
    tf = _PilToUint8(size, interpolation)
    try:
        if (root / "train").is_dir():
            train = ImageFolder(str(root / "train"), transform=tf)
            test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
            if test_dir is None:
                train, test = _holdout(train)
            else:
                test = ImageFolder(str(test_dir), transform=tf)
                if test.classes != train.classes:
                    raise InvalidDatasetError(
                        f"{test_dir.name}/ classes {test.classes[:5]} differ from train/ "
                        f"classes {train.classes[:5]}"
                    )
        else:
            train, test = _holdout(ImageFolder(str(root), transform=tf))
    except (FileNotFoundError, RuntimeError) as exc:
        raise InvalidDatasetError(f"image folder {root}: {exc}") from exc
    classes = len(getattr(train, "classes", None) or train.dataset.classes)  # type: ignore[union-attr]
    if classes < 2:
        raise InvalidDatasetError(f"image folder {root} holds fewer than two classes")
    return train, test, classes


def _holdout(ds: Dataset) -> tuple[Subset, Subset]:  # type: ignore[type-arg]
    """One folder: a deterministic 20 % test split."""
    n = len(ds)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED + 1)).tolist()
    n_test = max(1, n // 5)
    train, test = Subset(ds, sorted(order[n_test:])), Subset(ds, sorted(order[:n_test]))
    train.classes = ds.classes  # type: ignore[attr-defined]
    return train, test


def _torchvision(
    name: str, root: Path, size: int, interpolation: str, config: DataConfig
) -> tuple[Dataset, Dataset, int]:  # type: ignore[type-arg]
    """torchvision datasets with their official train/test splits (download is opt-in)."""
    import torchvision.datasets as tvd

    tf = _PilToUint8(size, interpolation)
    dl = config.download
    builders = {
        "cifar10": lambda s: tvd.CIFAR10(str(root), train=s == "train", transform=tf, download=dl),
        "cifar100": lambda s: tvd.CIFAR100(
            str(root), train=s == "train", transform=tf, download=dl
        ),
        "flowers102": lambda s: tvd.Flowers102(str(root), split=s, transform=tf, download=dl),
        "food101": lambda s: tvd.Food101(str(root), split=s, transform=tf, download=dl),
        "oxford-iiit-pet": lambda s: tvd.OxfordIIITPet(
            str(root), split="trainval" if s == "train" else "test", transform=tf, download=dl
        ),
        "stanford-cars": lambda s: tvd.StanfordCars(str(root), split=s, transform=tf, download=dl),
        "fer2013": lambda s: tvd.FER2013(str(root), split=s, transform=tf),
        "inaturalist": lambda s: tvd.INaturalist(
            str(root),
            version="2021_train_mini" if s == "train" else "2021_valid",
            transform=tf,
            download=dl,
        ),
        "imagenet": lambda s: tvd.ImageNet(
            str(root), split="train" if s == "train" else "val", transform=tf
        ),
    }
    try:
        train = builders[name]("train")
        test = builders[name]("test")
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        hint = "" if dl else " (set data.download=true to download it)"
        raise DatasetNotFoundError(f"{name} not found under {root}: {exc}{hint}") from exc
    classes = getattr(train, "classes", None)
    num = len(classes) if classes else int(max(_labels(train)) + 1)
    return train, test, num


def _labels(ds: Sequence[tuple[object, int]]) -> list[int]:
    return [int(y) for _, y in ds]


__all__ = [
    "DIGITS_CLASSES",
    "FASHION_MNIST_CLASSES",
    "SPLIT_SEED",
    "BatchTransform",
    "DataSplits",
    "TensorImages",
    "load_dataset",
    "split_train_val",
    "to_uint8_nhwc",
]

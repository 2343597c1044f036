"""Feature extractors for FID: torchvision's Inception v3 from a user's weights file, and a
small CNN trained here on Fashion-MNIST when no Inception weights are available.

Contract of every extractor (``FeatureExtractor``): it takes images as float N×C×H×W in
[0, 1] (uint8 in [0, 255] is accepted too) with C = 1 or 3 and any H×W, does its own resizing,
channel handling and normalisation, and returns float N×``dim`` features. ``name`` is what a
report prints next to the FID; ``comparable_to_inception`` says whether its FIDs may be set
beside the published (Inception) ones. Nothing here downloads anything.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from flow_compress.arch.models import align_keys, check_state_dict, load_weights, read_state_dict
from flow_compress.artifacts import atomic_write_bytes
from flow_compress.errors import (
    FidInputError,
    InvalidConfigError,
    WeightsNotAvailableError,
)
from flow_compress.recovery import LoopSettings, fit

INCEPTION = "inception"
FMNIST_CNN = "fmnist-cnn"
FEATURE_EXTRACTORS = (INCEPTION, FMNIST_CNN)

INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
FMNIST_SIZE = 28
FMNIST_DIM = 128

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Fashion-MNIST's training-set pixel mean and standard deviation (of values in [0, 1]).
_FMNIST_MEAN = 0.2860
_FMNIST_STD = 0.3530
# How far outside [0, 1] a batch may stray before it is taken for another value range: a
# decoder without a final squashing slightly overshoots (clamped, as saving a PNG would),
# while tanh outputs in [-1, 1] or pixels in [0, 255] are a caller's bug that would silently
# give a meaningless FID.
_RANGE_SLACK = 0.1


@runtime_checkable
class FeatureExtractor(Protocol):
    """What ``flow_compress.measure.fid.feature_stats`` runs. Extractors that are also
    ``nn.Module``s are moved to the device and put in eval mode there."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    @property
    def comparable_to_inception(self) -> bool: ...

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def as_unit_images(images: torch.Tensor) -> torch.Tensor:
    """``images`` as float N×C×H×W in [0, 1] (uint8 divided by 255; small overshoots
    clamped). Not four-dimensional, not 1 or 3 channels, or a value range that is clearly
    not [0, 1] → ``FidInputError``."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise FidInputError(
            f"images must be N×C×H×W with C = 1 or 3, got shape {tuple(images.shape)}"
        )
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise FidInputError(f"images must be float in [0, 1] or uint8, got {images.dtype}")
    images = images.float()
    if images.numel():
        lo, hi = float(images.min()), float(images.max())
        if lo < -_RANGE_SLACK or hi > 1.0 + _RANGE_SLACK:
            raise FidInputError(
                f"images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; map a tanh "
                "output with (x + 1) / 2 and pixels with x / 255"
            )
    return images.clamp(0.0, 1.0)


# --------------------------------------------------------------------------- Inception


class InceptionFeatures(nn.Module):
    """torchvision's Inception v3: the 2048-d average-pool features.

    Images are resized to 299×299 (bilinear, as pytorch-fid does), grey is repeated to three
    channels, and ImageNet normalisation is applied. The weights are torchvision's (e.g. its
    ``inception_v3_google-0cc3c7bd.pth``, or that state dict as safetensors); the usual
    pytorch-fid port (``pt_inception-2015-12-05``) is of the original TensorFlow graph, whose
    weights and a few pooling layers differ slightly, and it does not fit this module. FIDs
    from this extractor are therefore close to, but not identical with, published FIDs.
    """

    name = INCEPTION
    dim = INCEPTION_DIM
    comparable_to_inception = True

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = as_unit_images(images)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(
            x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False
        )
        out = self.net((x - self.mean) / self.std)
        # A module in training mode returns (logits, aux); features come from eval mode only.
        return out if isinstance(out, torch.Tensor) else out[0]


def build_inception(weights: Path | str | None) -> InceptionFeatures:
    """Inception features with weights read from ``weights`` (safetensors or a
    ``weights_only`` state dict of torchvision's ``inception_v3``, auxiliary head included).

    No file → ``WeightsNotAvailableError`` (nothing is downloaded); a file that does not fit
    → ``BadCheckpointError``.
    """
    if weights is None:
        raise WeightsNotAvailableError(
            "Inception FID needs torchvision's inception_v3 weights as a file (safetensors or a "
            "weights-only state dict); none was given and nothing is downloaded. Without it, "
            f"use the '{FMNIST_CNN}' extractor (its FIDs are not comparable to Inception FIDs)"
        )
    from torchvision.models import inception_v3

    # transform_input=True is how torchvision builds the model for its own ImageNet weights:
    # they come from TensorFlow and expect inputs in [-1, 1], and the flag maps the
    # ImageNet-normalised input to that range. It holds no parameters, so any state dict of
    # the architecture fits.
    net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    state = read_state_dict(weights)
    # Checkpoints saved before BatchNorm counted its batches lack these counters; they play
    # no part in eval mode, so the model's own zeros stand in.
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, value)
    state = align_keys(net, state)
    check_state_dict(net, state)
    net.load_state_dict(state, strict=True)
    # The classifier is dropped so the forward pass ends at the pooled, flattened features.
    net.fc = nn.Identity()
    return InceptionFeatures(net).eval()


# --------------------------------------------------------------------------- Fashion-MNIST CNN


class FmnistCnn(nn.Module):
    """A small Fashion-MNIST classifier: three conv blocks (conv 3×3, batch norm, ReLU, max
    pool; 32, 64, 128 channels), a 128-d penultimate layer and a 10-way classifier.

    ``forward`` returns logits (so the library's training loop trains it); ``features`` the
    penultimate activations. Input: float N×1×28×28 in [0, 1]; it normalises itself.
    """

    def __init__(self) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for c_in, c_out in ((1, 32), (32, 64), (64, 128)):
            blocks += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.body = nn.Sequential(*blocks)
        self.penultimate = nn.Sequential(nn.Flatten(), nn.Linear(128 * 3 * 3, FMNIST_DIM))
        self.classifier = nn.Linear(FMNIST_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - _FMNIST_MEAN) / _FMNIST_STD
        return F.relu(self.penultimate(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class FmnistFeatures(nn.Module):
    """The penultimate layer of ``FmnistCnn`` as FID features (``fmnist-cnn``, 128-d).

    Images of any size are resized to 28×28 (bilinear, antialiased) and colour is averaged
    to grey. Its FIDs measure distances in this network's feature space: they rank models
    on Fashion-MNIST-like images, but are not comparable to Inception FIDs.
    """

    name = FMNIST_CNN
    dim = FMNIST_DIM
    comparable_to_inception = False

    def __init__(self, net: FmnistCnn) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = as_unit_images(images)
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (FMNIST_SIZE, FMNIST_SIZE):
            x = F.interpolate(x, size=(FMNIST_SIZE, FMNIST_SIZE), mode="bilinear", antialias=True)
        return self.net.features(x)


@dataclass(frozen=True)
class FmnistTrainResult:
    net: FmnistCnn
    iterations: int
    seconds: float


def _unit_batches(
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``loader``'s batches, epoch after epoch, with images as float in [0, 1]."""
    while True:
        yielded = False
        for x, y in loader:
            yielded = True
            yield as_unit_images(x), y
        if not yielded:
            raise InvalidConfigError("the training loader yields no batches")


def train_fmnist_cnn(
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    epochs: float = 2.0,
    iters: int | None = None,
    lr: float = 0.05,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> FmnistTrainResult:
    """Train an ``FmnistCnn`` with cross-entropy through the library's loop
    (``recovery.fit``: SGD with Nesterov momentum, warm-up, cosine decay).

    ``loader`` yields (images, labels) batches, images uint8 or float in [0, 1], N×1×28×28
    (e.g. a shuffling ``DataLoader`` over ``load_dataset("fashion-mnist", ...).train``); it
    is iterated again for every epoch. ``iters`` overrides ``epochs`` (which needs a loader
    with a length). Seeded: the same loader order and seed give the same network.
    """
    if iters is None:
        if not isinstance(loader, Sized):
            raise InvalidConfigError("a loader without a length needs iters, not epochs")
        iters = max(1, round(epochs * len(loader)))
    device = torch.device(device)
    torch.manual_seed(seed)
    net = FmnistCnn().to(device)
    start = time.perf_counter()
    steps = fit(net, _unit_batches(loader), LoopSettings(iters=iters, lr=lr), device)
    return FmnistTrainResult(net.eval(), steps, time.perf_counter() - start)


def save_fmnist_cnn(net: FmnistCnn, path: Path | str) -> None:
    """Write the network's weights as safetensors, atomically."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    atomic_write_bytes(path, save(state))


def load_fmnist_cnn(path: Path | str) -> FmnistCnn:
    """An ``FmnistCnn`` with the weights of ``path`` (safetensors or a weights-only state
    dict); a missing or unfitting file → ``BadCheckpointError``."""
    return load_weights(FmnistCnn(), path).eval()


def load_feature_extractor(name: str, weights: Path | str | None) -> FeatureExtractor:
    """The extractor called ``name`` (one of ``FEATURE_EXTRACTORS``) with its weights.

    ``inception`` without ``weights`` → ``WeightsNotAvailableError``; ``fmnist-cnn`` needs
    the file ``save_fmnist_cnn`` wrote (train one with ``train_fmnist_cnn``). An unknown name
    → ``InvalidConfigError`` listing the known ones.
    """
    if name == INCEPTION:
        return build_inception(weights)
    if name == FMNIST_CNN:
        if weights is None:
            raise WeightsNotAvailableError(
                f"the '{FMNIST_CNN}' extractor needs its weights file; train one with "
                "flow_compress.measure.fid_features.train_fmnist_cnn and save_fmnist_cnn"
            )
        return FmnistFeatures(load_fmnist_cnn(weights))
    raise InvalidConfigError(
        f"unknown FID feature extractor {name!r}; known: {', '.join(FEATURE_EXTRACTORS)}"
    )


__all__ = [
    "FEATURE_EXTRACTORS",
    "FMNIST_CNN",
    "INCEPTION",
    "FeatureExtractor",
    "FmnistCnn",
    "FmnistFeatures",
    "FmnistTrainResult",
    "InceptionFeatures",
    "as_unit_images",
    "build_inception",
    "load_feature_extractor",
    "load_fmnist_cnn",
    "save_fmnist_cnn",
    "train_fmnist_cnn",
]

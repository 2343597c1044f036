"""Fréchet Inception Distance: feature statistics, the Fréchet distance between two
Gaussians, and the FID of a set of images against a dataset's statistics.

FID = ‖μa − μb‖² + Tr(Σa) + Tr(Σb) − 2·Tr((Σa^½ Σb Σa^½)^½), the Fréchet (2-Wasserstein)
distance between Gaussians fitted to two sets of features. It is biased by the sample size:
reported FIDs use at least ``MIN_REPORTED_SAMPLES`` images on each side (the number used is
kept in the statistics, so a report can say it); tests may use fewer.

Statistics of a dataset's real images are computed once (``feature_stats``) and kept as an
``.npz`` (``save_stats`` / ``load_stats``); they name the extractor they come from, and
statistics of different extractors are never compared.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flow_compress.artifacts import atomic_write_bytes
from flow_compress.errors import FidInputError
from flow_compress.measure.fid_features import FeatureExtractor, as_unit_images

MIN_REPORTED_SAMPLES = 10_000
STATS_FORMAT = 1


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """Mean and unbiased covariance of ``n`` feature vectors (float64, read-only), and the
    extractor they come from (``FeatureExtractor.name``; empty when unknown)."""

    n: int
    mean: np.ndarray
    cov: np.ndarray
    extractor: str = ""
    comparable_to_inception: bool = False

    def __post_init__(self) -> None:
        mean = np.array(self.mean, dtype=np.float64)
        cov = np.array(self.cov, dtype=np.float64)
        d = mean.shape[0] if mean.ndim == 1 else -1
        if d < 1 or cov.shape != (d, d):
            raise FidInputError(
                f"feature statistics need a mean of shape (d,) and a covariance of shape "
                f"(d, d), got {mean.shape} and {cov.shape}"
            )
        if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
            raise FidInputError("feature statistics hold NaN or infinite values")
        if self.n < 0:
            raise FidInputError(f"feature statistics of {self.n} samples")
        mean.setflags(write=False)
        cov.setflags(write=False)
        # A frozen dataclass's fields are set once here, through object.__setattr__.
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "cov", cov)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def from_features(
        cls, features: np.ndarray | torch.Tensor, *, extractor: str = "", comparable: bool = False
    ) -> FeatureStats:
        """The statistics of an N×D array of features in one go."""
        acc = StatsAccumulator(extractor=extractor, comparable_to_inception=comparable)
        acc.update(features)
        return acc.result()


class StatsAccumulator:
    """Feature statistics built batch by batch, in float64 on the features' device.

    It keeps the count, the sum and the sum of outer products of the features minus a
    reference point (the first batch's mean). Without that shift, Σxxᵀ − n·μμᵀ cancels
    catastrophically for features whose mean is large against their spread (post-ReLU
    features, pixels); with it, the result matches the two-pass covariance to round-off.
    """

    def __init__(self, *, extractor: str = "", comparable_to_inception: bool = False) -> None:
        self.extractor = extractor
        self.comparable_to_inception = comparable_to_inception
        self.n = 0
        self._shift: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        """Add an N×D batch (N may be 0); a dimension other than the first batch's →
        ``FidInputError``."""
        x = torch.as_tensor(features).detach().to(torch.float64)
        if x.ndim != 2:
            raise FidInputError(f"features must be N×D, got shape {tuple(x.shape)}")
        if self._shift is not None and x.shape[1] != self._shift.shape[0]:
            raise FidInputError(
                f"features of dimension {x.shape[1]} after batches of {self._shift.shape[0]}"
            )
        if len(x) == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise FidInputError("features hold NaN or infinite values")
        if self._shift is None:
            self._shift = x.mean(dim=0)
            self._sum = torch.zeros_like(self._shift)
            self._outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        assert self._sum is not None and self._outer is not None
        x = x.to(self._shift.device) - self._shift
        self._sum += x.sum(dim=0)
        self._outer += x.T @ x
        self.n += len(x)

    def result(self) -> FeatureStats:
        """The statistics so far: mean and unbiased (n − 1) covariance. Fewer than two
        samples → ``FidInputError`` (no covariance exists)."""
        if self._shift is None or self._sum is None or self._outer is None or self.n < 2:
            raise FidInputError(f"feature statistics need at least 2 samples, got {self.n}")
        centred = self._sum / self.n
        cov = (self._outer - self.n * torch.outer(centred, centred)) / (self.n - 1)
        cov = (cov + cov.T) / 2  # exactly symmetric, for the eigendecompositions
        return FeatureStats(
            self.n,
            (centred + self._shift).cpu().numpy(),
            cov.cpu().numpy(),
            self.extractor,
            self.comparable_to_inception,
        )


# --------------------------------------------------------------------------- distance


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix. Round-off leaves tiny
    negative eigenvalues on rank-deficient matrices; they are clipped to 0."""
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """The Fréchet distance between the Gaussians of ``a`` and ``b`` (≥ 0, finite).

    Tr((Σa Σb)^½) is computed as Tr((Σa^½ Σb Σa^½)^½), whose argument is symmetric positive
    semi-definite, through two symmetric eigendecompositions. The common alternative,
    ``scipy.linalg.sqrtm`` of the non-symmetric product Σa·Σb, returns complex values and
    loses accuracy (or fails) when a covariance is rank-deficient (fewer samples than
    dimensions, dead features), which is why it is not used. Different dimensions, different
    extractors, or fewer than two samples on a side → ``FidInputError``.
    """
    for side, s in (("first", a), ("second", b)):
        if s.n < 2:
            raise FidInputError(f"the {side} statistics come from {s.n} samples; 2 are needed")
    if a.dim != b.dim:
        raise FidInputError(f"feature statistics of dimensions {a.dim} and {b.dim} differ")
    if a.extractor and b.extractor and a.extractor != b.extractor:
        raise FidInputError(
            f"feature statistics of extractors {a.extractor!r} and {b.extractor!r} are not "
            "comparable"
        )
    root_a = _psd_sqrt(a.cov)
    inner = root_a @ b.cov @ root_a
    inner = (inner + inner.T) / 2
    tr_cross = float(np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0.0, None)).sum())
    diff = a.mean - b.mean
    value = float(diff @ diff) + float(np.trace(a.cov)) + float(np.trace(b.cov)) - 2 * tr_cross
    # The distance is a squared norm; a negative value can only be round-off around 0.
    return max(value, 0.0)


@dataclass(frozen=True)
class FidResult:
    """An FID with what a report must say beside it: the samples on each side and the
    extractor (and whether its FIDs compare with published Inception FIDs)."""

    value: float
    n_fake: int
    n_real: int
    extractor: str
    comparable_to_inception: bool

    @property
    def reportable(self) -> bool:
        """Both sides have at least ``MIN_REPORTED_SAMPLES`` images."""
        return min(self.n_fake, self.n_real) >= MIN_REPORTED_SAMPLES


def fid(fake: FeatureStats, real: FeatureStats) -> FidResult:
    """The FID of generated images' statistics against real ones (``frechet_distance``),
    with the sample counts and the extractor."""
    return FidResult(
        frechet_distance(fake, real),
        fake.n,
        real.n,
        fake.extractor or real.extractor,
        fake.comparable_to_inception and real.comparable_to_inception,
    )


# --------------------------------------------------------------------------- images


@torch.no_grad()
def feature_stats(
    extractor: FeatureExtractor,
    images: Iterable[torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    max_images: int | None = None,
) -> FeatureStats:
    """The feature statistics of ``images``: batches N×C×H×W, float in [0, 1] or uint8,
    C = 1 or 3 (for a generator: ``(x + 1) / 2`` of tanh outputs).

    Runs without gradients on ``device``; an extractor that is an ``nn.Module`` is moved
    there and run in eval mode (its training mode is restored afterwards). Stops after
    ``max_images`` images when given. Reported FIDs need ``MIN_REPORTED_SAMPLES`` images;
    the count used is the result's ``n``.
    """
    device = torch.device(device)
    module = extractor if isinstance(extractor, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.to(device).eval()
    acc = StatsAccumulator(
        extractor=extractor.name, comparable_to_inception=extractor.comparable_to_inception
    )
    try:
        for batch in images:
            if max_images is not None:
                batch = batch[: max_images - acc.n]
            if len(batch):
                x = as_unit_images(batch.to(device, non_blocking=True))
                feats = extractor(x)
                if feats.ndim != 2 or feats.shape[1] != extractor.dim:
                    raise FidInputError(
                        f"extractor {extractor.name!r} returned features of shape "
                        f"{tuple(feats.shape)}, not N×{extractor.dim}"
                    )
                acc.update(feats)
            if max_images is not None and acc.n >= max_images:
                break
    finally:
        if module is not None:
            module.train(was_training)
    return acc.result()


# --------------------------------------------------------------------------- files


def save_stats(stats: FeatureStats, path: Path | str) -> None:
    """Write ``stats`` to an ``.npz`` file atomically (a reader sees the old file or the
    new one, never half of one)."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        format=np.array(STATS_FORMAT),
        n=np.array(stats.n),
        mean=stats.mean,
        cov=stats.cov,
        extractor=np.array(stats.extractor),
        comparable_to_inception=np.array(stats.comparable_to_inception),
    )
    atomic_write_bytes(path, buffer.getvalue())


def load_stats(path: Path | str) -> FeatureStats:
    """Read statistics written by ``save_stats`` (no pickles are loaded). A missing file,
    or one that is not such statistics → ``FidInputError``."""
    path = Path(path)
    if not path.is_file():
        raise FidInputError(f"feature statistics file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["format"]) != STATS_FORMAT:
                raise FidInputError(
                    f"{path.name} holds statistics of format {int(data['format'])}, "
                    f"not {STATS_FORMAT}"
                )
            return FeatureStats(
                int(data["n"]),
                data["mean"],
                data["cov"],
                str(data["extractor"]),
                bool(data["comparable_to_inception"]),
            )
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise FidInputError(f"{path.name} is not a feature statistics file: {exc}") from exc


__all__ = [
    "MIN_REPORTED_SAMPLES",
    "FeatureStats",
    "FidResult",
    "StatsAccumulator",
    "feature_stats",
    "fid",
    "frechet_distance",
    "load_stats",
    "save_stats",
]

"""FID: the Fréchet distance against closed forms and an independent square root, the
streaming statistics, their files, and both feature extractors on real Fashion-MNIST."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.utils.data import DataLoader

from flow_compress.data import DataSplits, load_dataset
from flow_compress.errors import ErrorCode, FlowCompressError
from flow_compress.measure.evaluate import evaluate
from flow_compress.measure.fid import (
    MIN_REPORTED_SAMPLES,
    FeatureStats,
    StatsAccumulator,
    feature_stats,
    fid,
    frechet_distance,
    load_stats,
    save_stats,
)
from flow_compress.measure.fid_features import (
    FmnistFeatures,
    as_unit_images,
    build_inception,
    load_feature_extractor,
    save_fmnist_cnn,
    train_fmnist_cnn,
)

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not FMNIST.is_dir(), reason="apt-get install -y dataset-fashion-mnist"
)


def _spd(rng: np.random.Generator, d: int, floor: float = 0.1) -> np.ndarray:
    m = rng.standard_normal((d, d))
    return m @ m.T / d + floor * np.eye(d)


def _code(exc: pytest.ExceptionInfo[FlowCompressError]) -> ErrorCode:
    return exc.value.code


# --------------------------------------------------------------------------- distance


def test_identical_sets_are_at_distance_zero() -> None:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((500, 64)) * rng.uniform(0.1, 3.0, 64) + 5.0
    a = FeatureStats.from_features(feats)
    b = FeatureStats.from_features(feats.copy())
    scale = float(np.trace(a.cov))
    assert abs(frechet_distance(a, b)) < 1e-6 * scale
    assert abs(frechet_distance(a, a)) < 1e-6 * scale


def test_diagonal_covariances_match_the_closed_form() -> None:
    rng = np.random.default_rng(1)
    d = 32
    va, vb = rng.uniform(0.01, 4.0, d), rng.uniform(0.01, 4.0, d)
    ma, mb = rng.standard_normal(d), rng.standard_normal(d) + 0.5
    a = FeatureStats(1000, ma, np.diag(va))
    b = FeatureStats(1000, mb, np.diag(vb))
    expected = float(((np.sqrt(va) - np.sqrt(vb)) ** 2).sum() + ((ma - mb) ** 2).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_equal_covariances_leave_the_squared_mean_shift() -> None:
    rng = np.random.default_rng(2)
    d = 48
    cov = _spd(rng, d)
    ma = rng.standard_normal(d)
    shift = rng.standard_normal(d) * 0.3
    a, b = FeatureStats(100, ma, cov), FeatureStats(100, ma + shift, cov)
    assert frechet_distance(a, b) == pytest.approx(float(shift @ shift), rel=1e-8, abs=1e-9)


def test_full_covariances_match_an_independent_square_root() -> None:
    rng = np.random.default_rng(3)
    d = 40
    ca, cb = _spd(rng, d), _spd(rng, d, floor=0.5)
    ma, mb = rng.standard_normal(d), rng.standard_normal(d)
    # Well-conditioned, so scipy's general (non-symmetric) sqrtm is accurate here.
    cross = scipy.linalg.sqrtm(ca @ cb).real
    expected = float(((ma - mb) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.trace(cross))
    got = frechet_distance(FeatureStats(10, ma, ca), FeatureStats(10, mb, cb))
    assert got == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(FeatureStats(10, mb, cb), FeatureStats(10, ma, ca)) == pytest.approx(
        got, rel=1e-9
    )


def test_rank_deficient_covariances_give_a_finite_non_negative_distance() -> None:
    rng = np.random.default_rng(4)
    d = 256
    # Fewer samples than dimensions, and a dead (constant) feature, as post-ReLU nets have.
    fa, fb = rng.standard_normal((20, d)), rng.standard_normal((30, d)) + 0.2
    fa[:, 0] = fb[:, 0] = 0.0
    a, b = FeatureStats.from_features(fa), FeatureStats.from_features(fb)
    assert np.linalg.matrix_rank(a.cov) < d
    ab, ba, aa = frechet_distance(a, b), frechet_distance(b, a), frechet_distance(a, a)
    assert np.isfinite(ab) and ab > 0
    assert ba == pytest.approx(ab, rel=1e-8)
    assert 0.0 <= aa < 1e-6 * float(np.trace(a.cov))


def test_bad_inputs_raise_the_typed_error() -> None:
    rng = np.random.default_rng(5)
    a = FeatureStats.from_features(rng.standard_normal((10, 4)))
    with pytest.raises(FlowCompressError) as exc:
        frechet_distance(a, FeatureStats.from_features(rng.standard_normal((10, 5))))
    assert _code(exc) == ErrorCode.INVALID_FID_INPUT
    with pytest.raises(FlowCompressError) as exc:
        frechet_distance(a, FeatureStats(1, np.zeros(4), np.zeros((4, 4))))
    assert _code(exc) == ErrorCode.INVALID_FID_INPUT
    with pytest.raises(FlowCompressError) as exc:
        FeatureStats.from_features(rng.standard_normal((1, 4)))
    assert _code(exc) == ErrorCode.INVALID_FID_INPUT
    other = FeatureStats(10, a.mean, a.cov, extractor="inception")
    with pytest.raises(FlowCompressError, match="not comparable"):
        frechet_distance(FeatureStats(10, a.mean, a.cov, extractor="fmnist-cnn"), other)
    with pytest.raises(FlowCompressError) as exc:
        as_unit_images(torch.rand(2, 1, 8, 8) * 2 - 1)  # a tanh output, not mapped to [0, 1]
    assert _code(exc) == ErrorCode.INVALID_FID_INPUT
    with pytest.raises(FlowCompressError):
        as_unit_images(torch.rand(2, 2, 8, 8))


# --------------------------------------------------------------------------- statistics


def test_streaming_statistics_equal_the_one_shot_ones() -> None:
    rng = np.random.default_rng(6)
    # A mean far from 0 against the spread: the naive sum-of-squares formula would cancel.
    feats = rng.standard_normal((1000, 16)) * 0.01 + 1e3
    acc = StatsAccumulator()
    for lo, hi in ((0, 1), (1, 1), (1, 300), (300, 301), (301, 1000)):
        acc.update(torch.from_numpy(feats[lo:hi]))
    streamed = acc.result()
    assert streamed.n == 1000
    np.testing.assert_allclose(streamed.mean, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(streamed.cov, np.cov(feats, rowvar=False), rtol=1e-7, atol=1e-14)
    one_shot = FeatureStats.from_features(feats)
    np.testing.assert_allclose(streamed.cov, one_shot.cov, rtol=1e-9, atol=1e-14)
    assert frechet_distance(streamed, one_shot) < 1e-9


def test_statistics_round_trip_through_a_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    stats = FeatureStats.from_features(
        rng.standard_normal((50, 8)), extractor="fmnist-cnn", comparable=False
    )
    path = tmp_path / "real.npz"
    save_stats(stats, path)
    assert [p.name for p in tmp_path.iterdir()] == ["real.npz"]  # no temporary file left
    back = load_stats(path)
    assert (back.n, back.extractor, back.comparable_to_inception) == (50, "fmnist-cnn", False)
    np.testing.assert_array_equal(back.mean, stats.mean)
    np.testing.assert_array_equal(back.cov, stats.cov)
    assert not back.cov.flags.writeable
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for bad in (tmp_path / "junk.npz", tmp_path / "missing.npz"):
        with pytest.raises(FlowCompressError) as exc:
            load_stats(bad)
        assert _code(exc) == ErrorCode.INVALID_FID_INPUT


class _PixelMeans:
    """A plain-callable extractor (no nn.Module): the mean of each image row."""

    name = "row-means"
    dim = 8
    comparable_to_inception = False

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(1, 3))


def test_feature_stats_count_images_and_stop_at_the_limit() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(16, 1, 8, 8, generator=gen) for _ in range(4)]
    stats = feature_stats(_PixelMeans(), iter(batches), max_images=40)
    assert (stats.n, stats.dim, stats.extractor) == (40, 8, "row-means")
    expected = torch.cat(batches)[:40].mean(dim=(1, 3)).double().numpy()
    np.testing.assert_allclose(stats.mean, expected.mean(0), rtol=1e-6)
    uint8 = [(b * 255).round().to(torch.uint8) for b in batches]
    assert feature_stats(_PixelMeans(), uint8).n == 64
    result = fid(stats, stats)
    assert result.value < 1e-9 and (result.n_fake, result.n_real) == (40, 40)
    assert not result.reportable and MIN_REPORTED_SAMPLES == 10_000


# --------------------------------------------------------------------------- extractors


def test_inception_needs_a_weights_file() -> None:
    with pytest.raises(FlowCompressError) as exc:
        build_inception(None)
    assert _code(exc) == ErrorCode.WEIGHTS_NOT_AVAILABLE
    with pytest.raises(FlowCompressError) as exc:
        load_feature_extractor("inception", None)
    assert _code(exc) == ErrorCode.WEIGHTS_NOT_AVAILABLE
    with pytest.raises(FlowCompressError, match="fmnist-cnn") as exc:
        load_feature_extractor("vgg-features", None)
    assert _code(exc) == ErrorCode.INVALID_CONFIG


def test_inception_features_of_small_grey_images(tmp_path: Path) -> None:
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    random_net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path / "inception.pt"
    torch.save(random_net.state_dict(), path)
    extractor = build_inception(path)
    assert (extractor.name, extractor.dim, extractor.comparable_to_inception) == (
        "inception",
        2048,
        True,
    )
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = extractor(images)
    assert feats.shape == (3, 2048) and bool(torch.isfinite(feats).all())
    stats = feature_stats(extractor, [images[:2], images[2:]])
    assert (stats.n, stats.dim, stats.comparable_to_inception) == (3, 2048, True)


@pytest.fixture(scope="module")
def fmnist() -> DataSplits:
    return load_dataset("fashion-mnist", input_size=28, in_chans=1)


@pytest.fixture(scope="module")
def trained_features(fmnist: DataSplits) -> tuple[FmnistFeatures, float, float]:
    """The feature net trained briefly (300 steps of 64 on 6,000 real training images), its
    test top-1 on 2,000 test images, and the training time."""
    subset = torch.utils.data.Subset(fmnist.train, range(6000))
    loader = DataLoader(
        subset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    result = train_fmnist_cnn(loader, iters=300, lr=0.05, seed=0)
    test = torch.utils.data.Subset(fmnist.test, range(2000))
    batches = ((as_unit_images(x), y) for x, y in DataLoader(test, batch_size=500))
    top1, _ = evaluate(result.net, batches, torch.device("cpu"))
    return FmnistFeatures(result.net), top1, result.seconds


@needs_fmnist
def test_the_fmnist_feature_net_learns(
    trained_features: tuple[FmnistFeatures, float, float], tmp_path: Path
) -> None:
    extractor, top1, seconds = trained_features
    print(f"fmnist-cnn: {top1:.1f} % test top-1 after 300 steps in {seconds:.1f} s")
    assert top1 > 70.0  # chance is 10 %
    path = tmp_path / "fmnist_cnn.safetensors"
    save_fmnist_cnn(extractor.net, path)
    loaded = load_feature_extractor("fmnist-cnn", path)
    assert (loaded.name, loaded.dim, loaded.comparable_to_inception) == ("fmnist-cnn", 128, False)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), extractor.eval()(x))
        assert extractor(x).shape == (4, 128)


@needs_fmnist
def test_fid_separates_real_halves_from_perturbed_images(
    fmnist: DataSplits, trained_features: tuple[FmnistFeatures, float, float]
) -> None:
    extractor = trained_features[0]
    images = fmnist.test.images[:4000].float() / 255.0  # type: ignore[attr-defined]
    half_a, half_b = images[:2000], images[2000:]
    noise = torch.randn(half_b.shape, generator=torch.Generator().manual_seed(0))
    perturbed = (torch.roll(half_b, shifts=(3, 3), dims=(2, 3)) + 0.15 * noise).clamp(0, 1)

    def stats(x: torch.Tensor) -> FeatureStats:
        return feature_stats(extractor, x.split(500))

    start = time.perf_counter()
    real_a = stats(half_a)
    halves = fid(stats(half_b), real_a)
    shifted = fid(stats(perturbed), real_a)
    print(
        f"fmnist-cnn FID: halves {halves.value:.3f}, perturbed {shifted.value:.3f} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    assert halves.extractor == "fmnist-cnn" and not halves.comparable_to_inception
    assert halves.n_real == halves.n_fake == 2000
    assert shifted.value > 10 * halves.value

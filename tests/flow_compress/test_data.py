import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from flow_compress.config import DataConfig
from flow_compress.data import load_dataset
from flow_compress.errors import DatasetNotFoundError, InvalidDatasetError
from flow_compress.refs import parse_dataset_ref

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def test_parse_references() -> None:
    assert parse_dataset_ref("fashion-mnist").root is None
    assert parse_dataset_ref("fashion-mnist:/data/fm").root == "/data/fm"
    assert parse_dataset_ref("CIFAR10:/x").name == "cifar10"
    assert parse_dataset_ref("imagefolder:/imgs").root == "/imgs"
    for bad in ["", "mnist2", "imagefolder", "digits:/x", "../etc"]:
        with pytest.raises(InvalidDatasetError):
            parse_dataset_ref(bad)


def test_digits_splits_are_deterministic_and_disjoint() -> None:
    a = load_dataset("digits", input_size=16, in_chans=3)
    b = load_dataset("digits", input_size=16, in_chans=3)
    assert a.sizes() == {"train": 1294, "val": 144, "test": 359}
    assert torch.equal(a.val.images, b.val.images)  # type: ignore[attr-defined]
    x, y = next(a.loader("val", 8))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and y.shape == (8,)
    train = {t.numpy().tobytes() for t in a.train.images}  # type: ignore[attr-defined]
    assert not any(t.numpy().tobytes() in train for t in a.test.images)  # type: ignore[attr-defined]


@pytest.mark.skipif(not FMNIST.is_dir(), reason="apt-get install -y dataset-fashion-mnist")
def test_fashion_mnist_subset_from_idx_files() -> None:
    cfg = DataConfig(max_train_samples=512, max_eval_samples=256)
    d = load_dataset("fashion-mnist", input_size=32, in_chans=3, config=cfg)
    assert d.sizes() == {"train": 512, "val": 256, "test": 256}
    assert d.num_classes == 10
    x, y = next(d.loader("train", 64, shuffle=True, augment=True))
    assert x.shape == (64, 3, 32, 32)
    assert int(y.max()) <= 9
    # grey images are replicated to three identical channels
    assert torch.allclose((x[:, 0] - x[:, 1]).std(), (x[:, 1] - x[:, 2]).std(), atol=0.2)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_checks_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist"):
        load_dataset(f"fashion-mnist:{tmp_path / 'nope'}", input_size=28)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 50), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    d = load_dataset(f"fashion-mnist:{tmp_path}", input_size=28, in_chans=1)
    assert d.sizes() == {"train": 45, "val": 5, "test": 20}
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + (20).to_bytes(4, "big") + b"\x00" * 5)
    with pytest.raises(InvalidDatasetError, match="truncated"):
        load_dataset(f"fashion-mnist:{tmp_path}", input_size=28)


def test_imagefolder_single_folder_is_split(tmp_path: Path) -> None:
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.new("RGB", (20, 12), (i * 20, 0, 0)).save(tmp_path / cls / f"{i}.png")
    d = load_dataset(f"imagefolder:{tmp_path}", input_size=16, in_chans=3)
    assert d.num_classes == 2
    assert sum(d.sizes().values()) == 20 and d.sizes()["test"] == 4
    x, _ = next(d.loader("train", 4))
    assert x.shape == (4, 3, 16, 16)


def test_missing_torchvision_dataset_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="download"):
        load_dataset(f"cifar10:{tmp_path}", input_size=32)

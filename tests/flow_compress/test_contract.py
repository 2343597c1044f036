"""The input contract travels with the model: the same contract in every artifact of a real
compression, and a deployment that knows only the contract reproduces the pipeline.

The "deployment" functions below use numpy and onnxruntime only (no flow_compress), reading
the contract from the ONNX file's metadata, as a user holding only model.onnx would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from flow_compress.arch.models import pretrained_normalization, resolve_model
from flow_compress.artifacts import read_manifest, verify_manifest
from flow_compress.config import CompressionConfig, DataConfig
from flow_compress.contract import (
    CONTRACT_FILE,
    METADATA_KEY,
    InputContract,
    Normalization,
    build_contract,
)
from flow_compress.data import DIGITS_CLASSES, DataSplits, load_dataset
from flow_compress.errors import InvalidConfigError
from flow_compress.export.raw import RAW_FILE, RAW_INPUT_NAME
from flow_compress.export.torchscript import read_contract_file
from flow_compress.pipeline import compress
from flow_compress.schema import CompressionReport

from .conftest import SIZE, small_config

# --------------------------------------------------------------------------- a deployment


def deploy_contract(onnx_path: Path) -> dict:
    """The contract as a deployment reads it: ONNX Runtime's custom metadata, JSON."""
    meta = ort.InferenceSession(str(onnx_path)).get_modelmeta().custom_metadata_map
    return json.loads(meta["flow_compress.input_contract"])


def _bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize of float N×H×W×C images (growing only: no
    antialiasing filter is needed), as the contract's ``align_corners: false`` says."""

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * (n_in / n_out) - 0.5, 0)
        lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo).astype(np.float32)

    y0, y1, wy = axis(x.shape[1], out_h)
    x0, x1, wx = axis(x.shape[2], out_w)
    wy, wx = wy[None, :, None, None], wx[None, None, :, None]
    top = x[:, y0][:, :, x0] * (1 - wx) + x[:, y0][:, :, x1] * wx
    bottom = x[:, y1][:, :, x0] * (1 - wx) + x[:, y1][:, :, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def deploy_resize(images: np.ndarray, contract: dict) -> np.ndarray:
    """uint8 N×H×W×C images → float32 in [0, 1] at the contract's size (channels, resize,
    crop), following the contract only."""
    x = images.astype(np.float32) / np.float32(contract["pixel_divisor"])
    if x.shape[-1] != contract["channels"]:
        assert contract["channels"] == 1 and contract["rgb_to_grey"] == "mean"
        x = x[..., :3].mean(axis=-1, keepdims=True)
    resize = contract["resize"]
    h, w = resize["size"]
    if x.shape[1:3] != (h, w):
        assert resize["interpolation"] == "bilinear" and not resize["align_corners"]
        assert x.shape[1] <= h and x.shape[2] <= w, "this deployment only grows images"
        x = np.clip(_bilinear(x, h, w), *contract["value_range"])
    if contract["crop"] is not None:
        ch, cw = contract["crop"]
        top, left = round((h - ch) / 2), round((w - cw) / 2)
        x = x[:, top : top + ch, left : left + cw]
    return x


def deploy_normalise(x: np.ndarray, contract: dict) -> np.ndarray:
    """float32 N×H×W×C in [0, 1] → the model input (normalised, NCHW)."""
    assert contract["layout"] == "NCHW" and contract["dtype"] == "float32"
    mean = np.asarray(contract["mean"], dtype=np.float32)
    std = np.asarray(contract["std"], dtype=np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(0, 3, 1, 2), dtype=np.float32)


def onnx_predict(path: Path, feed_name: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path))
    return np.concatenate(
        [sess.run(None, {feed_name: x[i : i + 64]})[0] for i in range(0, len(x), 64)]
    )


# --------------------------------------------------------------------------- one compression


@pytest.fixture(scope="module")
def compressed(
    trained_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, CompressionReport]:
    out = tmp_path_factory.mktemp("contract") / "out"
    report = compress(
        small_config(export={"embed_preprocessing": True}), weights=trained_weights, out_dir=out
    )
    return out, report


def _test_images(digits: DataSplits) -> tuple[np.ndarray, np.ndarray]:
    """The test split as a deployment holds it: uint8 N×H×W×C images at their stored size."""
    images = digits.test.images.permute(0, 2, 3, 1).numpy()  # type: ignore[attr-defined]
    return images, digits.test.labels.numpy()  # type: ignore[attr-defined]


def test_the_contract_is_the_same_in_every_artifact(compressed, digits: DataSplits) -> None:
    out, report = compressed
    text = (out / CONTRACT_FILE).read_text(encoding="utf-8")
    contract = InputContract.model_validate_json(text)
    copies = {
        "preprocessing.json": text,
        "model.onnx metadata_props": deploy_contract_text(out / "model.onnx"),
        "model.raw.onnx metadata_props": deploy_contract_text(out / RAW_FILE),
        "model.ts extra file": read_contract_file(out / "model.ts"),
        "report.json": InputContract.model_validate(
            json.loads((out / "report.json").read_text())["input_contract"]
        ).to_json(),
        "returned report": report.input_contract.to_json() if report.input_contract else None,
    }
    assert {k: v == text for k, v in copies.items()} == {k: True for k in copies}
    # It is the contract the pipeline's data module was built from.
    assert contract == digits.contract
    assert contract.class_names == DIGITS_CLASSES
    assert (contract.channels, contract.height, contract.width) == (1, SIZE, SIZE)
    assert contract.normalization_source == "default"
    names = [e.name for e in read_manifest(out).files]
    assert CONTRACT_FILE in names and RAW_FILE in names
    assert verify_manifest(out) == []
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Input contract" in md
    assert any(p.format == "onnx_raw" and p.passed for p in report.parity)


def deploy_contract_text(path: Path) -> str:
    return ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map[METADATA_KEY]


def test_images_prepared_from_the_metadata_alone_reproduce_the_pipeline(
    compressed, digits: DataSplits
) -> None:
    out, report = compressed
    model = out / "model.onnx"
    images, labels = _test_images(digits)
    contract = deploy_contract(model)
    assert images.shape[1] < contract["resize"]["size"][0], "the resize is exercised"
    x = deploy_normalise(deploy_resize(images, contract), contract)
    deployed = onnx_predict(model, contract["input_name"], x).argmax(1)
    # The pipeline's own test batches through the same exported model.
    batches = [b for b, _ in digits.loader("test", 256)]
    pipeline = onnx_predict(model, "input", torch.cat(batches).numpy()).argmax(1)
    assert len(deployed) == len(labels) == len(pipeline)
    assert (deployed == pipeline).all()
    top1 = float((deployed == labels).mean() * 100)
    assert abs(top1 - report.pruned.top1) <= 0.5, (top1, report.pruned.top1)


def test_the_raw_model_takes_uint8_nhwc_and_predicts_the_same(
    compressed, digits: DataSplits
) -> None:
    out, report = compressed
    contract = deploy_contract(out / RAW_FILE)
    sess = ort.InferenceSession(str(out / RAW_FILE))
    (inp,) = sess.get_inputs()
    assert (inp.name, inp.type) == (RAW_INPUT_NAME, "tensor(uint8)")
    assert inp.shape[1:] == [contract["height"], contract["width"], contract["channels"]]
    images, labels = _test_images(digits)
    # A deployment resizes its uint8 images and keeps them as uint8.
    resized = np.clip(np.rint(deploy_resize(images, contract) * 255), 0, 255).astype(np.uint8)
    raw_logits = onnx_predict(out / RAW_FILE, RAW_INPUT_NAME, resized)
    ref_logits = onnx_predict(
        out / "model.onnx", "input", deploy_normalise(resized / 255.0, contract)
    )
    assert np.abs(raw_logits - ref_logits).max() <= report.config.export.parity_atol
    assert (raw_logits.argmax(1) == ref_logits.argmax(1)).all()
    # Rounding the resized images to uint8 barely moves the accuracy.
    top1 = float((raw_logits.argmax(1) == labels).mean() * 100)
    assert abs(top1 - report.pruned.top1) <= 1.0, (top1, report.pruned.top1)


@pytest.mark.parametrize("mode", ["int8_dynamic", "fp16"])
def test_quantized_variants_keep_the_contract(compressed, mode: str, tmp_path: Path) -> None:
    from flow_compress.config import QuantizeConfig
    from flow_compress.export.quantize import quantize_file

    out, _ = compressed
    dest = tmp_path / f"model.{mode}.onnx"
    quantize_file(mode, out / "model.onnx", dest, QuantizeConfig())
    assert deploy_contract_text(dest) == (out / CONTRACT_FILE).read_text(encoding="utf-8")


# --------------------------------------------------------------------------- normalisation


def test_a_pretrained_cfg_normalisation_is_carried_through(
    trained_weights: Path, tmp_path: Path
) -> None:
    import timm

    cfg = timm.models.get_pretrained_cfg("vit_tiny_patch16_224").to_dict()
    norm = Normalization.from_pretrained_cfg(cfg)
    assert (norm.mean, norm.std) == (tuple(cfg["mean"]), tuple(cfg["std"]))
    assert norm.interpolation == cfg["interpolation"] and norm.crop_pct == cfg["crop_pct"]
    config = small_config(
        data={"custom_normalization": norm.model_dump()},
        prune={"steps": 1},
        truncate={"enabled": False},
        recovery={"iters_per_step": 1, "final_iters": 1},
        latency={"enabled": False},
        export={"embed_preprocessing": True},
    )
    out = tmp_path / "out"
    report = compress(config, weights=trained_weights, out_dir=out)
    contract = report.input_contract
    assert contract is not None and contract.normalization_source == "config"
    # A grey model takes the mean of the RGB statistics.
    assert contract.mean == (sum(cfg["mean"]) / 3,) and contract.std == (sum(cfg["std"]) / 3,)
    assert contract.std != build_contract(SIZE, 1).std, "not the default"
    resized = int(SIZE // cfg["crop_pct"])
    assert contract.resize.size == (resized, resized) and contract.crop == (SIZE, SIZE)
    assert contract.resize.interpolation == "bicubic"
    assert deploy_contract_text(out / "model.onnx") == contract.to_json()
    assert read_contract_file(out / "model.ts") == contract.to_json()
    assert any(p.format == "onnx_raw" and p.passed for p in report.parity)
    # The pipeline fed exactly that: bicubic resize, clamp, centre crop, these statistics.
    data = load_dataset("digits", input_size=SIZE, in_chans=1, config=config.data)
    images = data.val.images[:8]  # type: ignore[attr-defined]
    x = F.interpolate(images.float() / 255, size=(resized, resized), mode="bicubic")
    top = round((resized - SIZE) / 2)
    x = x.clamp(0, 1)[:, :, top : top + SIZE, top : top + SIZE]
    expected = (x - contract.mean[0]) / contract.std[0]
    got, _ = next(data.loader("val", 8))
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18"])
def test_pretrained_resolves_the_architectures_published_preprocessing(name: str) -> None:
    norm = pretrained_normalization(resolve_model(name).spec)
    if name.startswith("vit"):
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        mean, std, interp, crop = cfg.mean, cfg.std, cfg.interpolation, cfg.crop_pct
    else:
        import torchvision

        t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        mean, std = tuple(t.mean), tuple(t.std)
        interp, crop = t.interpolation.value, t.crop_size[0] / t.resize_size[0]
    assert (norm.mean, norm.std, norm.interpolation) == (tuple(mean), tuple(std), interp)
    assert norm.crop_pct == pytest.approx(crop)
    data = load_dataset(
        "digits",
        input_size=SIZE,
        in_chans=3,
        config=DataConfig(normalization="pretrained", max_eval_samples=8),
        normalization=norm,
    )
    assert data.contract.normalization_source == "pretrained"
    assert data.contract.mean == tuple(mean)


def test_the_default_is_imagenet_for_rgb_and_stays_the_default() -> None:
    import torchvision

    t = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    rgb = build_contract(SIZE, 3)
    assert rgb.mean == tuple(t.mean) and rgb.std == tuple(t.std)
    assert rgb.channel_order == "RGB" and rgb.crop is None and rgb.resize.size == (SIZE, SIZE)
    data = load_dataset(
        "digits", input_size=SIZE, in_chans=3, config=DataConfig(max_eval_samples=8)
    )
    assert data.contract == build_contract(SIZE, 3, class_names=DIGITS_CLASSES)


def test_a_partial_custom_normalisation_keeps_the_default_statistics() -> None:
    custom = Normalization(interpolation="bicubic", crop_pct=0.8)
    data = load_dataset(
        "digits",
        input_size=SIZE,
        in_chans=3,
        config=DataConfig(custom_normalization=custom, max_eval_samples=8),
    )
    default = build_contract(SIZE, 3)
    assert (data.contract.mean, data.contract.std) == (default.mean, default.std)
    assert data.contract.crop == (SIZE, SIZE) and data.contract.resize.size == (20, 20)
    assert data.contract.normalization_source == "config"
    x, _ = next(data.loader("val", 8))
    assert x.shape == (8, 3, SIZE, SIZE)


def test_bad_normalisation_settings_are_refused() -> None:
    with pytest.raises(ValidationError, match="mean has 3 values but std has 1"):
        Normalization(mean=(0.1, 0.2, 0.3), std=(0.5,))
    with pytest.raises(ValidationError, match="embed_preprocessing needs the ONNX export"):
        CompressionConfig(
            model="resnet18",
            dataset="digits",
            export={"formats": ["torchscript"], "embed_preprocessing": True},
        )
    with pytest.raises(ValidationError, match="exclude each other"):
        DataConfig(normalization="pretrained", custom_normalization=Normalization(crop_pct=0.9))
    with pytest.raises(InvalidConfigError, match="pretrained"):
        load_dataset("digits", input_size=SIZE, config=DataConfig(normalization="pretrained"))
    two = DataConfig(custom_normalization=Normalization(mean=(0.1, 0.2), std=(0.3, 0.4)))
    with pytest.raises(ValidationError, match="does not fit a model of 3 channels"):
        CompressionConfig(model="resnet18", dataset="digits", in_chans=3, data=two)
    with pytest.raises(InvalidConfigError, match="does not fit a model of 3 channels"):
        load_dataset("digits", input_size=SIZE, in_chans=3, config=two)

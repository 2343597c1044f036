"""Quantized ONNX variants on a real pruned model (resnet18 trained on digits, 16 px):
INT8 static, INT8 dynamic and FP16 load in ONNX Runtime, agree with the FP32 pruned model,
are listed in the manifest and appear in the report; bad options are refused early."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from flow_compress.arch.models import build_model, save_weights
from flow_compress.artifacts import read_manifest, verify_manifest
from flow_compress.cli import app
from flow_compress.config import CompressionConfig, QuantizeConfig
from flow_compress.data import DataSplits
from flow_compress.errors import QuantizationParityError
from flow_compress.export import get_quantizer, list_quantizers
from flow_compress.export.onnx import export_onnx, run_logits, session
from flow_compress.export.quantize import build_quantized, classifier_nodes
from flow_compress.pipeline import compress
from flow_compress.recovery import LoopSettings, fit
from flow_compress.report import load_report
from flow_compress.schema import CompressionReport

from .conftest import SIZE, small_config

MODES = tuple(list_quantizers())  # every registered mode is built and checked
TAPS = ("layer3", "layer4")


@pytest.fixture(scope="module")
def confident_weights(
    trained_resnet: torch.nn.Module, digits: DataSplits, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The shared fixture model trained 120 steps more (about 91 % test top-1, from 76 %).

    Why: with the shared model (76 %) pruned with 3 recovery steps (about 53 %), 3-5 % of test
    inputs have a top-2 logit margin below 0.03 and every top-1 flip of INT8 static was among
    them (max logit difference only 0.24); 16-bit activations still flipped 1.6 %, and
    calibration size, calibrator, per-tensor vs per-channel and activation type moved agreement
    by under a point. The 97 % bar then measures the model's indecision, not the quantizer. On
    this model (pruned: 86-89 %) agreement was 98-100 % for every mode over three seeds.
    """
    model = copy.deepcopy(trained_resnet)
    fit(model, digits.forever(32, seed=1), LoopSettings(iters=120, lr=0.02), torch.device("cpu"))
    path = tmp_path_factory.mktemp("confident") / "resnet18.safetensors"
    save_weights(model.eval(), path)
    return path


@pytest.fixture(scope="module")
def quantized_run(confident_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compression with every quantized variant, recovered with feature distillation."""
    out = tmp_path_factory.mktemp("quant") / "out"
    cfg = small_config(
        recovery={
            "distillation": "kd_features",
            "feature_taps": list(TAPS),
            "iters_per_step": 5,
            "final_iters": 10,
        },
        quantize={"modes": list(MODES)},
    )
    compress(cfg, weights=confident_weights, out_dir=out)
    return out


@pytest.fixture(scope="module")
def report(quantized_run: Path) -> CompressionReport:
    return load_report(quantized_run / "report.json")


def _test_batch(digits: DataSplits) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*digits.loader("test", 512), strict=True)
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def test_every_variant_agrees_with_the_fp32_pruned_model(
    quantized_run: Path, digits: DataSplits
) -> None:
    x, _ = _test_batch(digits)
    reference = run_logits(session(quantized_run / "model.onnx"), x)
    for mode in MODES:
        logits = run_logits(session(quantized_run / get_quantizer(mode).file), x)
        assert logits.shape == reference.shape
        agree = float((logits.argmax(1) == reference.argmax(1)).mean() * 100)
        assert agree >= 97.0, f"{mode}: {agree:.2f} % top-1 agreement on {len(x)} test images"


def test_variants_are_in_the_manifest_and_verify(quantized_run: Path) -> None:
    listed = {f.name: f for f in read_manifest(quantized_run).files}
    for mode in MODES:
        file = get_quantizer(mode).file
        assert file in listed
        assert listed[file].size == (quantized_run / file).stat().st_size
    assert verify_manifest(quantized_run) == []
    leftovers = {p.name for p in quantized_run.iterdir()} - set(listed) - {"manifest.json"}
    assert leftovers == set(), "scratch files of the quantizer or timing leaked"


def test_report_records_checks_sizes_and_the_combination_table(
    quantized_run: Path, report: CompressionReport
) -> None:
    assert [q.mode for q in report.quantized] == list(MODES)
    fp32_size = (quantized_run / "model.onnx").stat().st_size
    for q in report.quantized:
        assert q.passed and q.agreement >= q.min_agreement
        assert q.size_bytes == (quantized_run / q.file).stat().st_size
        assert 0 < q.top1 <= 100 and q.top1 <= q.top5
        assert {"cpu@b1", "cpu@b4"} <= set(q.latency_ms)
    sizes = {q.mode: q.size_bytes / fp32_size for q in report.quantized}
    # INT8 weights take a quarter of FP32's bytes, FP16 half (plus graph overhead).
    assert sizes["int8_static"] < 0.35 and sizes["int8_dynamic"] < 0.35
    assert 0.4 < sizes["fp16"] < 0.6
    static = next(q for q in report.quantized if q.mode == "int8_static")
    assert static.calibration_samples is not None and static.calibration_samples > 0

    rows = {r.variant: r for r in report.combination}
    # Quantized rows follow the order the modes were asked in (here the registry's order).
    assert list(rows) == [
        "Baseline (FP32)",
        "Pruned + KD + features (FP32)",
        *(get_quantizer(m).label for m in MODES),
    ]
    assert {"Pruned + INT8 static", "Pruned + INT8 dynamic", "Pruned + FP16"} <= set(rows)
    base, pruned = rows["Baseline (FP32)"], rows["Pruned + KD + features (FP32)"]
    assert base.macs == report.base.macs and pruned.macs == report.pruned.macs < base.macs
    assert pruned.top1 == report.pruned.top1 and base.top1 == report.base.top1
    assert pruned.size_bytes == fp32_size < base.size_bytes
    for row in report.combination:
        assert set(row.latency_ms) == {"cpu@b1", "cpu@b4"}
        assert row.speedup["cpu@b1"] == pytest.approx(
            base.latency_ms["cpu@b1"] / row.latency_ms["cpu@b1"], rel=1e-3
        )
    assert "quantization" in report.timings_s

    md = (quantized_run / "report.md").read_text()
    assert "## Pruning combined with quantization" in md and "## Quantized models" in md
    assert "| Pruned + INT8 static | INT8 |" in md
    assert "kd_features distillation" in md and "feature taps layer3, layer4" in md


def test_feature_distillation_ran_end_to_end(report: CompressionReport) -> None:
    assert report.config.recovery.distillation == "kd_features"
    assert report.config.recovery.feature_taps == TAPS
    assert report.recovery_iterations.get("Final Fine-Tune", 0) > 0


def test_classifier_is_found_in_the_graph(quantized_run: Path) -> None:
    assert classifier_nodes(quantized_run / "model.onnx") == ["/fc/Gemm"]


def test_a_variant_below_the_agreement_bar_fails_with_a_stable_code(
    digits: DataSplits, tmp_path: Path
) -> None:
    # An untrained network's logits are nearly tied, so 8-bit logits (classifier quantized
    # too, calibrated on 8 images) flip many top-1 classes: no 100 % agreement is possible.
    torch.manual_seed(0)
    model = build_model("resnet18", 10, in_chans=1, input_size=SIZE).eval()
    export_onnx(model, digits.sample_inputs(2), tmp_path / "model.onnx")
    cfg = QuantizeConfig(
        modes=("int8_static",),
        keep_classifier_fp32=False,
        calibration_samples=8,
        min_agreement=100.0,
    )
    with pytest.raises(QuantizationParityError) as caught:
        build_quantized(tmp_path / "model.onnx", tmp_path, digits, cfg)
    assert caught.value.code == "quantization_parity_failed"
    assert "int8_static: top-1 agreement" in caught.value.message


@pytest.mark.parametrize(
    "quantize",
    [
        {"modes": ["int4"]},
        {"modes": ["fp16", "fp16"]},
        {"modes": ["fp16"], "bits": 8},
        {"modes": ["int8_static"], "calibration_samples": 0},
        {"modes": ["int8_static"], "min_agreement": 101},
    ],
)
def test_bad_quantize_options_are_config_errors(quantize: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        small_config(quantize=quantize)


def test_quantization_needs_the_onnx_export() -> None:
    with pytest.raises(ValidationError, match=r"quantize\.modes needs the ONNX export"):
        small_config(quantize={"modes": ["fp16"]}, export={"formats": ["torchscript"]})
    assert small_config(export={"formats": ["torchscript"]}).quantize.modes == ()


def test_quantize_config_is_frozen_and_off_by_default() -> None:
    cfg = CompressionConfig(model="resnet18", dataset="digits")
    assert cfg.quantize.modes == ()
    with pytest.raises(ValidationError):
        cfg.quantize.modes = ("fp16",)  # type: ignore[misc]


def _cli(tmp_path: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app,
        [
            "compress",
            "--model",
            "resnet18",
            "--dataset",
            "digits",
            "--in-chans",
            "1",
            "--input-size",
            str(SIZE),
            "--out",
            str(tmp_path / "out"),
            *extra,
        ],
    )
    return result.exit_code, result.output


def test_cli_refuses_bad_quantize_and_distillation_options(tmp_path: Path) -> None:
    for extra in (
        ("--quantize", "int8_static,int4"),
        ("--quantize", "fp16", "--min-agreement", "120"),
        ("--distillation", "kd_features"),  # taps missing
        ("--distillation", "mse"),
    ):
        code, output = _cli(tmp_path, *extra)
        assert code == 2, (extra, output)
        assert "error [invalid_config]" in output, (extra, output)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"export": {"formats": ["torchscript"]}}))
    code, output = _cli(tmp_path, "--config", str(cfg), "--quantize", "fp16")
    assert code == 2 and "needs the ONNX export" in output
    assert not (tmp_path / "out").exists()


def test_cli_distillation_none_trains_with_plain_cross_entropy(
    trained_weights: Path, tmp_path: Path
) -> None:
    cfg = small_config(prune={"steps": 1}, truncate={"enabled": False}, latency={"enabled": False})
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    code, output = _cli(
        tmp_path,
        "--weights",
        str(trained_weights),
        "--config",
        str(tmp_path / "cfg.json"),
        "--target-macs",
        "0.5",
        "--max-drop",
        "30",
        "--device",
        "cpu",
        "--distillation",
        "none",
        "--quantize",
        "none",
    )
    assert code == 0, output
    saved = load_report(tmp_path / "out" / "report.json")
    assert saved.config.recovery.distillation == "none" and saved.quantized == []
    assert saved.recovery_iterations.get("Filter Prune", 0) > 0
    assert "plain cross-entropy (no distillation)" in (tmp_path / "out" / "report.md").read_text()

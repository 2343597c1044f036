"""bench.combination end to end on a tiny real setting (resnet18 at 16 px on digits): one
compression per distillation choice with identical schedules, the KD model quantized, every
ONNX file timed in one process, and the paper-shaped table, JSON-ready rows and plot."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.combination import QUICK, markdown, plot, run
from flow_compress.arch.models import build_model, save_weights

SIZE = 16
# Random initial weights: the agreement bar is lifted (an untrained model's logits are nearly
# tied, so 8 bits flip its decisions); tests/flow_compress/test_quantize.py checks the bar.
PROTO = replace(
    QUICK,
    target=0.5,
    steps=1,
    iters_per_step=1,
    trunc_iters=1,
    final_iters=1,
    max_layers=0,
    batch_size=16,
    max_eval_samples=64,
    calibration_samples=32,
    min_agreement=0.0,
    warmup=1,
    runs=3,
)

pytestmark = pytest.mark.timeout(600)


def test_table_has_every_row_and_only_the_recovery_loss_differs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.safetensors"
    save_weights(build_model("resnet18", 10, in_chans=1, input_size=SIZE), weights)
    rows, devices, reports = run(
        PROTO,
        arch="resnet18",
        dataset="digits",
        in_chans=1,
        input_size=SIZE,
        device="cpu",
        weights=weights,
        out=tmp_path / "out",
    )
    assert [r["variant"] for r in rows] == [
        "Baseline (FP32)",
        "Pruned + KD (FP32)",
        "Pruned + KD features (FP32)",
        "Pruned + CE only (FP32)",
        "Pruned + KD + INT8 static",
        "Pruned + KD + INT8 dynamic",
        "Pruned + KD + FP16",
    ]
    assert set(devices) == {"cpu"}
    base = rows[0]
    for r in rows:
        assert set(r["latency_ms"]) == {"cpu@b1", "cpu@b32"}
        assert r["size_bytes"] > 0 and 0 <= r["top1"] <= r["top5"] <= 100
    for r in rows[1:]:
        assert r["macs"] < base["macs"] and r["size_bytes"] < base["size_bytes"]
    assert rows[4]["size_bytes"] < rows[1]["size_bytes"] / 3  # INT8 weights
    # Same schedule and budget: the configs differ only in the recovery loss (and the taps it
    # needs) and in the quantization of the KD run.
    dumped = {
        name: rep.config.model_dump(exclude={"recovery": {"distillation", "feature_taps"}})
        for name, rep in reports.items()
    }
    dumped["kd"].pop("quantize")
    for other in ("kd_features", "none"):
        dumped[other].pop("quantize")
        assert dumped[other] == dumped["kd"]
    assert reports["kd_features"].config.recovery.feature_taps == PROTO.feature_taps
    assert {q.mode for q in reports["kd"].quantized} == {"int8_static", "int8_dynamic", "fp16"}
    assert sorted(p.name for p in (tmp_path / "out" / "reports").iterdir()) == [
        "kd.json",
        "kd_features.json",
        "none.json",
    ]

    payload = {
        "mode": "quick",
        "command": "python -m bench.combination --quick",
        "protocol": {**PROTO.__dict__},
        "base": {"source": "test weights"},
        "rows": rows,
        "test_images": reports["kd"].splits["test"],
        "devices": devices,
        "machine": {},
        "wall_s": 1.0,
    }
    json.dumps(payload)
    md = markdown(payload)
    assert "| Pruned + KD + INT8 static |" in md and "cpu@b32 (ms)" in md
    assert "Top-1 is measured on 64 images: one standard error is about" in md
    plot(payload, tmp_path / "combination.png")
    assert (tmp_path / "combination.png").read_bytes()[:4] == b"\x89PNG"

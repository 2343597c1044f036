"""Shared small real models and data for the library tests (digits, resnet18 at 16 px)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from flow_compress.arch.models import build_model, save_weights
from flow_compress.config import CompressionConfig, DataConfig
from flow_compress.data import DataSplits, load_dataset
from flow_compress.recovery import LoopSettings, fit

SIZE = 16


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # tests/conftest.py


@pytest.fixture(scope="session")
def digits() -> DataSplits:
    return load_dataset("digits", input_size=SIZE, in_chans=1, config=DataConfig())


@pytest.fixture(scope="session")
def trained_resnet(digits: DataSplits) -> torch.nn.Module:
    """resnet18 trained briefly on digits (about 90 % validation top-1)."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10, in_chans=1, input_size=SIZE)
    fit(model, digits.forever(32, seed=0), LoopSettings(iters=80, lr=0.05), torch.device("cpu"))
    return model.eval()


@pytest.fixture(scope="session")
def trained_weights(
    trained_resnet: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_weights(trained_resnet, path)
    return path


def small_config(**overrides: object) -> CompressionConfig:
    """A fast, real configuration: few steps, few recovery iterations, tiny latency runs."""
    raw: dict[str, object] = {
        "model": "resnet18",
        "dataset": "digits",
        "in_chans": 1,
        "input_size": SIZE,
        "target_macs": 0.5,
        "max_drop": 30.0,
        "device": "cpu",
        "prune": {"steps": 2, "calibration_batches": 1},
        "truncate": {"max_layers": 1, "n_try": 2, "calibration_batches": 1, "tau": 30.0},
        "recovery": {"iters_per_step": 3, "trunc_iters": 2, "final_iters": 3, "batch_size": 32},
        "latency": {"runs": 2, "warmup": 1, "batch_sizes": [1, 4]},
        "export": {"parity_samples": 16},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}  # type: ignore[dict-item]
        else:
            raw[key] = value
    return CompressionConfig.model_validate(raw)

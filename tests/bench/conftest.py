"""What the bench.quality tests share: a tiny real protocol (resnet18 at 16 px on
scikit-learn's digits, two stage-1 steps of two recovery steps) and its base weights."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.quality import QUICK, Model
from flow_compress.arch.models import build_model, save_weights

SIZE = 16
MODEL = Model("resnet18", "digits", 1, SIZE, "cpu")
TINY = replace(
    QUICK,
    targets=(0.5,),
    seeds=(0,),
    steps=2,
    iters_per_step=2,
    trunc_iters=2,
    final_iters=2,
    max_layers=1,
    n_try=2,
    tau=100.0,  # accept the first candidate block, so stage 2 really spends steps
    batch_size=16,
    max_train_samples=256,
    max_eval_samples=64,
    calibration_batches=1,
)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised resnet18 for ``MODEL`` (the same one in every module)."""
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # tests/conftest.py
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "resnet18.safetensors"
    save_weights(build_model("resnet18", 10, in_chans=1, input_size=SIZE), path)
    return path

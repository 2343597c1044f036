"""The preflight (issue 12, item 5) on small real models: weights that fit and weights that do
not, the base cost, prunable groups and layers left alone, stage-2 candidates, whether the
target is reachable under the per-layer caps, export parity, and a model that cannot run
named by the layer it fails in."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from flow_compress.arch import Family, custom_models, register_family, unregister_family
from flow_compress.arch.models import build_model, save_weights
from flow_compress.config import ExportConfig, PruneConfig
from flow_compress.graph import count_macs_params
from flow_compress.pipeline.preflight import preflight

REPO = Path(__file__).resolve().parents[2]
TS_ONLY = ExportConfig(formats=("torchscript",), parity_samples=2)


def test_a_resnet_with_fitting_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, in_chans=1, input_size=16)
    save_weights(model, tmp_path / "w.safetensors")
    r = preflight(
        "resnet18",
        weights=tmp_path / "w.safetensors",
        in_chans=1,
        input_size=16,
        target_macs=0.3,
        export=TS_ONLY,
    )
    assert r.weights == "fit" and r.forward_error is None and r.graph_error is None
    assert (r.macs, r.params) == count_macs_params(model, torch.zeros(1, 1, 16, 16))
    assert r.prunable_groups > 0 and r.prunable_channels > 0 and r.prunable_heads == 0
    assert [a.layer for a in r.left_alone] == ["fc"]  # only the classifier
    assert "layer1.0" in r.stage2_candidates
    assert r.reachable_macs is not None and r.reachable_macs < r.macs
    assert r.target_reachable and r.ok
    assert [(e.format, e.passed) for e in r.exports] == [("torchscript", True)]


def test_the_reachable_floor_follows_the_per_layer_caps() -> None:
    loose = preflight("resnet18", in_chans=1, input_size=16, export=ExportConfig(formats=()))
    tight = preflight(
        "resnet18",
        in_chans=1,
        input_size=16,
        target_macs=0.5,
        prune=PruneConfig(max_layer_ratio=0.2),
        export=ExportConfig(formats=()),
    )
    assert loose.reachable_ratio is not None and tight.reachable_ratio is not None
    assert tight.reachable_ratio > loose.reachable_ratio
    # a 20 % cap per layer cannot remove half the MACs: the preflight says so up front
    assert tight.reachable_ratio > 0.5 and tight.target_reachable is False and not tight.ok


def test_weights_of_another_architecture_are_reported_with_the_fix(tmp_path: Path) -> None:
    save_weights(build_model("timm:efficientnet_b0", 10, input_size=32), tmp_path / "t.st")
    r = preflight(
        "efficientnet_b0", weights=tmp_path / "t.st", input_size=32, export=ExportConfig(formats=())
    )
    assert r.weights == "bad" and not r.ok
    assert r.weights_error is not None and "name it timm:efficientnet_b0" in r.weights_error


@pytest.mark.slow  # a ViT's graph: ~15 s on two idle cores
def test_an_auto_model_with_attention_reports_heads() -> None:
    r = preflight(
        "timm:deit_tiny_patch16_224",
        input_size=32,
        target_macs=0.5,
        export=ExportConfig(formats=()),
    )
    assert r.family == "auto" and r.graph_error is None
    assert r.prunable_heads > 0
    assert any("attention" in a.reason for a in r.left_alone)


class _Broken(nn.Module):
    """Its classifier expects more features than the body gives: fails at ``head``."""

    def __init__(self, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_chans, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


@pytest.fixture
def broken() -> Iterator[str]:
    register_family(
        Family(
            name="broken",
            architectures=custom_models(
                "broken",
                broken_net=lambda *, num_classes, in_chans, input_size: _Broken(
                    num_classes, in_chans
                ),
            ),
            small="broken_net",
        )
    )
    yield "broken_net"
    unregister_family("broken")


def test_a_model_that_cannot_run_names_the_failing_layer(broken: str) -> None:
    r = preflight(broken, input_size=16)
    assert r.failing_layer == "head (Linear)"
    assert r.forward_error is not None and "RuntimeError" in r.forward_error
    assert r.macs is None and not r.ok


def test_the_cli_answers_and_exits_by_the_verdict() -> None:
    cmd = [sys.executable, "-m", "flow_compress.cli", "check", "--model", "resnet18"]
    args = ["--in-chans", "1", "--input-size", "16", "--formats", "none", "--json"]
    ok = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["target_reachable"] is True
    hard = [*args, "--target-macs", "0.5", "--max-layer-ratio", "0.2"]
    missed = subprocess.run([*cmd, *hard], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert missed.returncode == 1
    assert json.loads(missed.stdout)["target_reachable"] is False
    unknown = subprocess.run(
        [*cmd[:-1], "tf_efficientnet_lite9"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert unknown.returncode == 2 and "unsupported_model" in unknown.stderr

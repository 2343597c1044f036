"""End to end through the CLI on real data: every artifact is written and reloads."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from flow_compress.artifacts import sha256_file
from flow_compress.cli import app
from flow_compress.errors import CancelledError, InvalidConfigError
from flow_compress.measure.evaluate import evaluate
from flow_compress.pipeline import compress
from flow_compress.plan import read_plan, rebuild
from flow_compress.report import load_report

from .conftest import SIZE, small_config

ARTIFACTS = {
    "model.ts",
    "model.onnx",
    "weights.safetensors",
    "plan.json",
    "preprocessing.json",
    "report.json",
    "report.md",
    "macs.png",
    "params.png",
    "top1.png",
    "dynamics.png",
    "manifest.json",
}


@pytest.fixture(scope="module")
def compressed(trained_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = small_config(truncate={"max_layers": 1, "tau": 100.0})
    cfg_file = out.parent / "cfg.json"
    cfg_file.write_text(cfg.model_dump_json())
    result = CliRunner().invoke(
        app,
        [
            "compress",
            "--model",
            "resnet18",
            "--weights",
            str(trained_weights),
            "--dataset",
            "digits",
            "--target-macs",
            "0.5",
            "--max-drop",
            "30",
            "--in-chans",
            "1",
            "--input-size",
            str(SIZE),
            "--config",
            str(cfg_file),
            "--out",
            str(out),
            "--checkpoint-dir",
            str(out.parent / "checkpoint"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "GMACs" in result.output
    (out.parent / "cli-output.txt").write_text(result.output)
    return out


def test_cli_checkpoints_outside_the_artifacts(compressed: Path) -> None:
    # The checkpoint lives where the user said, never among the published artifacts; its last
    # state is the model that stage 2 handed to the fine-tune (same plan as the artifacts).
    state = json.loads((compressed.parent / "checkpoint" / "state.json").read_text())
    assert state["stage"] == "Layer Trunc"
    assert (compressed.parent / "checkpoint" / state["weights_file"]).is_file()
    plan = json.loads((compressed / "plan.json").read_text())
    assert len(state["plan_ops"]) == len(plan["ops"])


def test_every_artifact_is_written_and_listed(compressed: Path) -> None:
    names = {p.name for p in compressed.iterdir()}
    assert names == ARTIFACTS
    manifest = json.loads((compressed / "manifest.json").read_text())
    listed = {f["name"]: f for f in manifest["files"]}
    assert set(listed) == ARTIFACTS - {"manifest.json"}
    for name, entry in listed.items():
        assert entry["sha256"] == sha256_file(compressed / name)
        assert entry["size"] == (compressed / name).stat().st_size
    assert not list(compressed.parent.glob(".out.partial-*"))


def test_report_contents(compressed: Path) -> None:
    report = load_report(compressed / "report.json")
    assert report.pruned.macs < report.base.macs and report.pruned.params < report.base.params
    assert report.macs_ratio == pytest.approx(report.pruned.macs / report.base.macs)
    stages = [s.stage for s in report.steps]
    assert stages[0] == "Baseline" and stages[-1] == "Final Fine-Tune" and "Filter Prune" in stages
    assert {(r.runtime, r.batch_size) for r in report.latency} == {
        (rt, b) for rt in ("eager", "torchscript", "onnxruntime") for b in (1, 4)
    }
    assert report.speedup_runtime == "onnxruntime@b1"
    assert {p.format for p in report.parity} == {"torchscript", "onnx", "plan_replay"}
    assert all(p.passed for p in report.parity)
    assert report.guarantee is not None and report.guarantee.delta_p99 >= 0
    assert report.guarantee.delta_max == 0.25, "the configured tolerance, not the largest error"
    assert report.guarantee.holds == (report.guarantee.delta_p99 <= 0.25)
    assert report.target_met == (report.macs_ratio <= 0.5 * 1.01)
    assert report.recovery_iterations["Filter Prune"] > 0
    activities = {"scoring", "surgery", "recovery", "evaluation", "export", "total"}
    assert activities <= set(report.timings_s)
    assert report.environment["torch"].startswith("2.14")
    md = (compressed / "report.md").read_text()
    assert "Filter Prune" in md and "GMACs" in md


def test_report_names_the_input_and_the_pruned_weights(
    compressed: Path, trained_weights: Path
) -> None:
    report = load_report(compressed / "report.json")
    manifest = {
        f["name"]: f for f in json.loads((compressed / "manifest.json").read_text())["files"]
    }
    assert report.weights_sha256 == sha256_file(trained_weights)
    assert report.pruned_weights_sha256 == manifest["weights.safetensors"]["sha256"]
    assert report.pruned_weights_sha256 != report.weights_sha256
    assert not any("no weights given" in n for n in report.notes), report.notes
    md = (compressed / "report.md").read_text()
    assert f"| Input weights sha256 | `{report.weights_sha256}` |" in md
    assert f"(weights.safetensors) | `{report.pruned_weights_sha256}` |" in md


def test_cli_prints_the_verdicts(compressed: Path) -> None:
    report = load_report(compressed / "report.json")
    output = (compressed.parent / "cli-output.txt").read_text()
    assert ("target met" if report.target_met else "target MISSED") in output
    assert report.guarantee is not None
    assert ("output bound holds" if report.guarantee.holds else "EXCEEDED") in output


def test_exported_models_reproduce_report_accuracy(compressed: Path) -> None:
    from flow_compress.data import load_dataset

    report = load_report(compressed / "report.json")
    data = load_dataset("digits", input_size=SIZE, in_chans=1)
    ts = torch.jit.load(str(compressed / "model.ts"))
    top1, _ = evaluate(ts, data.loader("test", 128), torch.device("cpu"))
    assert top1 == pytest.approx(report.pruned.top1, abs=1e-3)
    sess = ort.InferenceSession(str(compressed / "model.onnx"), providers=["CPUExecutionProvider"])
    correct = total = 0
    for x, y in data.loader("test", 100):
        logits = sess.run(None, {"input": x.numpy()})[0]
        correct += int((np.argmax(logits, 1) == y.numpy()).sum())
        total += len(y)
    assert 100 * correct / total == pytest.approx(report.pruned.top1, abs=0.3)


def test_plan_replay_from_files(compressed: Path) -> None:
    plan = read_plan(compressed / "plan.json")
    model = rebuild(plan, compressed / "weights.safetensors")
    ts = torch.jit.load(str(compressed / "model.ts"))
    x = torch.randn(3, 1, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(model(x), ts(x), atol=1e-5)


def test_cancel_between_steps_leaves_nothing(trained_weights: Path, tmp_path: Path) -> None:
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    out = tmp_path / "cancelled"
    with pytest.raises(CancelledError):
        compress(small_config(), weights=trained_weights, out_dir=out, should_cancel=cancel)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_refuses_non_empty_output(trained_weights: Path, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(InvalidConfigError, match="not empty"):
        compress(small_config(), weights=trained_weights, out_dir=tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_cli_reports_error_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    result = CliRunner().invoke(
        app,
        [
            "compress",
            "--model",
            "resnet18",
            "--weights",
            str(bad),
            "--dataset",
            "digits",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2
    assert "bad_checkpoint" in result.output
    result = CliRunner().invoke(
        app, ["compress", "--model", "nope", "--dataset", "digits", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "unsupported_model" in result.output
    result = CliRunner().invoke(
        app,
        [
            "compress",
            "--model",
            "resnet18",
            "--dataset",
            "digits",
            "--target-macs",
            "1.5",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and "invalid_config" in result.output

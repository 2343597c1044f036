"""Latency: base and pruned timed side by side in every runtime, the machine described."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from flow_compress.arch.models import build_model
from flow_compress.config import LatencyConfig
from flow_compress.errors import InvalidConfigError
from flow_compress.measure.environment import describe_device, environment
from flow_compress.measure.latency import compare_latency, measure_latency, prepare_engine

SHAPE = (3, 32, 32)
CFG = LatencyConfig(batch_sizes=(1, 3), warmup=1, runs=3, threads=1)


@pytest.fixture(scope="module")
def models() -> tuple[nn.Module, nn.Module]:
    # A large and a small real network stand in for the base and the pruned model.
    torch.manual_seed(0)
    return build_model("resnet18", 10, input_size=32), build_model(
        "mobilenet_v3_small", 10, input_size=32
    )


def _check_records(records, device_prefix: str) -> None:
    assert [(r.runtime, r.batch_size) for r in records] == [
        (rt, b) for rt in CFG.runtimes for b in CFG.batch_sizes
    ]
    for r in records:
        assert r.base_ms > 0 and r.pruned_ms > 0
        assert r.speedup == pytest.approx(r.base_ms / r.pruned_ms)
        assert r.dtype == "float32"
        assert r.device.startswith(device_prefix)


def test_compare_latency_times_every_runtime_and_batch_on_cpu(models, tmp_path: Path) -> None:
    base, pruned = models
    base.train()
    threads_before = torch.get_num_threads()
    records = compare_latency(base, pruned, SHAPE, CFG, torch.device("cpu"), tmp_path)
    _check_records(records, "cpu (")
    assert "1 thread)" in records[0].device, "the thread count in force is stated"
    assert torch.get_num_threads() == threads_before
    assert base.training, "the caller's model is copied, never switched to eval"
    names = {p.name for p in tmp_path.iterdir()}
    assert {"base.ts", "pruned.ts", "base.onnx", "pruned.onnx"} <= names


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compare_latency_on_cuda(models, tmp_path: Path) -> None:
    base, pruned = models
    records = compare_latency(base, pruned, SHAPE, CFG, torch.device("cuda"), tmp_path)
    import onnxruntime as ort

    ort_on_gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    for r in records:
        if r.runtime == "onnxruntime" and not ort_on_gpu:
            assert r.device.startswith("cpu (") and "no CUDA provider" in r.device
        else:
            assert r.device.startswith("cuda:0 (")
        assert r.base_ms > 0 and r.pruned_ms > 0
    assert next(base.parameters()).device.type == "cpu", "the caller's model stays put"


def test_measure_latency_is_the_median_after_warmup() -> None:
    calls: list[float] = []

    def run() -> None:
        calls.append(time.perf_counter())
        time.sleep(0.002)

    ms = measure_latency(run, torch.device("cpu"), warmup=2, runs=5)
    assert len(calls) == 7
    assert 2.0 <= ms < 200.0


def test_measure_latency_needs_a_run() -> None:
    with pytest.raises(ValueError):
        measure_latency(lambda: None, torch.device("cpu"), warmup=0, runs=0)


def test_unknown_runtime_is_rejected(models, tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError, match="tensorrt"):
        prepare_engine("tensorrt", models[1], SHAPE, torch.device("cpu"), tmp_path, "m")  # type: ignore[arg-type]


def test_describe_device_and_environment() -> None:
    label = describe_device(torch.device("cpu"))
    assert label.startswith("cpu (") and "thread" in label
    env = environment(torch.device("cpu"))
    for key in (
        "device",
        "torch",
        "torchvision",
        "torch_pruning",
        "onnxruntime",
        "python",
        "platform",
        "cpu",
        "cores",
    ):
        assert env[key], key
    assert env["torch"] == torch.__version__
    assert platform.release() not in str(env)  # the kernel version stays on the host
    assert env["torch_pruning"][0].isdigit()
    assert env["device"] == label


def test_timing_sessions_do_not_spin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Timings hold several ONNX Runtime sessions in one process and run them alternately;
    a session whose threads keep spinning after its run takes the cores from the next one
    (on 2 cores, two spinning ResNet-50 sessions run alternately took ~1.7x their time
    alone). So every timing engine, and every layer the cost model times, is built with
    non-spinning threads."""
    import onnxruntime as ort

    from flow_compress.config import DeploymentConfig
    from flow_compress.export import onnx as onnx_export
    from flow_compress.graph.latency_cost import LayerShape, time_layer

    made: list[ort.InferenceSession] = []
    real = onnx_export.session

    def recording(*args, **kwargs):
        sess = real(*args, **kwargs)
        made.append(sess)
        return sess

    monkeypatch.setattr(onnx_export, "session", recording)
    model = build_model("resnet18", num_classes=3, in_chans=1, input_size=16)
    engine = onnx_export.engine(model, (1, 16, 16), torch.device("cpu"), tmp_path, "m", 1)
    engine.runner(1)()
    dep = DeploymentConfig(runtime="onnxruntime", device="cpu", batch_size=1, threads=1)
    time_layer(LayerShape("conv", 4, 8, spatial=(8, 8)), dep)
    assert len(made) == 2
    for sess in made:
        options = sess.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # Sessions made for other purposes (parity, accuracy) keep ONNX Runtime's default.
    default = real(tmp_path / "m.onnx").get_session_options()  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="allow_spinning"):
        default.get_session_config_entry("session.intra_op.allow_spinning")

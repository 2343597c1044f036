"""Workers say what deployments they can run; the service refuses what none of them can."""

from __future__ import annotations

import glob
import time

from flow_compress.config import DeploymentConfig
from worker.broker import redis_client
from worker.capabilities import detect, refusal
from worker.telemetry import WorkerBeat, live_workers, write_heartbeat

CPU_ONLY = {"cuda": False, "onnxruntime_providers": ["CPUExecutionProvider"]}
GPU = {
    "cuda": True,
    "onnxruntime_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def test_this_machine_is_probed_in_a_child_process() -> None:
    caps = detect()
    assert "CPUExecutionProvider" in caps["onnxruntime_providers"]
    if not glob.glob("/dev/nvidia[0-9]*"):
        assert caps["cuda"] is False


def test_a_deployment_is_refused_only_when_no_worker_can_run_it() -> None:
    cuda = DeploymentConfig(device="cuda")
    trt = DeploymentConfig(device="cuda", provider="tensorrt")
    cpu = DeploymentConfig()
    assert refusal(cpu, [CPU_ONLY]) is None
    assert refusal(cuda, []) is None  # nobody said: the worker decides
    why = refusal(cuda, [CPU_ONLY, CPU_ONLY])
    assert why is not None and "CUDA GPU" in why
    assert refusal(cuda, [CPU_ONLY, GPU]) is None
    why = refusal(trt, [GPU])
    assert why is not None and "TensorrtExecutionProvider" in why
    torch_cuda = DeploymentConfig(runtime="eager", device="cuda")
    assert refusal(torch_cuda, [{"cuda": True, "onnxruntime_providers": []}]) is None


def test_capabilities_travel_with_the_heartbeat(redis_url: str, key_prefix: str) -> None:
    client = redis_client(redis_url)
    try:
        for host, caps in (("a", '{"cuda": true, "onnxruntime_providers": []}'), ("b", "")):
            beat = WorkerBeat(host, "gpu", 0, [], 1, time.time(), time.time(), caps)
            write_heartbeat(client, key_prefix, beat, 10.0)
        beats = {b.hostname: b for b in live_workers(client, key_prefix)}
        assert beats["a"].capabilities() == {"cuda": True, "onnxruntime_providers": []}
        assert beats["b"].capabilities() is None  # a worker of an older release
    finally:
        client.close()

"""What deployments a worker can time a latency target on, published with its heartbeat.

A job's ``deployment`` (``flow_compress.config.DeploymentConfig``) may ask for CUDA, or for
ONNX Runtime's CUDA or TensorRT execution provider. A worker without them would only fail the
job when it starts, perhaps after it waited in the queue; so each worker states at start-up
whether torch sees a GPU there and which ONNX Runtime providers it has, in its heartbeat hash
(``worker.telemetry``), and the API refuses at submission a deployment that no live worker
can run (``deployment_unavailable``), with the reason ``DeploymentConfig.refusal`` gives.

The worker's main process imports neither torch nor onnxruntime (its pool children fork from
it), so the check runs in a short child process. Torch (seconds to import) is only asked
when the machine has an NVIDIA device node at all.
"""

from __future__ import annotations

import glob
import json
import logging
import subprocess
import sys
from collections.abc import Iterable
from typing import Any

from flow_compress.config import DeploymentConfig

log = logging.getLogger(__name__)

_PROBE = """
import glob, json
out = {"cuda": False, "onnxruntime_providers": []}
try:
    import onnxruntime
    out["onnxruntime_providers"] = list(onnxruntime.get_available_providers())
except Exception:
    pass
if glob.glob("/dev/nvidia[0-9]*"):
    try:
        import torch
        out["cuda"] = bool(torch.cuda.is_available())
    except Exception:
        pass
print(json.dumps(out))
"""

PROBE_TIMEOUT_S = 120


def detect(timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """``{"cuda": bool, "onnxruntime_providers": [...]}`` of this machine, from a child
    process; on any failure the CPU-only answer (no GPU, the CPU provider only), logged."""
    fallback: dict[str, Any] = {"cuda": False, "onnxruntime_providers": ["CPUExecutionProvider"]}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        )
        caps = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        log.warning("could not probe this machine's deployments (%s): CPU only", exc)
        return fallback
    if not glob.glob("/dev/nvidia[0-9]*"):
        caps["cuda"] = False
    return {
        "cuda": bool(caps.get("cuda")),
        "onnxruntime_providers": [str(p) for p in caps.get("onnxruntime_providers", [])],
    }


def refusal(deployment: DeploymentConfig, published: Iterable[dict[str, Any]]) -> str | None:
    """Why no worker of ``published`` (the live workers' capabilities) can run
    ``deployment`` (None: one can, or none has published yet and the worker decides)."""
    reasons = []
    for caps in published:
        why = deployment.refusal(
            bool(caps.get("cuda")), [str(p) for p in caps.get("onnxruntime_providers", [])]
        )
        if why is None:
            return None
        reasons.append(why)
    if not reasons:
        return None
    return f"no worker can run it: {reasons[0]}"


__all__ = ["detect", "refusal"]

#!/usr/bin/env bash
# The CUDA half of the latency-target benchmark, as one prepared command for a lent GPU
# machine (its python3 holds CUDA PyTorch; the few packages it lacks travel as wheels in
# .whl/). Every piece writes under $OUT as it goes and is capped by `timeout`, so a piece
# that runs long still leaves the earlier ones' results.
#
#   bash bench/device_check.sh            # OUT defaults to bench/results/device
set -u
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c 'import torch, onnxruntime as o; print("torch", torch.__version__, torch.cuda.get_device_name(0)); print("onnxruntime", o.__version__, o.get_available_providers())'
    # A deployment the machine cannot run must be refused before any work, with its code.
    python3 - <<'EOF'
from flow_compress.config import DeploymentConfig
from flow_compress.errors import DeploymentUnavailableError
from flow_compress.measure.deployment import check_available

for dep in (
    DeploymentConfig(runtime="eager", device="cuda", dtype="fp16"),
    DeploymentConfig(runtime="onnxruntime", device="cuda"),
    DeploymentConfig(runtime="onnxruntime", device="cuda", provider="tensorrt"),
):
    try:
        check_available(dep)
        print(dep.label(), "available")
    except DeploymentUnavailableError as e:
        print(dep.label(), "refused:", e.code, e)
EOF
} 2>&1 | tee "$OUT/environment.txt"

# MACs target against latency target, on torch eager CUDA float16 at batch 32.
timeout "${LT_TIMEOUT:-400}" python3 -m bench.latency_target --quick --threads 8 \
    --runtime eager --device cuda --dtype fp16 --batch 32 --batches 1,32 \
    --models "${LT_MODELS:-resnet50,mobilenet_v3_large,timm:convnext_tiny,timm:vit_small_patch16_224}" \
    --out "$OUT/cuda_fp16" 2>&1 | tee -a "$OUT/log.txt"

# With the time left, ResNet-50 on TorchScript CUDA float32 (the exported artifact's runtime).
left=$(( ${TOTAL_S:-540} - SECONDS ))
if [ "$left" -gt 90 ]; then
    timeout "$left" python3 -m bench.latency_target --quick --threads 8 \
        --runtime torchscript --device cuda --dtype fp32 --batch 32 --batches 1,32 \
        --models resnet50 --out "$OUT/cuda_ts_fp32" 2>&1 | tee -a "$OUT/log.txt"
fi

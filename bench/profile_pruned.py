"""Where a pruned model spends its time against its base, kernel by kernel.

    python -m bench.profile_pruned [--model timm:convnext_tiny] [--device cuda] [--batch 256]

Runs the MACs-target compression of ``bench.latency_target`` (same protocol, structure only),
prints the pruned conv and linear widths, then profiles three forward passes of the base and
of the pruned model with ``torch.profiler`` and prints both tables, by kernel and by input
shape. This is how the float16 slowdown of a pruned ConvNeXt-T on an H200 was traced to
LayerNorm's two-pass kernel (bench/results/latency_target-cuda-h200-before).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.latency_target import QUICK, _compress


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="timm:convnext_tiny")
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    proto = replace(
        QUICK,
        runtime="eager",
        device=args.device,
        dtype="fp16" if cuda else "fp32",
        batch=args.batch,
        input_size=args.input_size,
    )
    with tempfile.TemporaryDirectory() as cache:
        _, _, result = _compress(args.model, proto, "macs", Path(cache))
    base, pruned = result.context.teacher, result.model
    for name, m in pruned.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            print(name, tuple(m.weight.shape))
    dtype = torch.half if cuda else torch.float
    size = args.input_size
    x = torch.randn(args.batch, 3, size, size, device=args.device, dtype=dtype)
    key = "cuda_time_total" if cuda else "cpu_time_total"
    for label, model in (("base", base), ("pruned", pruned)):
        m = copy.deepcopy(model).to(device=args.device, dtype=dtype).eval()
        with torch.no_grad():
            for _ in range(3):
                m(x)
            if cuda:
                torch.cuda.synchronize()
            acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
            with profile(activities=acts, record_shapes=True) as prof:
                for _ in range(3):
                    m(x)
                if cuda:
                    torch.cuda.synchronize()
        print("=====", label)
        print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60))
        by_shape = prof.key_averages(group_by_input_shape=True)
        print(by_shape.table(sort_by=key, row_limit=12, max_shapes_column_width=70))


if __name__ == "__main__":
    main()

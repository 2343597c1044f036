"""Training a base model here, so users and benchmarks can start from a model of their own."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from flow_compress._device import resolve_device, seed_everything
from flow_compress.arch.models import (
    WeightCaches,
    build_model,
    resolve_model,
    resolve_normalization,
    save_weights,
)
from flow_compress.artifacts import atomic_write_text
from flow_compress.config import TrainConfig
from flow_compress.data import DataSplits, load_dataset
from flow_compress.measure.evaluate import evaluate
from flow_compress.recovery import LoopSettings, fit
from flow_compress.refs import known_num_classes, parse_dataset_ref


@dataclass
class TrainResult:
    model: nn.Module
    data: DataSplits
    val_top1: float
    test_top1: float
    test_top5: float
    iterations: int
    seconds: float


def train(
    config: TrainConfig,
    out_dir: Path | None = None,
    *,
    on_iter: Callable[[int, int, float], None] | None = None,
    caches: WeightCaches | None = None,
) -> TrainResult:
    """Train ``config.model`` from scratch (or pretrained) with cross-entropy.

    Writes ``weights.safetensors`` and ``train.json`` (config, accuracies, time) to ``out_dir``
    when given. ``on_iter(i, total, loss)`` is called after every optimisation step.
    ``pretrained`` weights are read from ``caches`` (nothing is downloaded).
    """
    seed_everything(config.seed)
    device = resolve_device(config.device)
    spec = resolve_model(config.model, caches=caches).spec
    size = config.input_size or spec.default_input_size
    ref = parse_dataset_ref(config.dataset)
    data = load_dataset(
        ref,
        input_size=size,
        in_chans=config.in_chans,
        config=config.data,
        normalization=resolve_normalization(spec, config.data),
    )
    num_classes = config.num_classes or known_num_classes(ref) or data.num_classes
    model = build_model(
        config.model,
        num_classes,
        in_chans=config.in_chans,
        input_size=size,
        pretrained=config.pretrained,
        caches=caches,
    ).to(device)
    per_epoch = max(1, len(data.train) // config.batch_size)  # type: ignore[arg-type]
    iters = max(1, round(config.epochs * per_epoch))
    settings = LoopSettings(
        iters=iters,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
        amp=config.amp,
    )
    start = time.perf_counter()
    steps = fit(
        model,
        data.forever(config.batch_size, seed=config.seed),
        settings,
        device,
        on_iter=None if on_iter is None else (lambda i, loss: on_iter(i, iters, loss)),
    )
    seconds = time.perf_counter() - start
    bs = config.data.eval_batch_size
    val1, _ = evaluate(model, data.loader("val", bs), device)
    test1, test5 = evaluate(model, data.loader("test", bs), device)
    result = TrainResult(model, data, val1, test1, test5, steps, seconds)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_weights(model, out_dir / "weights.safetensors")
        summary = {
            "config": config.model_dump(mode="json"),
            "num_classes": num_classes,
            "input_size": size,
            "input_contract": data.contract.model_dump(mode="json"),
            "val_top1": val1,
            "test_top1": test1,
            "test_top5": test5,
            "iterations": steps,
            "seconds": round(seconds, 1),
            "device": str(device),
        }
        atomic_write_text(out_dir / "train.json", json.dumps(summary, indent=2))
    return result

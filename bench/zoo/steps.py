"""One zoo model through the library's own steps, in this process.

Steps, each timed and each a pass/fail with the reason of a failure:

1. ``build``: random init, 10 classes, 3 input channels, at the smallest input size the model
   accepts from ``SIZES``, else at its native size (timm's pretrained config); a model that
   does not build or run on the CPU is *skipped*;
2. ``export_unpruned``: TorchScript and ONNX export of the unpruned model with parity
   (``flow_compress.export.parity.export_model``); a model that fails here is *skipped* too —
   the goal is stated over the architectures that build and export unpruned;
3. ``stage1``: one ``FilterPruner.cut`` towards 50 % of the base MACs (the library's stage-1
   step, divergence criterion, on real data: scikit-learn digits upscaled to RGB) and one
   recovery iteration at a tiny learning rate (it checks that the pruned model trains; on a
   random-init model a real step can blow the logits up, e.g. DLA's ~400 → 1e18); passes when
   MACs and parameters strictly fall and the output shape is kept;
4. ``stage2``: one attempt: ``find_candidates`` and ``block_scores`` on the pruned model, the
   lowest-D_res candidate replaced as stage 2 does; passes when that runs and the output
   shape is kept (a model without candidates passes with ``candidates = 0``, reported);
5. ``export``: TorchScript and ONNX export of the pruned model with parity;
6. ``replay``: the plan (stage-1 prune entries + the stage-2 replace) applied to a freshly
   built model with ``plan.apply_ops``, the pruned weights loaded strictly, outputs equal.

``torch_pruning_step`` is Torch-Pruning's own kind of sweep on the same model: one
``tp.pruner.MetaPruner`` step at a 50 % channel ratio (magnitude importance, classifier
ignored), passes when it runs and keeps the output shape. No export, no depth pruning.
"""

from __future__ import annotations

import copy
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flow_compress.arch.blocks import find_candidates, make_replacement
from flow_compress.arch.surgery import adapt_in_chans, classifier_path, replace_module
from flow_compress.config import CompressionConfig, DataConfig, ExportConfig
from flow_compress.data import DataSplits, load_dataset
from flow_compress.errors import FlowCompressError
from flow_compress.export.parity import export_model
from flow_compress.pipeline import make_context
from flow_compress.pipeline.stage1 import FilterPruner
from flow_compress.pipeline.stage2 import block_scores
from flow_compress.plan import apply_ops
from flow_compress.schema import Stage

SIZES = (32, 64, 96, 128, 160, 224)
NUM_CLASSES = 10
TARGET = 0.5
STEPS = ("build", "export_unpruned", "stage1", "stage2", "export", "replay")
# Larger models are skipped (recorded): their exports alone take minutes on one CPU core.
MAX_PARAMS = 100_000_000


class StepFailed(Exception):
    """A step's invariant does not hold (the message says which)."""


def reason(exc: BaseException) -> str:
    """A one-line failure reason: the library's error code, or the exception type."""
    if isinstance(exc, FlowCompressError):
        return f"{exc.code}: {exc.message.splitlines()[0][:300]}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(text[0] if text else '')[:300]}"


def build(source: str, name: str, size: int) -> nn.Module:
    """Build ``source:name`` with random weights, 10 classes, 3 channels, for ``size`` px.

    Transformers size their position embeddings from the input size: timm builders get
    ``img_size`` when they accept it, torchvision's ViTs ``image_size``."""
    torch.manual_seed(0)
    if source == "timm":
        import timm

        try:
            model = timm.create_model(
                name, pretrained=False, num_classes=NUM_CLASSES, img_size=size
            )
        except TypeError:
            model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    else:
        import torchvision

        kwargs: dict[str, Any] = {"weights": None, "num_classes": NUM_CLASSES}
        if name.startswith("vit_"):
            kwargs["image_size"] = size
        if name in ("inception_v3", "googlenet"):
            kwargs["aux_logits"] = False
            # Their own init (truncated normal, std 0.1) on an untrained eval-mode net gives
            # logits of ~1e9 at random, beyond any absolute parity tolerance; torch's default
            # init keeps them ~1e-2.
            kwargs["init_weights"] = False
        model = torchvision.models.get_model(name, **kwargs)
    return adapt_in_chans(model, 3).eval()


def _native_size(source: str, name: str) -> int | None:
    """The input size a timm architecture was defined for (its pretrained config), or None."""
    if source != "timm":
        return None
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # no config registered under that name
        return None
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    return int(size[-1]) if size else None


def build_at_smallest(source: str, name: str) -> tuple[nn.Module, int]:
    """The model and the smallest size of ``SIZES`` at which it runs one forward pass, else
    its native size: CrossViT's two branches (patches of 12 and 16 px over a 240/224 px
    pair) only fit at sizes divisible by both patch sizes, none of which ``SIZES`` holds."""
    last: BaseException | None = None
    native = _native_size(source, name)
    for size in (*SIZES, *([native] if native and native not in SIZES else [])):
        try:
            model = build(source, name, size)
            with torch.no_grad():
                out = model(torch.zeros(1, 3, size, size))
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, NUM_CLASSES):
                raise StepFailed(f"output is {type(out).__name__}, not 1×{NUM_CLASSES} logits")
            return model, size
        except StepFailed:
            raise
        except Exception as exc:  # a build failure at one size: try the next
            last = exc
    assert last is not None
    raise last


def _config(size: int) -> CompressionConfig:
    return CompressionConfig.model_validate(
        {
            "model": "resnet18",  # unused by the steps below: they get the model itself
            "dataset": "digits",
            "in_chans": 3,
            "input_size": size,
            "target_macs": TARGET,
            "max_drop": 100.0,
            "device": "cpu",
            "prune": {"steps": 1, "ranking": "score", "calibration_batches": 1},
            "truncate": {"max_layers": 1, "n_try": 1, "tau": 100.0, "calibration_batches": 1},
            "recovery": {"iters_per_step": 1, "trunc_iters": 1, "final_iters": 0, "batch_size": 4},
            "data": {"eval_batch_size": 4, "max_eval_samples": 16},
            "latency": {"enabled": False},
            "export": {"parity_samples": 4},
        }
    )


_DATA: dict[int, DataSplits] = {}


def data(size: int) -> DataSplits:
    if size not in _DATA:
        _DATA[size] = load_dataset(
            "digits", input_size=size, in_chans=3, config=DataConfig(max_eval_samples=16)
        )
    return _DATA[size]


def _timed(row: dict[str, Any], step: str, fn: Callable[[], Any]) -> Any:
    # The sweep's parent reads these lines to tell which step a timed-out child was in.
    print(f"#step {step}", flush=True)
    start = time.perf_counter()
    try:
        out = fn()
    except Exception as exc:
        row["steps"][step] = {"ok": False, "s": round(time.perf_counter() - start, 2)}
        row["failed_step"] = step
        row["reason"] = reason(exc)
        row["traceback"] = traceback.format_exc(limit=6)[-2000:]
        raise
    row["steps"][step] = {"ok": True, "s": round(time.perf_counter() - start, 2)}
    return out


def _export(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        records = export_model(
            copy.deepcopy(model).cpu().eval(), x, Path(tmp), ExportConfig(parity_samples=len(x))
        )
    return {r.format: r.max_abs_diff for r in records}


def run_model(source: str, name: str, *, check_unpruned: bool = True) -> dict[str, Any]:
    """Every step on ``source:name``; returns the row (``status``: pass, fail or skip).
    ``check_unpruned=False`` skips the unpruned export (the CI sample is known to export)."""
    row: dict[str, Any] = {"source": source, "model": name, "steps": {}}
    try:
        model, size = _timed(row, "build", lambda: build_at_smallest(source, name))
    except Exception:
        row["status"] = "skip"
        return row
    row["size"] = size
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_PARAMS:
        row.update(
            status="skip",
            failed_step="build",
            reason=f"too large for the CPU sweep: {params / 1e6:.0f} M parameters",
        )
        return row
    splits = data(size)
    x = splits.sample_inputs(4)
    try:
        if check_unpruned:
            _timed(row, "export_unpruned", lambda: _export(model, x))
    except Exception:
        row["status"] = "skip"
        return row
    try:
        _run_steps(row, model, splits, size, x)
    except Exception:
        row["status"] = "fail"
        return row
    row["status"] = "pass"
    return row


def _run_steps(
    row: dict[str, Any], model: nn.Module, splits: DataSplits, size: int, x: torch.Tensor
) -> None:
    def stage1() -> tuple[nn.Module, list[dict[str, object]], Any]:
        ctx, student = make_context(model, splits, _config(size))
        row["base_macs"], row["base_params"] = ctx.base_macs, ctx.base_params
        pruned, entries = FilterPruner(ctx).cut(student, TARGET * ctx.base_macs, None)
        if not entries:
            raise StepFailed("stage 1 found nothing to prune")
        ctx.recover(pruned, 1, Stage.FILTER_PRUNE, lr=1e-5)
        macs, params = ctx.cost(pruned)
        row["stage1_macs_ratio"] = round(macs / ctx.base_macs, 4)
        row["groups_pruned"] = len(entries)
        if not (macs < ctx.base_macs and params < ctx.base_params):
            raise StepFailed(f"MACs {macs} / params {params} did not fall")
        _same_shape(pruned.eval(), model, x)
        return pruned, entries, ctx

    pruned, ops, ctx = _timed(row, "stage1", stage1)
    ops = list(ops)

    def stage2() -> nn.Module:
        cands = {c.name: c for c in find_candidates(pruned, ctx.example, allow_projection=False)}
        row["candidates"] = len(cands)
        if not cands:
            return pruned
        scores = block_scores(pruned, ctx)
        name = min(scores, key=scores.__getitem__)
        cand = cands[name]
        trial = copy.deepcopy(pruned)
        block = trial.get_submodule(name)
        replace_module(trial, name, make_replacement(block, cand.kind))
        ops.append({"op": "replace", "module": name, "with": cand.kind})
        for extra in cand.span:
            replace_module(trial, extra, make_replacement(block, "identity"))
            ops.append({"op": "replace", "module": extra, "with": "identity"})
        row["truncated"] = name
        _same_shape(trial.eval(), model, x)
        row["final_macs_ratio"] = round(ctx.cost(trial)[0] / ctx.base_macs, 4)
        return trial

    final = _timed(row, "stage2", stage2).eval()
    row["parity"] = _timed(row, "export", lambda: _export(final, x))

    def replay() -> None:
        fresh = build(row["source"], row["model"], size)
        apply_ops(fresh, ops, torch.zeros(1, 3, size, size))
        fresh.load_state_dict(final.state_dict(), strict=True)
        with torch.no_grad():
            diff = float((fresh.eval()(x) - final(x)).abs().max())
        row["replay_max_abs_diff"] = diff
        if not diff <= 1e-4:
            raise StepFailed(f"replayed model differs by {diff:.3g}")

    _timed(row, "replay", replay)


def _same_shape(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        got, want = model(x), reference(x)
    if got.shape != want.shape:
        raise StepFailed(f"output shape {tuple(got.shape)} != {tuple(want.shape)}")


def torch_pruning_step(source: str, name: str, size: int) -> dict[str, Any]:
    """Torch-Pruning's own sweep on one model: one MetaPruner step at a 50 % channel ratio."""
    import torch_pruning as tp

    row: dict[str, Any] = {"source": source, "model": name}
    start = time.perf_counter()
    try:
        model = build(source, name, size)
        example = torch.zeros(1, 3, size, size)
        with torch.no_grad():
            want = model(example).shape
        head = model.get_submodule(classifier_path(model))
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.5,
            ignored_layers=[head],
        )
        base, _ = tp.utils.count_ops_and_params(model, example)
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(model, example)
        with torch.no_grad():
            got = model(example).shape
        if got != want:
            raise StepFailed(f"output shape {tuple(got)} != {tuple(want)}")
        row["macs_ratio"] = round(macs / base, 4) if base else None
        row["status"] = "pass"
    except Exception as exc:  # Torch-Pruning raises assorted errors on graphs it cannot handle
        row["status"] = "fail"
        row["reason"] = reason(exc)
    row["s"] = round(time.perf_counter() - start, 2)
    return row

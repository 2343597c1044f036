"""Preflight: what a compression of a model would meet, answered in seconds on a CPU, before
a GPU hour is spent (``flow-compress check``).

It builds the model (and loads the weights, when given), runs it once on a random input of the
job's shape, and reports: whether the weights fit; the base MACs and parameters; the prunable
groups and their channels (and attention heads); the conv/linear layers stage 1 leaves alone
and why; the stage-2 candidates; the MACs left when every group is cut to its per-layer cap
(``prune.max_layer_ratio``, ``min_channels``, ``round_to``) — the floor stage 1 can reach, so
whether the target is reachable at all; and whether TorchScript and ONNX exports of the
unpruned model pass parity. A model that fails to run names the layer it failed in; one that
torch-pruning cannot trace says so. Nothing is trained and no data is read.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from flow_compress.arch.blocks import find_candidates
from flow_compress.arch.catalogue import WeightCaches
from flow_compress.arch.models import build_model, load_weights, read_state_dict, resolve_model
from flow_compress.arch.surgery import classifier_path
from flow_compress.config import CompressionConfig, DeploymentConfig, ExportConfig, PruneConfig
from flow_compress.errors import FlowCompressError
from flow_compress.export import get_exporter
from flow_compress.export.parity import check_parity
from flow_compress.graph import PruningGraph, count_macs_params
from flow_compress.measure.deployment import check_available
from flow_compress.refs import known_num_classes, parse_dataset_ref
from flow_compress.schema import ExportProbe, LeftAlone, PreflightReport


def preflight(
    model: str,
    *,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    in_chans: int = 3,
    input_size: int | None = None,
    target_macs: float | None = 0.3,
    prune: PruneConfig | None = None,
    allow_projection: bool = False,
    export: ExportConfig | None = None,
    caches: WeightCaches | None = None,
    seed: int = 0,
    deployment: DeploymentConfig | None = None,
) -> PreflightReport:
    """Check ``model`` (any reference ``resolve_model`` takes) for a compression to
    ``target_macs`` of its MACs (None: no MACs target, only a latency one), and that this
    machine can run ``deployment`` (``deployment_error`` says why not). Raises only for a
    name that does not resolve (``UnsupportedModelError``) or weights not in the caches
    (``WeightsNotAvailableError``); every other problem is reported. ``num_classes`` None:
    the published weights' classes, or the width of the given checkpoint's classifier, or
    10."""
    started = time.perf_counter()
    prune = prune or PruneConfig()
    export = export or ExportConfig(parity_samples=4)
    resolved = resolve_model(model, caches=caches)
    size = input_size or resolved.spec.default_input_size
    torch.manual_seed(seed)
    classes = num_classes
    if classes is None and weights is None and resolved.weights:
        classes = resolved.num_classes
    if classes is None and weights is not None:
        classes = _checkpoint_classes(resolved.architecture, weights, in_chans, size)
    classes = classes or 10
    net = build_model(resolved.architecture, classes, in_chans=in_chans, input_size=size)
    fields: dict[str, object] = {
        "model": model,
        "architecture": resolved.architecture,
        "family": resolved.spec.family,
        "num_classes": classes,
        "in_chans": in_chans,
        "input_size": size,
        "target_macs": target_macs,
        "weights": "not_given",
    }
    if deployment is not None:
        try:
            check_available(deployment)
        except FlowCompressError as exc:
            fields["deployment_error"] = exc.message
    source = weights if weights is not None else resolved.weights
    if source is not None:
        try:
            load_weights(net, source, reference=model)
            fields["weights"] = "fit"
        except FlowCompressError as exc:
            fields |= {"weights": "bad", "weights_error": exc.message}
    x = torch.randn(4, in_chans, size, size)
    try:
        with _innermost_module(net) as where, torch.no_grad():
            try:
                net(x[:2])
            except Exception:
                fields["failing_layer"] = where()
                raise
    except Exception as exc:
        fields["forward_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        return PreflightReport(**fields, seconds=time.perf_counter() - started)  # type: ignore[arg-type]
    macs, params = count_macs_params(net, x[:1])
    fields |= {"macs": macs, "params": params}
    fields |= _graph_checks(net, x, prune, allow_projection, macs, target_macs)
    fields["exports"] = _export_checks(net, x, export)
    return PreflightReport(**fields, seconds=time.perf_counter() - started)  # type: ignore[arg-type]


def preflight_config(
    config: CompressionConfig,
    *,
    weights: str | Path | None = None,
    caches: WeightCaches | None = None,
    parity_samples: int = 4,
    check_deployment: bool = True,
) -> PreflightReport:
    """The preflight of the job ``config`` describes (what ``submit`` and ``POST /v1/preflight``
    run): its model, input shape, target, stage-1 caps, stage-2 projection rule and export
    formats. The classes come from ``config.num_classes``, else from a dataset whose class
    count is known without reading it, else as ``preflight`` finds them."""
    classes = config.num_classes
    if classes is None:
        try:
            classes = known_num_classes(parse_dataset_ref(config.dataset))
        except FlowCompressError:
            classes = None  # an upload or a folder: the checkpoint's head says
    export = config.export.model_copy(
        update={"parity_samples": min(parity_samples, config.export.parity_samples)}
    )
    return preflight(
        config.model,
        weights=weights,
        num_classes=classes,
        in_chans=config.in_chans,
        input_size=config.input_size,
        target_macs=config.target_macs,
        # The service checks deployments against its workers, not the machine it runs on.
        deployment=config.deployment if check_deployment else None,
        prune=config.prune,
        allow_projection=config.truncate.allow_projection,
        export=export,
        caches=caches,
        seed=config.seed,
    )


def _checkpoint_classes(
    architecture: str, weights: str | Path, in_chans: int, size: int
) -> int | None:
    """The number of outputs of the checkpoint's classifier (found by building the model once
    to learn the classifier's name); None when the file or that tensor cannot be read (the
    weights check then reports why)."""
    try:
        probe = build_model(architecture, 10, in_chans=in_chans, input_size=size)
        head = classifier_path(probe)
        state = read_state_dict(weights)
    except Exception:
        return None
    for key in (f"{head}.weight", f"module.{head}.weight", f"model.{head}.weight"):
        tensor = state.get(key)
        if tensor is not None and tensor.ndim >= 1:
            return int(tensor.shape[0])
    return None


@contextmanager
def _innermost_module(model: nn.Module) -> Iterator[object]:
    """Track the modules a forward pass is inside; yields a function naming the innermost
    one (path and type) — where an exception was raised."""
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def enter(m: nn.Module, _args: object) -> None:
        stack.append(names.get(m, "?"))

    def leave(m: nn.Module, _args: object, _out: object) -> None:
        if stack:
            stack.pop()

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))

    def where() -> str | None:
        if not stack:
            return None
        path = stack[-1]
        mod = model.get_submodule(path) if path not in ("", "?") else model
        return f"{path or '(model)'} ({type(mod).__name__})"

    try:
        yield where
    finally:
        for h in handles:
            h.remove()


def _keep_min(size: int, unit: str, cfg: PruneConfig) -> int:
    # The same caps as stage 1 (pipeline.stage1.FilterPruner._keep_min) on the original widths.
    if unit == "head":
        return min(size, max(1, math.ceil((1 - cfg.max_layer_ratio) * size)))
    keep = max(cfg.min_channels, math.ceil((1 - cfg.max_layer_ratio) * size))
    if cfg.round_to:
        keep = math.ceil(keep / cfg.round_to) * cfg.round_to
    return min(keep, size)


def _graph_checks(
    net: nn.Module,
    x: torch.Tensor,
    cfg: PruneConfig,
    allow_projection: bool,
    macs: int,
    target: float | None,
) -> dict[str, object]:
    out: dict[str, object] = {}
    try:
        out["stage2_candidates"] = [
            c.name for c in find_candidates(net, x[:1], allow_projection=allow_projection)
        ]
    except Exception as exc:  # stage 2 is optional: report, do not stop
        out["stage2_candidates"] = []
        out["graph_error"] = f"stage-2 candidate search failed: {type(exc).__name__}: {exc}"
    trial = copy.deepcopy(net)
    try:
        head = classifier_path(trial)
        graph = PruningGraph(trial, x, ignored=[trial.get_submodule(head)])
        groups = graph.groups()
    except Exception as exc:
        out["graph_error"] = f"{type(exc).__name__}: {str(exc)[:800]}"
        return out
    channels = [g for g in groups if g.unit == "channel"]
    out["prunable_groups"] = len(groups)
    out["prunable_channels"] = sum(g.size for g in channels)
    out["prunable_heads"] = sum(g.size for g in groups if g.unit == "head")
    out["left_alone"] = [
        LeftAlone(layer=a.path, type=a.kind, reason=a.reason) for a in graph.ignored
    ]
    try:
        cut = []
        for g in groups:
            n = g.size - _keep_min(g.size, g.unit, cfg)
            if n > 0:
                graph.prune(g, list(range(g.size - n, g.size)))
                cut.append(g.root_name)
        graph.verify(cut)
        reachable, _ = count_macs_params(trial, x[:1])
    except Exception as exc:
        out["graph_error"] = f"cutting every group to its cap failed: {type(exc).__name__}: {exc}"
        return out
    out |= {
        "reachable_macs": reachable,
        "reachable_ratio": reachable / macs if macs else None,
        # No MACs target (a latency one only): nothing to reach in MACs.
        "target_reachable": target is None or reachable <= target * macs,
    }
    return out


def _export_checks(net: nn.Module, x: torch.Tensor, cfg: ExportConfig) -> list[ExportProbe]:
    probes = []
    with tempfile.TemporaryDirectory(prefix="flow-preflight-") as tmp:
        for name in dict.fromkeys(cfg.formats):
            exporter = get_exporter(name)
            path = Path(tmp) / exporter.file
            try:
                exporter.export(net, x[:2], path, cfg)
                record = check_parity(name, path, net, x[: cfg.parity_samples], cfg.parity_atol)
                probes.append(
                    ExportProbe(format=name, passed=record.passed, max_abs_diff=record.max_abs_diff)
                )
            except Exception as exc:  # the probe's answer, not the preflight's failure
                probes.append(
                    ExportProbe(
                        format=name, passed=False, error=f"{type(exc).__name__}: {str(exc)[:500]}"
                    )
                )
    return probes


__all__ = ["ExportProbe", "LeftAlone", "PreflightReport", "preflight", "preflight_config"]

"""Command line: ``flow-compress train`` and ``flow-compress compress`` (plus listings).

torch is imported inside the commands, so importing this module (the service CLI extends it)
stays cheap and torch-free.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from flow_compress.errors import FlowCompressError, InvalidConfigError

if TYPE_CHECKING:
    from rich.console import Console

    from flow_compress.arch.models import WeightCaches
    from flow_compress.schema import CompressionReport, ProgressEvent

# No name: ``api.cli`` mounts this app with ``add_typer``, and an unnamed app's commands join
# the top level there instead of forming a sub-group.
app = typer.Typer(
    help="Compress trained PyTorch vision models with IDAP++ (prune filters, truncate layers).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(exc: Exception) -> typer.Exit:
    if isinstance(exc, FlowCompressError):
        typer.secho(f"error [{exc.code}]: {exc.message}", err=True, fg="red")
    elif isinstance(exc, ValidationError):
        typer.secho(f"error [invalid_config]: {exc}", err=True, fg="red")
    else:
        typer.secho(f"error: {exc}", err=True, fg="red")
    return typer.Exit(2)


def _split_list(text: str | None) -> list[str] | None:
    """``"a, b"`` -> ``["a", "b"]``; ``"none"`` or ``""`` -> ``[]``; None stays None (unset).
    Values are checked by the config models, so a typo is an ``invalid_config`` error."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    return [] if items == ["none"] else items


def _caches() -> WeightCaches:
    """Where published weights may already be on this machine: the folders huggingface_hub
    and torch.hub use (they read HF_HOME / HF_HUB_CACHE and TORCH_HOME); the library itself
    reads no environment and gets these passed in."""
    import torch.hub
    from huggingface_hub import constants

    from flow_compress.arch.models import WeightCaches

    return WeightCaches(hub_cache=Path(constants.HF_HUB_CACHE), torch_hub=Path(torch.hub.get_dir()))


@app.command()
def architectures(
    pattern: Annotated[
        str | None, typer.Option("--filter", help="Shell-style pattern, e.g. 'efficientnet*'.")
    ] = None,
    source: Annotated[
        str | None, typer.Option(help="registered, plugin, timm or torchvision.")
    ] = None,
) -> None:
    """List the model names a job may use: reference, source and family (``auto``: the
    structural rules). Bare names resolve to a registered family first; a name both timm and
    torchvision have needs its prefix."""
    from flow_compress.arch import AUTO_FAMILY, find_registered, get_architecture
    from flow_compress.arch.catalogue import NameSource, build_catalogue

    try:
        wanted = NameSource(source) if source else None
        if wanted is NameSource.HF_HUB:
            raise ValueError
    except ValueError:
        raise _fail(ValueError("--source: one of registered, plugin, timm, torchvision")) from None
    catalogue = build_catalogue()
    for error in catalogue.plugin_errors:
        typer.secho(f"plug-in failed to load: {error}", err=True, fg="red")
    for src, name in catalogue.entries(source=wanted, pattern=pattern):
        if src in (NameSource.REGISTERED, NameSource.PLUGIN):
            typer.echo(f"{name}\t{src}\t{get_architecture(name).family}")
        else:
            spec = find_registered(src.value, name)
            typer.echo(f"{src}:{name}\t{src}\t{spec.family if spec else AUTO_FAMILY}")


@app.command()
def check(
    model: Annotated[
        str | None,
        typer.Option(help="Model: resnet18, timm:NAME, torchvision:NAME, hf-hub:ORG/NAME."),
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="Weights to check against it.")] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="A job's CompressionConfig JSON: check what that job would meet."),
    ] = None,
    input_size: Annotated[int | None, typer.Option(help="Input side in pixels.")] = None,
    in_chans: Annotated[int, typer.Option()] = 3,
    num_classes: Annotated[
        int | None, typer.Option(help="Default: the checkpoint's classifier width.")
    ] = None,
    target_macs: Annotated[float, typer.Option(help="Fraction of base MACs to keep.")] = 0.3,
    max_layer_ratio: Annotated[
        float | None, typer.Option(help="Per-layer cap: fraction of a layer prunable.")
    ] = None,
    formats: Annotated[
        str | None, typer.Option(help="Export formats to probe (default: all; none: skip).")
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the report (or the error) as JSON on stdout."),
    ] = False,
    deployment_check: Annotated[
        bool,
        typer.Option(
            help="Check that this machine can run the config's deployment (the service "
            "turns it off: it checks against its workers)."
        ),
    ] = True,
) -> None:
    """Preflight in seconds on a CPU: weights fit, base MACs and params, prunable groups,
    layers left alone and why, stage-2 candidates, MACs reachable under the per-layer caps,
    TorchScript and ONNX parity of the unpruned model. Exits 1 when a check fails, 2 on an
    error (with --json, ``{"error": {"code", "message"}}`` on stdout)."""
    from flow_compress.config import CompressionConfig, ExportConfig, PruneConfig
    from flow_compress.pipeline.preflight import preflight, preflight_config

    try:
        if config is not None:
            if model is not None:
                raise InvalidConfigError("give --model or --config, not both")
            job = CompressionConfig.model_validate_json(config.read_text())
            report = preflight_config(
                job, weights=weights, caches=_caches(), check_deployment=deployment_check
            )
        else:
            if model is None:
                raise InvalidConfigError("--model (or --config) is required")
            prune = PruneConfig(**({"max_layer_ratio": max_layer_ratio} if max_layer_ratio else {}))
            chosen = _split_list(formats)
            export = ExportConfig(
                parity_samples=4, **({"formats": tuple(chosen)} if chosen is not None else {})
            )
            report = preflight(
                model,
                weights=weights,
                num_classes=num_classes,
                in_chans=in_chans,
                input_size=input_size,
                target_macs=target_macs,
                prune=prune,
                export=export,
                caches=_caches(),
            )
    except (FlowCompressError, ValidationError, OSError) as exc:
        if as_json:
            typer.echo(json.dumps({"error": _error_body(exc)}))
            raise typer.Exit(2) from exc
        raise _fail(exc) from exc
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        typer.echo(_describe_preflight(report))
    if not report.ok:
        raise typer.Exit(1)


def _error_body(exc: Exception) -> dict[str, str]:
    """The stable code and message of a failure, as the API's error bodies carry them."""
    if isinstance(exc, FlowCompressError):
        return {"code": str(getattr(exc.code, "value", exc.code)), "message": exc.message}
    if isinstance(exc, ValidationError):
        return {"code": "invalid_config", "message": str(exc)}
    return {"code": "invalid_config", "message": f"{type(exc).__name__}: {exc}"}


def _describe_preflight(r: Any) -> str:
    mark = {True: "ok", False: "FAIL", None: "n/a"}
    lines = [
        f"{r.model} ({r.architecture}, family {r.family}) at {r.in_chans}x{r.input_size}px, "
        f"{r.num_classes} classes  [{r.seconds:.1f} s]",
        f"weights: {r.weights}" + (f" ({r.weights_error})" if r.weights_error else ""),
    ]
    if r.forward_error:
        lines.append(f"forward pass FAILED in {r.failing_layer}: {r.forward_error}")
        return "\n".join(lines)
    lines.append(f"base: {r.macs / 1e6:.2f} MMACs, {r.params / 1e6:.2f} M params")
    if r.graph_error:
        lines.append(f"pruning graph FAILED: {r.graph_error}")
    lines.append(
        f"prunable: {r.prunable_groups} groups, {r.prunable_channels} channels, "
        f"{r.prunable_heads} heads; left alone: {len(r.left_alone)} layers"
    )
    lines += [f"  {a.layer} ({a.type}): {a.reason}" for a in r.left_alone[:20]]
    lines.append(f"stage-2 candidates: {len(r.stage2_candidates)}")
    if r.deployment_error is not None:
        lines.append(f"deployment: {mark[False]} {r.deployment_error}")
    if r.reachable_macs is not None and r.target_macs is not None:
        lines.append(
            f"target {r.target_macs:.1%}: reachable {mark[r.target_reachable]} — every group "
            f"at its cap leaves {r.reachable_macs / 1e6:.2f} MMACs ({r.reachable_ratio:.1%})"
        )
    for e in r.exports:
        detail = f"max |diff| {e.max_abs_diff:.2e}" if e.error is None else e.error
        lines.append(f"export {e.format}: {mark[e.passed]} ({detail})")
    return "\n".join(lines)


@app.command()
def criteria() -> None:
    """List the registered stage-1 criteria."""
    from flow_compress.criteria import get_criterion, list_criteria

    for name in list_criteria():
        typer.echo(f"{name}\t{get_criterion(name).description}")


@app.command()
def formats() -> None:
    """List the registered export formats and quantization modes."""
    from flow_compress.export import get_exporter, get_quantizer, list_exporters, list_quantizers

    for name in list_exporters():
        typer.echo(f"{name}\t{get_exporter(name).file}")
    for name in list_quantizers():
        typer.echo(f"{name}\t{get_quantizer(name).file} (quantize.modes)")


@app.command()
def train(
    model: Annotated[
        str, typer.Option(help="Model: resnet18, timm:NAME, torchvision:NAME, hf-hub:ORG/NAME.")
    ],
    dataset: Annotated[str, typer.Option(help="Dataset reference, e.g. fashion-mnist.")],
    out: Annotated[Path, typer.Option(help="Folder for weights.safetensors and train.json.")],
    epochs: Annotated[float, typer.Option(help="Epochs (fractions allowed).")] = 5,
    lr: Annotated[float, typer.Option()] = 0.05,
    batch_size: Annotated[int, typer.Option()] = 128,
    input_size: Annotated[int | None, typer.Option(help="Input side in pixels.")] = None,
    in_chans: Annotated[int, typer.Option(help="Input channels (1 for grey data).")] = 3,
    device: Annotated[str, typer.Option()] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
    max_train_samples: Annotated[int | None, typer.Option()] = None,
    pretrained: Annotated[
        bool, typer.Option(help="Start from published weights in the local caches.")
    ] = False,
    normalization: Annotated[
        str,
        typer.Option(
            help="default or pretrained (the architecture's published mean/std/resize; "
            "compress with the same setting)."
        ),
    ] = "default",
) -> None:
    """Train a registered architecture on a dataset reference (to get a base model here)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from flow_compress.config import DataConfig, TrainConfig
    from flow_compress.train import train as run_train

    try:
        cfg = TrainConfig(
            model=model,
            dataset=dataset,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            input_size=input_size,
            in_chans=in_chans,
            device=device,
            seed=seed,
            pretrained=pretrained,
            data=DataConfig(max_train_samples=max_train_samples, normalization=normalization),
        )
        console = Console(stderr=True)
        if console.is_terminal:
            with Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]:.3f}"),
                TimeRemainingColumn(),
                console=console,
            ) as bar:
                task = bar.add_task("train", total=None, loss=float("nan"))

                def on_iter(i: int, total: int, loss: float) -> None:
                    bar.update(task, completed=i + 1, total=total, loss=loss)

                result = run_train(cfg, out, on_iter=on_iter, caches=_caches())
        else:

            def log_iter(i: int, total: int, loss: float) -> None:
                if i % 50 == 0 or i + 1 == total:
                    console.print(f"train {i + 1}/{total}  loss {loss:.3f}")

            result = run_train(cfg, out, on_iter=log_iter, caches=_caches())
    except (FlowCompressError, ValidationError) as exc:
        raise _fail(exc) from exc
    typer.echo(
        f"val top-1 {result.val_top1:.2f}  test top-1 {result.test_top1:.2f}  "
        f"top-5 {result.test_top5:.2f}  ({result.seconds:.0f} s) → {out / 'weights.safetensors'}"
    )


@app.command()
def compress(
    model: Annotated[
        str, typer.Option(help="Model: resnet18, timm:NAME, torchvision:NAME, hf-hub:ORG/NAME.")
    ],
    dataset: Annotated[str, typer.Option(help="Dataset reference.")],
    out: Annotated[Path, typer.Option(help="Output folder (must be empty or absent).")],
    weights: Annotated[
        Path | None,
        typer.Option(
            help="safetensors, weights-only state dict (pytorch_model.bin, training "
            "checkpoints) or a folder holding model.safetensors / pytorch_model.bin."
        ),
    ] = None,
    pretrained: Annotated[
        bool, typer.Option(help="Start from published weights in the local caches.")
    ] = False,
    target_macs: Annotated[
        float | None,
        typer.Option(
            help="Fraction of base MACs to keep (default 0.3 unless a latency target is given)."
        ),
    ] = None,
    target_latency_ms: Annotated[
        float | None, typer.Option(help="Latency to reach on the deployment, ms per batch.")
    ] = None,
    target_speedup: Annotated[
        float | None, typer.Option(help="Speed-up over the base to reach on the deployment.")
    ] = None,
    deploy_runtime: Annotated[
        str | None,
        typer.Option(help="Deployment runtime: onnxruntime (default), torchscript or eager."),
    ] = None,
    deploy_device: Annotated[str | None, typer.Option(help="Deployment device: cpu or cuda.")] = (
        None
    ),
    deploy_provider: Annotated[
        str | None,
        typer.Option(help="ONNX Runtime on CUDA: default (its CUDA provider) or tensorrt."),
    ] = None,
    deploy_batch: Annotated[int | None, typer.Option(help="Deployment batch size.")] = None,
    deploy_threads: Annotated[
        int | None, typer.Option(help="Deployment intra-op threads (default: the runtime's).")
    ] = None,
    deploy_dtype: Annotated[str | None, typer.Option(help="fp32 (default) or fp16.")] = None,
    latency_cache: Annotated[
        Path,
        typer.Option(help="Folder of the latency cost model's layer tables (reused by runs)."),
    ] = Path.home() / ".cache" / "flow-compress" / "latency",
    max_drop: Annotated[float, typer.Option(help="Accuracy budget, top-1 points.")] = 1.5,
    steps: Annotated[int | None, typer.Option(help="Stage-1 steps K.")] = None,
    schedule: Annotated[str | None, typer.Option(help="decay or paper.")] = None,
    criterion: Annotated[
        str | None, typer.Option(help="A registered criterion (see `flow-compress criteria`).")
    ] = None,
    iters_per_step: Annotated[
        int | None, typer.Option(help="Recovery steps per prune step.")
    ] = None,
    trunc_iters: Annotated[int | None, typer.Option(help="Recovery steps per truncation.")] = None,
    final_iters: Annotated[int | None, typer.Option(help="Final fine-tune steps.")] = None,
    stage2: Annotated[bool, typer.Option("--stage2/--no-stage2", help="Layer truncation.")] = True,
    max_layers: Annotated[int | None, typer.Option(help="Stage-2 removals at most.")] = None,
    round_to: Annotated[
        int | None, typer.Option(help="Keep channel counts multiples of N.")
    ] = None,
    distillation: Annotated[
        str | None,
        typer.Option(help="Recovery loss: kd, kd_features (needs --feature-taps) or none (CE)."),
    ] = None,
    feature_taps: Annotated[
        str | None,
        typer.Option(help="Comma-separated module paths for kd_features, e.g. layer3,layer4."),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated quantized ONNX variants: int8_static, int8_dynamic, fp16."
        ),
    ] = None,
    calibration_samples: Annotated[
        int | None, typer.Option(help="Validation images calibrating int8_static.")
    ] = None,
    min_agreement: Annotated[
        float | None,
        typer.Option(help="Top-1 agreement (%) a quantized model needs with the FP32 one."),
    ] = None,
    on_target_missed: Annotated[
        str | None,
        typer.Option(
            help="publish (default): publish the best model reached; fail: exit with "
            "budget_exceeded when the MACs target is not met within the accuracy budget."
        ),
    ] = None,
    guarantee_delta_max: Annotated[
        float | None, typer.Option(help="Output-bound tolerance Δmax (default 0.25).")
    ] = None,
    enforce_guarantee: Annotated[
        bool, typer.Option(help="Fail (guarantee_exceeded) when the output bound is exceeded.")
    ] = False,
    normalization: Annotated[
        str | None,
        typer.Option(
            help="default or pretrained (the architecture's published mean/std/resize); "
            "explicit values go in --config as data.custom_normalization."
        ),
    ] = None,
    embed_preprocessing: Annotated[
        bool,
        typer.Option(help="Also publish model.raw.onnx, taking uint8 NHWC images."),
    ] = False,
    input_size: Annotated[int | None, typer.Option()] = None,
    in_chans: Annotated[int, typer.Option()] = 3,
    num_classes: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str, typer.Option()] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
    config: Annotated[Path | None, typer.Option(help="JSON file with a CompressionConfig.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoint every accepted step here; rerunning the same command after a "
            "crash continues from the last one. Delete the folder when done."
        ),
    ] = None,
) -> None:
    """Compress a model to a MACs and/or latency target within an accuracy budget; writes
    every artifact."""
    from rich.console import Console

    from flow_compress.config import CompressionConfig, set_dotted
    from flow_compress.pipeline import compress as run_compress

    raw: dict[str, Any] = json.loads(config.read_text()) if config else {}
    raw.update(
        model=model,
        dataset=dataset,
        max_drop=max_drop,
        in_chans=in_chans,
        device=device,
        seed=seed,
    )
    deployment = {
        "deployment.runtime": deploy_runtime,
        "deployment.device": deploy_device,
        "deployment.provider": deploy_provider,
        "deployment.batch_size": deploy_batch,
        "deployment.threads": deploy_threads,
        "deployment.dtype": deploy_dtype,
    }
    for key, value in {
        "target_macs": target_macs,
        "target_latency_ms": target_latency_ms,
        "target_speedup": target_speedup,
        **deployment,
        "input_size": input_size,
        "num_classes": num_classes,
        "prune.steps": steps,
        "prune.schedule": schedule,
        "prune.criterion": criterion,
        "prune.round_to": round_to,
        "recovery.iters_per_step": iters_per_step,
        "recovery.trunc_iters": trunc_iters,
        "recovery.final_iters": final_iters,
        "truncate.max_layers": max_layers,
        "recovery.distillation": distillation,
        "recovery.feature_taps": _split_list(feature_taps),
        "quantize.modes": _split_list(quantize),
        "quantize.calibration_samples": calibration_samples,
        "quantize.min_agreement": min_agreement,
        "on_target_missed": on_target_missed,
        "guarantee.delta_max": guarantee_delta_max,
        "data.normalization": normalization,
    }.items():
        if value is not None:
            set_dotted(raw, key, value)
    if not stage2:
        set_dotted(raw, "truncate.enabled", False)
    if enforce_guarantee:
        set_dotted(raw, "guarantee.enforce", True)
    if embed_preprocessing:
        set_dotted(raw, "export.embed_preprocessing", True)
    if pretrained:
        raw["pretrained"] = True
    console = Console(stderr=True)
    try:
        cfg = CompressionConfig.model_validate(raw)
        run = functools.partial(
            run_compress,
            checkpoint_dir=checkpoint_dir,
            caches=_caches(),
            latency_cache=latency_cache,
        )
        report = _run_with_progress(console, run, cfg, weights, out, overwrite)
    except (FlowCompressError, ValidationError) as exc:
        raise _fail(exc) from exc
    speed = f"{report.speedup:.2f}× ({report.speedup_runtime})" if report.speedup else "n/a"
    typer.echo(_verdicts(report))
    typer.echo(
        f"top-1 {report.base.top1:.2f} → {report.pruned.top1:.2f} (drop {report.top1_drop:.2f})  "
        f"GMACs {report.base.macs / 1e9:.4f} → {report.pruned.macs / 1e9:.4f} "
        f"({report.macs_ratio:.1%})  params {report.base.params / 1e6:.2f}M → "
        f"{report.pruned.params / 1e6:.2f}M  speed-up {speed}\nartifacts: {out}"
    )
    for q in report.quantized:
        timing = "  ".join(f"{k} {v:.3f} ms" for k, v in q.latency_ms.items())
        typer.echo(
            f"{q.file}: top-1 {q.top1:.2f}  agreement {q.agreement:.2f} %  "
            f"{q.size_bytes / 1e6:.2f} MB  {timing}".rstrip()
        )


def _verdicts(report: CompressionReport) -> str:
    """The run's verdicts in one line: MACs and latency targets, speed-up, output bound."""
    parts = []
    if report.config.target_macs is not None:
        target = f"{report.config.target_macs:.1%} of the base MACs"
        if report.macs_target_met is None:  # a report of schema version 1
            parts.append(f"target {target}: not judged")
        elif report.macs_target_met:
            parts.append(f"MACs target met: {report.macs_ratio:.1%} <= {target}")
        else:
            parts.append(f"MACs target MISSED: {report.macs_ratio:.1%} > {target}")
    d = report.deployment
    if d is not None:
        parts.append(
            f"on {d.deployment}: {d.base_ms:.3g} → {d.pruned_ms:.3g} ms, {d.speedup:.2f}× "
            f"({d.verdict})"
        )
        if d.latency_target_met is not None:
            wanted = " and ".join(
                t
                for t in (
                    f"{d.target_latency_ms:g} ms" if d.target_latency_ms is not None else "",
                    f"{d.target_speedup:g}×" if d.target_speedup is not None else "",
                )
                if t
            )
            state = "met" if d.latency_target_met else "MISSED"
            parts.append(f"latency target {wanted} {state}")
    if report.target_met is False:
        parts.append("(missed within the accuracy budget; published anyway: on_target_missed)")
    g = report.guarantee
    if g is not None and g.holds is not None:
        state = "holds" if g.holds else "EXCEEDED"
        parts.append(f"output bound {state}: p99 {g.delta_p99:.4g} vs Δmax {g.delta_max:g}")
    return "  ".join(parts)


def _describe(ev: ProgressEvent) -> str:
    info = []
    if ev.macs is not None:
        info.append(f"{ev.macs / 1e6:.1f} MMACs")
    if ev.top1 is not None:
        info.append(f"val top-1 {ev.top1:.2f}")
    if ev.message:
        info.append(ev.message)
    return "  ".join(info)


def _run_with_progress(
    console: Console, run: Any, cfg: Any, weights: Path | None, out: Path, overwrite: bool
) -> Any:
    """A live bar on a terminal; one plain line per step otherwise (CI logs stay readable)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if not console.is_terminal:

        def log(ev: ProgressEvent) -> None:
            console.print(
                f"[{ev.percent:5.1f}%] {ev.stage} {ev.step}/{ev.total_steps}  {_describe(ev)}"
            )

        return run(cfg, weights=weights, out_dir=out, progress=log, overwrite=overwrite)
    with Progress(
        TextColumn("[bold]{task.fields[stage]:<16}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("compress", total=100, stage="starting", info="")

        def on_progress(ev: ProgressEvent) -> None:
            bar.update(task, completed=ev.percent, stage=ev.stage, info=_describe(ev))

        return run(cfg, weights=weights, out_dir=out, progress=on_progress, overwrite=overwrite)


def main() -> None:
    app(args=sys.argv[1:])


if __name__ == "__main__":
    main()

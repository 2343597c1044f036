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

from flow_compress.errors import FlowCompressError

if TYPE_CHECKING:
    from rich.console import Console

    from flow_compress.schema import ProgressEvent

app = typer.Typer(
    name="flow-compress",
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


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _split_list(text: str | None) -> list[str] | None:
    """``"a, b"`` -> ``["a", "b"]``; ``"none"`` or ``""`` -> ``[]``; None stays None (unset).
    Values are checked by the config models, so a typo is an ``invalid_config`` error."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    return [] if items == ["none"] else items


@app.command()
def architectures() -> None:
    """List the registered architecture names."""
    from flow_compress.registry import list_architectures

    for name in list_architectures():
        typer.echo(name)


@app.command()
def train(
    model: Annotated[str, typer.Option(help="Registered architecture name.")],
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
    pretrained: Annotated[bool, typer.Option(help="Start from published weights.")] = False,
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
            data=DataConfig(max_train_samples=max_train_samples),
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

                result = run_train(cfg, out, on_iter=on_iter)
        else:

            def log_iter(i: int, total: int, loss: float) -> None:
                if i % 50 == 0 or i + 1 == total:
                    console.print(f"train {i + 1}/{total}  loss {loss:.3f}")

            result = run_train(cfg, out, on_iter=log_iter)
    except (FlowCompressError, ValidationError) as exc:
        raise _fail(exc) from exc
    typer.echo(
        f"val top-1 {result.val_top1:.2f}  test top-1 {result.test_top1:.2f}  "
        f"top-5 {result.test_top5:.2f}  ({result.seconds:.0f} s) → {out / 'weights.safetensors'}"
    )


@app.command()
def compress(
    model: Annotated[str, typer.Option(help="Registered architecture name.")],
    dataset: Annotated[str, typer.Option(help="Dataset reference.")],
    out: Annotated[Path, typer.Option(help="Output folder (must be empty or absent).")],
    weights: Annotated[
        Path | None, typer.Option(help="safetensors or weights-only state dict.")
    ] = None,
    target_macs: Annotated[float, typer.Option(help="Fraction of base MACs to keep.")] = 0.3,
    max_drop: Annotated[float, typer.Option(help="Accuracy budget, top-1 points.")] = 1.5,
    steps: Annotated[int | None, typer.Option(help="Stage-1 steps K.")] = None,
    schedule: Annotated[str | None, typer.Option(help="decay or paper.")] = None,
    criterion: Annotated[str | None, typer.Option(help="divergence, l1, taylor, random.")] = None,
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
    """Compress a model to a MACs target within an accuracy budget; writes every artifact."""
    from rich.console import Console

    from flow_compress.config import CompressionConfig
    from flow_compress.pipeline import compress as run_compress

    raw: dict[str, Any] = json.loads(config.read_text()) if config else {}
    raw.update(
        model=model,
        dataset=dataset,
        target_macs=target_macs,
        max_drop=max_drop,
        in_chans=in_chans,
        device=device,
        seed=seed,
    )
    for key, value in {
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
    }.items():
        if value is not None:
            _set_path(raw, key, value)
    if not stage2:
        _set_path(raw, "truncate.enabled", False)
    console = Console(stderr=True)
    try:
        cfg = CompressionConfig.model_validate(raw)
        run = functools.partial(run_compress, checkpoint_dir=checkpoint_dir)
        report = _run_with_progress(console, run, cfg, weights, out, overwrite)
    except (FlowCompressError, ValidationError) as exc:
        raise _fail(exc) from exc
    speed = f"{report.speedup:.2f}× ({report.speedup_runtime})" if report.speedup else "n/a"
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

"""A ``CompressionReport`` as Markdown for people, and the Markdown table every report of the
project (the benchmarks' too) is written with.

Cost is reported in GMACs (multiply-accumulates, the paper's "GFLOPs"); FLOPs = 2 x MACs.
Headline accuracies are on the test split; the compression-dynamics table uses the validation
split, as the step records do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from flow_compress.export import EAGER_RUNTIME, exporters
from flow_compress.schema import (
    SPEEDUP_NOISE,
    CompressionReport,
    CostModelStats,
    DeploymentOutcome,
    LatencyRecord,
    StepRecord,
)

# --------------------------------------------------------------------------- formatting


def _gmacs(macs: float) -> str:
    """GMACs with three significant digits and at least two decimals (0.0312, 4.10, 17.50)."""
    g = macs / 1e9
    if g <= 0:
        return "0.00"
    decimals = min(6, max(2, 2 - math.floor(math.log10(g))))
    return f"{g:.{decimals}f}"


def _mparams(params: float) -> str:
    m = params / 1e6
    if m <= 0:
        return "0.00"
    decimals = min(5, max(2, 2 - math.floor(math.log10(m))))
    return f"{m:.{decimals}f}"


def _pct(value: float) -> str:
    return f"{value:.2f} %"


def _ms(value: float) -> str:
    if value >= 100:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


def _cell(text: object) -> str:
    """A Markdown table cell: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> list[str]:
    """A GitHub-flavoured Markdown table as lines; ``align`` has one of ``l``/``r`` per column
    (all left by default). Cells are escaped (pipes) and flattened (newlines)."""
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _ratio_change(ratio: float) -> str:
    return f"×{ratio:.3f} ({(ratio - 1) * 100:+.1f} %)"


def _split_runtime(name: str) -> tuple[str, int | None]:
    """'onnxruntime@b1' -> ('onnxruntime', 1); a bare runtime has no batch."""
    runtime, sep, batch = name.partition("@b")
    return (runtime, int(batch)) if sep and batch.isdigit() else (name, None)


def _runtime(name: str | None) -> str:
    """A latency runtime as people know it: the eager module, or a format's runtime label.

    Takes a bare runtime (``onnxruntime``), a headline's ``runtime@bN`` (the batch is left to
    the caller) or a deployment's runtime with its provider (``onnxruntime+tensorrt``)."""
    labels = {EAGER_RUNTIME: "PyTorch eager"}
    labels |= {e.runtime: e.runtime_label or e.runtime for e in exporters() if e.runtime}
    runtime, _ = _split_runtime(name or "")
    runtime, _, provider = runtime.partition("+")
    label = labels.get(runtime, runtime)
    providers = {"tensorrt": "TensorRT"}
    return f"{label} ({providers.get(provider, provider)} provider)" if provider else label


def _deployment_runtime(d: DeploymentOutcome) -> str:
    # The label's first part carries the provider (onnxruntime+tensorrt); ``runtime`` does not.
    first = d.deployment.split("/", 1)[0]
    return _runtime(first if first.startswith(d.runtime) else d.runtime)


def _noise_pct(d: DeploymentOutcome) -> float:
    """Half-width, in percent, of the band around 1 that ``schema.speedup_verdict`` calls noise."""
    return max(SPEEDUP_NOISE, d.spread / 2) * 100


def _verdict_text(d: DeploymentOutcome) -> str:
    if d.verdict == "no faster":
        return f"**no faster** (within the measurement noise, ±{_noise_pct(d):.1f} %)"
    return f"**{d.verdict}**"


def _latency_targets(d: DeploymentOutcome) -> str:
    """'≤ 2.00 ms per batch and ≥ 2.00× speed-up', or '' without a latency target."""
    wanted = []
    if d.target_latency_ms is not None:
        wanted.append(f"≤ {_ms(d.target_latency_ms)} ms per batch")
    if d.target_speedup is not None:
        wanted.append(f"≥ {d.target_speedup:.2f}× speed-up")
    return " and ".join(wanted)


def _format(name: str) -> str:
    """A parity row's format: a registered format's label, or the plan replay check."""
    labels = {"plan_replay": "plan replay", "onnx_raw": "ONNX, raw uint8 input"} | {
        e.name: e.label for e in exporters()
    }
    return labels.get(name, name)


# --------------------------------------------------------------------------- markdown


def _headline_latency(report: CompressionReport) -> LatencyRecord | None:
    """The latency row the headline speed-up came from; None with a deployment (whose own
    outcome is the headline) or when no row matches."""
    if report.speedup is None or report.deployment is not None:
        return None
    runtime, batch = _split_runtime(report.speedup_runtime or "")
    candidates = [
        r
        for r in report.latency
        if r.runtime == runtime and (batch is None or r.batch_size == batch)
    ]
    for record in sorted(candidates, key=lambda r: r.batch_size):
        if math.isclose(record.speedup, report.speedup, rel_tol=1e-6):
            return record
    return None


def _headline(report: CompressionReport) -> list[str]:
    base, pruned = report.base, report.pruned
    rows: list[list[object]] = [
        ["Top-1 (test)", _pct(base.top1), _pct(pruned.top1), f"{-report.top1_drop:+.2f} pts"],
        ["Top-5 (test)", _pct(base.top5), _pct(pruned.top5), f"{pruned.top5 - base.top5:+.2f} pts"],
        ["GMACs", _gmacs(base.macs), _gmacs(pruned.macs), _ratio_change(report.macs_ratio)],
        [
            "Params (M)",
            _mparams(base.params),
            _mparams(pruned.params),
            _ratio_change(report.params_ratio),
        ],
    ]
    d = report.deployment
    if d is not None:
        rows.append(
            [
                f"Latency (ms), {d.deployment}",
                _ms(d.base_ms),
                _ms(d.pruned_ms),
                f"{d.speedup:.2f}× speed-up ({d.verdict})",
            ]
        )
    lines = [
        f"# Compression report: {report.model} on {report.dataset}",
        "",
        _summary_sentence(report),
        "",
        *md_table(["", "Base", "Pruned", "Change"], rows, "lrrr"),
        "",
        "GMACs are billions of multiply-accumulates per image (what the IDAP++ paper calls "
        f'"GFLOPs"); FLOPs = 2 × MACs, so the pruned model costs '
        f"{_gmacs(2 * pruned.macs)} GFLOPs against {_gmacs(2 * base.macs)} for the base.",
    ]
    return lines


def _deployment_sentences(d: DeploymentOutcome) -> list[str]:
    """The speed-up on the job's deployment and the latency target's verdict. The verdict word
    is the report's own (``deployment.verdict``): a speed-up inside the noise never reads as
    faster."""
    parts = [
        f"On its deployment `{d.deployment}` ({_deployment_runtime(d)} on {d.device}) the "
        f"pruned model runs at **{d.speedup:.2f}×** the base's speed, {_ms(d.base_ms)} → "
        f"{_ms(d.pruned_ms)} ms per batch of {d.batch_size}: it is {_verdict_text(d)}."
    ]
    wanted = _latency_targets(d)
    if wanted and d.latency_target_met is not None:
        verdict = "**met**" if d.latency_target_met else "**missed** within the accuracy budget"
        parts.append(f"Latency target ({wanted}): {verdict}.")
    return parts


def _summary_sentence(report: CompressionReport) -> str:
    cfg = report.config
    macs_met = report.macs_target_met
    if cfg.target_macs is None:
        target = "no MACs target"
    elif macs_met is None:
        target = f"target {cfg.target_macs * 100:.1f} %"
    elif macs_met:
        target = f"target {cfg.target_macs * 100:.1f} %: **met**"
    else:
        target = f"target {cfg.target_macs * 100:.1f} %: **missed** within the accuracy budget"
    macs = (
        f"The pruned model keeps {report.macs_ratio * 100:.1f} % of the base model's MACs "
        f"({target}) and {report.params_ratio * 100:.1f} % of its "
        f"parameters, at a top-1 drop of {report.top1_drop:.2f} points on the test split "
        f"(budget {cfg.max_drop:.2f})."
    )
    if report.deployment is not None:
        # The deployment is where the model will run: its speed-up leads.
        return " ".join([*_deployment_sentences(report.deployment), macs])
    parts = [macs]
    record = _headline_latency(report)
    if report.speedup is not None:
        where = f" with {_runtime(report.speedup_runtime)}" if report.speedup_runtime else ""
        if record is not None:
            where += f" at batch {record.batch_size} on {record.device}, {record.dtype}"
        else:
            _, batch = _split_runtime(report.speedup_runtime or "")
            where += f" at batch {batch}" if batch is not None else ""
        parts.append(f"Measured speed-up: **{report.speedup:.2f}×**{where}.")
    else:
        parts.append("No latency was measured.")
    return " ".join(parts)


def _cost_model_lines(c: CostModelStats) -> list[str]:
    rows: list[list[object]] = [
        ["Table entries (layer shapes)", f"{c.table_entries:,}"],
        ["Layer timings measured in this run", f"{c.measured:,}"],
        ["Lookups answered by the table", f"{c.reused:,}"],
        ["Seconds spent timing layers", f"{c.build_s:.1f}"],
    ]
    if c.cache_file:
        rows.append(["Table file", f"`{c.cache_file}`"])
    rows.append(["Steps checked against a measurement", c.steps_checked])
    if c.mean_abs_error_pct is not None:
        rows.append(["Mean prediction error", f"{c.mean_abs_error_pct:.1f} %"])
    if c.max_abs_error_pct is not None:
        rows.append(["Largest prediction error", f"{c.max_abs_error_pct:.1f} %"])
    if c.steps_checked and c.mean_abs_error_pct is not None:
        meaning = (
            "The prediction error is |predicted − measured| ÷ measured for each checked "
            "stage-1 step: the latency the cost model predicted from its per-layer table "
            "before the step, against the end-to-end median measured on the deployment after "
            "it (the dynamics table's Predicted and Latency columns). A small error means the "
            "ranking by score per millisecond saved chose by what the deployment really pays; "
            "a large one means layer timings add up poorly there (fusion, overheads) and the "
            "ranking was closer to a guess."
        )
    else:
        meaning = "No step's prediction was checked against an end-to-end measurement."
    return [
        "### Cost model",
        "",
        "Stage 1 ranked channels by score per millisecond saved, the milliseconds coming from a "
        "table of layer timings measured on the deployment (reused across runs on the same "
        "deployment and machine).",
        "",
        *md_table(["Item", "Value"], rows),
        "",
        meaning,
        "",
    ]


def _deployment_section(report: CompressionReport) -> list[str]:
    d = report.deployment
    if d is None:
        return []
    dep = report.config.deployment
    how = (
        f"median of {dep.runs} timed runs after {dep.warmup} warm-up runs"
        if dep is not None
        else "median of the timed runs after warm-up"
    )
    rows: list[list[object]] = [
        ["Deployment", f"`{d.deployment}`"],
        ["Runtime", _deployment_runtime(d)],
        ["Hardware", d.device],
        ["Batch", d.batch_size],
        ["Precision", d.dtype],
        ["Threads", d.threads if d.threads else "the runtime's default"],
        ["Base (ms)", _ms(d.base_ms)],
        ["Pruned (ms)", _ms(d.pruned_ms)],
        ["Speed-up", f"**{d.speedup:.2f}×**"],
        ["Spread (interquartile range ÷ median)", f"{d.spread * 100:.1f} %"],
        ["Verdict", _verdict_text(d)],
    ]
    if d.target_latency_ms is not None:
        rows.append(["Latency target", f"≤ {_ms(d.target_latency_ms)} ms per batch"])
    if d.target_speedup is not None:
        rows.append(["Speed-up target", f"≥ {d.target_speedup:.2f}×"])
    if d.latency_target_met is not None:
        rows.append(["Latency target reached", "**met**" if d.latency_target_met else "**missed**"])
    else:
        rows.append(["Latency target reached", "no latency target was given"])
    if d.parity is not None:
        rows.append(
            [
                "Parity on the deployment",
                f"top-1 agrees with eager float32 on {d.parity.top1_agreement:.1f} % of "
                f"{d.parity.samples} validation images (at least {d.parity.min_agreement:g} % "
                f"required); max |logit difference| {d.parity.max_abs_diff:.3g}",
            ]
        )
    lines = [
        "## Deployment",
        "",
        f"Base and pruned models timed on the job's deployment, alternating run by run in one "
        f"process ({how}). The verdict takes the measurement's noise into account: within "
        f"±{_noise_pct(d):.1f} % of 1 (the larger of {SPEEDUP_NOISE * 100:.0f} % and half the "
        "spread) the pruned model is reported as no faster.",
        "",
        *md_table(["Item", "Value"], rows),
        "",
    ]
    if d.cost_model is not None:
        lines += _cost_model_lines(d.cost_model)
    return lines


def _latency_section(records: Sequence[LatencyRecord]) -> list[str]:
    lines = ["## Latency", ""]
    if not records:
        return [*lines, "Latency was not measured for this job.", ""]
    devices = list(dict.fromkeys(r.device for r in records))
    dtypes = list(dict.fromkeys(r.dtype for r in records))
    shared = len(devices) == 1
    intro = (
        "Median of the timed runs after warm-up; base and pruned were timed in the same "
        "process, alternating run by run (CUDA synchronised around every timed run)."
    )
    if shared:
        intro += f" Device: {devices[0]}; dtype: {', '.join(dtypes)}."
    header = ["Runtime", "Batch", "Base (ms)", "Pruned (ms)", "Speed-up"]
    align = "lrrrr"
    if not shared:
        header.insert(2, "Device")
        align = "lrlrrr"
    rows: list[list[object]] = []
    for r in records:
        row: list[object] = [_runtime(r.runtime), r.batch_size, _ms(r.base_ms), _ms(r.pruned_ms)]
        row.append(f"{r.speedup:.2f}×")
        if not shared:
            row.insert(2, r.device)
        rows.append(row)
    return [*lines, intro, "", *md_table(header, rows, align), ""]


def _mb(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:.2f}"


def _latency_key(key: str) -> str:
    """'cpu@b32' -> 'CPU b32'."""
    where, _, batch = key.partition("@")
    return f"{where.upper()} {batch}"


def _combination_section(report: CompressionReport) -> list[str]:
    """Pruning x quantization x distillation in the shape of the paper's combination table."""
    rows_in = report.combination
    if not rows_in:
        return []
    keys = list(dict.fromkeys(k for r in rows_in for k in r.latency_ms))
    header = ["Variant", "Precision", "GMACs", "Top-1", "Top-5", "Size (MB)"]
    header += [f"{_latency_key(k)} (ms)" for k in keys]
    header += [f"Speed-up {_latency_key(k)}" for k in keys]
    rows: list[list[object]] = []
    for r in rows_in:
        row: list[object] = [
            r.variant,
            r.precision.upper(),
            _gmacs(r.macs),
            _pct(r.top1),
            _pct(r.top5),
            _mb(r.size_bytes),
        ]
        row += [_ms(r.latency_ms[k]) if k in r.latency_ms else "-" for k in keys]
        row += [f"{r.speedup[k]:.2f}×" if k in r.speedup else "-" for k in keys]
        rows.append(row)
    env = report.environment
    timing = (
        "Latency: ONNX Runtime, median of the timed runs after warm-up, every file timed "
        "round-robin in the same process as the baseline"
        + (f" (CPU: {env['cpu']})" if env.get("cpu") else "")
        + f", {report.config.latency.threads or 'default (all cores)'} intra-op thread(s)"
        + "; CUDA columns appear only where the job ran on CUDA with ONNX Runtime's CUDA "
        "provider. Speed-up is against the baseline's FP32 ONNX model."
        if keys
        else "Latency was not measured for this job (latency.enabled is off)."
    )
    distill = report.config.recovery.distillation
    return [
        "## Pruning combined with quantization",
        "",
        "The paper's combination table for this job: the base model, the pruned model "
        f"(recovered with {distill} distillation) and its quantized ONNX variants. Accuracy is on "
        "the test split; size is the ONNX file on disk; quantization does not change the MAC "
        "count (it makes each MAC cheaper).",
        "",
        *md_table(header, rows, "ll" + "r" * (len(header) - 2)),
        "",
        timing,
        "",
    ]


def _quantized_section(report: CompressionReport) -> list[str]:
    if not report.quantized:
        return []
    cfg = report.config.quantize
    rows = [
        [
            q.mode,
            f"`{q.file}`",
            f"{q.agreement:.2f} %",
            f"{q.min_agreement:.2f} %",
            f"{q.max_abs_diff:.3g}",
            q.samples,
            q.calibration_samples if q.calibration_samples is not None else "-",
            "pass" if q.passed else "FAIL",
        ]
        for q in report.quantized
    ]
    method = (
        f"INT8 static: QDQ format, {'per-channel' if cfg.per_channel else 'per-tensor'} INT8 "
        f"weights, {cfg.activation_type} activations calibrated ({cfg.calibration_method}) on "
        "validation images"
        + (", classifier kept in FP32" if cfg.keep_classifier_fp32 else "")
        + "; INT8 dynamic: activation ranges computed at run time; FP16: float32 input and "
        "output kept."
    )
    return [
        "## Quantized models",
        "",
        "Each variant was loaded in ONNX Runtime (CPU) and compared with the FP32 pruned ONNX "
        "model on validation images (disjoint from the calibration images where the split is "
        "large enough): top-1 agreement and the largest absolute logit difference. " + method,
        "",
        *md_table(
            [
                "Mode",
                "File",
                "Top-1 agreement",
                "Required",
                "Max logit diff",
                "Samples",
                "Calibration images",
                "Result",
            ],
            rows,
            "llrrrrrl",
        ),
        "",
    ]


def _dynamics_section(steps: Sequence[StepRecord]) -> list[str]:
    lines = ["## Compression dynamics", ""]
    if not steps:
        return [*lines, "No steps were recorded.", ""]
    lines += [
        "Every step of the run, accuracy on the validation split. Rows marked *rolled back* were "
        "tried and undone (the model continued from the previous row).",
        "",
    ]
    # Reports without a deployment keep the table they always had.
    measured = any(s.latency_ms is not None for s in steps)
    predicted = any(s.predicted_latency_ms is not None for s in steps)
    if measured or predicted:
        lines[-1:] = [
            "Latency (ms) is the median measured on the deployment after the step; Predicted "
            "(ms) is what the cost model expected before it was taken.",
            "",
        ]
    header = ["Step", "Stage", "GMACs", "Params (M)", "Top-1", "Top-5"]
    header += ["Latency (ms)"] if measured else []
    header += ["Predicted (ms)"] if predicted else []
    rows: list[list[object]] = []
    for s in steps:
        step = str(s.step) if s.accepted else f"{s.step} (rolled back)"
        row: list[object] = [
            step,
            s.stage,
            _gmacs(s.macs),
            _mparams(s.params),
            _pct(s.top1),
            _pct(s.top5),
        ]
        if measured:
            row.append(_ms(s.latency_ms) if s.latency_ms is not None else "-")
        if predicted:
            row.append(_ms(s.predicted_latency_ms) if s.predicted_latency_ms is not None else "-")
        rows.append(row)
    lines += md_table(header, rows, "ll" + "r" * (len(header) - 2))
    details = [s for s in steps if s.detail]
    if details:
        lines += ["", "Step notes:", ""]
        lines += [f"- step {s.step} ({s.stage}): {s.detail}" for s in details]
    return [*lines, ""]


def _guarantee_section(report: CompressionReport) -> list[str]:
    lines = ["## Output guarantee", ""]
    g = report.guarantee
    if g is None:
        return [*lines, "The output bound was not checked for this job.", ""]
    if g.holds is None:
        verdict = "not judged (a report of schema version 1, whose Δmax was not a tolerance)"
    elif g.holds:
        verdict = "the bound **holds** for at least 99 % of validation inputs"
    else:
        verdict = "the bound is **exceeded** by more than 1 % of validation inputs"
    lines += [
        "The IDAP++ bound ‖N₀(x) − N\\*(x)‖² ≤ Δmax · ‖N₀(x)‖² is checked on the validation "
        "split, not assumed. The 99th percentile of the relative squared error "
        "‖N₀(x) − N\\*(x)‖² / ‖N₀(x)‖² between the base (N₀) and pruned (N\\*) outputs is "
        f"**{g.delta_p99:.4g}** against the tolerance Δmax = {g.delta_max:.4g} "
        f"(guarantee.delta_max): {verdict}.",
        "",
    ]
    if g.holds is False:
        lines += [
            "With guarantee.enforce the job would have failed (guarantee_exceeded) instead of "
            "publishing this model.",
            "",
        ]
    return lines


def _parity_section(report: CompressionReport) -> list[str]:
    lines = ["## Export parity", ""]
    if not report.parity:
        return [*lines, "No exported model was checked.", ""]
    atol = report.config.export.parity_atol
    rows = [
        [
            _format(p.format),
            p.samples,
            f"{p.max_abs_diff:.3g}",
            f"{(atol if p.tolerance is None else p.tolerance):.3g}",
            "pass" if p.passed else "FAIL",
        ]
        for p in report.parity
    ]
    lines += [
        "Each artifact was reloaded (TorchScript with torch.jit.load, ONNX in ONNX Runtime on "
        "the CPU, a plan replay by rebuilding the architecture from plan.json and the weights) "
        "and run on real validation samples; the difference is the largest absolute difference "
        "from the eager pruned model's logits.",
        "",
        *md_table(["Format", "Samples", "Max abs diff", "Tolerance", "Result"], rows, "lrrrl"),
        "",
    ]
    return lines


def _contract_section(report: CompressionReport) -> list[str]:
    c = report.input_contract
    if c is None:
        return []
    resize = f"{c.resize.size[0]}×{c.resize.size[1]}, {c.resize.interpolation}" + (
        ", antialiased when shrinking" if c.resize.antialias else ""
    )
    crop = f"centre {c.crop[0]}×{c.crop[1]}" if c.crop else "none"
    rows: list[list[object]] = [
        ["Input", f"`{c.input_name}`: {c.dtype} {c.layout}, {c.channels} × {c.height} × {c.width}"],
        [
            "Channels",
            c.channel_order + (" (colour → grey: mean of R, G, B)" if c.channels == 1 else ""),
        ],
        ["Resize (whole image)", resize],
        ["Crop", crop],
        ["Scaling", f"uint8 ÷ {c.pixel_divisor:g} → [{c.value_range[0]:g}, {c.value_range[1]:g}]"],
        ["Mean", ", ".join(f"{v:g}" for v in c.mean)],
        ["Std", ", ".join(f"{v:g}" for v in c.std)],
        ["Normalisation from", c.normalization_source],
        ["Output", f"`{c.output_name}`: logits (no softmax)"],
    ]
    if c.class_names:
        shown = ", ".join(c.class_names[:20]) + (" …" if len(c.class_names) > 20 else "")
        rows.append([f"Classes ({len(c.class_names)})", shown])
    return [
        "## Input contract",
        "",
        "How an image must be prepared for the exported models: x = (pixel ÷ divisor − mean) "
        "÷ std per channel, after the resize and crop. The same contract is in "
        "preprocessing.json, in model.onnx's metadata_props (key "
        "`flow_compress.input_contract`) and in model.ts's extra file preprocessing.json.",
        "",
        *md_table(["Item", "Value"], rows),
        "",
    ]


def _timings_section(report: CompressionReport) -> list[str]:
    lines = ["## Time and effort", ""]
    timings = report.timings_s
    stages = {k: v for k, v in timings.items() if k.endswith("_total")}
    activities = {k: v for k, v in timings.items() if k not in stages and k != "total"}
    total = timings.get("total", sum(activities.values()))
    if activities:
        # Activities are disjoint (stage totals overlap them and are shown apart); what the
        # activities do not cover is bookkeeping: MAC counting, model copies, data loading.
        other = total - sum(activities.values())
        rows: list[list[object]] = [
            [name, _duration(sec), f"{sec / total * 100:.0f} %" if total > 0 else "-"]
            for name, sec in activities.items()
        ]
        if other > 0.05 * total:
            rows.append(
                [
                    "other (MAC counting, copies, data)",
                    _duration(other),
                    f"{other / total * 100:.0f} %",
                ]
            )
        rows.append(["**Total (wall)**", f"**{_duration(total)}**", "100 %" if total > 0 else "-"])
        lines += [*md_table(["Activity", "Wall time", "Share"], rows, "lrr"), ""]
    if stages:
        names = {
            "stage1_total": "Filter Prune (stage 1)",
            "stage2_total": "Layer Trunc (stage 2)",
            "finetune_total": "Final Fine-Tune",
        }
        rows = [[names.get(k, k), _duration(v)] for k, v in stages.items()]
        lines += [*md_table(["Stage", "Wall time"], rows, "lr"), ""]
    if not timings:
        lines += ["No stage timings were recorded.", ""]
    if report.recovery_iterations:
        rows = [[stage, f"{n:,}"] for stage, n in report.recovery_iterations.items()]
        lines += [*md_table(["Stage", "Recovery optimisation steps"], rows, "lr"), ""]
    return lines


def _settings_section(report: CompressionReport) -> list[str]:
    cfg = report.config
    p, t, r = cfg.prune, cfg.truncate, cfg.recovery
    prune = (
        f"{p.steps} steps, {p.schedule} schedule, {p.criterion} criterion, {p.ranking} ranking"
        if p.enabled
        else "off"
    )
    trunc = (
        f"up to {t.max_layers} layers, tau {t.tau} points, {t.n_try} tries per round"
        if t.enabled
        else "off"
    )
    if r.distillation == "none":
        loss = "plain cross-entropy (no distillation)"
    else:
        loss = f"{r.distillation} distillation (T = {r.temperature}, weight {r.kd_weight})"
        if r.distillation == "kd_features":
            loss += f", feature taps {', '.join(r.feature_taps)} (weight {r.feature_weight})"
    recovery = (
        f"{loss}; "
        f"{r.iters_per_step} steps after each prune step, {r.trunc_iters} after each truncation, "
        f"{r.final_iters} final"
    )
    rows: list[list[object]] = [
        [
            "MACs target",
            f"{cfg.target_macs * 100:.1f} % of the base"
            if cfg.target_macs is not None
            else "none (latency target only)",
        ],
    ]
    if cfg.target_latency_ms is not None:
        rows.append(["Latency target", f"≤ {_ms(cfg.target_latency_ms)} ms per batch"])
    if cfg.target_speedup is not None:
        rows.append(["Speed-up target", f"≥ {cfg.target_speedup:.2f}×"])
    if cfg.deployment is not None:
        dep = cfg.deployment
        rows.append(
            [
                "Deployment",
                f"`{dep.label()}` ({dep.warmup} warm-up, {dep.runs} timed runs per measurement)",
            ]
        )
    rows += [
        ["If the target is missed", cfg.on_target_missed],
        [
            "Output bound",
            f"Δmax {cfg.guarantee.delta_max:g}"
            + (", enforced" if cfg.guarantee.enforce else ", reported"),
        ],
        ["Accuracy budget", f"{cfg.max_drop:.2f} top-1 points"],
        ["Filter pruning", prune],
        ["Layer truncation", trunc],
        ["Recovery", recovery],
        [
            "Quantization",
            ", ".join(cfg.quantize.modes) + f" (min agreement {cfg.quantize.min_agreement} %)"
            if cfg.quantize.modes
            else "off",
        ],
        [
            "Input",
            f"{cfg.in_chans} channel{'s' if cfg.in_chans != 1 else ''}, "
            + (f"{cfg.input_size} px" if cfg.input_size else "the model's default size"),
        ],
        ["Seed", cfg.seed],
    ]
    if report.splits:
        rows.append(["Splits", ", ".join(f"{k} {v:,}" for k, v in report.splits.items())])
    rows.append(
        [
            "Input weights sha256",
            f"`{report.weights_sha256}`" if report.weights_sha256 else "none (random init)",
        ]
    )
    if report.pruned_weights_sha256:
        rows.append(
            ["Pruned weights sha256 (weights.safetensors)", f"`{report.pruned_weights_sha256}`"]
        )
    return ["## Settings", "", *md_table(["Setting", "Value"], rows), ""]


def _environment_section(report: CompressionReport) -> list[str]:
    lines = ["## Environment", ""]
    if not report.environment:
        return [*lines, "Not recorded.", ""]
    rows = [[k, v] for k, v in report.environment.items()]
    return [*lines, *md_table(["Item", "Value"], rows), ""]


def _notes_section(report: CompressionReport) -> list[str]:
    if not report.notes:
        return []
    return ["## Notes", "", *[f"- {_cell(n)}" for n in report.notes], ""]


def render_markdown(report: CompressionReport) -> str:
    """The report as a Markdown document for people.

    Sections: headline (model, dataset, base -> pruned test top-1/top-5, GMACs with FLOPs = 2 x
    MACs stated, params, the headline speed-up with its runtime and device; with a deployment,
    its speed-up, verdict and latency target lead), the deployment (outcome, targets, cost
    model and its prediction error) when the job named one, latency table,
    with quantized variants the combination table (Variant | Precision | GMACs | Top-1 |
    Top-5 | Size (MB) | ONNX Runtime latency and speed-up per device and batch) and the
    quantized models' checks,
    compression-dynamics table (Step | Stage | GMACs | Params (M) | Top-1 | Top-5 on the
    validation split, plus Latency (ms) and Predicted (ms) where steps were timed), output
    guarantee (p99 of the relative squared error), export parity,
    the input contract, time per stage, settings, environment, notes. No raw JSON.
    """
    lines = [
        *_headline(report),
        "",
        *_deployment_section(report),
        *_latency_section(report.latency),
        *_combination_section(report),
        *_quantized_section(report),
        *_dynamics_section(report.steps),
        *_guarantee_section(report),
        *_parity_section(report),
        *_contract_section(report),
        *_timings_section(report),
        *_settings_section(report),
        *_environment_section(report),
        *_notes_section(report),
    ]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


__all__ = ["md_table", "render_markdown"]

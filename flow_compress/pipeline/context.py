"""State shared by the pipeline's stages: data, teacher, budget, records, timers, progress."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from flow_compress.config import CompressionConfig
from flow_compress.data import Batch, DataSplits
from flow_compress.errors import CancelledError
from flow_compress.graph.adapter import count_macs_params
from flow_compress.graph.latency_cost import LatencyTable
from flow_compress.measure.deployment import DeploymentTimer
from flow_compress.measure.evaluate import evaluate
from flow_compress.recovery import LoopSettings, fit
from flow_compress.schema import (
    SPEEDUP_NOISE,
    TARGET_SLACK,
    ProgressEvent,
    Stage,
    StepRecord,
)

ProgressFn = Callable[[ProgressEvent], None]
CancelFn = Callable[[], bool]
# Called with the model after every accepted step (stage, accepted steps of that stage so far);
# the pipeline uses it to write a checkpoint (flow_compress.pipeline.checkpoint).
AcceptFn = Callable[[nn.Module, Stage, int], None]

# Share of the progress bar per stage (percent rises monotonically through the run).
PROGRESS_SPAN = {
    Stage.BASELINE: (0.0, 5.0),
    Stage.FILTER_PRUNE: (5.0, 60.0),
    Stage.LAYER_TRUNC: (60.0, 75.0),
    Stage.FINAL_FINE_TUNE: (75.0, 90.0),
    Stage.EXPORT: (90.0, 100.0),
}


@dataclass
class Context:
    config: CompressionConfig
    data: DataSplits
    device: torch.device
    teacher: nn.Module
    example: torch.Tensor
    base_macs: int
    base_params: int
    base_val_top1: float = 0.0
    plan_ops: list[dict[str, object]] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    recovery_iters: Counter[Stage] = field(default_factory=Counter)
    timings: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    progress_fn: ProgressFn | None = None
    cancel_fn: CancelFn | None = None
    accept_fn: AcceptFn | None = None
    # Stage 1's per-layer cap is against the widths first seen; kept here so a resumed run
    # caps against the original model, not the checkpoint's pruned one.
    original_widths: dict[str, int] = field(default_factory=dict)
    # Training batches drawn so far; a resumed run skips as many to draw the same ones.
    train_batches_used: int = 0
    # (stage, step) of the checkpoint this run resumed from, None for a fresh run.
    resumed_from: tuple[Stage, int] | None = None
    # The deployment a latency target is measured on (None: no deployment configured), the
    # cost model's layer table, the base model's and the current model's measured latency.
    deployment: DeploymentTimer | None = None
    cost_table: LatencyTable | None = None
    base_latency_ms: float | None = None
    latency_now_ms: float | None = None
    # Relative spread (IQR / median) of the last measurement: a target counts as reached
    # during the run only when it is cleared by more than the noise.
    latency_spread: float = 0.0
    # Measured over predicted milliseconds saved by the last cost-model step: the next step's
    # prediction is corrected by it (what the layer table misses is mostly proportional).
    saving_efficiency: float = 1.0
    _train_batches: Iterator[Batch] | None = None
    _percent: float = 0.0

    # ------------------------------------------------------------ control

    def check_cancel(self) -> None:
        if self.cancel_fn is not None and self.cancel_fn():
            raise CancelledError("compression cancelled by the caller")

    def accepted(self, model: nn.Module, stage: Stage, step: int) -> None:
        """A stage accepted its ``step``-th step with ``model``: let ``accept_fn`` record it."""
        if self.accept_fn is not None:
            self.accept_fn(model, stage, step)

    def emit(
        self,
        stage: Stage,
        step: int,
        total: int,
        *,
        macs: int | None = None,
        top1: float | None = None,
        message: str = "",
    ) -> None:
        lo, hi = PROGRESS_SPAN.get(stage, (self._percent, self._percent))
        frac = min(1.0, step / total) if total > 0 else 1.0
        self._percent = max(self._percent, lo + (hi - lo) * frac)
        if self.progress_fn is not None:
            self.progress_fn(
                ProgressEvent(stage, step, total, round(self._percent, 2), macs, top1, message)
            )

    @property
    def percent(self) -> float:
        return self._percent

    @contextmanager
    def timer(self, key: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] += time.perf_counter() - start

    # ------------------------------------------------------------ measurements

    def cost(self, model: nn.Module) -> tuple[int, int]:
        """MACs and parameters of ``model`` for one input."""
        return count_macs_params(model, self.example)

    @property
    def target_macs(self) -> float | None:
        """The MACs the configuration asks the pruned model to stay under (None: no MACs
        target, only a latency one)."""
        if self.config.target_macs is None:
            return None
        return self.config.target_macs * self.base_macs

    def reached_target(self, macs: float) -> bool:
        """Whether ``macs`` meets the MACs target (within ``TARGET_SLACK``); true without one."""
        target = self.target_macs
        return target is None or macs <= target * TARGET_SLACK

    @property
    def target_latency_ms(self) -> float | None:
        """The latency to reach on the deployment: the stricter of ``target_latency_ms`` and
        the base latency over ``target_speedup``; None without a latency target."""
        cfg = self.config
        targets = []
        if cfg.target_latency_ms is not None:
            targets.append(cfg.target_latency_ms)
        if cfg.target_speedup is not None and self.base_latency_ms is not None:
            targets.append(self.base_latency_ms / cfg.target_speedup)
        return min(targets) if targets else None

    def reached_latency(self, ms: float | None) -> bool:
        """Whether a measured latency ``ms`` meets the latency target by more than the last
        measurement's noise (the final verdict is a fresh measurement, and a model that only
        just met the target would miss it half the time); true without a target."""
        target = self.target_latency_ms
        if target is None:
            return True
        margin = max(SPEEDUP_NOISE, self.latency_spread / 2)
        return ms is not None and ms * (1 + margin) <= target

    def reached_targets(self, macs: float) -> bool:
        """Every given target met: MACs by count, latency by the last measurement."""
        return self.reached_target(macs) and self.reached_latency(self.latency_now_ms)

    def measure_latency(self, model: nn.Module) -> float | None:
        """Latency of ``model`` on the deployment (None without one), which becomes the
        current latency the next stage-1 step starts from.

        After the baseline, ``model`` is timed alternately with the base model and its
        latency is the baseline's median divided by the speed-up measured now: load on the
        machine that slows both alike cancels, so steps compare with each other and with the
        target in one currency instead of in whatever the machine's load was at each step."""
        if self.deployment is None:
            return None
        with self.timer("latency_steps"):
            if self.base_latency_ms is None:
                # The baseline: the model against a copy of itself, so it gets twice the runs
                # every later measurement's base half gets.
                both = self.deployment.compare(self.teacher, model)
                ms = (both.base.ms + both.pruned.ms) / 2
            else:
                both = self.deployment.compare(self.teacher, model)
                ms = self.base_latency_ms / both.speedup
            self.latency_spread = max(both.base.spread, both.pruned.spread)
        self.latency_now_ms = ms
        return ms

    def val_accuracy(self, model: nn.Module, max_batches: int | None = None) -> tuple[float, float]:
        with self.timer("evaluation"):
            batches = self.data.loader("val", self.config.data.eval_batch_size)
            if max_batches is not None:
                batches = (b for i, b in enumerate(batches) if i < max_batches)
            return evaluate(model, batches, self.device)

    def record(
        self,
        model: nn.Module,
        stage: Stage,
        *,
        top: tuple[float, float] | None = None,
        accepted: bool = True,
        detail: str = "",
        predicted_ms: float | None = None,
        measured_ms: float | None = None,
    ) -> StepRecord:
        """Append a row of the dynamics table for ``model``: MACs, params, validation
        accuracy (``top`` when already measured) and, with a deployment, its latency there
        (``measured_ms`` when ``measure_latency`` already timed it; a rejected model is timed
        too but does not become the current latency)."""
        macs, params = self.cost(model)
        top1, top5 = top if top is not None else self.val_accuracy(model)
        now = self.latency_now_ms
        ms = measured_ms if measured_ms is not None else self.measure_latency(model)
        if not accepted:
            self.latency_now_ms = now
        rec = StepRecord(
            step=len(self.steps),
            stage=stage,
            macs=macs,
            params=params,
            top1=round(top1, 3),
            top5=round(top5, 3),
            accepted=accepted,
            detail=detail,
            latency_ms=round(ms, 4) if ms is not None else None,
            predicted_latency_ms=round(predicted_ms, 4) if predicted_ms is not None else None,
        )
        self.steps.append(rec)
        return rec

    def drop(self, top1: float) -> float:
        return self.base_val_top1 - top1

    # ------------------------------------------------------------ training

    def train_batches(self) -> Iterator[Batch]:
        if self._train_batches is None:
            self._train_batches = self._counted(
                self.data.forever(self.config.recovery.batch_size, seed=self.config.seed)
            )
        return self._train_batches

    def _counted(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        # The batch order depends only on the seed and the position, so skipping the batches
        # an earlier run drew makes a resumed run draw the same ones next.
        for _ in range(self.train_batches_used):
            next(batches)
        for batch in batches:
            self.train_batches_used += 1
            yield batch

    def recover(
        self,
        model: nn.Module,
        iters: int,
        stage: Stage,
        *,
        lr: float | None = None,
        on_iter: Callable[[int, float], None] | None = None,
    ) -> int:
        """Distil from the original model (per ``recovery.distillation``) for ``iters`` steps;
        ``on_iter(step, loss)`` runs after every step (what a recipe changes mid-training)."""
        rc = self.config.recovery
        settings = LoopSettings(
            iters=iters,
            lr=lr or rc.lr,
            momentum=rc.momentum,
            weight_decay=rc.weight_decay,
            temperature=rc.temperature,
            kd_weight=rc.kd_weight,
            feature_weight=rc.feature_weight,
            amp=rc.amp,
        )
        teacher = None if rc.distillation == "none" else self.teacher
        taps = rc.feature_taps if rc.distillation == "kd_features" else ()
        with self.timer("recovery"):
            n = fit(
                model,
                self.train_batches(),
                settings,
                self.device,
                teacher=teacher,
                feature_taps=taps,
                on_iter=on_iter,
            )
        self.recovery_iters[stage] += n
        return n

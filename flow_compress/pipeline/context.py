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
from flow_compress.measure.evaluate import evaluate
from flow_compress.recovery import LoopSettings, fit
from flow_compress.schema import ProgressEvent, Stage, StepRecord

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
# The MACs target counts as reached within 1 %: channel rounding and coupled groups make an
# exact landing impossible, and stage 1 stops there.
TARGET_SLACK = 1.01


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
    def target_macs(self) -> float:
        """The MACs the configuration asks the pruned model to stay under."""
        return self.config.target_macs * self.base_macs

    def reached_target(self, macs: float) -> bool:
        """Whether ``macs`` meets the MACs target (within ``TARGET_SLACK``)."""
        return macs <= self.target_macs * TARGET_SLACK

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
    ) -> StepRecord:
        macs, params = self.cost(model)
        top1, top5 = top if top is not None else self.val_accuracy(model)
        rec = StepRecord(
            step=len(self.steps),
            stage=stage,
            macs=macs,
            params=params,
            top1=round(top1, 3),
            top5=round(top5, 3),
            accepted=accepted,
            detail=detail,
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
        self, model: nn.Module, iters: int, stage: Stage, *, lr: float | None = None
    ) -> int:
        """Distil from the original model (per ``recovery.distillation``) for ``iters`` steps."""
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
            )
        self.recovery_iters[stage] += n
        return n

"""Recovery training: distillation from the original model (or plain cross-entropy).

One iteration-based loop serves base-model training, the recovery after each pruning step
and truncation, and the final fine-tune, so every method spends exactly the optimisation
steps it is given (the benchmarks compare criteria under identical budgets).

Loss with a teacher (``kd``): ``w·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1-w)·CE(s, y)``.
``kd_features`` adds MSE between student and teacher activations at named taps, through a
learned 1×1 projection per tap (pruned students have fewer channels than the teacher).
SGD with momentum, 5 % linear warm-up then cosine decay to zero. AMP (bf16 where supported,
else fp16 with loss scaling) on CUDA only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flow_compress.data import Batch


@dataclass(frozen=True)
class LoopSettings:
    iters: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    temperature: float = 4.0
    kd_weight: float = 0.7
    feature_weight: float = 1.0
    label_smoothing: float = 0.0
    amp: bool = True


def _autocast(
    device: torch.device, amp: bool
) -> tuple[contextlib.AbstractContextManager[object], bool]:
    if device.type != "cuda" or not amp:
        return contextlib.nullcontext(), False
    bf16 = torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float16
    return torch.autocast("cuda", dtype=dtype), not bf16


class _Taps:
    """Forward hooks capturing named activations; removed by ``close`` (always, via finally)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        modules = dict(model.named_modules())
        for name in names:
            if name not in modules:
                from flow_compress.errors import InvalidConfigError

                raise InvalidConfigError(f"feature tap {name!r} is not a module of the model")
            self.handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            self.out[name] = out

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def fit(
    student: nn.Module,
    batches: Iterator[Batch],
    settings: LoopSettings,
    device: torch.device,
    *,
    teacher: nn.Module | None = None,
    feature_taps: Sequence[str] = (),
    on_iter: Callable[[int, float], None] | None = None,
) -> int:
    """Train ``student`` in place for ``settings.iters`` steps; returns the steps taken."""
    if settings.iters <= 0:
        return 0
    student.train()
    if teacher is not None:
        teacher.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    cast, scale = _autocast(device, settings.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=scale)
    s_taps = t_taps = None
    adapters: nn.ModuleDict | None = None
    if feature_taps and teacher is not None:
        s_taps, t_taps = _Taps(student, feature_taps), _Taps(teacher, feature_taps)
        adapters = nn.ModuleDict()
    opt = torch.optim.SGD(
        params,
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        nesterov=settings.momentum > 0,
    )
    warm = max(1, int(0.05 * settings.iters))

    def lr_at(i: int) -> float:
        if i < warm:
            return settings.lr * (i + 1) / warm
        t = (i - warm) / max(1, settings.iters - warm)
        return settings.lr * 0.5 * (1 + math.cos(math.pi * t))

    steps = 0
    try:
        for i in range(settings.iters):
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for g in opt.param_groups:
                g["lr"] = lr_at(i)
            with cast:
                logits = student(x)
                if teacher is None:
                    loss = F.cross_entropy(logits, y, label_smoothing=settings.label_smoothing)
                else:
                    with torch.no_grad():
                        t_logits = teacher(x)
                    loss = _kd_loss(logits, t_logits, y, settings)
                    if s_taps is not None and t_taps is not None and adapters is not None:
                        loss = loss + settings.feature_weight * _feature_loss(
                            s_taps.out, t_taps.out, adapters, opt, device
                        )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            steps += 1
            if on_iter is not None:
                on_iter(i, float(loss.detach()))
    finally:
        for taps in (s_taps, t_taps):
            if taps is not None:
                taps.close()
        student.eval()
    return steps


def _kd_loss(
    s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, settings: LoopSettings
) -> torch.Tensor:
    temp = settings.temperature
    kl = F.kl_div(
        F.log_softmax(s.float() / temp, dim=1),
        F.log_softmax(t.float() / temp, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    ce = F.cross_entropy(s.float(), y)
    return settings.kd_weight * temp * temp * kl + (1 - settings.kd_weight) * ce


def _feature_loss(
    s_out: dict[str, torch.Tensor],
    t_out: dict[str, torch.Tensor],
    adapters: nn.ModuleDict,
    opt: torch.optim.Optimizer,
    device: torch.device,
) -> torch.Tensor:
    total = torch.zeros((), device=device)
    for name, s in s_out.items():
        t = t_out[name].detach()
        key = name.replace(".", "__")
        if key not in adapters:
            # The projection is created on first sight (channel counts are known only now) and
            # optimised with the student.
            proj: nn.Module
            if s.ndim == 4:
                proj = nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False)
            else:
                proj = nn.Linear(s.shape[-1], t.shape[-1], bias=False)
            adapters[key] = proj.to(device)
            opt.add_param_group({"params": list(proj.parameters())})
        total = total + F.mse_loss(adapters[key](s.float()), t.float())
    return total

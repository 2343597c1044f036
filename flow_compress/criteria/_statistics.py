"""Statistics for the flow-divergence scores (stage 1's δ and stage 2's D_res), collected
with forward hooks.

All hooks live here and are removed in ``finally``; nothing is stored on the user's model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from flow_compress.arch import attention
from flow_compress.data import Batch
from flow_compress.graph import TapSpec


def _run_observed(
    model: nn.Module,
    install: Callable[[list[RemovableHandle]], None],
    batches: Iterable[Batch],
    device: torch.device,
) -> None:
    """Run ``batches`` through ``model`` in eval mode with the hooks ``install`` registers
    (appending each handle to the list it is given); every hook is removed in ``finally``,
    also those registered before an error in ``install`` itself."""
    handles: list[RemovableHandle] = []
    try:
        install(handles)
        model.eval()
        for x, _ in batches:
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class UnitStats:
    """E_x[||A(l,c)(x)||_2] per unit, and the spatial size (H·W) or token count N."""

    act_norm: torch.Tensor
    spatial: int


class _Accumulator:
    def __init__(self, spec: TapSpec) -> None:
        self.spec = spec
        self.total: torch.Tensor | None = None
        self.count = 0
        self.spatial = 1

    def __call__(self, _m: nn.Module, _inp: object, out: torch.Tensor) -> None:
        with torch.no_grad():
            a = out.detach().float()
            if self.spec.activation is not None:
                a = self.spec.activation(a)
            if self.spec.channel_dim == 1:
                self.spatial = int(a[0, 0].numel())
                norms = a.flatten(2).norm(dim=2)
            else:
                a = a.reshape(a.shape[0], -1, a.shape[-1])
                self.spatial = int(a.shape[1])
                norms = a.norm(dim=1)
            s = norms.sum(dim=0).cpu()
            self.total = s if self.total is None else self.total + s
            self.count += norms.shape[0]

    def result(self) -> UnitStats:
        if self.total is None or self.count == 0:
            raise RuntimeError(f"tap {self.spec.module} saw no data (is it on the forward path?)")
        return UnitStats(self.total / self.count, self.spatial)


@torch.no_grad()
def collect_unit_stats(
    model: nn.Module,
    taps: Mapping[str, TapSpec],
    batches: Iterable[Batch],
    device: torch.device,
) -> dict[str, UnitStats]:
    """Run ``batches`` through ``model`` and return stats keyed like ``taps``."""
    modules = dict(model.named_modules())
    accs = {key: _Accumulator(spec) for key, spec in taps.items()}

    def install(handles: list[RemovableHandle]) -> None:
        for key, spec in taps.items():
            handles.append(modules[spec.module].register_forward_hook(accs[key]))

    _run_observed(model, install, batches, device)
    return {key: acc.result() for key, acc in accs.items()}


@torch.no_grad()
def collect_head_stats(
    model: nn.Module,
    layers: Iterable[str],
    batches: Iterable[Batch],
    device: torch.device,
) -> dict[str, UnitStats]:
    """E_x||A_h(x)||_F per head of each self-attention layer in ``layers`` (paths), with the
    token count N as ``spatial``. A_h = softmax(Q_h K_hᵀ/√d)·V_h is recomputed from the
    layer's input in a pre-hook (``attention.head_output_norms``)."""
    modules = dict(model.named_modules())
    totals: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    tokens: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(m: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            x = attention.self_attention_input(m, args, kwargs)
            if x is None:
                return
            norms = attention.head_output_norms(m, x.detach()).sum(dim=0).cpu()
            totals[name] = norms if name not in totals else totals[name] + norms
            counts[name] = counts.get(name, 0) + int(x.shape[0])
            tokens[name] = int(x.shape[1])

        return fn

    names = list(layers)

    def install(handles: list[RemovableHandle]) -> None:
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(hook(name), with_kwargs=True))

    _run_observed(model, install, batches, device)
    missing = [n for n in names if n not in totals]
    if missing:
        raise RuntimeError(f"attention layers {missing} saw no self-attention call")
    return {n: UnitStats(totals[n] / counts[n], tokens[n]) for n in names}


@torch.no_grad()
def collect_block_norms(
    model: nn.Module,
    blocks: Mapping[str, str | None],
    batches: Iterable[Batch],
    device: torch.device,
    ends: Mapping[str, str] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-sample (||F(x)||_2, ||x||_2) for each block, for D_res.

    ``blocks`` maps a block path to the path of the module whose output is the residual
    branch F(x) (e.g. ``bn2`` of a BasicBlock), or to None for plain shape-preserving layers,
    where F(x) is taken as ``block(x) - x`` (what the block adds to the flow). ``ends`` maps
    a block to the last module of a run of sibling layers that starts at the block (VGG's
    conv → BN → ReLU): x is the block's input and F(x) is the run's output minus x.
    """
    ends = ends or {}
    modules = dict(model.named_modules())
    inputs: dict[str, list[torch.Tensor]] = {k: [] for k in blocks}
    branches: dict[str, list[torch.Tensor]] = {k: [] for k in blocks}
    last_input: dict[str, torch.Tensor] = {}

    def norms(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().flatten(1).norm(dim=1).cpu()

    def pre_hook(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            last_input[name] = args[0]
            inputs[name].append(norms(args[0]))

        return hook

    def block_hook(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: object, out: torch.Tensor) -> None:
            branches[name].append(norms(out - last_input[name]))

        return hook

    def branch_hook(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: object, out: torch.Tensor) -> None:
            branches[name].append(norms(out))

        return hook

    def install(handles: list[RemovableHandle]) -> None:
        for name, branch in blocks.items():
            block = modules[name]
            handles.append(block.register_forward_pre_hook(pre_hook(name)))
            if branch is None:
                last = modules[ends[name]] if name in ends else block
                handles.append(last.register_forward_hook(block_hook(name)))
            else:
                handles.append(modules[f"{name}.{branch}"].register_forward_hook(branch_hook(name)))

    _run_observed(model, install, batches, device)
    last_input.clear()
    return {k: (torch.cat(branches[k]), torch.cat(inputs[k])) for k in blocks if inputs[k]}

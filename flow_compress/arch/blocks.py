"""Stage-2 candidates: blocks that can be replaced by an identity or a projection shortcut.

The families declare which blocks qualify (``BlockRule``s in ``flow_compress/arch/<family>.py``);
this module runs the rules over a model. A rule either looks at one module and says whether it
is a candidate, what replaces it and which submodule's output is its residual branch F(x), or
scans a module and returns candidates inside it (a child, or a run of sibling layers). Modules
no rule claimed are read from structure (``arch.structure``): a residual block ``x + F(x)``
becomes an identity candidate with F(x) its output minus its input. Identity
candidates must map their input shape to the same output shape on a real input; the check runs
on every model, so a rule cannot silently break a forward pass. docs/algorithm.md, "Stage 2",
lists the candidates of every family and why DenseNet has none.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flow_compress.arch._spec import Candidate, Kind, block_rules
from flow_compress.arch.structure import residual_form, run_once


class ProjectionShortcut(nn.Module):
    """The block's own projection shortcut followed by its output activation (``Identity*``)."""

    def __init__(self, shortcut: nn.Module, activation: nn.Module | None) -> None:
        super().__init__()
        self.shortcut = shortcut
        self.activation = activation if activation is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.shortcut(x))


# --------------------------------------------------------------------------- discovery


def find_candidates(
    model: nn.Module, example: torch.Tensor, *, allow_projection: bool
) -> list[Candidate]:
    """Candidates in model order: the families' rules first, then, in modules no rule claimed
    (nor any module inside one), residual blocks found from structure
    (``arch.structure.residual_form``; outermost first). Identity candidates are kept only if
    shapes really match (input of the candidate against output of its last span member);
    structural ones also only if called once with one tensor argument and nothing else."""
    found: list[Candidate] = []
    claimed: list[str] = []
    rules = list(block_rules())
    for name, module in model.named_modules():
        for rule in rules:
            if rule.scan is not None:
                hits = rule.scan(name, module)
                found.extend(hits)
                claimed.extend(c for h in hits for c in h.paths)
                continue
            assert rule.match is not None
            hit = rule.match(module)
            if hit is None:
                continue
            claimed.append(name)
            kind, branch = hit
            if kind == "projection" and (not allow_projection or rule.projection is None):
                break
            found.append(Candidate(name, kind, branch))
            break
    structural = _structural(model, claimed)
    found = sorted(found + structural, key=_order(model))
    if not found:
        return found
    shapes = _io_shapes(model, example, [(c.name, c.paths[-1]) for c in found])
    single = _single_tensor_calls(model, example, [c.name for c in structural])
    mine = {c.name for c in structural}
    return [
        c
        for c in found
        if c.name in shapes
        and (c.kind == "projection" or shapes[c.name][0] == shapes[c.name][1])
        and (c.name not in mine or c.name in single)
    ]


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def _structural(model: nn.Module, claimed: list[str]) -> list[Candidate]:
    """Residual blocks no rule claimed, outermost first (a block inside one is not)."""
    out: list[Candidate] = []
    taken = list(claimed)
    for name, module in model.named_modules():
        if not name or _inside(name, taken) or next(module.children(), None) is None:
            continue
        if residual_form(module):
            out.append(Candidate(name, "identity", None))
            taken.append(name)
    return out


def _order(model: nn.Module) -> Callable[[Candidate], int]:
    index = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return lambda c: index.get(c.name, len(index))


def _single_tensor_calls(model: nn.Module, example: torch.Tensor, names: list[str]) -> set[str]:
    """Those of ``names`` called exactly once, with one positional tensor argument and
    nothing else, returning one tensor (what an ``nn.Identity`` in its place can take)."""
    if not names:
        return set()
    calls: dict[str, int] = dict.fromkeys(names, 0)
    bad: set[str] = set()
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def fn(
            _m: nn.Module, args: tuple[object, ...], kwargs: dict[str, object], out: object
        ) -> None:
            calls[name] += 1
            # An identity takes one argument: even a None keyword (timm's relpos ViT blocks
            # get shared_rel_pos=None) would not reach it.
            if len(args) != 1 or not isinstance(args[0], torch.Tensor) or kwargs:
                bad.add(name)
            if not isinstance(out, torch.Tensor):
                bad.add(name)

        return fn

    modules = dict(model.named_modules())
    for name in names:
        handles.append(modules[name].register_forward_hook(hook(name), with_kwargs=True))
    run_once(model, example, handles)
    return {n for n, k in calls.items() if k == 1 and n not in bad}


def _io_shapes(
    model: nn.Module, example: torch.Tensor, spans: list[tuple[str, str]]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Input shape of each span's first module and output shape of its last, keyed by the
    first."""
    inputs: dict[str, tuple[int, ...]] = {}
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    handles = []
    modules = dict(model.named_modules())

    def pre(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            inputs[name] = tuple(args[0].shape)

        return fn

    def post(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, _args: object, out: torch.Tensor) -> None:
            if name in inputs:
                shapes[name] = (inputs[name], tuple(out.shape))

        return fn

    for first, last in spans:
        handles.append(modules[first].register_forward_pre_hook(pre(first)))
        handles.append(modules[last].register_forward_hook(post(first)))
    run_once(model, example, handles)
    return shapes


def make_replacement(block: nn.Module, kind: Kind) -> nn.Module:
    """An ``nn.Identity`` or, for ``projection``, the shortcut the block's rule builds."""
    if kind == "identity":
        return nn.Identity()
    for rule in block_rules():
        if rule.match is None or rule.projection is None:
            continue
        if rule.match(block) is not None:
            return rule.projection(block)
    raise ValueError(f"no projection rule for {type(block).__name__}")


__all__ = ["Candidate", "ProjectionShortcut", "find_candidates", "make_replacement"]

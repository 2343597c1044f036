"""Which layers stage 1 can handle, from the families' declarations (``flow_compress.arch``).

- ``opaque_modules``: what DepGraph must see as one node, each with the reason it is left
  alone (attention layers, declared opaque blocks, channel shuffles found from structure,
  layer types without a pruning rule); the graph adapter reports them
  (``PruningGraph.ignored``).
- ``opaque_block``: blocks that DepGraph must see as one node because torch-pruning cannot
  trace through them; only the channels internal to their scopes are pruned.
- ``declared_parameters``: layer-scale parameters that sit outside standard layers but follow
  a channel, with the dimension that follows it. Groups that touch any *other* free-standing
  parameter (class tokens, position embeddings, unknown user parameters) are not pruned.
- Attention layers (``flow_compress.arch.attention``) are opaque too; their heads are
  separate units.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from flow_compress.arch import OpaqueBlock, layer_scales, opaque_blocks
from flow_compress.arch.attention import is_attention, layout_of
from flow_compress.arch.structure import computes_attention, scale_dim, shuffles, token_concats

# Leaf layers holding parameters that stage 1 can score and slice (norms follow their conv or
# linear producer). Anything else with its own parameters must be declared by a family.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.PReLU,
)


def opaque_block(module: nn.Module) -> OpaqueBlock | None:
    """The registered opaque block ``module`` is, or None."""
    return next((b for b in opaque_blocks() if b.match(module)), None)


def declared_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Free-standing parameters that follow a channel, with the dimension that follows it:
    the layer scales the families declare, then every parameter of a non-standard module
    shaped like one (``arch.structure.scale_dim``: one non-unit axis, not a token or an
    embedding)."""
    scales = list(layer_scales())
    out: list[tuple[nn.Parameter, int]] = []
    seen: set[int] = set()
    for m in model.modules():
        scale = next((s for s in scales if s.match(m)), None)
        if scale is not None:
            p = scale.parameter(m)
            out.append((p, scale.dim))
            seen.add(id(p))
    for m in model.modules():
        # torch's own layers hold weights, never layer scales (a Conv1d's 1×1×k kernel has
        # one non-unit axis too).
        if (
            isinstance(m, SUPPORTED_LAYERS)
            or type(m).__module__.startswith("torch.")
            or layout_of(m) is not None
        ):
            continue
        for name, p in m.named_parameters(recurse=False):
            dim = scale_dim(name, p)
            if dim is not None and id(p) not in seen:
                out.append((p, dim))
                seen.add(id(p))
    return out


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


@dataclass(frozen=True)
class Opaque:
    """A module DepGraph sees as one node, and why: its channels are left alone, and only the
    widths internal to its ``scopes`` (child paths) become groups. ``channel_dim`` is the
    axis of its input and output that carries channels (None: 1 for 4-D maps, -1 else)."""

    path: str
    reason: str
    scopes: tuple[str, ...] = ()
    channel_dim: int | None = None


def _has_weights(m: nn.Module) -> bool:
    return any(isinstance(c, nn.Conv2d | nn.Linear) for c in m.modules())


def _unknown_attention(m: nn.Module) -> bool:
    if not any(True for _ in m.parameters()):
        return False
    return "attention" in type(m).__name__.lower() or computes_attention(m)


def _one_argument(m: nn.Module) -> bool:
    """Whether ``m`` can be called with its input tensor alone (a scope is traced that way)."""
    try:
        params = list(inspect.signature(m.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params[1:]
    )


def _scopes(model: nn.Module, path: str, inside: tuple[str, ...]) -> tuple[str, ...]:
    """Children of ``path`` that hold a conv or linear layer, are not opaque themselves and
    take their input tensor alone (CoaT's attention also takes the token grid's size)."""
    m = model.get_submodule(path)
    # A leaf is no scope: its only width is the scope's output, which is never pruned.
    return tuple(
        n
        for n, c in m.named_children()
        if _has_weights(c)
        and next(c.children(), None) is not None
        and _one_argument(c)
        and not any(p == f"{path}.{n}" or p.startswith(f"{path}.{n}.") for p in inside)
    )


def opaque_modules(model: nn.Module, example: torch.Tensor | None = None) -> dict[str, Opaque]:
    """Every module DepGraph must see as one node, by path, with the reason recorded:

    - attention layers of a registered layout (their heads are separate units) and of an
      unknown layout (left alone: their head structure would be cut blindly);
    - opaque blocks a family declares (ShuffleNetV2 units), with their declared scopes;
    - modules whose own code shuffles channels (``arch.structure.shuffles``), with every child
      that holds a conv or linear layer as a scope (the widths inside it never cross the
      shuffle);
    - leaf layers with parameters of a type stage 1 cannot slice (recurrent, 1-D/3-D or
      transposed convolutions, embeddings, unknown norms), other than declared layer scales;
    - with ``example``, modules whose own code concatenates tokens along axis 1
      (``arch.structure.token_concats``), with their weight-holding children as scopes.

    Instances of a type made opaque are all opaque (DepGraph dispatches on the type)."""
    declared = {id(p) for p, _ in declared_parameters(model)}
    out: dict[str, Opaque] = {}
    for path, m in model.named_modules():
        layout = layout_of(m)
        if layout is not None:
            heads = "heads pruned separately" if is_attention(m) else "heads not prunable"
            out[path] = Opaque(path, f"attention layer ({layout.name}; {heads})")
            continue
        block = opaque_block(m)
        if block is not None:
            out[path] = Opaque(
                path, f"opaque block ({block.name})", block.scopes(m), block.channel_dim
            )
            continue
        if path and _unknown_attention(m):
            out[path] = Opaque(path, f"attention layer of an unknown layout ({type(m).__name__})")
            continue
        own = list(m.parameters(recurse=False))
        if (
            own
            and next(m.children(), None) is None
            and not isinstance(m, SUPPORTED_LAYERS)
            and not all(id(p) in declared for p in own)
        ):
            out[path] = Opaque(path, f"layer type {type(m).__name__} has no pruning rule")
    inside = tuple(out)
    for path in shuffles(model, skip=inside):
        m = model.get_submodule(path)
        first = next((c for c in m.modules() if isinstance(c, nn.Conv2d | nn.Linear)), None)
        dim = -1 if isinstance(first, nn.Linear) else None
        out[path] = Opaque(
            path, "channel shuffle (reshape, axis swap, reshape)", _scopes(model, path, inside), dim
        )
    if example is not None:
        inside = tuple(out)
        for path in token_concats(model, example, skip=inside):
            out[path] = Opaque(
                path,
                "concatenates tokens along axis 1 (a class token re-inserted), which "
                "torch-pruning reads as channels",
                _scopes(model, path, inside),
                -1,
            )
    types = {type(model.get_submodule(p)) for p in out}
    for path, m in model.named_modules():
        if type(m) in types and path not in out:
            out[path] = Opaque(path, f"same type as an opaque module ({type(m).__name__})")
    return out


def check_supported(model: nn.Module) -> dict[str, Opaque]:
    """What stage 1 leaves alone in ``model`` (``opaque_modules``); nothing is refused up
    front any more: a layer type without a rule is left alone with its reason, and a model
    that cannot be traced fails when its graph is built, naming the layers left alone."""
    return opaque_modules(model)


__all__ = [
    "SUPPORTED_LAYERS",
    "Opaque",
    "check_supported",
    "declared_parameters",
    "opaque_block",
    "opaque_modules",
]

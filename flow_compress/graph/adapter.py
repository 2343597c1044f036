"""The one module that imports torch-pruning (DepGraph).

It turns a model into ``PrunableGroup``s — coupled channels that must be removed together,
or the heads of one attention layer — with, for each root unit, the MACs its removal saves
and where the producers' activations are observed; it applies removals by root indices and
replays them from a plan; it counts MACs; and it exposes torch-pruning's stock importances
(L1 magnitude, Taylor, random) to the criteria that use them. For the benchmarks' recipes it
also runs torch-pruning's own pruner (``StockPruner``, ``prune_to_macs``: one-shot or
iterative, global or uniform, to a MACs target) and zeroes units in place for soft filter
pruning (``PruningGraph.zero_units``).

Architecture handling comes from the families' declarations (``flow_compress.arch``,
``flow_compress.graph.support``):

- Attention layers and opaque blocks (ShuffleNetV2 units) are registered with DepGraph as
  customised layers whose pruning functions refuse to run, so DepGraph neither traces into
  them nor couples through them; every group that reaches one of them is left out. For the
  transformer's embedding width (coupled to every attention layer) this is the rule
  "embedding dim kept"; for ShuffleNetV2 it keeps the channel shuffle intact.
- Inside an opaque block, each declared scope (ShuffleNetV2's ``branch2``) gets its own
  DepGraph, traced on the input it receives in the model; only groups that do not reach the
  scope's output become prunable (the inner 1×1 → depthwise → 1×1 width).
- Attention heads are groups of ``unit == "head"``: removing head h slices Q/K/V rows and
  output-projection columns and updates the layer's head count
  (``flow_compress.arch.attention.prune_heads``).
- Modules no family declares are read from structure (``graph.support.opaque_modules``):
  channel shuffles become opaque blocks whose children are scopes, attention layers of an
  unknown layout and leaf layers without a pruning rule become opaque nodes.
- A fused gated linear unit (``arch.structure.fused_gates``: a layer whose output is chunked
  in two halves that are multiplied, timm's ``GluMlp``) is a group numbered by hidden unit:
  unit ``i`` is the layer's rows ``i`` and ``i + half`` and the consumer's column ``i``, both
  rows removed together (DepGraph alone numbers them as two unrelated root channels).
- Groups that reach the model's (or a scope's) output, an ignored layer (the classifier), a
  free-standing parameter that is not a layer scale, a grouped convolution, or a narrower
  layer (slicing) are left out. ``PruningGraph.ignored`` lists every layer left alone with the
  reason (what the preflight prints).

Plan entries are ``{"op": "prune", "root": path, "idxs": [...], "graph": n}`` (plus
``"unit": "head"`` for heads). ``graph`` identifies the DepGraph the removal was computed on;
replay builds a new graph whenever it changes, exactly as stage 1 did.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.utils import op_counter

from flow_compress.arch import Activation, activations, attention
from flow_compress.arch.structure import fused_gates
from flow_compress.errors import UnsupportedModelError
from flow_compress.graph.support import declared_parameters, opaque_modules

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
# The norms the latency cost model times (``graph.latency_cost.layer_shape``).
_NORM_TYPES = (nn.BatchNorm2d, nn.LayerNorm)
_ACT_BY_GRAD_FN: dict[str, Activation] = {
    "Relu": torch.relu,
    "Hardtanh": lambda t: t.clamp(0.0, 6.0),  # ReLU6 shows up as hardtanh
    "Silu": nn.functional.silu,
    "Hardswish": nn.functional.hardswish,
    "Gelu": nn.functional.gelu,
    "Sigmoid": torch.sigmoid,
    "Hardsigmoid": nn.functional.hardsigmoid,
}
# torch's own activation modules; families add theirs (``Family.activations``).
_ACT_MODULES: dict[type[nn.Module], Activation] = {
    nn.ReLU: torch.relu,
    nn.ReLU6: lambda t: t.clamp(0.0, 6.0),
    nn.SiLU: nn.functional.silu,
    nn.Hardswish: nn.functional.hardswish,
    nn.GELU: nn.functional.gelu,
    nn.Sigmoid: torch.sigmoid,
    nn.Hardsigmoid: nn.functional.hardsigmoid,
}
_GRAPH_IDS = itertools.count(1)
# torch-pruning's stock importances, by the name the criteria ask for them with.
_STOCK: dict[str, Callable[[], tp.importance.Importance]] = {
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "taylor": tp.importance.GroupTaylorImportance,
    "random": tp.importance.RandomImportance,
}

Unit = Literal["channel", "head"]


@dataclass(frozen=True)
class TapSpec:
    """Where a producer's post-activation output is observed.

    ``module`` is the path of the module whose output is hooked (the norm layer after the
    conv/linear, or the layer itself), ``activation`` is applied to that output inside the hook
    (torchvision reuses one ReLU module per block, so hooking the ReLU would be wrong), and
    ``channel_dim`` is 1 for conv maps, -1 for linear outputs (B×D or B×N×D tokens).
    """

    module: str
    activation: Activation | None
    channel_dim: int


@dataclass
class Member:
    """One conv/linear of a group: ``idxs`` in its own numbering, ``root_idxs`` in the root's."""

    name: str
    module: nn.Module
    idxs: list[int]
    root_idxs: list[int]


@dataclass
class PrunableGroup:
    """Units removed together. ``unit == "channel"``: a DepGraph group rooted at conv/linear
    ``root_name``; ``unit == "head"``: the ``size`` heads of the attention layer
    ``root_name`` (no producers/consumers; scored with the head formula)."""

    root_name: str
    size: int
    producers: list[Member] = field(default_factory=list)
    consumers: list[Member] = field(default_factory=list)
    # LayerNorm and BatchNorm2d layers whose channels the group removes (timed by the
    # latency cost model; they cost no MACs).
    norms: list[Member] = field(default_factory=list)
    cost: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    unit: Unit = "channel"
    tokens: int = 0
    _group: object = None


# --------------------------------------------------------------------------- MACs


def _attention_counter(module: nn.Module, inputs: tuple[Any, ...], _out: object) -> None:
    if attention.layout_of(module) is None or not inputs:
        return  # an attention type of no known layout: its layers are counted as usual
    x = inputs[0]
    batch_first = getattr(module, "batch_first", True)
    batch, tokens = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
    module.__flops__ += attention.attention_macs(module, int(tokens)) * int(batch)  # type: ignore[operator]


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """MACs (multiply-accumulates) and parameters for one input of ``example``'s shape.

    Attention layers are counted by ``attention.attention_macs`` (torch-pruning's stock
    counter assumes the attention width equals the embedding width, which head pruning
    breaks; it is the same count for unpruned layers)."""
    was_training = model.training
    op_counter.CUSTOM_MODULES_MAPPING = dict.fromkeys(
        attention.attention_types(), _attention_counter
    )
    try:
        macs, params = tp.utils.count_ops_and_params(model, example[:1])
    finally:
        op_counter.CUSTOM_MODULES_MAPPING = {}
        model.train(was_training)
    return int(macs), int(params)


# --------------------------------------------------------------------------- opaque nodes


class _OpaquePruner(tp.pruner.BasePruningFunc):
    """DepGraph handler for attention layers and opaque blocks: it reports their channel
    counts (for shape inference) and refuses to prune them; groups reaching them are dropped
    before anything is pruned."""

    def __init__(self, channels: dict[int, tuple[int, int]]) -> None:
        super().__init__(pruning_dim=1)
        self.channels = channels

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise UnsupportedModelError(
            f"{type(layer).__name__} is handled outside DepGraph; its channels cannot be pruned"
        )

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise UnsupportedModelError(
            f"{type(layer).__name__} is handled outside DepGraph; its channels cannot be pruned"
        )

    def get_out_channels(self, layer: nn.Module) -> int | None:
        return self.channels.get(id(layer), (None, None))[1]

    def get_in_channels(self, layer: nn.Module) -> int | None:
        return self.channels.get(id(layer), (None, None))[0]


@dataclass
class _Graph:
    """One DepGraph: the model's (``prefix == ""``) or a scope's inside an opaque block."""

    dg: tp.DependencyGraph
    prefix: str
    module: nn.Module


class _Cut(torch.autograd.Function):
    """Identity on an opaque module's output whose autograd node links only to the module's
    tensor inputs: DepGraph traces autograd nodes, and without the cut it would walk into the
    module's internals (the shuffle's reshapes, the heads' reshapes) as if they were free
    operations of the surrounding graph. Every input is linked, so that the producers of a
    block taking several streams (CoaT's parallel block) stay in the traced graph."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.n_inputs = len(inputs)
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, ...]:
        return (None,) * (1 + ctx.n_inputs)


def _cut(inputs: list[torch.Tensor], out: Any) -> Any:
    return _Cut.apply(out.detach(), *inputs) if isinstance(out, torch.Tensor) else out


def _width(module: object, out: bool) -> int | None:
    """Channels of a conv/linear layer on the side a group prunes (None for anything else)."""
    if isinstance(module, nn.Conv2d):
        return int(module.out_channels if out else module.in_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features if out else module.in_features)
    return None


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".") or not root


def _cut_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if isinstance(out, tuple):
        # Every output: a block returning several streams (CoaT's parallel block) would
        # otherwise let DepGraph trace into it through all but the first.
        return tuple(_cut(inputs, o) for o in out)
    return _cut(inputs, out)


def _end_hook(_m: nn.Module, _args: object, out: Any) -> Any:
    return out + 0 if isinstance(out, torch.Tensor) else out


def _build_dg(
    module: nn.Module,
    example: torch.Tensor,
    pruners: dict[type, tp.pruner.BasePruningFunc],
    declared: list[tuple[nn.Parameter, int]],
    *,
    scoped: bool = False,
) -> tp.DependencyGraph:
    mine = {id(p) for p in module.parameters()}
    unwrapped = [(p, d) for p, d in declared if id(p) in mine]
    opaque = tuple(pruners)
    handles = [
        m.register_forward_hook(_cut_hook, with_kwargs=True)
        for m in module.modules()
        if type(m) in opaque
    ]
    if scoped:
        # torch-pruning marks a graph output only when no module produced it; a scope's output
        # often is a layer's (Linear → Dropout), so end it in an op of its own.
        handles.append(module.register_forward_hook(_end_hook))
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                module,
                example_inputs=example,
                customized_pruners=dict(pruners),
                unwrapped_parameters=unwrapped or None,
                verbose=False,
            )
    finally:
        for h in handles:
            h.remove()


def _custom_types(model: nn.Module) -> str:
    """Names of non-torch module classes in ``model`` (for error messages)."""
    names = sorted(
        {type(m).__name__ for m in model.modules() if not type(m).__module__.startswith("torch.")}
    )
    return ", ".join(names[:10]) or "none"


@dataclass(frozen=True)
class LeftAlone:
    """A layer stage 1 does not prune, and why (the preflight prints these): ``path`` and
    ``kind`` (its class name) name it; ``reason`` says what keeps it."""

    path: str
    kind: str
    reason: str


class PruningGraph:
    """Prunable groups of ``model`` traced on ``example`` (a real batch; one sample is used).

    Layers it cannot handle are left alone, each with its reason (``ignored``); raises
    ``UnsupportedModelError`` naming the layers left alone and the model's blocks when the
    model does not run on ``example`` or torch-pruning cannot trace it."""

    def __init__(
        self, model: nn.Module, example: torch.Tensor, *, ignored: Sequence[nn.Module] = ()
    ) -> None:
        self.id = next(_GRAPH_IDS)
        self.model = model
        self.example = example[:1]
        self.ignored_layers = list(ignored)
        self.names = {m: n for n, m in model.named_modules()}
        self.opaque_info = opaque_modules(model, self.example)
        self.opaque: dict[int, str] = {id(model.get_submodule(p)): p for p in self.opaque_info}
        inside = tuple(self.opaque_info)
        # Parameters inside an opaque module are never DepGraph's business.
        self.declared = [
            (p, d)
            for p, d in declared_parameters(model)
            if not any(_within(self._owner(model, p), o) for o in inside)
        ]
        self._declared_ids = {id(p) for p, _ in self.declared}
        self.fused = set(fused_gates(model))
        self.attention: dict[str, nn.Module] = {
            p: model.get_submodule(p)
            for p in self.opaque_info
            if attention.is_attention(model.get_submodule(p))
        }
        self._reasons: dict[str, str] = {}
        self._groups: list[PrunableGroup] | None = None
        # Conv/linear input shapes of the shape pass: the latency cost model times each layer
        # on the input it really gets.
        self.in_shapes: dict[str, tuple[int, ...]] = {}
        was_training = model.training
        model.eval()
        try:
            try:
                self.out_shapes, channels, scope_inputs, self.tokens = self._shape_pass()
            except Exception as exc:
                raise UnsupportedModelError(
                    f"{type(model).__name__} does not run on an input of shape "
                    f"{tuple(self.example.shape)} ({type(exc).__name__}: {str(exc)[:300]}); "
                    f"layers left alone: {self._opaque_summary()}; "
                    f"blocks in this model: {_custom_types(model)}"
                ) from exc
            pruner = _OpaquePruner(channels)
            types = {type(model.get_submodule(n)) for n in self.opaque.values()}
            pruners: dict[type, tp.pruner.BasePruningFunc] = dict.fromkeys(types, pruner)
            # Kept for ``StockPruner``, which builds torch-pruning's own graph on this model.
            self._opaque_pruners = pruners
            try:
                self.graphs = [
                    _Graph(_build_dg(model, self.example, pruners, self.declared), "", model)
                ]
                for scope, x in scope_inputs.items():
                    sub = model.get_submodule(scope)
                    self.graphs.append(
                        _Graph(
                            _build_dg(sub, x, pruners, self.declared, scoped=True),
                            scope + ".",
                            sub,
                        )
                    )
            except UnsupportedModelError:
                raise
            except Exception as exc:  # torch-pruning raises assorted errors on unknown graphs
                raise UnsupportedModelError(
                    f"dependency tracing of {type(model).__name__} failed in torch-pruning "
                    f"({type(exc).__name__}: {exc}); blocks in this model: {_custom_types(model)}"
                ) from exc
        finally:
            model.train(was_training)
        self._graph_of: dict[nn.Module, _Graph] = {}
        for g in self.graphs:
            for m in g.dg.module2node:
                if isinstance(m, nn.Module) and m in self.names:
                    self._graph_of.setdefault(m, g)
        # Scoped graphs own their modules: prefer them over the model graph's view.
        for g in self.graphs[1:]:
            for m in g.dg.module2node:
                if isinstance(m, nn.Module):
                    self._graph_of[m] = g

    @staticmethod
    def _owner(model: nn.Module, param: nn.Parameter) -> str:
        for name, p in model.named_parameters():
            if p is param:
                return name.rpartition(".")[0]
        return ""

    def _opaque_summary(self) -> str:
        items = [
            f"{type(self.model.get_submodule(p)).__name__} ({p or '<root>'})"
            for p in list(self.opaque_info)[:8]
        ]
        return ", ".join(items) or "none"

    @property
    def ignored(self) -> list[LeftAlone]:
        """Every conv/linear layer whose output channels no prunable group removes, and every
        module DepGraph sees as one node, each with the reason it is left alone (the first
        reason found for it), in model order."""
        groups = self.groups()
        pruned = {p.name for g in groups if g.unit == "channel" for p in g.producers}
        heads = {g.root_name for g in groups if g.unit == "head"}
        out: list[LeftAlone] = []
        for path, m in self.model.named_modules():
            if path in self.opaque_info and path not in heads:
                out.append(LeftAlone(path, type(m).__name__, self.opaque_info[path].reason))
            elif isinstance(m, nn.Conv2d | nn.Linear) and path not in pruned:
                if any(_within(path, o) for o in self.opaque_info) and path not in self._reasons:
                    continue  # inside a module already listed, and no group of its own
                if path not in self._reasons and any(_within(path, h) for h in heads):
                    reason = "inside an attention layer: pruned by whole heads, not channels"
                elif path not in self._reasons and m not in self._graph_of:
                    # Registered outside but called only from a module left alone (CoaT's
                    # shared ConvRelPosEnc runs inside its attention layers).
                    reason = "not traced: it runs only inside a module left alone"
                else:
                    reason = self._reasons.get(path, "no prunable group has its output channels")
                out.append(LeftAlone(path, type(m).__name__, reason))
        return out

    def _shape_pass(
        self,
    ) -> tuple[
        dict[str, tuple[int, ...]],
        dict[int, tuple[int, int]],
        dict[str, torch.Tensor],
        dict[str, int],
    ]:
        """One forward pass recording conv/linear output shapes, opaque nodes' channel
        counts, the inputs of opaque blocks' scopes, and attention token counts."""
        shapes: dict[str, tuple[int, ...]] = {}
        channels: dict[int, tuple[int, int]] = {}
        scope_inputs: dict[str, torch.Tensor] = {}
        tokens: dict[str, int] = {}
        handles = []

        def out_hook(name: str):  # type: ignore[no-untyped-def]
            def fn(_m: nn.Module, inputs: tuple[Any, ...], out: torch.Tensor) -> None:
                shapes[name] = tuple(out.shape)
                if inputs and isinstance(inputs[0], torch.Tensor):
                    self.in_shapes[name] = tuple(inputs[0].shape)

            return fn

        def in_hook(name: str):  # type: ignore[no-untyped-def]
            def fn(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
                if inputs and isinstance(inputs[0], torch.Tensor):
                    self.in_shapes[name] = tuple(inputs[0].shape)

            return fn

        def opaque_hook(name: str, channel_dim: int | None):  # type: ignore[no-untyped-def]
            def fn(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
                x = args[0] if args else next(iter(kwargs.values()), None)
                y = out[0] if isinstance(out, tuple) else out
                if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                    return
                if x.dim() == 0 or y.dim() == 0:
                    return
                dx = channel_dim if channel_dim is not None else (1 if x.dim() == 4 else -1)
                dy = channel_dim if channel_dim is not None else (1 if y.dim() == 4 else -1)
                channels[id(m)] = (int(x.shape[dx]), int(y.shape[dy]))
                if name in self.attention:
                    t = attention.self_attention_input(m, args, kwargs)
                    if t is not None:
                        tokens[name] = int(t.shape[1])

            return fn

        def scope_hook(name: str):  # type: ignore[no-untyped-def]
            def fn(_m: nn.Module, args: tuple[Any, ...]) -> None:
                scope_inputs[name] = args[0][:1].detach().clone()

            return fn

        try:
            for name, module in self.model.named_modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    handles.append(module.register_forward_hook(out_hook(name)))
                elif isinstance(module, _NORM_TYPES):
                    handles.append(module.register_forward_pre_hook(in_hook(name)))
                info = self.opaque_info.get(name)
                if info is None:
                    continue
                handles.append(
                    module.register_forward_hook(
                        opaque_hook(name, info.channel_dim), with_kwargs=True
                    )
                )
                for scope in info.scopes:
                    sub = module.get_submodule(scope)
                    path = f"{name}.{scope}"
                    handles.append(sub.register_forward_pre_hook(scope_hook(path)))
            with torch.no_grad():
                self.model(self.example)
        finally:
            for h in handles:
                h.remove()
        return shapes, channels, scope_inputs, tokens

    # ------------------------------------------------------------------ groups

    def _half(self, root: nn.Module) -> int | None:
        """Half the output width of a fused gate's layer (its hidden units), else None."""
        if self.names.get(root) not in self.fused:
            return None
        width = _width(root, True)
        return width // 2 if width else None

    def _excluded(self, graph: _Graph, group: tp.Group, units: int | None = None) -> bool:
        return self._why_excluded(graph, group, units) is not None

    def _why_excluded(self, graph: _Graph, group: tp.Group, units: int | None = None) -> str | None:
        """Why a group cannot be pruned, or None: it reaches an opaque module, an undeclared
        free parameter, the model's (or a scope's) output, a grouped convolution (channels
        would have to go per group), or a depthwise conv fed by a scope's input. ``units``:
        how many units the group removes when that is not its root's index count (a fused
        gate removes two root rows per unit)."""
        size = units if units is not None else len(group[0].idxs)
        for item in group.items:
            target = item.dep.target.module
            width = _width(target, graph.dg.is_out_channel_pruning_fn(item.dep.handler))
            if width is not None and width < size:
                return (
                    f"channel indices map onto the narrower {self.names.get(target, '?')} "
                    f"({width} < {size} channels: slicing or splitting)"
                )
            if id(target) in self.opaque:
                path = self.opaque[id(target)]
                return f"coupled to {path} ({self.opaque_info[path].reason})"
            if isinstance(target, nn.Parameter) and id(target) not in self._declared_ids:
                return f"coupled to a free-standing parameter of shape {tuple(target.shape)}"
            if isinstance(target, tp.ops._OutputOp):
                return (
                    "coupled to the model's output"
                    if not graph.prefix
                    else (f"crosses the output of {graph.prefix[:-1]}")
                )
            if isinstance(target, nn.Conv2d) and 1 < target.groups != target.in_channels:
                return (
                    f"coupled to grouped convolution {self.names.get(target, '?')} "
                    f"(groups={target.groups}): its channels cannot be removed one by one"
                )
            if (
                graph.prefix
                and isinstance(target, nn.Conv2d)
                and target.groups == target.in_channels > 1
                and not graph.dg.module2node[target].inputs
            ):
                return f"depthwise conv on the input of {graph.prefix[:-1]}"
        return None

    def _note(self, graph: _Graph, group: tp.Group, reason: str) -> None:
        # Only the layers whose *output* channels this group would remove: a layer's input
        # side belongs to its producer's group, whose reason may differ.
        for item in group.items:
            m = item.dep.target.module
            if (
                isinstance(m, nn.Conv2d | nn.Linear)
                and m in self.names
                and graph.dg.is_out_channel_pruning_fn(item.dep.handler)
            ):
                self._reasons.setdefault(self.names[m], reason)

    def groups(self) -> list[PrunableGroup]:
        """Every prunable group (the classifier's outputs, ignored layers, opaque nodes and
        undeclared free parameters excluded), with the MACs saved per root unit; then one
        head group per self-attention layer with more than one head."""
        out = []
        for m in self.ignored_layers:
            if m in self.names:
                self._reasons.setdefault(self.names[m], "classifier: its outputs are the logits")
        for graph in self.graphs:
            for g in graph.dg.get_all_groups(
                ignored_layers=self.ignored_layers, root_module_types=(nn.Conv2d, nn.Linear)
            ):
                why = self._why_excluded(graph, g, self._half(g[0].dep.target.module))
                if why is not None:
                    self._note(graph, g, why)
                    continue
                pg = self._channel_group(g)
                if pg is not None:
                    out.append(pg)
        for name, m in self.attention.items():
            heads, _, _ = attention.geometry(m)
            n = self.tokens.get(name)
            if n is None or heads < 2 or m in self.ignored_layers:
                continue
            cost = torch.full((heads,), attention.head_macs(m, n), dtype=torch.float64)
            out.append(PrunableGroup(name, heads, cost=cost, unit="head", tokens=n))
        return out

    def _channel_group(self, g: tp.Group) -> PrunableGroup | None:
        root = g[0].dep.target.module
        name = self.names[root]
        half = self._half(root)
        size = half if half is not None else len(g[0].idxs)
        pg = PrunableGroup(root_name=name, size=size, _group=g)
        cost = torch.zeros(size, dtype=torch.float64)
        dg = self._graph_of[root].dg
        for item in g.items:
            dep = item.dep
            module = dep.target.module
            if isinstance(module, _NORM_TYPES):
                nname = self.names.get(module)
                if nname is not None and nname in self.in_shapes:
                    pg.norms.append(Member(nname, module, list(item.idxs), list(item.root_idxs)))
                continue
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            mname = self.names.get(module)
            if mname is None or mname not in self.out_shapes:
                continue
            roots = list(item.root_idxs)
            if half is not None:
                roots = [r % half for r in roots]  # both rows of a hidden unit are that unit
            member = Member(mname, module, list(item.idxs), roots)
            is_out = dg.is_out_channel_pruning_fn(dep.handler)
            (pg.producers if is_out else pg.consumers).append(member)
            unit = self._unit_cost(module, mname, is_out)
            for r in member.root_idxs:
                if 0 <= r < size:
                    cost[r] += unit
        pg.cost = cost.clamp_min(1.0)
        return pg if pg.producers else None

    def _unit_cost(self, module: nn.Module, name: str, is_out: bool) -> float:
        shape = self.out_shapes[name]
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            spatial = shape[2] * shape[3]
            depthwise = module.groups == module.in_channels and module.groups > 1
            if depthwise:
                # Removing one channel of a depthwise conv removes its whole filter, once.
                return float(kh * kw * spatial) if is_out else 0.0
            other = module.in_channels if is_out else module.out_channels
            return float(other // module.groups * kh * kw * spatial)
        assert isinstance(module, nn.Linear)
        tokens = 1
        for d in shape[1:-1]:
            tokens *= d
        other = module.in_features if is_out else module.out_features
        return float(other * tokens)

    def tap_for(self, module: nn.Module) -> TapSpec:
        """Observe a producer after its norm layer and activation, where the graph shows them."""
        node = self._graph_of[module].dg.module2node[module]
        target, act = self.names[module], None
        nxt = node.outputs[0] if len(node.outputs) == 1 else None
        if nxt is not None and isinstance(nxt.module, _NORMS):
            target = self.names[nxt.module]
            nxt = nxt.outputs[0] if len(nxt.outputs) == 1 else None
        if nxt is not None:
            modules = {**_ACT_MODULES, **activations()}
            if type(nxt.module) in modules:
                act = modules[type(nxt.module)]
            else:
                fn = type(nxt.grad_fn).__name__ if nxt.grad_fn is not None else ""
                act = next((a for key, a in _ACT_BY_GRAD_FN.items() if fn.startswith(key)), None)
        channel_dim = 1 if isinstance(module, nn.Conv2d) else -1
        return TapSpec(module=target, activation=act, channel_dim=channel_dim)

    # ------------------------------------------------------------------ pruning

    def prune(self, group: PrunableGroup, root_idxs: Sequence[int]) -> dict[str, object]:
        """Remove ``root_idxs`` of the group's root; returns the plan entry that replays it."""
        entry: dict[str, object] = {
            "op": "prune",
            "root": group.root_name,
            "idxs": sorted(int(i) for i in root_idxs),
            "graph": self.id,
        }
        if group.unit == "head":
            entry["unit"] = "head"
        self.prune_entry(entry)
        return entry

    def prune_entry(self, entry: dict[str, Any]) -> None:
        """Apply one plan ``prune`` entry to this graph's model."""
        root_name = str(entry["root"])
        idxs = sorted(int(i) for i in entry["idxs"])
        if entry.get("unit") == "head":
            attention.prune_heads(self.model, root_name, idxs)
            return
        root = self.model.get_submodule(root_name)
        graph = self._graph_of.get(root)
        if graph is None:
            raise UnsupportedModelError(f"{root_name} is not in the dependency graph")
        pruner = graph.dg.get_pruner_of_module(root)
        units = len(idxs)
        half = self._half(root)
        if half is not None:
            idxs = idxs + [i + half for i in idxs]
        g = graph.dg.get_pruning_group(root, pruner.prune_out_channels, idxs)
        if self._excluded(graph, g, units if half is not None else None):
            raise UnsupportedModelError(
                f"channels of {root_name} are coupled to a layer that cannot be pruned"
            )
        if not graph.dg.check_pruning_group(g):
            raise UnsupportedModelError(f"pruning {len(idxs)} channels would empty {root_name}")
        g.prune(record_history=False)

    def verify(self, pruned: Sequence[str]) -> None:
        """Run the pruned model once; a failure becomes an ``UnsupportedModelError`` naming the
        layer types of the pruned roots, never a crash deep inside a later stage."""
        was_training = self.model.training
        try:
            with torch.no_grad():
                self.model.eval()
                self.model(self.example)
        except Exception as exc:
            kinds = sorted(
                {f"{type(self.model.get_submodule(p)).__name__} ({p})" for p in pruned[:5]}
            )
            raise UnsupportedModelError(
                f"pruning {', '.join(kinds)} broke the forward pass of "
                f"{type(self.model).__name__} ({type(exc).__name__}: {exc})"
            ) from exc
        finally:
            self.model.train(was_training)

    def stock_importance(self, name: str, group: PrunableGroup) -> torch.Tensor:
        """torch-pruning's stock importance ``name`` (``l1``: ``GroupMagnitudeImportance(p=1)``,
        ``taylor``: ``GroupTaylorImportance`` on the gradients the caller left on the model,
        ``random``: ``RandomImportance``) per root unit of a channel group; higher = keep."""
        if group.unit != "channel":
            raise ValueError(f"stock importances score channel groups, not {group.unit}s")
        try:
            imp = _STOCK[name]()
        except KeyError:
            raise ValueError(
                f"unknown stock importance {name!r}; valid: {', '.join(_STOCK)}"
            ) from None
        scores = imp(group._group)
        if scores is None:
            return torch.zeros(group.size)
        scores = scores.detach().float().cpu()
        if len(scores) == 2 * group.size:  # a fused gate: a unit's two rows together
            scores = scores[: group.size] + scores[group.size :]
        return scores

    @torch.no_grad()
    def zero_units(
        self, group: PrunableGroup, root_idxs: Sequence[int], *, whole: bool = True
    ) -> None:
        """Zero units ``root_idxs`` of a channel group in place, without removing them (soft
        filter pruning). In every layer whose *output* channels the group couples, the units'
        filter rows and biases are zeroed. With ``whole`` (the default) the units' outputs
        become exact zeros: a following norm's shift is zeroed too (BatchNorm's ``bias`` and
        ``running_mean``; a LayerNorm/GroupNorm's ``weight`` and ``bias``), and so are a
        declared layer scale's entries. Input-side (consumer) weights are left as they are:
        they multiply zeros.

        ``whole=False`` zeroes the filters only, as SFP does during training: a BatchNorm
        after them then outputs its shift β, and where β > 0 the ReLU passes gradient back
        through BN's scale γ, so the filters can regrow (with ``whole`` the ReLU sits at 0,
        its gradient is 0, and nothing regrows).

        After ``whole`` zeroing, removing the units (``prune``) leaves the model's outputs
        unchanged wherever the coupled channels are normalised by BatchNorm or not at all; a
        LayerNorm over the pruned dimension renormalises the remaining channels, so there
        removal only approximately preserves the outputs."""
        if group.unit != "channel":
            raise ValueError(f"zero_units zeroes channel groups, not {group.unit}s")
        chosen = {int(i) for i in root_idxs}
        root = self.model.get_submodule(group.root_name)
        half = self._half(root)
        if half is not None:
            chosen |= {i + half for i in chosen}
        dg = self._graph_of[root].dg
        dims = {id(p): d for p, d in self.declared}
        for item in group._group.items:  # type: ignore[attr-defined]
            if not dg.is_out_channel_pruning_fn(item.dep.handler):
                continue
            idx = [i for i, r in zip(item.idxs, item.root_idxs, strict=True) if r in chosen]
            if not idx:
                continue
            target = item.dep.target.module
            at = torch.tensor(sorted(idx), dtype=torch.long)
            if isinstance(target, nn.Parameter):
                if whole and id(target) in dims:
                    target.index_fill_(dims[id(target)], at.to(target.device), 0.0)
                continue
            if isinstance(target, nn.Conv2d | nn.Linear):
                names = ("weight", "bias")
            elif whole and isinstance(target, nn.modules.batchnorm._BatchNorm):
                names = ("bias", "running_mean")
            elif whole and isinstance(target, nn.LayerNorm | nn.GroupNorm):
                names = ("weight", "bias")
            else:
                continue
            for name in names:
                t = getattr(target, name, None)
                if isinstance(t, torch.Tensor):
                    t.index_fill_(0, at.to(t.device), 0.0)


def replay_prune(
    model: nn.Module, example: torch.Tensor, entries: Sequence[dict[str, object]]
) -> None:
    """Apply plan ``prune`` entries in order on a freshly built model, tracing a new graph
    whenever the entry's ``graph`` changes (as stage 1 did; entries without one share a
    graph)."""
    graph: PruningGraph | None = None
    current: object = None
    for entry in entries:
        gid = entry.get("graph")
        if graph is None or gid != current:
            graph = PruningGraph(model, example)
            current = gid
        graph.prune_entry(dict(entry))


# --------------------------------------------------------------------------- stock pruner


def _copy_with_grads(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that also carries its parameters' gradients (``deepcopy``
    drops them, and torch-pruning's Taylor importance reads them)."""
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        if p.grad is not None:
            q.grad = p.grad.detach().clone()
    return twin


class StockPruner:
    """torch-pruning's own pruner (``tp.pruner.BasePruner``) on ``graph.model``: what a
    torch-pruning user runs, with the library's exclusions so that it prunes only what stage
    1 could prune.

    ``importance`` names a stock importance (``l1``: ``GroupMagnitudeImportance(p=1)``,
    ``taylor``: ``GroupTaylorImportance`` on the gradients the caller left on the model,
    ``random``: ``RandomImportance``). ``global_pruning`` ranks the channels of every group
    together (torch-pruning's global pruning); otherwise every group loses the same fraction
    ``pruning_ratio`` of its channels (uniform, one ratio per layer). ``iterative_steps`` and
    torch-pruning's linear ratio scheduler set the ratio each ``step`` prunes to;
    ``max_pruning_ratio`` and ``round_to`` are passed on as they are (torch-pruning checks
    the cap before a step, so a single step is not bounded by it).

    Left to torch-pruning as ``ignored_layers``: the graph's ignored layers (the classifier),
    opaque modules (attention, channel shuffles) and every conv/linear the graph leaves
    alone (``PruningGraph.ignored``). Attention heads are not pruned: torch-pruning's head
    pruning needs head counts declared per layer, and the comparison is about channels.
    Opaque modules get the graph's own refusing handlers and are cut out of the trace as in
    ``PruningGraph``."""

    def __init__(
        self,
        graph: PruningGraph,
        importance: str,
        *,
        global_pruning: bool,
        pruning_ratio: float,
        iterative_steps: int = 1,
        max_pruning_ratio: float = 1.0,
        round_to: int | None = None,
    ) -> None:
        if importance not in _STOCK:
            raise ValueError(f"unknown stock importance {importance!r}; valid: {', '.join(_STOCK)}")
        if not 0.0 <= pruning_ratio < 1.0:
            raise ValueError(f"pruning_ratio must be in [0, 1), got {pruning_ratio}")
        model = graph.model
        self.model = model
        self.example = graph.example
        self.iterative_steps = iterative_steps
        self.steps_done = 0
        left = {a.path for a in graph.ignored if a.path}
        ignored: list[nn.Module] = [*graph.ignored_layers]
        ignored += [model.get_submodule(p) for p in sorted(left)]
        self.names = {m: n for n, m in model.named_modules()}
        pruners = graph._opaque_pruners
        handles = [
            m.register_forward_hook(_cut_hook, with_kwargs=True)
            for m in model.modules()
            if type(m) in tuple(pruners)
        ]
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                self._pruner = tp.pruner.BasePruner(
                    model,
                    graph.example,
                    importance=_STOCK[importance](),
                    global_pruning=global_pruning,
                    pruning_ratio=pruning_ratio,
                    iterative_steps=iterative_steps,
                    max_pruning_ratio=max_pruning_ratio,
                    ignored_layers=ignored,
                    round_to=round_to,
                    customized_pruners=dict(pruners),
                    unwrapped_parameters=graph.declared or None,
                    root_module_types=[nn.Conv2d, nn.Linear],
                )
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)

    @property
    def done(self) -> bool:
        return self.steps_done >= self.iterative_steps

    def step(self) -> list[dict[str, object]]:
        """Prune the schedule's next step in place; returns one plan ``prune`` entry per group
        pruned (replayable with ``replay_prune``; all entries of one step share a graph id).
        Raises ``UnsupportedModelError`` when the pruned model no longer runs."""
        if self.done:
            return []
        gid = next(_GRAPH_IDS)
        entries: list[dict[str, object]] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for group in self._pruner.step(interactive=True) or ():
                root = group[0].dep.target.module
                entries.append(
                    {
                        "op": "prune",
                        "root": self.names[root],
                        "idxs": sorted(int(i) for i in group[0].idxs),
                        "graph": gid,
                    }
                )
                group.prune()
            self.steps_done += 1
            with torch.no_grad():
                self.model(self.example)
        except UnsupportedModelError:
            raise
        except Exception as exc:
            raise UnsupportedModelError(
                f"torch-pruning's step broke the forward pass of {type(self.model).__name__} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        finally:
            self.model.train(was_training)
        return entries


@dataclass(frozen=True)
class StockCut:
    """What ``prune_to_macs`` found: the pruned copy, torch-pruning's ``pruning_ratio`` that
    produced it, its MACs, the plan entries that replay it, and the trials it took."""

    model: nn.Module
    pruning_ratio: float
    macs: int
    entries: list[dict[str, object]]
    trials: int


def prune_to_macs(
    model: nn.Module,
    example: torch.Tensor,
    target_macs: float,
    importance: str,
    *,
    global_pruning: bool,
    ignored: Sequence[str] = (),
    iterative_steps: int = 1,
    max_pruning_ratio: float = 1.0,
    round_to: int | None = None,
    tolerance: float = 0.002,
    max_trials: int = 24,
    max_ratio: float = 0.95,
    seed: int = 0,
) -> StockCut:
    """Prune a copy of ``model`` with ``StockPruner`` so that its MACs land on
    ``target_macs``: bisection on torch-pruning's ``pruning_ratio`` in [0, ``max_ratio``].

    Each trial prunes a fresh copy (gradients copied too, for Taylor) through all
    ``iterative_steps`` of torch-pruning's schedule back to back, with no training between
    them — exact for one-shot pruning, an estimate for an iterative schedule whose training
    changes the importances between steps. ``random`` importance is drawn from a generator
    seeded with ``seed`` in every trial, so that the ratio, not the draw, moves the MACs.
    ``ignored`` are module paths (the classifier) left to torch-pruning as ignored layers.

    Stops when the MACs are within ``tolerance`` × the model's MACs of the target (0.002:
    0.2 points of MACs ratio) or after ``max_trials``; returns the trial closest to the
    target (on a tie, the one with fewer MACs). ``model`` is not modified."""
    base_macs, _ = count_macs_params(model, example)
    lo, hi = 0.0, max_ratio
    best: StockCut | None = None
    trials = 0

    def trial(ratio: float) -> StockCut:
        twin = _copy_with_grads(model)
        graph = PruningGraph(twin, example, ignored=[twin.get_submodule(p) for p in ignored])
        pruner = StockPruner(
            graph,
            importance,
            global_pruning=global_pruning,
            pruning_ratio=ratio,
            iterative_steps=iterative_steps,
            max_pruning_ratio=max_pruning_ratio,
            round_to=round_to,
        )
        entries: list[dict[str, object]] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            while not pruner.done:
                entries += pruner.step()
        twin.zero_grad(set_to_none=True)
        macs, _ = count_macs_params(twin, example)
        return StockCut(twin, ratio, macs, entries, 0)

    while trials < max_trials:
        ratio = (lo + hi) / 2
        cut = trial(ratio)
        trials += 1
        gap = abs(cut.macs - target_macs)
        if best is None or (gap, cut.macs) < (abs(best.macs - target_macs), best.macs):
            best = cut
        if gap <= tolerance * base_macs:
            break
        if cut.macs > target_macs:
            lo = ratio
        else:
            hi = ratio
    assert best is not None
    return StockCut(best.model, best.pruning_ratio, best.macs, best.entries, trials)

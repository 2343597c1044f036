"""The one module that imports torch-pruning (DepGraph).

It turns a model into ``PrunableGroup``s — coupled channels that must be removed together,
or the heads of one attention layer — with, for each root unit, the MACs its removal saves
and where the producers' activations are observed; it applies removals by root indices and
replays them from a plan; it counts MACs; and it exposes torch-pruning's stock importances
(L1, Taylor, random) for baselines.

Architecture handling (``flow_compress.families``, ``flow_compress.attention``):

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
  (``flow_compress.attention.prune_heads``).
- Groups that reach the model's output, an ignored layer (the classifier) or a free-standing
  parameter not declared by ``families.declared_parameters`` are left out.

Plan entries are ``{"op": "prune", "root": path, "idxs": [...], "graph": n}`` (plus
``"unit": "head"`` for heads). ``graph`` identifies the DepGraph the removal was computed on;
replay builds a new graph whenever it changes, exactly as stage 1 did.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.utils import op_counter

from flow_compress import attention
from flow_compress.calibration import Activation, TapSpec
from flow_compress.errors import UnsupportedModelError
from flow_compress.families import check_supported, declared_parameters, opaque_block

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
_ACT_BY_GRAD_FN: dict[str, Activation] = {
    "Relu": torch.relu,
    "Hardtanh": lambda t: t.clamp(0.0, 6.0),  # ReLU6 shows up as hardtanh
    "Silu": nn.functional.silu,
    "Hardswish": nn.functional.hardswish,
    "Gelu": nn.functional.gelu,
    "Sigmoid": torch.sigmoid,
    "Hardsigmoid": nn.functional.hardsigmoid,
}
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

Unit = Literal["channel", "head"]


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
    cost: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    unit: Unit = "channel"
    tokens: int = 0
    _group: object = None


# --------------------------------------------------------------------------- MACs


def _attention_counter(module: nn.Module, inputs: tuple[Any, ...], _out: object) -> None:
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
    input: DepGraph traces autograd nodes, and without the cut it would walk into the
    module's internals (the shuffle's reshapes, the heads' reshapes) as if they were free
    operations of the surrounding graph."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        return None, None


def _cut_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    x = args[0] if args else next(iter(kwargs.values()))
    if isinstance(out, tuple):
        return (_Cut.apply(x, out[0].detach()), *out[1:])
    return _Cut.apply(x, out.detach())


def _build_dg(
    module: nn.Module,
    example: torch.Tensor,
    pruners: dict[type, tp.pruner.BasePruningFunc],
    declared: list[tuple[nn.Parameter, int]],
) -> tp.DependencyGraph:
    mine = {id(p) for p in module.parameters()}
    unwrapped = [(p, d) for p, d in declared if id(p) in mine]
    opaque = tuple(pruners)
    handles = [
        m.register_forward_hook(_cut_hook, with_kwargs=True)
        for m in module.modules()
        if type(m) in opaque
    ]
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


class PruningGraph:
    """Prunable groups of ``model`` traced on ``example`` (a real batch; one sample is used).

    Raises ``UnsupportedModelError`` naming the layer type when the model holds a layer that
    stage 1 cannot handle, or when torch-pruning cannot trace it."""

    def __init__(
        self, model: nn.Module, example: torch.Tensor, *, ignored: Sequence[nn.Module] = ()
    ) -> None:
        check_supported(model)
        self.id = next(_GRAPH_IDS)
        self.model = model
        self.example = example[:1]
        self.ignored = list(ignored)
        self.names = {m: n for n, m in model.named_modules()}
        self.declared = declared_parameters(model)
        self._declared_ids = {id(p) for p, _ in self.declared}
        self.opaque: dict[int, str] = {}
        self.attention: dict[str, nn.Module] = {}
        for name, m in model.named_modules():
            if isinstance(m, attention.attention_types()):
                self.opaque[id(m)] = name
                if attention.is_attention(m):
                    self.attention[name] = m
            elif opaque_block(m) is not None:
                self.opaque[id(m)] = name
        was_training = model.training
        model.eval()
        try:
            self.out_shapes, channels, scope_inputs, self.tokens = self._shape_pass()
            pruner = _OpaquePruner(channels)
            types = {type(model.get_submodule(n)) for n in self.opaque.values()}
            pruners: dict[type, tp.pruner.BasePruningFunc] = dict.fromkeys(types, pruner)
            try:
                self.graphs = [
                    _Graph(_build_dg(model, self.example, pruners, self.declared), "", model)
                ]
                for scope, x in scope_inputs.items():
                    sub = model.get_submodule(scope)
                    self.graphs.append(
                        _Graph(_build_dg(sub, x, pruners, self.declared), scope + ".", sub)
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
            def fn(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
                shapes[name] = tuple(out.shape)

            return fn

        def opaque_hook(name: str, channel_dim: int):  # type: ignore[no-untyped-def]
            def fn(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
                x = args[0] if args else next(iter(kwargs.values()))
                y = out[0] if isinstance(out, tuple) else out
                channels[id(m)] = (int(x.shape[channel_dim]), int(y.shape[channel_dim]))
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
                if id(module) not in self.opaque:
                    continue
                block = opaque_block(module)
                dim = block.channel_dim if block is not None else -1
                handles.append(
                    module.register_forward_hook(opaque_hook(name, dim), with_kwargs=True)
                )
                if block is not None:
                    for scope in block.scopes(module):
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

    def _excluded(self, graph: _Graph, group: tp.Group) -> bool:
        for item in group.items:
            target = item.dep.target.module
            if id(target) in self.opaque:
                return True
            if isinstance(target, nn.Parameter) and id(target) not in self._declared_ids:
                return True
            if isinstance(target, tp.ops._OutputOp):
                return True
        return False

    def groups(self) -> list[PrunableGroup]:
        """Every prunable group (the classifier's outputs, ignored layers, opaque nodes and
        undeclared free parameters excluded), with the MACs saved per root unit; then one
        head group per self-attention layer with more than one head."""
        out = []
        for graph in self.graphs:
            for g in graph.dg.get_all_groups(
                ignored_layers=self.ignored, root_module_types=(nn.Conv2d, nn.Linear)
            ):
                if self._excluded(graph, g):
                    continue
                pg = self._channel_group(g)
                if pg is not None:
                    out.append(pg)
        for name, m in self.attention.items():
            heads, _, _ = attention.geometry(m)
            n = self.tokens.get(name)
            if n is None or heads < 2 or m in self.ignored:
                continue
            cost = torch.full((heads,), attention.head_macs(m, n), dtype=torch.float64)
            out.append(PrunableGroup(name, heads, cost=cost, unit="head", tokens=n))
        return out

    def _channel_group(self, g: tp.Group) -> PrunableGroup | None:
        root = g[0].dep.target.module
        name = self.names[root]
        size = len(g[0].idxs)
        pg = PrunableGroup(root_name=name, size=size, _group=g)
        cost = torch.zeros(size, dtype=torch.float64)
        dg = self._graph_of[root].dg
        for item in g.items:
            dep = item.dep
            module = dep.target.module
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            mname = self.names.get(module)
            if mname is None or mname not in self.out_shapes:
                continue
            member = Member(mname, module, list(item.idxs), list(item.root_idxs))
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
            if type(nxt.module) in _ACT_MODULES:
                act = _ACT_MODULES[type(nxt.module)]
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
        g = graph.dg.get_pruning_group(root, pruner.prune_out_channels, idxs)
        if self._excluded(graph, g):
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

    def importance(self, criterion: str, group: PrunableGroup) -> torch.Tensor:
        """torch-pruning's stock importance per root unit (higher = keep); for heads, the same
        criteria over the weights each head owns (Q/K/V rows, output-projection columns)."""
        if criterion not in ("l1", "taylor", "random"):
            raise ValueError(f"unknown stock criterion {criterion!r}")
        if group.unit == "head":
            return _head_importance(criterion, self.model.get_submodule(group.root_name))
        imp: tp.importance.Importance
        if criterion == "l1":
            imp = tp.importance.GroupMagnitudeImportance(p=1)
        elif criterion == "taylor":
            imp = tp.importance.GroupTaylorImportance()
        else:
            imp = tp.importance.RandomImportance()
        scores = imp(group._group)
        if scores is None:
            return torch.zeros(group.size)
        return scores.detach().float().cpu()


def _head_importance(criterion: str, module: nn.Module) -> torch.Tensor:
    heads, _, _ = attention.geometry(module)
    if criterion == "random":
        return torch.rand(heads)
    weights = attention.head_weight_slices(module)
    if criterion == "l1":
        return sum(w.detach().float().abs().sum(dim=1) for w in weights).cpu()  # type: ignore[union-attr]
    grads = attention.head_grad_slices(module)
    total = torch.zeros(heads)
    for w, gr in zip(weights, grads, strict=True):
        if gr is not None:
            total += (w.detach().float() * gr.float()).abs().sum(dim=1).cpu()
    return total


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

"""The one module that imports torch-pruning (DepGraph).

It turns a model into ``PrunableGroup``s — coupled channels that must be removed together —
with, for each root channel, the MACs its removal saves and where the producers' activations
are observed; it applies removals by root indices and replays them from a plan; it counts
MACs; and it exposes torch-pruning's stock importances (L1, Taylor, random) for baselines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from flow_compress.calibration import Activation, TapSpec
from flow_compress.errors import UnsupportedModelError

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
_ACT_BY_GRAD_FN: dict[str, Activation] = {
    "Relu": torch.relu,
    "Hardtanh": lambda t: t.clamp(0.0, 6.0),  # ReLU6 shows up as hardtanh
    "Silu": nn.functional.silu,
    "Hardswish": nn.functional.hardswish,
    "Gelu": nn.functional.gelu,
    "Sigmoid": torch.sigmoid,
}
_ACT_MODULES: dict[type[nn.Module], Activation] = {
    nn.ReLU: torch.relu,
    nn.ReLU6: lambda t: t.clamp(0.0, 6.0),
    nn.SiLU: nn.functional.silu,
    nn.Hardswish: nn.functional.hardswish,
    nn.GELU: nn.functional.gelu,
}


@dataclass
class Member:
    """One conv/linear of a group: ``idxs`` in its own numbering, ``root_idxs`` in the root's."""

    name: str
    module: nn.Module
    idxs: list[int]
    root_idxs: list[int]


@dataclass
class PrunableGroup:
    root_name: str
    size: int
    producers: list[Member] = field(default_factory=list)
    consumers: list[Member] = field(default_factory=list)
    cost: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    _group: object = None


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """MACs (multiply-accumulates) and parameters for one input of ``example``'s shape."""
    was_training = model.training
    try:
        macs, params = tp.utils.count_ops_and_params(model, example[:1])
    finally:
        model.train(was_training)
    return int(macs), int(params)


class PruningGraph:
    """DepGraph of ``model`` traced on ``example`` (a real batch; one sample is used)."""

    def __init__(
        self, model: nn.Module, example: torch.Tensor, *, ignored: Sequence[nn.Module] = ()
    ) -> None:
        self.model = model
        self.example = example[:1]
        self.ignored = list(ignored)
        self.names = {m: n for n, m in model.named_modules()}
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                self.dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=self.example, verbose=False
                )
        except Exception as exc:  # torch-pruning raises assorted errors on unknown graphs
            raise UnsupportedModelError(
                f"dependency tracing failed ({type(exc).__name__}: {exc}); this architecture "
                "cannot be pruned structurally yet"
            ) from exc
        finally:
            model.train(was_training)
        self.out_shapes = self._output_shapes()

    def _output_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        handles = []
        for name, module in self.model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):

                def hook(_m: nn.Module, _i: object, out: torch.Tensor, name: str = name) -> None:
                    shapes[name] = tuple(out.shape)

                handles.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                self.model.eval()
                self.model(self.example)
        finally:
            for h in handles:
                h.remove()
        return shapes

    # ------------------------------------------------------------------ groups

    def groups(self) -> list[PrunableGroup]:
        """Every prunable coupled-channel group (the classifier's outputs and ignored layers
        excluded), with the MACs saved per root channel."""
        out = []
        for g in self.dg.get_all_groups(
            ignored_layers=self.ignored, root_module_types=(nn.Conv2d, nn.Linear)
        ):
            root = g[0].dep.target.module
            name = self.names[root]
            size = len(g[0].idxs)
            pg = PrunableGroup(root_name=name, size=size, _group=g)
            cost = torch.zeros(size, dtype=torch.float64)
            for item in g.items:
                dep = item.dep
                module = dep.target.module
                if not isinstance(module, (nn.Conv2d, nn.Linear)):
                    continue
                mname = self.names.get(module)
                if mname is None or mname not in self.out_shapes:
                    continue
                member = Member(mname, module, list(item.idxs), list(item.root_idxs))
                is_out = self.dg.is_out_channel_pruning_fn(dep.handler)
                (pg.producers if is_out else pg.consumers).append(member)
                unit = self._unit_cost(module, mname, is_out)
                for r in member.root_idxs:
                    if 0 <= r < size:
                        cost[r] += unit
            pg.cost = cost.clamp_min(1.0)
            if pg.producers:
                out.append(pg)
        return out

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
        node = self.dg.module2node[module]
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
        root = self.model.get_submodule(group.root_name)
        idxs = sorted(int(i) for i in root_idxs)
        pruner = self.dg.get_pruner_of_module(root)
        g = self.dg.get_pruning_group(root, pruner.prune_out_channels, idxs)
        if not self.dg.check_pruning_group(g):
            raise UnsupportedModelError(
                f"pruning {len(idxs)} channels would empty {group.root_name}"
            )
        g.prune(record_history=False)
        return {"op": "prune", "root": group.root_name, "idxs": idxs}

    def importance(self, criterion: str, group: PrunableGroup) -> torch.Tensor:
        """torch-pruning's stock importance per root channel (higher = keep)."""
        imp: tp.importance.Importance
        if criterion == "l1":
            imp = tp.importance.GroupMagnitudeImportance(p=1)
        elif criterion == "taylor":
            imp = tp.importance.GroupTaylorImportance()
        elif criterion == "random":
            imp = tp.importance.RandomImportance()
        else:
            raise ValueError(f"unknown stock criterion {criterion!r}")
        scores = imp(group._group)
        if scores is None:
            return torch.zeros(group.size)
        return scores.detach().float().cpu()


def replay_prune(
    model: nn.Module, example: torch.Tensor, entries: Sequence[dict[str, object]]
) -> None:
    """Apply plan ``prune`` entries in order on a freshly built model (one graph per run of
    consecutive entries: graph surgery keeps the DepGraph valid until modules are replaced)."""
    if not entries:
        return
    graph = PruningGraph(model, example)
    for entry in entries:
        root = model.get_submodule(str(entry["root"]))
        pruner = graph.dg.get_pruner_of_module(root)
        idxs = [int(i) for i in entry["idxs"]]  # type: ignore[attr-defined]
        graph.dg.get_pruning_group(root, pruner.prune_out_channels, idxs).prune(
            record_history=False
        )

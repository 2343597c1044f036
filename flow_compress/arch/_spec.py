"""What a family declares, and the registries of families and architectures (torch-free).

The specs hold plain data and callables; every callable imports torch, torchvision or timm
when it runs, never at import time, so the HTTP layer can list and validate architecture
names without torch. The torch-side machinery that reads the specs lives beside them:
``arch.blocks`` (stage-2 candidates), ``arch.attention`` (heads) and ``graph`` (DepGraph).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from flow_compress._registry import Registry
from flow_compress.errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

Source = Literal["torchvision", "timm", "custom"]
Kind = Literal["identity", "projection"]
Activation = Callable[["torch.Tensor"], "torch.Tensor"]


AUTO_FAMILY = "auto"
"""The family of timm and torchvision models no hand-written family registers: its rules are
the structural ones (``arch.blocks``, ``arch.attention``, ``graph``); it is not registered."""


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture. ``family`` names the registered ``Family`` that builds it
    (``flow_compress.arch.models.build_model`` dispatches on it); ``builder`` is the constructor's
    name in ``source``'s own registry (``torchvision.models.get_model`` or
    ``timm.create_model``), which may differ from ``name`` (``timm_resnet50`` → ``resnet50``).

    A ``custom`` architecture (an operator's own model code) is built by ``factory``, called
    as ``factory(num_classes=, in_chans=, input_size=)``; it imports torch when it runs."""

    name: str
    family: str
    source: Source
    builder: str
    default_input_size: int = 224
    factory: Callable[..., nn.Module] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if (self.source == "custom") != (self.factory is not None):
            raise ValueError(f"{self.name}: a factory is given exactly for source 'custom'")


@dataclass(frozen=True)
class Candidate:
    """A stage-2 candidate: ``name`` is replaced by the ``kind`` replacement, and every path in
    ``span`` (siblings that follow it) by an identity with it. ``branch`` is the submodule
    whose output is the residual branch F(x) (None: F(x) is the block's output minus x)."""

    name: str
    kind: Kind
    branch: str | None
    span: tuple[str, ...] = ()

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.name, *self.span)


@dataclass(frozen=True)
class BlockRule:
    """Stage-2 candidates of one block type.

    Either ``match(module) -> (kind, branch) | None`` looks at one module (and
    ``projection(module)`` builds its shortcut when ``kind`` is ``projection``), or
    ``scan(path, module) -> candidates`` finds candidates inside a module (a child, or a run
    of sibling layers whose extra members are the candidate's ``span``).
    """

    name: str
    match: Callable[[nn.Module], tuple[Kind, str | None] | None] | None = None
    projection: Callable[[nn.Module], nn.Module] | None = None
    scan: Callable[[str, nn.Module], list[Candidate]] | None = None

    def __post_init__(self) -> None:
        if (self.match is None) == (self.scan is None):
            raise ValueError(f"block rule {self.name!r} needs exactly one of match and scan")


@dataclass(frozen=True)
class OpaqueBlock:
    """A block DepGraph treats as one node (torch-pruning cannot trace through it); only the
    channels internal to its ``scopes`` (child paths) become prunable groups."""

    name: str
    match: Callable[[nn.Module], bool]
    scopes: Callable[[nn.Module], tuple[str, ...]]
    channel_dim: int = 1


@dataclass(frozen=True)
class LayerScale:
    """A free-standing parameter that follows a channel (a layer-scale vector): pruned with
    the channel along ``dim``. Groups touching any other free parameter are left out."""

    name: str
    match: Callable[[nn.Module], bool]
    parameter: Callable[[nn.Module], nn.Parameter]
    dim: int = 0


@dataclass(frozen=True)
class AttentionLayout:
    """A self-attention layer type whose heads are prunable units.

    Its packed Q/K/V projection has rows ``[Q | K | V]``, grouped by head inside each part
    (row ``s·A + h·d + i`` for part ``s``, head ``h``, channel ``i``; ``A = H·d``). The
    callables read one layer of this layout:

    - ``types()``: the classes DepGraph treats as opaque nodes and whose MACs are counted
      here (``attention_macs``), even for instances whose heads cannot be pruned;
    - ``matches(m)``: whether an instance of ``types()`` is a layer of this layout (handled as
      one node; a subclass that may change the forward pass can be refused here);
    - ``prunable(m)``: whether this instance's heads can be removed;
    - ``geometry(m)``: ``(num_heads, head_dim, embed_dim)``;
    - ``packed(m)``: the Q/K/V weight (3A×D) and bias (or None);
    - ``out_proj(m)``: the output projection (``nn.Linear``, A inputs);
    - ``tokens(m, args, kwargs)``: the batch-first B×N×D input of a self-attention call, or
      None (cross-attention, masks);
    - ``qk_norm(m, q, k)``: per-head normalisation applied to Q and K before QKᵀ, if any;
    - ``prune(model, path, m, packed_rows, rows, keep)``: keep Q/K/V rows ``packed_rows``,
      output-projection columns ``rows`` and heads ``keep``; returns the (possibly new)
      layer now at ``path``.
    """

    name: str
    types: Callable[[], tuple[type[nn.Module], ...]]
    matches: Callable[[nn.Module], bool]
    prunable: Callable[[nn.Module], bool]
    geometry: Callable[[nn.Module], tuple[int, int, int]]
    packed: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None]]
    out_proj: Callable[[nn.Module], nn.Linear]
    tokens: Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], torch.Tensor | None]
    prune: Callable[[nn.Module, str, nn.Module, torch.Tensor, torch.Tensor, list[int]], nn.Module]
    qk_norm: (
        Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
    ) = None


@dataclass(frozen=True)
class Family:
    """Everything the library knows about one architecture family, declared in one module
    (``flow_compress/arch/<family>.py``) and registered with ``register_family``.

    - ``architectures``: the registered names it builds (their ``family`` is this one);
    - ``input_size_arg``: per source, the builder keyword that receives the input size
      (ViTs size their position embeddings from it); other families get none;
    - ``block_rules``: stage-2 candidates; ``opaque_blocks``, ``layer_scales``, ``attention``
      and ``activations``: what the structural pruner must know (``flow_compress.graph``);
    - ``small``: the smallest registered variant, which the tests compress end to end;
      ``paper``: the variant the IDAP++ paper reports, if any (built and cut once in a test at
      64 px; compressed at 224 px by bench/architectures);
    - ``stage2``: whether stage 2 finds candidates after stage 1 — ``always``; ``unpruned``
      (only where stage 1 left equal widths, e.g. VGG's convs); ``never`` (DenseNet).
    """

    name: str
    architectures: tuple[ArchSpec, ...]
    small: str
    paper: str | None = None
    input_size_arg: Mapping[str, str] = field(default_factory=dict)
    block_rules: tuple[BlockRule, ...] = ()
    opaque_blocks: tuple[OpaqueBlock, ...] = ()
    layer_scales: tuple[LayerScale, ...] = ()
    attention: tuple[AttentionLayout, ...] = ()
    activations: Callable[[], Mapping[type[nn.Module], Activation]] | None = None
    stage2: Literal["always", "unpruned", "never"] = "always"

    def __post_init__(self) -> None:
        names = {a.name for a in self.architectures}
        for spec in self.architectures:
            if spec.family != self.name:
                raise ValueError(
                    f"{spec.name} belongs to family {spec.family!r}, not {self.name!r}"
                )
        for variant in (self.small, self.paper):
            if variant is not None and variant not in names:
                raise ValueError(f"family {self.name!r} does not register {variant!r}")


def torchvision_models(family: str, *names: str) -> tuple[ArchSpec, ...]:
    """``ArchSpec``s of torchvision models registered under their torchvision names."""
    return tuple(ArchSpec(n, family, "torchvision", n) for n in names)


def timm_models(family: str, **names: str) -> tuple[ArchSpec, ...]:
    """``ArchSpec``s of timm models: ``registered_name=timm_name``."""
    return tuple(ArchSpec(n, family, "timm", timm_name) for n, timm_name in names.items())


def custom_models(
    family: str, default_input_size: int = 224, **factories: Callable[..., nn.Module]
) -> tuple[ArchSpec, ...]:
    """``ArchSpec``s of an operator's own models: ``name=factory`` (see ``ArchSpec``)."""
    return tuple(
        ArchSpec(n, family, "custom", n, default_input_size, factory=f)
        for n, f in factories.items()
    )


_FAMILIES: Registry[Family] = Registry("architecture family", UnsupportedModelError)
_ARCHITECTURES: Registry[ArchSpec] = Registry("architecture", UnsupportedModelError)


def register_family(family: Family) -> Family:
    """Register a family and every architecture it declares; a duplicate family or
    architecture name raises ``ValueError`` (nothing is registered then)."""
    if family.name in _FAMILIES:
        raise ValueError(f"architecture family {family.name!r} is already registered")
    taken = [a.name for a in family.architectures if a.name in _ARCHITECTURES]
    if taken:
        raise ValueError(f"architecture {taken[0]!r} is already registered")
    _FAMILIES.register(family)
    for spec in family.architectures:
        _ARCHITECTURES.register(spec)
    return family


def register_architecture(spec: ArchSpec) -> ArchSpec:
    """Register one more variant of an already registered family."""
    get_family(spec.family)
    return _ARCHITECTURES.register(spec)


def unregister_family(name: str) -> Family:
    """Remove a family and its architectures (plug-ins loaded for a while, tests)."""
    family = _FAMILIES.unregister(name)
    for spec in list(_ARCHITECTURES):
        if spec.family == name:
            _ARCHITECTURES.unregister(spec.name)
    return family


def _load_plugins() -> None:
    # Entry-point families join before the first lookup (``arch.plugins``; once per process).
    from flow_compress.arch import plugins

    plugins.load_plugins()


def get_family(name: str) -> Family:
    _load_plugins()
    return _FAMILIES.get(name)


def families() -> Iterator[Family]:
    """Registered families, in registration order."""
    _load_plugins()
    return iter(_FAMILIES)


def get_architecture(name: str) -> ArchSpec:
    """The registered architecture ``name``; an unknown one raises ``UnsupportedModelError``
    listing the registered names. (``flow_compress.arch.models.resolve_model`` also resolves
    timm, torchvision and ``hf-hub:`` names.)"""
    _load_plugins()
    return _ARCHITECTURES.get(name)


def find_registered(source: str, builder: str) -> ArchSpec | None:
    """The registered architecture built by ``builder`` from ``source``, if any (so
    ``torchvision:resnet18`` keeps the ``resnet`` family's rules)."""
    _load_plugins()
    return next((a for a in _ARCHITECTURES if a.source == source and a.builder == builder), None)


def list_architectures() -> list[str]:
    _load_plugins()
    return _ARCHITECTURES.names()


def block_rules() -> Iterator[BlockRule]:
    """Every family's block rules (rules match by module type, so a rule never fires on
    another family's model)."""
    for family in families():
        yield from family.block_rules


def opaque_blocks() -> Iterator[OpaqueBlock]:
    for family in families():
        yield from family.opaque_blocks


def layer_scales() -> Iterator[LayerScale]:
    for family in families():
        yield from family.layer_scales


def attention_layouts() -> Iterator[AttentionLayout]:
    for family in families():
        yield from family.attention


def activations() -> dict[type[nn.Module], Activation]:
    """Activation modules the families add to torch's standard ones (``graph`` applies the
    one that follows a producer when it observes its output)."""
    out: dict[type[nn.Module], Activation] = {}
    for family in families():
        if family.activations is not None:
            out.update(family.activations())
    return out

"""Family rules from structure: what stage 1 and stage 2 need, read off module types and
traced graphs of modules no family rule claimed (docs/algorithm.md, "Models without rules").

The families' hand-written rules come first and stay the special cases; this module handles
everything they leave:

- **residual blocks** (``residual_form``): a module whose own ``forward``, traced with
  ``torch.fx`` with every child kept as a leaf (so only the module's own code is read, never
  its children's), returns ``x + F(x)`` — its input plus something computed from it, possibly
  through identity-like children (``nn.Identity``, dropout, drop-path, stochastic depth) on
  the skip, through further residual adds (``x + A(x) + M(x + A(x))`` is ``x + F(x)``), and
  followed by an elementwise activation. Replacing it by an identity removes F. At run time
  such a module must also be called once, with one tensor argument, and map its input shape
  to the same output shape (``arch.blocks.find_candidates`` checks).
- **channel shuffles** (``shuffles``): a module whose own traced code reshapes a 4-D map,
  swaps two axes and flattens them back (``view → transpose/permute → view``) is a channel
  shuffle; DepGraph cannot map indices through it (torch-pruning 1.6 raises
  ``ZeroDivisionError``), so the graph adapter treats it as an opaque block and prunes only
  the widths internal to its children.
- **attention of no known layout** (``computes_attention``): a module whose own code takes
  a softmax and a matrix product (or calls ``scaled_dot_product_attention``) computes
  attention over heads it reshapes itself (CoaT's ``FactorAttnConvRelPosEnc``, whose
  ``ConvRelPosEnc`` also splits the value channels into head groups convolved with
  different kernels). DepGraph would map channel indices through those reshapes and splits
  and cut across heads, so the graph adapter leaves such a module alone, whatever its name.
- **token concatenations** (``token_concats``): a module whose own code concatenates
  B×N×C token tensors along axis 1 (CoaT's class token re-inserted after a convolution over
  the image tokens, ``torch.cat((x[:, :1], tokens), dim=1)``). torch-pruning reads axis 1
  as channels: it maps channel indices through such a concatenation (wrong) or, when it
  cannot size a sliced operand, fails the whole trace (torch-pruning 1.6:
  ``TypeError: unsupported operand type(s) for +: 'int' and 'NoneType'``). Read at run time
  (such modules take arguments fx cannot trace, e.g. a ``size`` tuple that is unpacked); the
  graph adapter makes them opaque blocks and prunes only the widths inside their children.
- **fused gates** (``fused_gates``): a conv/linear child whose output a module's own code
  chunks into two halves that are multiplied together (``a, b = fc1(x).chunk(2)`` then
  ``act(a) * b``: timm's ``GluMlp``/``SwiGLUPacked``, any GLU written that way) holds two
  rows per hidden unit, ``i`` and ``i + half``. DepGraph maps the two halves to different
  root indices, so the graph adapter numbers such a group by hidden unit and removes both
  rows of each. (A GLU with two separate layers, timm's ``SwiGLU`` ``fc1_g``/``fc1_x``, needs
  no rule: the product couples the two layers' channels one to one.)
- **layer scale** (``scale_dim``, read by ``graph.support.declared_parameters``): a
  free-standing parameter of a non-standard module with exactly one non-unit axis (``(C,)``,
  ``(C, 1, 1)``, ``(1, 1, C)``) and not named like a token or an embedding is a per-channel
  scale and is pruned with its channel.

Squeeze-excitation (an elementwise product with a gate computed from the same map),
depthwise groups and concatenations need no rule: DepGraph couples them on the traced graph
(``flow_compress.graph``), and anything it cannot handle is left alone with a recorded
reason there.
"""

from __future__ import annotations

import inspect
import operator
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
)
_ACTIVATION_FUNCTIONS = (
    torch.relu,
    F.relu,
    F.relu6,
    F.silu,
    F.gelu,
    F.hardswish,
    F.leaky_relu,
    F.mish,
)
_ACTIVATION_METHODS = ("relu", "relu_")
_PASS_METHODS = ("contiguous", "clone")
# Reshapes keep the row-major element order: a chain of them that ends in the input's shape
# (checked at run time) is the identity on the skip.
_RESHAPE_METHODS = ("view", "reshape", "flatten", "unflatten")
_RESHAPES = ("view", "reshape")
_SWAPS = ("transpose", "permute")
# Parameter names that hold tokens or embeddings, never a per-channel scale.
_NOT_SCALES = ("token", "embed", "pos", "bias_table", "relative")


def _identity_types() -> tuple[type[nn.Module], ...]:
    """Modules that are the identity in eval mode (what a skip path may pass through)."""
    types: list[type[nn.Module]] = [nn.Identity, nn.Dropout, nn.Dropout2d]
    try:
        from torchvision.ops import StochasticDepth

        types.append(StochasticDepth)
    except ImportError:  # torchvision is a dependency; keep the rule usable without it
        pass
    try:
        from timm.layers import DropPath

        types.append(DropPath)
    except ImportError:  # timm is optional
        pass
    return tuple(types)


class _ShallowTracer(fx.Tracer):
    """Traces one module's own ``forward``: every child is a leaf (a ``call_module`` node)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


# Traced graphs per module object: a module's own code does not change while it lives, and
# the pruner reads every module's graph at each step (a copy is a new object, traced anew).
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, fx.Graph | None] = weakref.WeakKeyDictionary()


def shallow_graph(module: nn.Module) -> fx.Graph | None:
    """The module's own forward as an fx graph (children as leaves), or None when it cannot
    be traced symbolically (shape-dependent control flow, unsupported Python). Arguments
    that default to None are specialised to None: a block traced that way is only a
    candidate when it is called without them (``find_candidates`` checks)."""
    if module in _GRAPHS:
        return _GRAPHS[module]
    graph: fx.Graph | None
    try:
        params = inspect.signature(module.forward).parameters
        concrete = {n: None for n, p in list(params.items())[1:] if p.default is None}
        graph = _ShallowTracer().trace(module, concrete_args=concrete or None)
    except Exception:  # fx raises assorted errors on code it cannot trace; not a candidate
        graph = None
    _GRAPHS[module] = graph
    return graph


def _target(module: nn.Module, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return module.get_submodule(str(node.target))
    except AttributeError:
        return None


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )


def _is_activation(module: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        return True
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS:
        return True
    child = _target(module, node)
    return child is not None and isinstance(child, _ACTIVATION_MODULES)


def _passthrough(module: nn.Module, node: fx.Node, identity: tuple[type[nn.Module], ...]) -> bool:
    if node.op == "call_method" and node.target in (*_PASS_METHODS, *_RESHAPE_METHODS):
        return True
    if node.op == "call_function" and node.target in (torch.reshape, torch.flatten):
        return True
    child = _target(module, node)
    if isinstance(child, nn.Sequential) and len(child) == 0:
        return True  # an empty Sequential is the identity (timm's GhostNet shortcut)
    return child is not None and isinstance(child, identity)


def _skip_of(
    module: nn.Module, node: Any, x: fx.Node, identity: tuple[type[nn.Module], ...]
) -> bool:
    """Whether ``node`` is ``x`` plus something (``x`` itself, an identity-like pass of it, or
    a residual add one of whose operands is)."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 64:
        seen += 1
        if node is x:
            return True
        if _is_add(node):
            return any(_skip_of(module, a, x, identity) for a in node.args[:2])
        if not _passthrough(module, node, identity) or not node.args:
            return False
        node = node.args[0]
    return False


def _depends_on(node: Any, x: fx.Node) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        if n is x:
            return True
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def residual_form(module: nn.Module) -> bool:
    """Whether ``module``'s own forward returns ``x + F(x)`` for its first argument ``x``
    (optionally followed by an elementwise activation), read off its shallow fx graph."""
    if isinstance(module, nn.Sequential | nn.ModuleList | nn.ModuleDict):
        return False
    graph = shallow_graph(module)
    if graph is None:
        return False
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    outputs = [n for n in graph.nodes if n.op == "output"]
    if not placeholders or len(outputs) != 1:
        return False
    x = placeholders[0]
    node = outputs[0].args[0]
    identity = _identity_types()
    while (
        isinstance(node, fx.Node)
        and node.args
        and (_is_activation(module, node) or _is_reshape_node(node))
    ):
        node = node.args[0]
    if not isinstance(node, fx.Node) or not _is_add(node) or len(node.args) < 2:
        return False
    a, b = node.args[0], node.args[1]
    for skip, branch in ((a, b), (b, a)):
        if _skip_of(module, skip, x, identity) and _depends_on(branch, x) and branch is not x:
            return True
    return False


def _is_reshape_node(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target in _RESHAPE_METHODS


def _is_swap(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _SWAPS:
        return True
    return node.op == "call_function" and node.target in (torch.transpose, torch.permute)


def _is_reshape(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _RESHAPES:
        return True
    return node.op == "call_function" and node.target in (torch.reshape, torch.flatten)


def has_channel_shuffle(module: nn.Module) -> bool:
    """Whether ``module``'s own traced code holds a reshape → axis swap → reshape chain (a
    channel shuffle, or any regrouping DepGraph cannot map channel indices through)."""
    if isinstance(module, nn.Sequential | nn.ModuleList | nn.ModuleDict):
        return False
    graph = shallow_graph(module)
    if graph is None:
        return False
    for node in graph.nodes:
        if not _is_swap(node):
            continue
        before = node.args[0] if node.args else None
        after = list(node.users)
        while after and after[0].op == "call_method" and after[0].target in _PASS_METHODS:
            after = list(after[0].users)
        if (
            isinstance(before, fx.Node)
            and _is_reshape(before)
            and any(_is_reshape(u) for u in after)
        ):
            return True
    return False


def shuffles(model: nn.Module, skip: tuple[str, ...] = ()) -> Iterator[str]:
    """Paths of modules (outermost first, not under ``skip``) that hold a channel shuffle in
    their own code."""
    found: list[str] = []
    for path, m in model.named_modules():
        if not path or any(path == s or path.startswith(s + ".") for s in (*skip, *found)):
            continue
        if next(m.children(), None) is None:
            continue
        if has_channel_shuffle(m):
            found.append(path)
            yield path


_MUL_FUNCTIONS = (operator.mul, torch.mul)
_GATE_METHODS = ("sigmoid", "tanh")
_GATE_FUNCTIONS = (torch.sigmoid, torch.tanh, F.sigmoid, F.tanh)


def _elementwise(module: nn.Module, node: fx.Node) -> bool:
    """Whether ``node`` maps each element on its own (an activation, a sigmoid or tanh gate,
    an identity-like child): a hidden unit stays the same unit through it."""
    if _is_activation(module, node):
        return True
    if (node.op == "call_method" and node.target in _GATE_METHODS) or (
        node.op == "call_function" and node.target in _GATE_FUNCTIONS
    ):
        return True
    child = _target(module, node)
    return child is not None and isinstance(child, (*_identity_types(), nn.Sigmoid, nn.Tanh))


def _half_of(module: nn.Module, node: fx.Node, chunk: fx.Node) -> int | None:
    """Which half of ``chunk`` ``node`` is (``chunk[i]``, possibly through elementwise
    nodes), or None."""
    for _ in range(8):
        if node.op == "call_function" and node.target is operator.getitem:
            src, index = node.args[0], node.args[1]
            return int(index) if src is chunk and isinstance(index, int) else None
        if not _elementwise(module, node) or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None


def _users_through(module: nn.Module, node: fx.Node, depth: int = 0) -> set[fx.Node]:
    """``node``'s users, and theirs through elementwise nodes (where the product may be)."""
    out: set[fx.Node] = set()
    for u in node.users:
        out.add(u)
        if depth < 4 and _elementwise(module, u):
            out |= _users_through(module, u, depth + 1)
    return out


def _is_halving_chunk(node: fx.Node, layer: nn.Module) -> bool:
    """``chunk(2)`` along the layer's channel axis (-1 for a linear, 1 for a conv map)."""
    is_chunk = (node.op == "call_method" and node.target == "chunk") or (
        node.op == "call_function" and node.target is torch.chunk
    )
    chunks = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    axes = (1, -3) if isinstance(layer, nn.Conv2d) else (-1,)
    return is_chunk and chunks == 2 and dim in axes


def _is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MUL_FUNCTIONS) or (
        node.op == "call_method" and node.target == "mul"
    )


def fused_gates(model: nn.Module) -> Iterator[str]:
    """Paths of conv/linear layers whose output their parent's own code splits into two halves
    (``chunk(2)``) that are multiplied together: a fused gated linear unit, whose hidden unit
    ``i`` is output rows ``i`` and ``i + half`` of the layer."""
    for path, m in model.named_modules():
        if isinstance(m, nn.Sequential | nn.ModuleList | nn.ModuleDict):
            continue
        if not any(isinstance(c, nn.Conv2d | nn.Linear) for c in m.children()):
            continue
        graph = shallow_graph(m)
        if graph is None:
            continue
        for node in graph.nodes:
            layer = _target(m, node)
            if not isinstance(layer, nn.Conv2d | nn.Linear) or len(node.users) != 1:
                continue
            (chunk,) = node.users
            if not _is_halving_chunk(chunk, layer) or chunk.args[0] is not node:
                continue
            products = {u for half in chunk.users for u in _users_through(m, half) if _is_mul(u)}
            if any(
                {_half_of(m, a, chunk) for a in p.args[:2] if isinstance(a, fx.Node)} == {0, 1}
                for p in products
            ):
                yield f"{path}.{node.target}" if path else str(node.target)


_SOFTMAX = (torch.softmax, F.softmax)
_MATMUL = (operator.matmul, torch.matmul, torch.bmm, torch.einsum)


def computes_attention(module: nn.Module) -> bool:
    """Whether ``module``'s own traced code computes attention: a softmax and a matrix
    product, or ``F.scaled_dot_product_attention``."""
    if isinstance(module, nn.Sequential | nn.ModuleList | nn.ModuleDict):
        return False
    graph = shallow_graph(module)
    if graph is None:
        return False
    softmax = matmul = False
    for node in graph.nodes:
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            return True
        softmax |= (node.op == "call_method" and node.target == "softmax") or (
            node.op == "call_function" and node.target in _SOFTMAX
        )
        matmul |= (node.op == "call_method" and node.target in ("matmul", "bmm")) or (
            node.op == "call_function" and node.target in _MATMUL
        )
    return softmax and matmul


_CATS = (torch.cat, torch.concat, torch.concatenate)


class _CatRecorder(TorchFunctionMode):
    """Records the innermost running module of every token-axis concatenation."""

    def __init__(self, stack: list[str], found: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.found = found

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _CATS and self.stack:
            tensors = args[0] if args else kwargs.get("tensors", ())
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if (
                len(tensors) > 1
                and all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in tensors)
                and dim in (1, -2)
                and self.stack[-1] not in self.found
            ):
                self.found.append(self.stack[-1])
        return func(*args, **kwargs)


def token_concats(model: nn.Module, example: torch.Tensor, skip: tuple[str, ...] = ()) -> list[str]:
    """Paths of modules (not the model itself, not under ``skip``) whose own code, run on
    ``example``, concatenates 3-D token tensors (B×N×C) along the token axis. Empty when the
    model does not run on ``example`` (the graph adapter reports that failure itself)."""
    stack: list[str] = []
    found: list[str] = []
    handles = []

    def enter(path: str) -> Any:
        def fn(_m: nn.Module, _args: Any) -> None:
            stack.append(path)

        return fn

    def leave(_m: nn.Module, _args: Any, _out: Any) -> None:
        stack.pop()

    for path, m in model.named_modules():
        if path and not any(path == s or path.startswith(s + ".") for s in skip):
            handles.append(m.register_forward_pre_hook(enter(path)))
            handles.append(m.register_forward_hook(leave, always_call=True))
    try:
        with _CatRecorder(stack, found):
            run_once(model, example, handles)
    except Exception:  # a model that does not run is reported where its graph is built
        return []
    return found


def run_once(model: nn.Module, example: torch.Tensor, handles: list[Any]) -> None:
    """One eval-mode forward pass of ``example[:1]`` with ``handles`` registered; the hooks
    are removed and the training flag restored whatever happens."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def scale_dim(name: str, p: torch.Tensor) -> int | None:
    """The channel axis of a layer-scale-like parameter (exactly one non-unit axis, at most
    four axes, not named like a token or an embedding), or None."""
    if any(word in name.lower() for word in _NOT_SCALES) or not 1 <= p.dim() <= 4:
        return None
    big = [i for i, s in enumerate(p.shape) if s > 1]
    return big[0] if len(big) == 1 else None


__all__ = [
    "computes_attention",
    "fused_gates",
    "has_channel_shuffle",
    "residual_form",
    "run_once",
    "scale_dim",
    "shallow_graph",
    "shuffles",
    "token_concats",
]

"""The measured latency cost model: how long each prunable group's layers take at each width,
on the deployment's own runtime and hardware.

MACs are a poor proxy for speed: a runtime's kernels are blocked (ONNX Runtime's CPU convs
work on channel blocks, GPUs on tensor-core tiles), so removing channels below a block
boundary can save nothing, and a 1x1 conv on a 7x7 map costs far more per MAC than a 3x3 conv
on a 56x56 one. So every conv and linear layer that occurs is timed *alone*, as a one-node
model in the deployment's runtime, on the input shape it really gets, at a grid of widths of
the dimension pruning changes. The timings are a lookup table on disk, keyed by the
deployment and the machine, so a table is built once per runtime, device and input size and
reused by every later job (``LatencyTable``).

A group's latency at width w is the sum over its layers (producers with w outputs,
consumers with w inputs, and the norm layers between them with w channels) of their table
entries. Norms are in the table because their kernels have fast paths too: on an H200 in
float16, LayerNorm over a width that is not a multiple of 8 leaves the vectorised kernel for
a two-pass one, and a pruned ConvNeXt-T spent half its GPU time there (BatchNorm is timed on
the torch runtimes only; ONNX Runtime folds it into the convolution before it). The widths
a group may be cut to are the *fast* ones found in the table: a width is dropped when a wider
one measured no slower (within ``_SAME``), because a width inside a kernel's block costs as
much as the block's end. Between measured widths the curve is interpolated linearly.

What the sum leaves out (activations, additions, memory traffic between layers) is why the
pipeline times the whole model after every step and reports both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from flow_compress.artifacts import atomic_write_text
from flow_compress.config import DeploymentConfig
from flow_compress.measure.deployment import device_of
from flow_compress.measure.environment import describe_device
from flow_compress.measure.latency import torch_threads

# A wider width measured within this fraction of a narrower one's time is as fast: keeping the
# channels then costs nothing measurable.
_SAME = 0.02
# At most this many widths are timed per layer and role; wider layers get a coarser grid.
_MAX_POINTS = 24
# One timed repeat runs the op this long at least, so microsecond ops are timed accurately.
_REPEAT_S = 0.002
_REPEATS = 7
# 2: layers timed with non-spinning threads, as end-to-end timings are.
_TABLE_VERSION = 2


def grid_step(width: int) -> int:
    """Spacing of the widths timed for a layer of this width: 8 (the channel block of
    ONNX Runtime's AVX2 kernels and of tensor cores) when there are enough, finer for thin
    layers, coarser when more than ``_MAX_POINTS`` would be timed."""
    step = 8 if width >= 64 else 4 if width >= 16 else 1
    while width // step > _MAX_POINTS:
        step *= 2
    return step


def width_grid(width: int, keep_min: int) -> list[int]:
    """The widths timed for a layer now ``width`` wide that may shrink to ``keep_min``:
    multiples of ``grid_step(width)`` in [keep_min, width), ``keep_min`` and ``width``."""
    step = grid_step(width)
    out = {width, max(1, keep_min)}
    w = math.ceil(max(1, keep_min) / step) * step
    while w < width:
        out.add(w)
        w += step
    return sorted(out)


# Layers whose input is channels-first (N, C, *spatial); the others are (N, *spatial, C).
_CHANNELS_FIRST = ("conv", "layernorm_cf", "batchnorm")
_NORMS = ("layernorm", "layernorm_cf", "batchnorm")


@dataclass(frozen=True)
class LayerShape:
    """One conv, linear or norm layer as the runtime sees it. ``spatial``: the input's
    (H, W) for a conv, its token dimensions (between batch and features) for a linear layer,
    the dimensions beside the channels for a norm. Kinds: ``conv``, ``linear``,
    ``layernorm`` (over the last dimension), ``layernorm_cf`` (over dimension 1 of an
    (N, C, H, W) map: timm's LayerNorm2d), ``batchnorm``."""

    kind: str
    cin: int
    cout: int
    groups: int = 1
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    spatial: tuple[int, ...] = ()
    bias: bool = True

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups == self.cin and self.groups > 1

    def key(self) -> str:
        return json.dumps(
            [
                self.kind,
                self.cin,
                self.cout,
                self.groups,
                self.kernel,
                self.stride,
                self.pads,
                self.dilation,
                self.spatial,
                self.bias,
            ],
            separators=(",", ":"),
        )

    def with_width(self, role: str, width: int) -> LayerShape:
        """This layer with the channels ``role`` ("out", "in" or "both") set to ``width``;
        a depthwise conv's inputs, outputs and groups move together, as a norm's channels do."""
        if self.kind in _NORMS:
            return replace(self, cin=width, cout=width)
        if self.depthwise:
            mult = self.cout // self.cin
            return replace(self, cin=width, cout=width * mult, groups=width)
        if role == "out":
            return replace(self, cout=width)
        if role == "in":
            return replace(self, cin=width)
        return replace(self, cin=width, cout=width)


def layer_shape(module: nn.Module, in_shape: tuple[int, ...]) -> LayerShape | None:
    """The shape of ``module`` (Conv2d, Linear, LayerNorm over one dimension, BatchNorm2d)
    on an input of ``in_shape`` (batch first), or None for other modules."""
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        c = int(module.normalized_shape[0])
        dims = tuple(int(d) for d in in_shape)
        bias = module.bias is not None
        if dims[-1] == c:
            return LayerShape("layernorm", c, c, spatial=dims[1:-1], bias=bias)
        if len(dims) == 4 and dims[1] == c:
            return LayerShape("layernorm_cf", c, c, spatial=dims[2:], bias=bias)
        return None
    if isinstance(module, nn.BatchNorm2d) and len(in_shape) == 4:
        c = int(module.num_features)
        return LayerShape("batchnorm", c, c, spatial=tuple(int(d) for d in in_shape[2:]))
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        dh, dw = module.dilation
        if isinstance(module.padding, str):
            # "same" pads (d·(k-1)) split with the extra on the right, as torch does; "valid" 0.
            ph = dh * (kh - 1) if module.padding == "same" else 0
            pw = dw * (kw - 1) if module.padding == "same" else 0
            pads = (ph // 2, pw // 2, ph - ph // 2, pw - pw // 2)
        else:
            p0, p1 = module.padding
            pads = (p0, p1, p0, p1)
        return LayerShape(
            "conv",
            module.in_channels,
            module.out_channels,
            module.groups,
            (kh, kw),
            tuple(module.stride),  # type: ignore[arg-type]
            pads,
            (dh, dw),
            tuple(int(d) for d in in_shape[2:4]),
            module.bias is not None,
        )
    if isinstance(module, nn.Linear):
        return LayerShape(
            "linear",
            module.in_features,
            module.out_features,
            spatial=tuple(int(d) for d in in_shape[1:-1]),
            bias=module.bias is not None,
        )
    return None


# --------------------------------------------------------------------------- timing one layer


def _timed(run: Callable[[], object], sync: Callable[[], None]) -> float:
    """Milliseconds of one call: calls are repeated in bursts of at least ``_REPEAT_S`` so
    timer resolution and call overhead do not swamp tiny ops, and the fastest burst counts.
    The fastest, not the median: other processes only ever add time, and a table entry is
    the layer's own cost (end-to-end timings, which the verdicts use, take medians)."""
    for _ in range(2):
        run()
    sync()
    start = time.perf_counter()
    run()
    sync()
    once = max(time.perf_counter() - start, 1e-7)
    n = max(1, min(200, math.ceil(_REPEAT_S / once)))
    times = []
    for _ in range(_REPEATS):
        sync()
        start = time.perf_counter()
        for _ in range(n):
            run()
        sync()
        times.append((time.perf_counter() - start) / n)
    return min(times) * 1000.0


def _onnx_layer(shape: LayerShape, batch: int) -> bytes:
    """``shape`` as a one-node ONNX model (Conv, MatMul/Gemm + bias, LayerNormalization, the
    last between the transposes a channels-first LayerNorm exports to) with random weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = []
    if shape.kind in ("layernorm", "layernorm_cf"):
        first = shape.kind == "layernorm_cf"
        dims = [batch, shape.cin, *shape.spatial] if first else [batch, *shape.spatial, shape.cin]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
        inits.append(numpy_helper.from_array(np.ones(shape.cin, np.float32), "g"))
        inputs = ["t" if first else "x", "g"]
        if shape.bias:
            inits.append(numpy_helper.from_array(np.zeros(shape.cin, np.float32), "b"))
            inputs.append("b")
        nodes = [helper.make_node("LayerNormalization", inputs, ["n" if first else "y"], axis=-1)]
        if first:
            nodes.insert(0, helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]))
            nodes.append(helper.make_node("Transpose", ["n"], ["y"], perm=[0, 3, 1, 2]))
    elif shape.kind == "conv":
        x = helper.make_tensor_value_info(
            "x", TensorProto.FLOAT, [batch, shape.cin, *shape.spatial]
        )
        weight = rng.standard_normal(
            (shape.cout, shape.cin // shape.groups, *shape.kernel), dtype=np.float32
        )
        inits.append(numpy_helper.from_array(weight, "w"))
        inputs = ["x", "w"]
        if shape.bias:
            inits.append(numpy_helper.from_array(np.zeros(shape.cout, np.float32), "b"))
            inputs.append("b")
        nodes = [
            helper.make_node(
                "Conv",
                inputs,
                ["y"],
                group=shape.groups,
                kernel_shape=list(shape.kernel),
                strides=list(shape.stride),
                pads=list(shape.pads),
                dilations=list(shape.dilation),
            )
        ]
    else:
        dims = [batch, *shape.spatial, shape.cin]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
        if not shape.spatial:
            # What torch exports for a Linear on a 2-D input.
            weight = rng.standard_normal((shape.cout, shape.cin), dtype=np.float32)
            inits.append(numpy_helper.from_array(weight, "w"))
            inits.append(numpy_helper.from_array(np.zeros(shape.cout, np.float32), "b"))
            nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
        else:
            weight = rng.standard_normal((shape.cin, shape.cout), dtype=np.float32)
            inits.append(numpy_helper.from_array(weight, "w"))
            nodes = [helper.make_node("MatMul", ["x", "w"], ["m" if shape.bias else "y"])]
            if shape.bias:
                inits.append(numpy_helper.from_array(np.zeros(shape.cout, np.float32), "b"))
                nodes.append(helper.make_node("Add", ["m", "b"], ["y"]))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "layer", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


class _ChannelsFirstNorm(nn.Module):
    """LayerNorm over dimension 1 of an (N, C, H, W) map, as timm's LayerNorm2d runs it."""

    def __init__(self, channels: int, bias: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _torch_layer(shape: LayerShape) -> nn.Module:
    if shape.kind == "layernorm":
        return nn.LayerNorm(shape.cin, bias=shape.bias)
    if shape.kind == "layernorm_cf":
        return _ChannelsFirstNorm(shape.cin, shape.bias)
    if shape.kind == "batchnorm":
        return nn.BatchNorm2d(shape.cin)
    if shape.kind == "conv":
        pads = shape.pads
        if pads[0] == pads[2] and pads[1] == pads[3]:
            return nn.Conv2d(
                shape.cin,
                shape.cout,
                shape.kernel,
                shape.stride,
                (pads[0], pads[1]),
                shape.dilation,
                shape.groups,
                shape.bias,
            )
        return nn.Sequential(
            nn.ZeroPad2d((pads[1], pads[3], pads[0], pads[2])),
            nn.Conv2d(
                shape.cin,
                shape.cout,
                shape.kernel,
                shape.stride,
                0,
                shape.dilation,
                shape.groups,
                shape.bias,
            ),
        )
    return nn.Linear(shape.cin, shape.cout, bias=shape.bias)


def time_layer(shape: LayerShape, dep: DeploymentConfig) -> float:
    """Milliseconds one call of the layer takes on the deployment, at its batch size.

    ONNX Runtime: the one-node model in a session with the deployment's threads and provider.
    torch runtimes: the module itself (a single layer calls the same kernel traced or not)."""
    batch = dep.batch_size
    device = device_of(dep)
    channels_first = shape.kind in _CHANNELS_FIRST
    if dep.runtime == "onnxruntime":
        if shape.kind == "batchnorm":
            # Exported in eval mode after a conv, ONNX Runtime folds it into the conv's
            # weights: it costs nothing of its own there.
            return 0.0
        from flow_compress.export.onnx import session

        # Non-spinning threads, as the end-to-end timings run (``export.onnx.file_engine``),
        # so the layers' sum and the whole model's time are measured alike.
        sess = session(
            _onnx_layer(shape, batch),
            device,
            dep.threads,
            tensorrt=dep.provider == "tensorrt",
            spinning=False,
        )
        dims = (
            [batch, shape.cin, *shape.spatial]
            if channels_first
            else [batch, *shape.spatial, shape.cin]
        )
        feed = {"x": np.random.default_rng(1).standard_normal(dims, dtype=np.float32)}
        return _timed(lambda: sess.run(None, feed), lambda: None)  # type: ignore[attr-defined]
    dtype = torch.float16 if dep.dtype == "fp16" else torch.float32
    module = _torch_layer(shape).to(device=device, dtype=dtype).eval()
    if channels_first:
        x = torch.randn(batch, shape.cin, *shape.spatial, device=device, dtype=dtype)
    else:
        x = torch.randn(batch, *shape.spatial, shape.cin, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run() -> object:
        with torch.no_grad():
            return module(x)

    with torch_threads(dep.threads):
        return _timed(run, sync)


# --------------------------------------------------------------------------- the table


def _versions() -> str:
    import importlib.metadata

    out = [f"torch {torch.__version__}"]
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        out.append(f"onnxruntime {importlib.metadata.version('onnxruntime')}")
    return ", ".join(out)


@dataclass
class LatencyTable:
    """Layer timings of one deployment on one machine, in memory and (with ``path``) on disk.

    The file name is a digest of the deployment, the hardware description and the runtime
    versions, so a table is only ever reused where its numbers were measured. ``measured``
    and ``reused`` count this run's lookups; ``build_s`` is the time spent measuring."""

    deployment: DeploymentConfig
    path: Path | None = None
    entries: dict[str, float] = field(default_factory=dict)
    measured: int = 0
    reused: int = 0
    build_s: float = 0.0
    hardware: str = ""
    timer: Callable[[LayerShape, DeploymentConfig], float] = time_layer
    ident: str = ""
    _dirty: bool = False
    _fresh: list[LayerShape] = field(default_factory=list)

    @classmethod
    def open(
        cls,
        deployment: DeploymentConfig,
        cache_dir: Path | None,
        timer: Callable[[LayerShape, DeploymentConfig], float] = time_layer,
    ) -> LatencyTable:
        """The table for ``deployment`` on this machine, read from ``cache_dir`` when a
        matching one is there (an unreadable file is ignored and rebuilt)."""
        with torch_threads(deployment.threads):
            hardware = describe_device(device_of(deployment))
        ident = json.dumps(
            [_TABLE_VERSION, deployment.label(), hardware, _versions()], separators=(",", ":")
        )
        digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"latency-{digest}.json" if cache_dir is not None else None
        table = cls(deployment, path, hardware=hardware, timer=timer, ident=ident)
        if path is not None and path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                if raw.get("ident") == ident:
                    table.entries = {str(k): float(v) for k, v in raw["entries"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                table.entries = {}
        return table

    def ms(self, shape: LayerShape) -> float:
        """The layer's time on the deployment: from the table, or measured now and added."""
        key = shape.key()
        hit = self.entries.get(key)
        if hit is not None:
            self.reused += 1
            return hit
        start = time.perf_counter()
        value = float(self.timer(shape, self.deployment))
        self.build_s += time.perf_counter() - start
        self.entries[key] = value
        self.measured += 1
        self._dirty = True
        self._fresh.append(shape)
        return value

    def recheck(self) -> int:
        """Time every entry measured since the last recheck once more and keep the faster of
        the two. A disturbance of the machine (another process, a busy neighbour on a shared
        host) lasts tens of milliseconds, longer than all of one layer's bursts, and with two
        threads on two cores it doubles a layer's time: on an AMD EPYC one linear layer timed
        0.56 ms and 1.06 ms in consecutive calls, and such entries sent a ViT-S step's
        prediction 45 % off. Timed again after every other new layer, a layer is rarely hit
        both times. Returns how many entries fell by more than ``_SAME``."""
        fresh, self._fresh = self._fresh, []
        fell = 0
        start = time.perf_counter()
        for shape in fresh:
            key = shape.key()
            again = float(self.timer(shape, self.deployment))
            if again < self.entries[key]:
                fell += again * (1 + _SAME) < self.entries[key]
                self.entries[key] = again
        self.build_s += time.perf_counter() - start
        return fell

    def save(self) -> None:
        """Write the table (atomically; concurrent writers each leave a whole file)."""
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "ident": self.ident,
            "deployment": self.deployment.label(),
            "hardware": self.hardware,
            "entries": self.entries,
        }
        atomic_write_text(self.path, json.dumps(body, sort_keys=True))
        self._dirty = False


# --------------------------------------------------------------------------- group curves


@dataclass(frozen=True)
class Part:
    """One member layer's share of a group's curve: its milliseconds at the curve's widths,
    with the other layer dimensions as they were when the curve was built. ``role`` is the
    dimension the group's width sets ("out", "in" or "both")."""

    layer: str
    role: str
    ms: tuple[float, ...]


class Member(NamedTuple):
    shape: LayerShape
    role: str
    name: str


@dataclass(frozen=True)
class Curve:
    """Predicted milliseconds of a group's layers at each candidate width (ascending), with
    the widths that are fast (no wider candidate measured as fast)."""

    widths: tuple[int, ...]
    ms: tuple[float, ...]
    parts: tuple[Part, ...] = ()

    def at(self, width: int) -> float:
        return float(np.interp(width, self.widths, self.ms))

    def fast_widths(self) -> list[int]:
        """Widths kept by the staircase rule: w stays only if every wider candidate is slower
        than w by more than ``_SAME``."""
        out = []
        best_wider = math.inf
        for w, t in zip(reversed(self.widths), reversed(self.ms), strict=True):
            if t * (1 + _SAME) < best_wider:
                out.append(w)
            best_wider = min(best_wider, t)
        return sorted(out)


def member_layers(
    producers: Iterable[tuple[str, nn.Module]],
    consumers: Iterable[tuple[str, nn.Module]],
    in_shapes: dict[str, tuple[int, ...]],
    norms: Iterable[tuple[str, nn.Module]] = (),
) -> list[Member]:
    """The layers a group's width changes, each once, with the role the width plays in it
    ("out", "in", or "both" for a layer on both sides, and for a norm)."""
    roles: dict[str, tuple[nn.Module, set[str]]] = {}
    for name, module in norms:
        roles.setdefault(name, (module, {"out", "in"}))
    for role, members in (("out", producers), ("in", consumers)):
        for name, module in members:
            roles.setdefault(name, (module, set()))[1].add(role)
    out = []
    for name, (module, rs) in roles.items():
        shape_in = in_shapes.get(name)
        shape = layer_shape(module, shape_in) if shape_in is not None else None
        if shape is None:
            continue
        out.append(Member(shape, "both" if len(rs) == 2 else next(iter(rs)), name))
    return out


def layers_ms(
    model: nn.Module, in_shapes: dict[str, tuple[int, ...]], table: LatencyTable
) -> float:
    """The summed table time of every conv, linear and norm layer of ``model`` on the input
    shapes it gets (``in_shapes``: a pruning graph's shape pass)."""
    total = 0.0
    for name, module in model.named_modules():
        shape = in_shapes.get(name)
        ls = layer_shape(module, shape) if shape is not None else None
        if ls is not None:
            total += table.ms(ls)
    return total


def group_curve(layers: list[Member], width: int, keep_min: int, table: LatencyTable) -> Curve:
    """The group's summed layer times at every width of ``width_grid(width, keep_min)``,
    with each layer's own share (``Curve.parts``)."""
    widths = width_grid(width, keep_min)
    parts = tuple(
        Part(m.name, m.role, tuple(table.ms(m.shape.with_width(m.role, w)) for w in widths))
        for m in layers
    )
    totals = [sum(p.ms[i] for p in parts) for i in range(len(widths))]
    return Curve(tuple(widths), tuple(totals), parts)


__all__ = [
    "Curve",
    "LatencyTable",
    "LayerShape",
    "Member",
    "Part",
    "grid_step",
    "group_curve",
    "layer_shape",
    "layers_ms",
    "member_layers",
    "time_layer",
    "width_grid",
]

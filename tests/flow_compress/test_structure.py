"""Family rules from structure (``flow_compress.arch.structure`` and the graph adapter's
left-alone list): residual blocks, layer scales, channel shuffles, grouped convolutions and
attention layers of models nobody wrote rules for. Small real modules, real forward passes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flow_compress.arch.blocks import find_candidates
from flow_compress.arch.structure import (
    computes_attention,
    fused_gates,
    has_channel_shuffle,
    residual_form,
    token_concats,
)
from flow_compress.graph import PruningGraph, count_macs_params, replay_prune


def _conv(c_in: int, c_out: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class Residual(nn.Module):
    """x + F(x) through a drop path on the branch and an identity shortcut, then an act."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = _conv(c, c)
        self.drop = nn.Dropout(0.0)
        self.shortcut = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.body(x)) + self.shortcut(x))


class TwoResiduals(nn.Module):
    """x + A(x), then (x + A(x)) + M(x + A(x)) through a flatten and back (a ViT/Swin block)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = _conv(c, c)
        self.m = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x + self.a(x)
        x = x.reshape(b, c, h * w)
        x = x + self.m(x.transpose(1, 2)).transpose(1, 2)
        return x.reshape(b, c, h, w)


class Projection(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = _conv(c, c)
        self.down = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.down(x)


class Plain(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = _conv(c, c)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.bias  # adds a constant, not its input


class WithShortcutArg(nn.Module):
    """``x + F(x)`` only when called without ``shortcut`` (DLA's trees pass one)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = _conv(c, c)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        if shortcut is None:
            shortcut = x
        return self.body(x) + shortcut


class Shuffle(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(c // 2, c, 1), nn.ReLU(), nn.Conv2d(c, c // 2, 1), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        out = torch.cat((a, self.branch(b)), dim=1)
        n, c, h, w = out.shape
        return out.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class Scaled(nn.Module):
    """A block with a free per-channel scale (no family declares it)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * c, 1)
        self.gamma = nn.Parameter(torch.rand(2 * c))
        self.out = nn.Conv2d(2 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.conv(x)) * self.gamma.view(1, -1, 1, 1))


class WindowAttention(nn.Module):
    """An attention layer of a layout no family declares."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
        return self.proj(attn @ v)


class Hybrid(nn.Module):
    """A CNN with blocks of every kind above and a token mixer at the end."""

    def __init__(self, attention: nn.Module, c: int = 16) -> None:
        super().__init__()
        self.stem = _conv(3, c)
        self.res = Residual(c)
        self.two = TwoResiduals(c)
        self.proj = Projection(c)
        self.shuffle = Shuffle(c)
        self.scaled = Scaled(c)
        self.grouped = nn.Sequential(nn.Conv2d(c, 2 * c, 1), _conv(2 * c, 2 * c, groups=4))
        self.squeeze = nn.Conv2d(2 * c, c, 1)
        self.attn = attention
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(
            self.grouped(self.scaled(self.shuffle(self.proj(self.two(self.res(self.stem(x)))))))
        )
        t = x.flatten(2).transpose(1, 2)
        out = (
            self.attn(t, t, t)[0]
            if isinstance(self.attn, nn.MultiheadAttention)
            else (self.attn(t))
        )
        return self.head(out.mean(1))


def test_residual_form_reads_the_modules_own_forward() -> None:
    assert residual_form(Residual(8))
    assert residual_form(TwoResiduals(8))
    assert not residual_form(Projection(8))  # a projection shortcut is not the identity
    assert not residual_form(Plain(8))
    assert not residual_form(_conv(8, 8))
    assert residual_form(WithShortcutArg(8))  # structurally; the call decides (below)


def test_structural_candidates_keep_shapes_and_single_tensor_calls() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = _conv(3, 8)
            self.a = Residual(8)
            self.b = WithShortcutArg(8)
            self.c = WithShortcutArg(8)
            self.widen = Residual(8)
            self.head = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            x = self.b(self.a(x))
            x = self.c(x, x * 2)  # called with a shortcut: replacing it by x is wrong
            return self.head(self.widen(x).mean((2, 3)))

    net = Net().eval()
    names = [c.name for c in find_candidates(net, torch.randn(1, 3, 8, 8), allow_projection=False)]
    assert names == ["a", "b", "widen"]
    # nested residuals: the outermost block is the candidate, not the one inside it
    outer = nn.Sequential(_conv(3, 8), Residual(8))
    outer[1].body = nn.Sequential(Residual(8))  # type: ignore[assignment]
    cands = find_candidates(outer.eval(), torch.randn(1, 3, 8, 8), allow_projection=False)
    assert [c.name for c in cands] == ["1"]


def test_timm_inverted_residuals_with_a_skip_are_candidates() -> None:
    # The reported model: timm's tf_efficientnet_lite0 has no family rule.
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10).eval()
    cands = find_candidates(model, torch.randn(1, 3, 32, 32), allow_projection=False)
    with_skip = {n for n, m in model.named_modules() if getattr(m, "has_skip", False)}
    assert {c.name for c in cands} == with_skip and len(with_skip) == 9
    assert all(c.kind == "identity" and c.branch is None for c in cands)


def test_channel_shuffle_is_detected_from_the_traced_graph() -> None:
    assert has_channel_shuffle(Shuffle(8))
    assert not has_channel_shuffle(Residual(8))
    assert not has_channel_shuffle(TwoResiduals(8))  # reshape without an axis swap between


@pytest.mark.parametrize("kind", ["unknown", "torch"])
def test_unruled_layers_are_left_alone_with_reasons_and_the_rest_prunes(kind: str) -> None:
    torch.manual_seed(0)
    attn = (
        WindowAttention(16) if kind == "unknown" else nn.MultiheadAttention(16, 4, batch_first=True)
    )
    model = Hybrid(attn).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = PruningGraph(model, x, ignored=[model.head])
    groups = graph.groups()
    left = {a.path: a.reason for a in graph.ignored}
    assert "classifier" in left["head"]
    assert "channel shuffle" in left["shuffle"]
    assert "grouped convolution" in left["grouped.1.0"]
    if kind == "unknown":
        assert "unknown layout" in left["attn"]
        assert not any(g.unit == "head" for g in groups)
    else:  # nn.MultiheadAttention outside a ViT: its heads are units
        assert [g.root_name for g in groups if g.unit == "head"] == ["attn"]
    roots = {p.name for g in groups for p in g.producers}
    assert "shuffle.branch.0" in roots  # the width inside the shuffle, never across it
    assert "scaled.conv" in roots  # pruned with its free per-channel scale
    assert not roots & {"grouped.1.0", "shuffle.branch.2"}
    before = count_macs_params(model, x)
    by_root = {g.root_name: g for g in groups if g.unit == "channel"}
    entries = [graph.prune(by_root[r], [0, 1]) for r in ("scaled.conv", "shuffle.branch.0")]
    graph.verify(["scaled.conv"])
    assert model.scaled.gamma.shape == (30,) and model.scaled.out.in_channels == 30
    assert count_macs_params(model, x)[0] < before[0]
    fresh = Hybrid(
        WindowAttention(16) if kind == "unknown" else nn.MultiheadAttention(16, 4, batch_first=True)
    ).eval()
    replay_prune(fresh, x, entries)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=1e-5)


def test_a_one_by_one_conv_head_is_the_classifier() -> None:
    from flow_compress.arch.surgery import classifier_path, replace_head

    model = nn.Sequential(
        _conv(3, 8), nn.Conv2d(8, 1000, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).eval()
    assert classifier_path(model) == "1"
    replace_head(model, 10)
    x = torch.randn(2, 3, 8, 8)
    assert model(x).shape == (2, 10)
    graph = PruningGraph(model, x, ignored=[model[1]])
    assert {g.root_name for g in graph.groups()} == {"0.0"}  # never the logits
    left = {a.path: a.reason for a in graph.ignored}
    assert "classifier" in left["1"]


class FusedGlu(nn.Module):
    """A fused gated MLP written as timm's ``GluMlp`` is: one layer, chunked and multiplied."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


class NotAGate(FusedGlu):
    """Chunks a layer's output in two but adds the halves: no gate, no hidden-unit pairs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(a + b)


def test_fused_gates_are_read_from_the_chunk_and_product() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    assert list(fused_gates(FusedGlu(8, 6))) == ["fc1"]
    assert list(fused_gates(timm_layers.GluMlp(8, 12, act_layer=nn.SiLU, gate_last=False))) == [
        "fc1"
    ]
    assert list(fused_gates(NotAGate(8, 6))) == []
    assert list(fused_gates(timm_layers.SwiGLU(8, 6))) == []  # two layers: DepGraph couples them


def test_a_fused_gate_prunes_both_halves_of_a_hidden_unit() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), FusedGlu(8, 6), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 5, 4)
    graph = PruningGraph(model, x, ignored=[model[2]])
    (group,) = [g for g in graph.groups() if g.root_name == "1.fc1"]
    assert group.size == 6  # hidden units, not the layer's 12 rows
    assert sorted(r for p in group.producers for r in p.root_idxs) == sorted(list(range(6)) * 2)
    reference = copy.deepcopy(model)
    keep = [0, 2, 3, 5]
    fc1, fc2 = reference[1].fc1, reference[1].fc2
    rows = keep + [6 + k for k in keep]
    fc1.weight, fc1.bias = nn.Parameter(fc1.weight[rows]), nn.Parameter(fc1.bias[rows])
    fc2.weight = nn.Parameter(fc2.weight[:, keep])
    entry = graph.prune(group, [1, 4])
    graph.verify([group.root_name])
    assert model[1].fc1.out_features == 8 and model[1].fc2.in_features == 4
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-6)
    fresh = nn.Sequential(nn.Linear(4, 8), FusedGlu(8, 6), nn.Linear(8, 3)).eval()
    replay_prune(fresh, x, [entry])
    fresh.load_state_dict(model.state_dict())


class ClassTokenConv(nn.Module):
    """CoaT's ``ConvPosEnc``: a depthwise conv over the image tokens, the class token put back
    in front by a concatenation along the token axis; it takes the grid size too."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c, c, 3, padding=1, groups=c)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, _, c = x.shape
        cls, img = x[:, :1], x[:, 1:]
        feat = img.transpose(1, 2).reshape(b, c, size[0], size[1])
        return torch.cat((cls, (self.proj(feat) + feat).flatten(2).transpose(1, 2)), dim=1)


class TokenNet(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, c, 2, stride=2)
        self.cls = nn.Parameter(torch.zeros(1, 1, c))
        self.cpe = ClassTokenConv(c)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)
        size = (t.shape[2], t.shape[3])
        t = torch.cat((self.cls.expand(t.shape[0], -1, -1), t.flatten(2).transpose(1, 2)), 1)
        t = self.cpe(t, size)
        t = t + self.mlp(t)
        return self.head(t[:, 0])


def test_a_token_axis_concatenation_is_left_alone_and_the_rest_prunes() -> None:
    torch.manual_seed(0)
    model = TokenNet().eval()
    x = torch.randn(2, 3, 8, 8)
    assert token_concats(model, x) == ["cpe"]  # the model's own class-token concat is not
    graph = PruningGraph(model, x, ignored=[model.head])
    left = {a.path: a.reason for a in graph.ignored}
    assert "concatenates tokens along axis 1" in left["cpe"]
    assert "coupled to cpe" in left["embed"]
    (group,) = [g for g in graph.groups() if g.unit == "channel"]
    assert group.root_name == "mlp.0"
    entry = graph.prune(group, [0, 1, 2])
    graph.verify([group.root_name])
    fresh = TokenNet().eval()
    replay_prune(fresh, x, [entry])
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=1e-6)


class FactorAttention(nn.Module):
    """Attention written inline under a name without "attention" (CoaT's factorised one)."""

    def __init__(self, c: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        att = q @ (k.softmax(dim=2).transpose(-1, -2) @ v)
        return self.proj(att.transpose(1, 2).reshape(b, n, c))


def test_attention_is_read_from_softmax_and_matmul_whatever_the_name() -> None:
    assert computes_attention(FactorAttention(16, 4))
    assert not computes_attention(FusedGlu(8, 6))
    model = nn.Sequential(nn.Linear(8, 16), FactorAttention(16, 4), nn.Linear(16, 3)).eval()
    graph = PruningGraph(model, torch.randn(2, 5, 8), ignored=[model[2]])
    left = {a.path: a.reason for a in graph.ignored}
    assert "unknown layout (FactorAttention)" in left["1"]
    assert not [g for g in graph.groups() if g.root_name.startswith("1.")]

"""Stage 1's selection by importance per millisecond saved (``prune.ranking="score_per_ms"``).

The MACs selection removes single channels, lowest score (or score per MAC) first. On a real
runtime that wastes accuracy: a cut that stops inside a kernel's channel block saves nothing,
and a channel of a cheap-per-MAC layer saves less time than one of an expensive layer. Here
each group moves between the *fast widths* of its measured curve
(``graph.latency_cost.Curve.fast_widths``) and a move's price is the importance it removes
(the sum of the lowest scores it drops) divided by the milliseconds the cost model predicts
it saves. Moves are taken cheapest first, across all groups, until the predicted saving
covers the step's need; a group is re-priced after each of its moves. A group whose cuts save
no measurable time is never cut for the latency target.

Groups that share a layer do not save independently: a conv between two groups (its inputs
one group's width, its outputs the other's) was timed with the other side at full width, and
once the other side is cut, cutting this side saves proportionally less. Each layer's share of
a group's curve is therefore scaled by the kept fraction of the groups on the layer's other
side (a conv's time is close to bilinear in its input and output widths); summing the shares
unscaled over-predicted a ResNet-50's first step by 1.6x.

When a MACs target is given too, moves continue once the time is saved, priced by score per
MAC saved, until the MACs need is met as well. Head groups have no conv/linear members of
their own: their milliseconds are estimated from their MACs at the model's measured
milliseconds per MAC.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from flow_compress.graph import PrunableGroup
from flow_compress.graph.latency_cost import Curve


@dataclass(frozen=True)
class Option:
    """One group as the selection sees it: its scores (one per root unit, higher = keep),
    the fewest units it may keep, and its latency curve (None: estimated from MACs)."""

    group: PrunableGroup
    scores: torch.Tensor
    keep_min: int
    curve: Curve | None


@dataclass(frozen=True)
class LatencySelection:
    removals: dict[str, list[int]]
    saved_macs: float
    saved_ms: float


def _widths(opt: Option, round_to: int | None) -> list[int]:
    """Widths the group may be cut to, narrowest first, all below its current width."""
    g = opt.group
    if opt.curve is not None and g.unit == "channel":
        ws = [w for w in opt.curve.fast_widths() if opt.keep_min <= w < g.size]
    else:
        ws = list(range(opt.keep_min, g.size))
    if round_to and g.unit == "channel":
        ws = [w for w in ws if w % round_to == 0] or ws
    return ws


class _Group:
    def __init__(self, opt: Option, ms_per_mac: float, round_to: int | None) -> None:
        self.opt = opt
        g = opt.group
        self.order = torch.argsort(opt.scores.double(), stable=True)
        self.cum_score = torch.cumsum(opt.scores.double()[self.order], 0)
        self.cum_macs = torch.cumsum(g.cost.double()[self.order], 0)
        self.width = g.size
        self.candidates = _widths(opt, round_to)
        self.ms_per_mac = ms_per_mac
        # Per member layer: its milliseconds at the curve's widths and the groups on the
        # layer's other side (filled in by ``_link``).
        self.parts: list[tuple[tuple[float, ...], list[_Group]]] = []

    def kept(self) -> float:
        return self.width / self.opt.group.size

    def _ms(self, width: int) -> float:
        curve = self.opt.curve
        if curve is not None and self.parts:
            total = 0.0
            for ms, others in self.parts:
                scale = 1.0
                for o in others:
                    scale *= o.kept()
                total += scale * float(np.interp(width, curve.widths, ms))
            return total
        if curve is not None:
            return curve.at(width)
        removed = self.opt.group.size - width
        return -float(self.cum_macs[removed - 1]) * self.ms_per_mac if removed > 0 else 0.0

    def _removed(self, width: int, cum: torch.Tensor) -> float:
        n = self.opt.group.size - width
        return float(cum[n - 1]) if n > 0 else 0.0

    def best(self, by: str) -> tuple[float, int, float, float] | None:
        """The cheapest next move from the current width: (price, width, ms, macs saved)."""
        best = None
        here_ms = self._ms(self.width)
        here_score = self._removed(self.width, self.cum_score)
        here_macs = self._removed(self.width, self.cum_macs)
        for w in self.candidates:
            if w >= self.width:
                break
            saved_ms = here_ms - self._ms(w)
            saved_macs = self._removed(w, self.cum_macs) - here_macs
            gain = saved_ms if by == "ms" else saved_macs
            if gain <= 0:
                continue
            price = (self._removed(w, self.cum_score) - here_score) / gain
            if best is None or price < best[0]:
                best = (price, w, saved_ms, saved_macs)
        return best


def _link(groups: list[_Group]) -> None:
    """Give every group's layer shares the groups that set the layer's other dimension."""
    by_layer: dict[str, list[tuple[_Group, str]]] = {}
    for g in groups:
        if g.opt.curve is not None:
            for part in g.opt.curve.parts:
                by_layer.setdefault(part.layer, []).append((g, part.role))
    other = {"in": ("out", "both"), "out": ("in", "both"), "both": ("in", "out")}
    for g in groups:
        if g.opt.curve is None:
            continue
        for part in g.opt.curve.parts:
            partners = [
                h for h, role in by_layer[part.layer] if h is not g and role in other[part.role]
            ]
            g.parts.append((part.ms, partners))


def select_by_latency(
    options: list[Option],
    need_ms: float,
    need_macs: float,
    *,
    ms_per_mac: float,
    round_to: int | None = None,
) -> LatencySelection:
    """Cut groups between fast widths until the predicted saving reaches ``need_ms`` and the
    MACs saving ``need_macs`` (either may be 0). Returns the root indices to remove per
    group (the lowest-scored units), the MACs and the predicted milliseconds saved."""
    groups = [_Group(o, ms_per_mac, round_to) for o in options]
    _link(groups)
    saved_ms = saved_macs = 0.0
    for by in ("ms", "macs"):
        need = need_ms if by == "ms" else need_macs
        heap: list[tuple[float, int, int]] = []
        for i, g in enumerate(groups):
            move = g.best(by)
            if move is not None:
                heapq.heappush(heap, (move[0], i, move[1]))
        while heap and (saved_ms if by == "ms" else saved_macs) < need:
            _, i, width = heapq.heappop(heap)
            g = groups[i]
            move = g.best(by)
            if move is None:
                continue
            if move[1] != width:  # stale entry: re-queue the group's current best
                heapq.heappush(heap, (move[0], i, move[1]))
                continue
            g.width = width
            saved_ms += move[2]
            saved_macs += move[3]
            nxt = g.best(by)
            if nxt is not None:
                heapq.heappush(heap, (nxt[0], i, nxt[1]))
    removals: dict[str, list[int]] = {}
    for g in groups:
        n = g.opt.group.size - g.width
        if n > 0:
            removals[g.opt.group.root_name] = sorted(int(i) for i in g.order[:n])
    return LatencySelection(removals, saved_macs, saved_ms)


__all__ = ["LatencySelection", "Option", "select_by_latency"]

"""bench.latency_quality's verdict: it can come out either way, and it needs the target met."""

from __future__ import annotations

from typing import Any

from bench.latency_quality import summarise, verdict


def _run(ranking: str, seed: int, top1: float, met: bool = True) -> dict[str, Any]:
    return {
        "ranking": ranking,
        "seed": seed,
        "test_top1": top1,
        "speedup": 2.05,
        "macs_ratio": 0.4,
        "target_met": met,
    }


def test_the_verdict_holds_only_when_no_macs_aware_ranking_is_more_accurate() -> None:
    rows = [
        _run("score_per_ms", 0, 90.0),
        _run("score_per_ms", 1, 89.0),
        _run("score_per_mac", 0, 89.5),
        _run("score_per_mac", 1, 89.0),
        _run("score", 0, 88.0),
        _run("score", 1, 88.0),
    ]
    v = verdict(summarise(rows))
    assert v["holds"] is True and v["against"] == "score_per_mac"
    assert v["margin_points"] == 0.25
    rows[2] = _run("score_per_mac", 0, 91.5)
    v = verdict(summarise(rows))
    assert v["holds"] is False and v["margin_points"] == -0.75


def test_a_missed_speedup_target_fails_the_verdict() -> None:
    rows = [
        _run("score_per_ms", 0, 95.0, met=False),
        _run("score_per_ms", 1, 95.0),
        _run("score", 0, 80.0),
        _run("score", 1, 80.0),
    ]
    v = verdict(summarise(rows))
    assert v["holds"] is False and v["met_every_seed"] is False


def test_no_verdict_without_a_ranking_to_compare_with() -> None:
    assert verdict(summarise([_run("score_per_ms", 0, 90.0)]))["holds"] is None


def test_no_verdict_when_no_macs_aware_ranking_reached_the_speed() -> None:
    rows = [
        _run("score_per_ms", 0, 80.0),
        _run("score_per_ms", 1, 80.0),
        _run("score", 0, 88.0, met=False),
        _run("score", 1, 88.0),
    ]
    v = verdict(summarise(rows))
    assert v["holds"] is None and "speed-up target" in v["why"]

"""Checkpoints and resume (flow_compress.pipeline.checkpoint) on a real resnet18 and digits.

An interrupted run (cancelled right after its first accepted stage-1 step, as a crash would
stop it) leaves a checkpoint; resuming from it must skip the finished steps and end exactly
where an uninterrupted run ends: same plan, same step records, same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flow_compress.arch.models import build_model
from flow_compress.config import CompressionConfig
from flow_compress.data import DataSplits
from flow_compress.errors import CancelledError
from flow_compress.pipeline import CompressionResult, run_pipeline
from flow_compress.pipeline.checkpoint import STATE_FILE, Checkpointer, fingerprint
from flow_compress.plan import Plan, apply_plan
from flow_compress.schema import ProgressEvent
from tests.flow_compress.conftest import SIZE, small_config

pytestmark = pytest.mark.timeout(600)


def _config() -> CompressionConfig:
    # Three short stage-1 steps (a checkpoint in the middle) and one stage-2 removal.
    return small_config(
        target_macs=0.4,
        prune={"steps": 3, "ranking": "score"},
        recovery={"final_iters": 0},
        truncate={"n_try": 1},
    )


def _run(
    model: torch.nn.Module,
    data: DataSplits,
    config: CompressionConfig,
    folder: Path | None,
    *,
    stop_after_first_step: bool = False,
    events: list[ProgressEvent] | None = None,
) -> CompressionResult:
    seen = events if events is not None else []
    accepted: list[int] = []

    def progress(event: ProgressEvent) -> None:
        seen.append(event)
        if event.stage == "Filter Prune" and event.macs is not None and event.step > 0:
            accepted.append(event.step)

    checkpoint = Checkpointer(folder, fingerprint(config, "w")) if folder else None
    return run_pipeline(
        model,
        data,
        config,
        progress=progress,
        should_cancel=lambda: stop_after_first_step and bool(accepted),
        checkpoint=checkpoint,
    )


def test_a_resumed_run_continues_from_the_checkpoint_and_ends_like_an_uninterrupted_one(
    trained_resnet: torch.nn.Module, digits: DataSplits, tmp_path: Path
) -> None:
    config = _config()
    reference = _run(trained_resnet, digits, config, None)
    assert sum(s.stage == "Filter Prune" for s in reference.context.steps) >= 2

    folder = tmp_path / "ckpt"
    with pytest.raises(CancelledError):
        _run(trained_resnet, digits, config, folder, stop_after_first_step=True)
    state = json.loads((folder / STATE_FILE).read_text())
    assert (state["stage"], state["step"]) == ("Filter Prune", 1)
    assert len(list(folder.glob("weights-*.safetensors"))) == 1

    events: list[ProgressEvent] = []
    resumed = _run(trained_resnet, digits, config, folder, events=events)
    # It started at step 2: no baseline, no step 1 again.
    assert not any(e.stage == "Baseline" for e in events)
    prune_steps = [e.step for e in events if e.stage == "Filter Prune" and e.macs is not None]
    assert prune_steps[0] == 1 and "resumed" in events[0].message
    assert prune_steps[1:] and min(prune_steps[1:]) >= 2
    assert any(
        n.startswith("resumed from a checkpoint after Filter Prune step 1")
        for n in (resumed.context.notes)
    )

    ref, res = reference.context, resumed.context
    assert _graphs_numbered_locally(res.plan_ops) == _graphs_numbered_locally(ref.plan_ops)
    assert [s.model_dump() for s in res.steps] == [s.model_dump() for s in ref.steps]
    assert dict(res.recovery_iters) == dict(ref.recovery_iters)
    ref_state, res_state = reference.model.state_dict(), resumed.model.state_dict()
    assert ref_state.keys() == res_state.keys()
    for key, value in ref_state.items():
        assert torch.equal(value, res_state[key]), key
    # The stage-2 acceptance was checkpointed too.
    final = json.loads((folder / STATE_FILE).read_text())
    assert final["stage"] == "Layer Trunc" and final["plan_ops"] == res.plan_ops
    # The resumed plan replays (the checkpoint's graph ids cannot merge with new ones).
    replayed = apply_plan(
        build_model("resnet18", 10, in_chans=1, input_size=SIZE),
        Plan(model="resnet18", num_classes=10, in_chans=1, input_size=SIZE, ops=res.plan_ops),
        torch.zeros(1, 1, SIZE, SIZE),
    )
    assert {k: v.shape for k, v in replayed.state_dict().items()} == {
        k: v.shape for k, v in res_state.items()
    }


def _graphs_numbered_locally(ops: list[dict[str, object]]) -> list[dict[str, object]]:
    """Plan ops with DepGraph ids replaced by their first-seen order (ids are per process)."""
    order: dict[object, int] = {}
    return [
        {**op, "graph": order.setdefault(op["graph"], len(order))} if "graph" in op else op
        for op in ops
    ]


def test_a_checkpoint_of_another_run_or_a_corrupt_one_is_ignored(
    trained_resnet: torch.nn.Module, digits: DataSplits, tmp_path: Path
) -> None:
    config = _config().model_copy(
        update={"truncate": _config().truncate.model_copy(update={"enabled": False})}
    )
    folder = tmp_path / "ckpt"
    with pytest.raises(CancelledError):
        _run(trained_resnet, digits, config, folder, stop_after_first_step=True)

    # Another configuration's checkpoint: not resumed (a fresh run starts with its baseline).
    other = config.model_copy(update={"seed": config.seed + 1})
    assert Checkpointer(folder, fingerprint(other, "w")).load() == (
        None,
        "checkpoint ignored: it belongs to another configuration or weights",
    )
    assert Checkpointer(folder, fingerprint(config, "other weights")).load()[0] is None
    assert Checkpointer(folder, fingerprint(config, "w")).load()[0] is not None

    # A corrupt weights file: not resumed either, and the run starts over.
    state = json.loads((folder / STATE_FILE).read_text())
    weights = folder / state["weights_file"]
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    events: list[ProgressEvent] = []
    with pytest.raises(CancelledError):
        _run(trained_resnet, digits, config, folder, stop_after_first_step=True, events=events)
    assert events[0].stage == "Baseline"

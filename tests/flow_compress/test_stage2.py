import torch
from torch import nn

from flow_compress.arch.blocks import find_candidates
from flow_compress.data import DataSplits
from flow_compress.pipeline import make_context
from flow_compress.pipeline.stage2 import block_scores, run_stage2

from .conftest import small_config


def _ctx(model: nn.Module, data: DataSplits, **truncate: object):
    cfg = small_config(truncate={"max_layers": 1, "n_try": 2, **truncate}, max_drop=100.0)
    ctx, student = make_context(model, data, cfg)
    base = ctx.record(student, "Baseline")
    ctx.base_val_top1 = base.top1
    return ctx, student


def test_candidates_are_identity_blocks_of_matching_shape(
    trained_resnet: nn.Module, digits: DataSplits
) -> None:
    x = digits.sample_inputs(1)
    names = {c.name for c in find_candidates(trained_resnet, x, allow_projection=False)}
    assert names == {"layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"}
    with_proj = find_candidates(trained_resnet, x, allow_projection=True)
    assert {c.name for c in with_proj if c.kind == "projection"} == {
        "layer2.0",
        "layer3.0",
        "layer4.0",
    }


def test_block_scores_are_positive(trained_resnet: nn.Module, digits: DataSplits) -> None:
    ctx, student = _ctx(trained_resnet, digits)
    scores = block_scores(student, ctx)
    assert len(scores) == 5 and all(v > 0 for v in scores.values())


def test_removal_accepted_within_budget(trained_resnet: nn.Module, digits: DataSplits) -> None:
    ctx, student = _ctx(trained_resnet, digits, tau=100.0)
    base_macs = ctx.base_macs
    out = run_stage2(student, ctx)
    assert ctx.steps[-1].stage == "Layer Trunc"
    assert ctx.plan_ops and ctx.plan_ops[0]["op"] == "replace"
    assert isinstance(out.get_submodule(str(ctx.plan_ops[0]["module"])), nn.Identity)
    assert ctx.cost(out)[0] < base_macs
    x = digits.sample_inputs(2)
    assert out(x).shape == (2, 10)


def test_removal_reverted_when_error_rises(trained_resnet: nn.Module, digits: DataSplits) -> None:
    # No recovery and tau = 0: cutting a block of a trained network costs accuracy, so every
    # tried candidate must be reverted and the model left untouched.
    cfg = small_config(
        truncate={"max_layers": 1, "n_try": 2, "tau": 0.0},
        max_drop=100.0,
        recovery={"trunc_iters": 0},
    )
    ctx, student = make_context(trained_resnet, digits, cfg)
    ctx.base_val_top1 = ctx.record(student, "Baseline").top1
    before = {k: v.clone() for k, v in student.state_dict().items()}
    out = run_stage2(student, ctx)
    assert ctx.plan_ops == []
    assert [s.stage for s in ctx.steps] == ["Baseline"]
    assert sum("rejected" in n for n in ctx.notes) == 2
    after = out.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

import copy
import itertools

import pytest
import torch

from flow_compress.arch.models import build_model
from flow_compress.criteria import list_criteria
from flow_compress.data import DataSplits
from flow_compress.graph.adapter import PruningGraph
from flow_compress.pipeline import make_context
from flow_compress.pipeline.stage1 import FilterPruner, decay_schedule, paper_ratios
from flow_compress.plan import Plan, apply_plan

from .conftest import SIZE, small_config


def test_decay_schedule_is_front_loaded_and_ends_at_target() -> None:
    f = decay_schedule(0.3, 6)
    assert abs(f[-1] - 0.3) < 1e-9
    cuts = [1 - f[0]] + [f[i - 1] - f[i] for i in range(1, len(f))]
    assert all(a >= b for a, b in itertools.pairwise(cuts))
    assert all(0.3 <= x < 1 for x in f)


def test_paper_ratios_grow_as_in_the_authors_code() -> None:
    r = paper_ratios(20, 1.5, 0.1)
    assert abs(r[0] - 0.1) < 1e-9
    assert r == sorted(r)


def test_one_step_lowers_macs_and_params_and_keeps_output_shape(
    trained_resnet: torch.nn.Module, digits: DataSplits
) -> None:
    cfg = small_config(prune={"steps": 1, "ranking": "score"}, target_macs=0.6)
    ctx, student = make_context(trained_resnet, digits, cfg)
    base = ctx.record(student, "Baseline")
    ctx.base_val_top1 = base.top1
    pruned = FilterPruner(ctx).run(student)
    macs, params = ctx.cost(pruned)
    assert macs < base.macs and params < base.params
    assert macs <= 0.6 * base.macs * 1.05
    x = digits.sample_inputs(4)
    assert pruned(x).shape == trained_resnet(x).shape == (4, 10)
    assert ctx.recovery_iters["Filter Prune"] == cfg.recovery.iters_per_step
    # The classifier's outputs are never pruned.
    assert pruned.fc.out_features == 10


def test_group_costs_cover_coupled_layers(
    trained_resnet: torch.nn.Module, digits: DataSplits
) -> None:
    model = copy.deepcopy(trained_resnet)
    graph = PruningGraph(model, digits.sample_inputs(1), ignored=[model.fc])
    groups = {g.root_name: g for g in graph.groups()}
    assert "fc" not in groups
    # The stem's channels are coupled to every block of layer1 through the residual adds.
    stem = next(g for g in groups.values() if any(p.name == "conv1" for p in g.producers))
    names = {p.name for p in stem.producers}
    assert {"layer1.0.conv2", "layer1.1.conv2"} <= names
    assert bool((stem.cost > 0).all())


def test_blown_budget_rolls_back_to_the_last_accepted_model(
    trained_resnet: torch.nn.Module, digits: DataSplits
) -> None:
    # Cutting 95 % of MACs in one step with no recovery destroys accuracy: with no retries
    # the step is rolled back and the unpruned model is kept.
    cfg = small_config(
        target_macs=0.05,
        max_drop=1.0,
        prune={"steps": 1, "retries": 0, "max_layer_ratio": 0.99, "min_channels": 1},
        recovery={"iters_per_step": 0},
    )
    ctx, student = make_context(trained_resnet, digits, cfg)
    base = ctx.record(student, "Baseline")
    ctx.base_val_top1 = base.top1
    result = FilterPruner(ctx).run(student)
    assert ctx.cost(result) == (base.macs, base.params)
    assert [s.stage for s in ctx.steps] == ["Baseline"]
    assert sum("rolled back" in n for n in ctx.notes) == 1
    assert ctx.plan_ops == []


def test_retries_halve_the_cut(trained_resnet: torch.nn.Module, digits: DataSplits) -> None:
    cfg = small_config(
        target_macs=0.05,
        max_drop=1.0,
        prune={"steps": 1, "retries": 2, "max_layer_ratio": 0.99, "min_channels": 1},
        recovery={"iters_per_step": 0},
    )
    ctx, student = make_context(trained_resnet, digits, cfg)
    base = ctx.record(student, "Baseline")
    ctx.base_val_top1 = base.top1
    result = FilterPruner(ctx).run(student)
    rollbacks = sum("rolled back" in n for n in ctx.notes)
    assert rollbacks >= 1
    macs = ctx.cost(result)[0]
    if rollbacks < 3:
        # An accepted retry cut at most (1/2)^rollbacks of the requested reduction.
        requested = base.macs * (1 - 0.05)
        assert base.macs - macs <= requested / 2**rollbacks * 1.05
        assert ctx.drop(ctx.steps[-1].top1) <= 1.0
    else:
        assert macs == base.macs


@pytest.mark.parametrize("criterion", list_criteria())
def test_every_registered_criterion_runs_through_the_same_schedule(
    criterion: str, trained_resnet: torch.nn.Module, digits: DataSplits
) -> None:
    cfg = small_config(
        prune={"steps": 1, "criterion": criterion, "ranking": "score"}, max_drop=100.0
    )
    ctx, student = make_context(trained_resnet, digits, cfg)
    base = ctx.record(student, "Baseline")
    ctx.base_val_top1 = base.top1
    pruned = FilterPruner(ctx).run(student)
    assert ctx.cost(pruned)[0] < base.macs
    assert ctx.recovery_iters["Filter Prune"] == cfg.recovery.iters_per_step


def test_round_to_keeps_channel_counts_multiples(
    trained_resnet: torch.nn.Module, digits: DataSplits
) -> None:
    cfg = small_config(prune={"steps": 1, "round_to": 8, "ranking": "score"}, target_macs=0.6)
    ctx, student = make_context(trained_resnet, digits, cfg)
    ctx.base_val_top1 = ctx.record(student, "Baseline").top1
    pruned = FilterPruner(ctx).run(student)
    convs = [
        m for n, m in pruned.named_modules() if isinstance(m, torch.nn.Conv2d) and n != "conv1"
    ]
    assert all(m.out_channels % 8 == 0 for m in convs)
    assert ctx.cost(pruned)[0] < ctx.base_macs


def test_plan_replay_rebuilds_identical_model(
    trained_resnet: torch.nn.Module, digits: DataSplits
) -> None:
    cfg = small_config(prune={"steps": 2}, truncate={"max_layers": 1, "tau": 100.0})
    from flow_compress.pipeline import run_pipeline

    result = run_pipeline(trained_resnet, digits, cfg)
    assert any(op["op"] == "replace" for op in result.ops)
    plan = Plan(model="resnet18", num_classes=10, in_chans=1, input_size=SIZE, ops=result.ops)
    fresh = build_model("resnet18", 10, in_chans=1, input_size=SIZE)
    apply_plan(fresh, plan, torch.zeros(1, 1, SIZE, SIZE))
    fresh.load_state_dict(result.model.state_dict())
    x = digits.sample_inputs(8)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), result.model.eval()(x))

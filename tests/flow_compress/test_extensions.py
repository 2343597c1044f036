"""The three extension points, each exercised by registering a toy plug-in and running it: a
criterion through stage 1, a family through the whole pipeline, an export format through the
parity check (README, "Extending flow-compress"). Each fixture unregisters its plug-in, so
the registries the other tests loop over are left as they were."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from flow_compress.arch import (
    ArchSpec,
    BlockRule,
    Family,
    Kind,
    get_architecture,
    register_family,
    unregister_family,
)
from flow_compress.arch.blocks import find_candidates
from flow_compress.arch.models import build_model
from flow_compress.config import CompressionConfig, ExportConfig, PruneConfig
from flow_compress.criteria import (
    Criterion,
    ScoreRequest,
    list_criteria,
    register_criterion,
    unregister_criterion,
)
from flow_compress.data import DataSplits, load_dataset
from flow_compress.errors import InvalidConfigError, UnsupportedModelError
from flow_compress.export import (
    Exporter,
    get_exporter,
    list_exporters,
    register_exporter,
    unregister_exporter,
)
from flow_compress.export.parity import check_parity, export_model
from flow_compress.pipeline import make_context, run_pipeline
from flow_compress.pipeline.stage1 import FilterPruner
from flow_compress.plan import Plan, apply_plan

from .conftest import small_config

# --------------------------------------------------------------------------- a criterion


def _filter_norm(request: ScoreRequest) -> list[torch.Tensor]:
    """L2 norm of each root channel's filters, summed over the group's producers."""
    out = []
    for g in request.groups:
        score = torch.zeros(g.size)
        for p in g.producers:
            norms = p.module.weight.detach().flatten(1).norm(dim=1)  # type: ignore[union-attr]
            for idx, root in zip(p.idxs, p.root_idxs, strict=True):
                if 0 <= root < g.size:
                    score[root] += norms[idx]
        out.append(score)
    return out


@pytest.fixture
def filter_norm() -> Iterator[list[ScoreRequest]]:
    requests: list[ScoreRequest] = []

    def score(request: ScoreRequest) -> list[torch.Tensor]:
        requests.append(request)
        return _filter_norm(request)

    register_criterion(Criterion("filter_norm", "toy: L2 filter norm", score))
    yield requests
    unregister_criterion("filter_norm")


def test_a_registered_criterion_drives_stage_1(
    filter_norm: list[ScoreRequest], trained_resnet: nn.Module, digits: DataSplits
) -> None:
    cfg = small_config(prune={"steps": 1, "criterion": "filter_norm"}, max_drop=100.0)
    ctx, student = make_context(trained_resnet, digits, cfg)
    ctx.base_val_top1 = ctx.record(student, "Baseline").top1
    pruned = FilterPruner(ctx).run(student)
    assert filter_norm, "stage 1 scored with the registered criterion"
    assert all(r.batches and r.options.criterion == "filter_norm" for r in filter_norm)
    assert ctx.cost(pruned)[0] < ctx.base_macs
    assert "filter_norm" in list_criteria()


def test_criterion_names_are_validated_against_the_registry(
    filter_norm: list[ScoreRequest],
) -> None:
    assert PruneConfig(criterion="filter_norm").criterion == "filter_norm"
    with pytest.raises(ValidationError, match=r"unknown criterion 'nope'; registered: .*l1"):
        PruneConfig(criterion="nope")
    schema = CompressionConfig.model_json_schema()["$defs"]["PruneConfig"]
    assert "filter_norm" in schema["properties"]["criterion"]["enum"]


def test_an_unregistered_criterion_is_refused() -> None:
    with pytest.raises(ValidationError, match="unknown criterion 'filter_norm'"):
        PruneConfig(criterion="filter_norm")
    with pytest.raises(ValueError, match="already registered"):
        register_criterion(Criterion("l1", "a second l1", _filter_norm))


# --------------------------------------------------------------------------- a family


def _mnasnet_match(m: nn.Module) -> tuple[Kind, str | None] | None:
    from torchvision.models.mnasnet import _InvertedResidual

    if isinstance(m, _InvertedResidual) and m.apply_residual:
        return ("identity", "layers")
    return None


@pytest.fixture
def mnasnet() -> Iterator[Family]:
    family = register_family(
        Family(
            name="mnasnet",
            architectures=(ArchSpec("mnasnet0_5", "mnasnet", "torchvision", "mnasnet0_5"),),
            small="mnasnet0_5",
            block_rules=(BlockRule("mnasnet-inverted-residual", _mnasnet_match),),
        )
    )
    yield family
    unregister_family("mnasnet")


@pytest.fixture(scope="module")
def digits32() -> DataSplits:
    from flow_compress.config import DataConfig

    return load_dataset("digits", input_size=32, in_chans=3, config=DataConfig(max_eval_samples=32))


def test_a_registered_family_compresses_truncates_and_replays(
    mnasnet: Family, digits32: DataSplits
) -> None:
    assert get_architecture("mnasnet0_5").family == "mnasnet"
    torch.manual_seed(0)
    model = build_model("mnasnet0_5", 10, input_size=32)
    x = digits32.sample_inputs(4)
    assert find_candidates(model, x[:1], allow_projection=False), "its block rule matches"
    cfg = small_config(
        model="mnasnet0_5",
        in_chans=3,
        input_size=32,
        target_macs=0.6,
        max_drop=100.0,
        prune={"steps": 1, "calibration_batches": 1},
        truncate={"max_layers": 1, "n_try": 1, "tau": 100.0, "calibration_batches": 1},
        recovery={"iters_per_step": 1, "trunc_iters": 1, "final_iters": 0, "batch_size": 8},
        data={"eval_batch_size": 16, "max_eval_samples": 32},
    )
    result = run_pipeline(model, digits32, cfg)
    ctx, pruned = result.context, result.model
    assert ctx.cost(pruned)[0] < ctx.base_macs
    assert any(op["op"] == "replace" for op in result.ops), "stage 2 used the family's rule"
    plan = Plan(model="mnasnet0_5", num_classes=10, in_chans=3, input_size=32, ops=result.ops)
    fresh = apply_plan(build_model("mnasnet0_5", 10, input_size=32), plan, x[:1])
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), pruned(x), atol=1e-5)


def test_an_unregistered_family_is_gone_with_its_architectures(mnasnet: Family) -> None:
    unregister_family("mnasnet")
    with pytest.raises(UnsupportedModelError, match="unknown architecture 'mnasnet0_5'"):
        get_architecture("mnasnet0_5")
    register_family(mnasnet)  # for the fixture's teardown
    with pytest.raises(ValueError, match="already registered"):
        register_family(mnasnet)


# --------------------------------------------------------------------------- an exporter


def _export_pt2(model: nn.Module, example: torch.Tensor, path: Path, cfg: ExportConfig) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def _load_pt2(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    module = torch.export.load(str(path)).module()
    return lambda x: module(x).float()


@pytest.fixture
def pt2() -> Iterator[Exporter]:
    yield register_exporter(
        Exporter(
            name="pt2", file="model.pt2", label="torch.export", export=_export_pt2, load=_load_pt2
        )
    )
    unregister_exporter("pt2")


def test_a_registered_format_is_exported_and_checked(pt2: Exporter, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, in_chans=1, input_size=16)
    inputs = torch.randn(6, 1, 16, 16)
    (record,) = export_model(model, inputs, tmp_path, ExportConfig(formats=("pt2",)))
    assert (record.format, record.passed, record.samples) == ("pt2", True, 6)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]
    assert "pt2" in list_exporters() and get_exporter("pt2") is pt2


def test_format_names_are_validated_against_the_registry(pt2: Exporter, tmp_path: Path) -> None:
    assert ExportConfig(formats=("onnx", "pt2")).formats == ("onnx", "pt2")
    unregister_exporter("pt2")
    try:
        with pytest.raises(ValidationError, match=r"unknown export format 'pt2'; registered"):
            ExportConfig(formats=("pt2",))
        # An unknown format is refused, never exported as another one.
        with pytest.raises(InvalidConfigError, match="unknown export format 'pt2'"):
            check_parity("pt2", tmp_path / "model.pt2", nn.Linear(2, 2), torch.zeros(1, 2), 1.0)
        bad = ExportConfig.model_construct(formats=("pt2",))
        with pytest.raises(InvalidConfigError, match="unknown export format 'pt2'"):
            export_model(nn.Linear(2, 2), torch.zeros(2, 2), tmp_path, bad)
        assert list(tmp_path.iterdir()) == []
    finally:
        register_exporter(pt2)

"""Weights as users have them (issue 12, item 2): timm / Hugging Face folders, training
checkpoints that wrap the weights, ``hf-hub:`` references read from a local cache the test
builds (the standard hub layout, no download), published weights from local caches with
``pretrained``, ``weights_not_available`` when they are not there, and a helpful
``bad_checkpoint`` for a checkpoint of the same name in the other source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from flow_compress.arch.catalogue import WeightCaches
from flow_compress.arch.models import (
    build_model,
    load_weights,
    read_state_dict,
    resolve_model,
    save_weights,
)
from flow_compress.errors import (
    BadCheckpointError,
    ErrorCode,
    UnsupportedModelError,
    WeightsNotAvailableError,
)
from flow_compress.pipeline import compress
from flow_compress.pipeline.compress import prepare
from flow_compress.plan import read_plan, rebuild

from .conftest import small_config

LITE0 = "tf_efficientnet_lite0"


def make_hub_repo(
    cache: Path,
    repo: str,
    model: nn.Module,
    config: dict[str, object],
    file: str = "model.safetensors",
) -> Path:
    """A repository in the standard Hugging Face cache layout:
    ``models--ORG--NAME/{refs/main, snapshots/<rev>/{config.json, <weights>}}``."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snapshot = folder / "snapshots" / rev
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(rev)
    (snapshot / "config.json").write_text(json.dumps(config))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if file.endswith(".safetensors"):
        save_file(state, str(snapshot / file))
    else:
        torch.save(state, snapshot / file)
    return snapshot


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    torch.manual_seed(1)
    return build_model(f"timm:{LITE0}", 10, in_chans=1, input_size=32)


# ----------------------------------------------------------------------------- layouts


@pytest.fixture(scope="module")
def small() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", 10, in_chans=1, input_size=16)


@pytest.mark.parametrize(
    "layout",
    [
        "safetensors",
        "hf-folder-safetensors",
        "hf-folder-bin",
        "state_dict",
        "model",
        "model_state_dict",
        "ema-with-metadata",
        "ddp-module-prefix",
        "lightning",
    ],
)
def test_every_checkpoint_layout_loads_the_same_weights(
    layout: str, small: nn.Module, tmp_path: Path
) -> None:
    sd = small.state_dict()
    path = tmp_path / "w.pt"
    if layout == "safetensors":
        save_weights(small, path)
    elif layout.startswith("hf-folder"):
        path = tmp_path / "repo"
        path.mkdir()
        if layout.endswith("bin"):
            torch.save(sd, path / "pytorch_model.bin")
        else:
            save_weights(small, path / "model.safetensors")
    elif layout in ("state_dict", "model", "model_state_dict"):
        torch.save({layout: sd, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    elif layout == "ema-with-metadata":
        torch.save({"state_dict_ema": sd, "epoch": 7, "arch": "resnet18"}, path)
    elif layout == "ddp-module-prefix":
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    elif layout == "lightning":
        torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 1}, path)
    fresh = build_model("resnet18", 10, in_chans=1, input_size=16)
    assert not _same(fresh, small)
    load_weights(fresh, path)
    assert _same(fresh, small)


def test_a_pickled_module_is_refused_and_never_unpickled(small: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(small, path)  # a whole nn.Module: unpickling it would run code
    with pytest.raises(BadCheckpointError, match="pickled modules are refused"):
        read_state_dict(path)


def test_a_timm_checkpoint_under_the_torchvision_name_says_which_name_fits(
    tmp_path: Path,
) -> None:
    # The report: a timm efficientnet_b0 checkpoint named efficientnet_b0 (the
    # registered torchvision family) failed with 360 missing keys and no hint.
    path = tmp_path / "effnet.safetensors"
    save_weights(build_model("timm:efficientnet_b0", 10), path)
    with pytest.raises(BadCheckpointError) as info:
        load_weights(build_model("efficientnet_b0", 10), path, reference="efficientnet_b0")
    assert info.value.code is ErrorCode.BAD_CHECKPOINT
    assert "missing 360 keys" in info.value.message
    assert "name it timm:efficientnet_b0" in info.value.message
    # and the hint is right: the same file loads under that name
    load_weights(build_model("timm:efficientnet_b0", 10), path)


def test_a_checkpoint_of_an_unrelated_model_stays_bad_checkpoint_without_a_hint(
    small: nn.Module, tmp_path: Path
) -> None:
    path = tmp_path / "resnet.safetensors"
    save_weights(small, path)
    with pytest.raises(BadCheckpointError) as info:
        load_weights(build_model("mobilenet_v2", 10, in_chans=1), path, reference="mobilenet_v2")
    assert "name it" not in info.value.message


# ----------------------------------------------------------------------------- hf-hub


def test_an_hf_hub_reference_resolves_from_the_local_cache(
    lite0: nn.Module, tmp_path: Path
) -> None:
    snapshot = make_hub_repo(
        tmp_path,
        "acme/lite0-digits",
        lite0,
        {"architecture": LITE0, "num_classes": 10, "pretrained_cfg": {"input_size": [1, 32, 32]}},
        file="pytorch_model.bin",
    )
    resolved = resolve_model("hf-hub:acme/lite0-digits", caches=WeightCaches(hub_cache=tmp_path))
    assert resolved.architecture == f"timm:{LITE0}"
    assert resolved.weights == snapshot / "pytorch_model.bin"
    assert resolved.num_classes == 10
    assert resolved.pretrained_cfg == {"input_size": [1, 32, 32]}


def test_an_hf_hub_reference_not_in_the_cache_is_weights_not_available(tmp_path: Path) -> None:
    for caches in (WeightCaches(hub_cache=tmp_path), None):
        with pytest.raises(WeightsNotAvailableError) as info:
            resolve_model("hf-hub:acme/absent", caches=caches)
        assert info.value.code is ErrorCode.WEIGHTS_NOT_AVAILABLE


def test_an_hf_hub_repository_of_no_timm_model_is_unsupported(tmp_path: Path) -> None:
    make_hub_repo(tmp_path, "acme/bert", nn.Linear(2, 2), {"model_type": "bert"})
    with pytest.raises(UnsupportedModelError, match="no timm 'architecture'"):
        resolve_model("hf-hub:acme/bert", caches=WeightCaches(hub_cache=tmp_path))


def test_an_hf_hub_model_with_other_classes_gets_a_new_head(tmp_path: Path) -> None:
    torch.manual_seed(2)
    hub = build_model(f"timm:{LITE0}", 5, in_chans=1, input_size=32)
    make_hub_repo(tmp_path, "acme/lite0-five", hub, {"architecture": LITE0, "num_classes": 5})
    cfg = small_config(model="hf-hub:acme/lite0-five", input_size=32)
    job = prepare(cfg, None, caches=WeightCaches(hub_cache=tmp_path))
    assert job.architecture == f"timm:{LITE0}"
    assert any("classifier replaced" in n for n in job.notes)
    body = {k: v for k, v in hub.state_dict().items() if not k.startswith("classifier.")}
    got = job.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in body.items())
    with torch.no_grad():
        assert job.model(torch.zeros(1, 1, 32, 32)).shape == (1, 10)


@pytest.mark.slow  # a whole compression: ~30 s on two idle cores
def test_an_hf_hub_model_without_hand_written_rules_compresses_and_replays(
    lite0: nn.Module, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    make_hub_repo(cache, "acme/lite0-digits", lite0, {"architecture": LITE0, "num_classes": 10})
    cfg = small_config(
        model="hf-hub:acme/lite0-digits",
        input_size=32,
        target_macs=0.7,
        max_drop=100.0,
        prune={"steps": 1},
        truncate={"max_layers": 1, "n_try": 1},
        recovery={"iters_per_step": 2, "trunc_iters": 1, "final_iters": 2, "batch_size": 8},
        latency={"enabled": False},
        export={"formats": ["torchscript"], "parity_samples": 4},
        data={"max_train_samples": 64, "max_eval_samples": 32, "eval_batch_size": 32},
    )
    out = tmp_path / "out"
    report = compress(cfg, weights=None, out_dir=out, caches=WeightCaches(hub_cache=cache))
    assert report.model == "hf-hub:acme/lite0-digits"
    assert report.pruned.macs < report.base.macs
    plan = read_plan(out / "plan.json")
    assert plan.model == f"timm:{LITE0}"  # rebuilds without the cache
    rebuilt = rebuild(plan, out / "weights.safetensors")
    x = torch.randn(3, 1, 32, 32)
    pruned = build_model(f"timm:{LITE0}", 10, in_chans=1, input_size=32)
    with torch.no_grad():
        assert rebuilt(x).shape == (3, 10)
        # the base accuracy the report states is the hub model's (its weights were loaded)
        assert not torch.equal(rebuilt(x), pruned(x))
    assert any("Hugging Face cache" in n for n in report.notes)
    assert not any("no weights given" in n for n in report.notes), report.notes


# ----------------------------------------------------------------------------- pretrained


def test_timm_pretrained_weights_come_from_the_local_hub_cache(tmp_path: Path) -> None:
    torch.manual_seed(3)
    published = build_model("timm:resnet18", 1000)  # what timm/resnet18.a1_in1k would hold
    make_hub_repo(tmp_path, "timm/resnet18.a1_in1k", published, {"architecture": "resnet18"})
    caches = WeightCaches(hub_cache=tmp_path)
    model = build_model("timm:resnet18", 10, pretrained=True, caches=caches)
    assert torch.equal(model.conv1.weight, published.conv1.weight)
    assert model.fc.out_features == 10
    grey = build_model("timm:resnet18", 10, in_chans=1, pretrained=True, caches=caches)
    # timm adapts the stem to one channel by summing the published RGB filters
    assert torch.allclose(grey.conv1.weight, published.conv1.weight.sum(1, keepdim=True))


def test_torchvision_pretrained_weights_come_from_the_local_torch_hub(tmp_path: Path) -> None:
    torch.manual_seed(4)
    published = build_model("resnet18", 1000)
    (tmp_path / "checkpoints").mkdir()
    torch.save(published.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    model = build_model("resnet18", 10, pretrained=True, caches=WeightCaches(torch_hub=tmp_path))
    assert torch.equal(model.layer1[0].conv1.weight, published.layer1[0].conv1.weight)
    assert model.fc.out_features == 10


@pytest.mark.parametrize("name", ["resnet18", "timm:resnet18", f"timm:{LITE0}"])
def test_pretrained_without_cached_weights_is_weights_not_available(
    name: str, tmp_path: Path
) -> None:
    for caches in (WeightCaches(hub_cache=tmp_path, torch_hub=tmp_path), None):
        with pytest.raises(WeightsNotAvailableError) as info:
            build_model(name, 10, pretrained=True, caches=caches)
        assert info.value.code is ErrorCode.WEIGHTS_NOT_AVAILABLE


def test_only_a_run_without_weights_is_noted_as_randomly_initialised(tmp_path: Path) -> None:
    cfg = small_config()
    weights = tmp_path / "w.safetensors"
    save_weights(build_model("resnet18", 10, in_chans=1, input_size=cfg.input_size), weights)
    random_init = "no weights given: compressed a randomly initialised model"
    assert random_init in prepare(cfg, None).notes
    assert random_init not in prepare(cfg, weights).notes

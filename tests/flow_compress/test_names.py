"""Model names beyond the registered families (issue 12, item 1): every timm and torchvision
classifier resolves with an explicit source, bare names keep working, ambiguous and unknown
names are refused with stable codes and a fix, and unregistered models build adapted to the
data (classes, channels, input size) as the ``auto`` family."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch
import torchvision

from flow_compress.arch import AUTO_FAMILY, get_architecture, list_architectures
from flow_compress.arch.catalogue import Catalogue, build_catalogue, resolve_name
from flow_compress.arch.models import build_model, resolve_model
from flow_compress.errors import ErrorCode, UnsupportedModelError

TIMM = timm.list_models()
TORCHVISION = torchvision.models.list_models(module=torchvision.models)


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return build_catalogue()


def test_registered_names_keep_their_family_and_spec() -> None:
    for name in list_architectures():
        resolved = resolve_model(name)
        assert resolved.spec is get_architecture(name)
        assert resolved.architecture == name
    # the same model spelt with its source keeps the hand-written family
    assert resolve_model("torchvision:resnet18").spec is get_architecture("resnet18")
    assert resolve_model("timm:resnet50").spec is get_architecture("timm_resnet50")


def test_every_timm_and_torchvision_name_resolves_with_its_source() -> None:
    for source, names in (("timm", TIMM), ("torchvision", TORCHVISION)):
        for name in names:
            spec = resolve_model(f"{source}:{name}").spec
            assert (spec.source, spec.builder) == (source, name)
            assert spec.family == AUTO_FAMILY or spec.name in list_architectures()
    assert len(TIMM) > 1000 and len(TORCHVISION) > 50


def test_bare_names_resolve_when_one_source_has_them() -> None:
    only_timm = "tf_efficientnet_lite0"
    assert only_timm in TIMM and only_timm not in TORCHVISION
    spec = resolve_model(only_timm).spec
    assert (spec.source, spec.builder, spec.family) == ("timm", only_timm, AUTO_FAMILY)
    only_tv = "regnet_x_400mf"
    assert only_tv in TORCHVISION and only_tv not in TIMM
    assert resolve_model(only_tv).spec.source == "torchvision"


def test_a_bare_name_both_sources_have_is_refused_with_the_prefixes() -> None:
    both = sorted(set(TIMM) & set(TORCHVISION) - set(list_architectures()))
    assert "efficientnet_b5" in both
    with pytest.raises(UnsupportedModelError) as info:
        resolve_model("efficientnet_b5")
    assert info.value.code is ErrorCode.UNSUPPORTED_MODEL
    assert "timm:efficientnet_b5" in info.value.message
    assert "torchvision:efficientnet_b5" in info.value.message


@pytest.mark.parametrize(
    ("name", "suggested"),
    [
        ("tf_efficientnet_lite9", "timm:tf_efficientnet_lite0"),
        ("resnet_18", "resnet18"),
        ("timm:tf_efficientnet_lite9", "timm:tf_efficientnet_lite0"),
        ("torchvision:regnet_x_400", "torchvision:regnet_x_400mf"),
    ],
)
def test_unknown_names_are_refused_with_close_matches(name: str, suggested: str) -> None:
    with pytest.raises(UnsupportedModelError) as info:
        resolve_model(name)
    assert "did you mean" in info.value.message
    suggestions = info.value.message.split("did you mean:", 1)[1]
    assert suggested in [s.strip(" ?") for s in suggestions.split(",")]


@pytest.mark.parametrize("name", ["", "bogus:resnet18", "timm:", "hf-hub:no-slash", "a b"])
def test_malformed_references_are_unsupported_model(name: str) -> None:
    with pytest.raises(UnsupportedModelError):
        resolve_model(name)


def test_the_catalogue_resolves_like_the_library_without_torch(catalogue: Catalogue) -> None:
    assert set(catalogue.timm) == set(TIMM)
    assert set(catalogue.torchvision) == set(TORCHVISION)
    assert set(catalogue.registered) == set(list_architectures())
    assert catalogue.versions["timm"] == timm.__version__
    names = ["resnet18", "timm:resnet50", only := "tf_efficientnet_lite0", "regnet_x_400mf"]
    expected = {n: resolve_model(n).architecture for n in names}
    code = (
        "import json, sys\n"
        "from flow_compress.arch.catalogue import Catalogue\n"
        "from flow_compress.errors import UnsupportedModelError\n"
        "c = Catalogue.model_validate_json(sys.stdin.read())\n"
        f"out = {{n: c.resolve(n).canonical for n in {names!r}}}\n"
        "for bad in ('efficientnet_b5', 'timm:nope_net'):\n"
        "    try:\n"
        "        c.resolve(bad)\n"
        "    except UnsupportedModelError as e:\n"
        "        out[bad] = e.code.value\n"
        "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=catalogue.model_dump_json(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert {n: out[n] for n in names} == expected
    assert out[only] == f"timm:{only}"
    assert out["efficientnet_b5"] == out["timm:nope_net"] == "unsupported_model"


def test_without_the_lists_prefixed_names_pass_on_syntax_alone() -> None:
    # What the API does before any worker published its catalogue.
    lists = {"registered": list_architectures(), "plugin": (), "timm": None, "torchvision": None}
    assert resolve_name("timm:anything_at_all", **lists).canonical == "timm:anything_at_all"
    assert resolve_name("resnet18", **lists).canonical == "resnet18"
    with pytest.raises(UnsupportedModelError, match="name it with its source"):
        resolve_name("tf_efficientnet_lite0", **lists)


@pytest.mark.parametrize(
    "name",
    [
        "timm:tf_efficientnet_lite0",  # the model: no hand-written family
        "timm:deit_tiny_patch16_224",  # takes img_size: position embeddings sized to the input
        "torchvision:regnet_x_400mf",
        "timm:resnet18.a1_in1k",  # a pretrained tag picks timm's config
    ],
)
def test_auto_models_build_adapted_to_the_data(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 7, in_chans=1, input_size=32)
    assert not model.training
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_default_input_size_comes_from_the_source() -> None:
    assert resolve_model("timm:vit_base_patch16_384").spec.default_input_size == 384
    assert resolve_model("torchvision:efficientnet_b7").spec.default_input_size == 600


def test_the_cli_lists_names_by_source_and_pattern() -> None:
    from typer.testing import CliRunner

    from flow_compress.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app, ["architectures", "--filter", "efficientnet_b*", "--source", "torchvision"]
    )
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.output.strip().splitlines()]
    assert ["torchvision:efficientnet_b0", "torchvision", "efficientnet"] in rows
    assert ["torchvision:efficientnet_b5", "torchvision", "auto"] in rows
    assert {r[1] for r in rows} == {"torchvision"}
    assert all(r[0].startswith("torchvision:efficientnet_b") for r in rows)
    everything = runner.invoke(app, ["architectures", "--filter", "tf_efficientnet_lite0"])
    assert everything.output.split("\t")[:2] == ["timm:tf_efficientnet_lite0", "timm"]
    assert runner.invoke(app, ["architectures", "--source", "nope"]).exit_code == 2

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flow_compress.arch import (
    ArchSpec,
    get_architecture,
    list_architectures,
    register_architecture,
)
from flow_compress.arch.models import build_model, load_weights, read_state_dict, save_weights
from flow_compress.errors import BadCheckpointError, UnsupportedModelError

REQUIRED = [
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg11_bn",
    "vgg13_bn",
    "vgg16_bn",
    "vgg19_bn",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    *[f"efficientnet_b{i}" for i in range(5)],
    "densenet121",
    "convnext_tiny",
    "convnext_small",
    "vit_b_16",
    "vit_tiny_patch16_224",
]


def test_registry_holds_the_required_architectures() -> None:
    assert set(REQUIRED) <= set(list_architectures())


def test_unknown_architecture_lists_valid_names() -> None:
    with pytest.raises(UnsupportedModelError, match="resnet18"):
        get_architecture("resnet9000")


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_architecture(ArchSpec("resnet18", "resnet", "torchvision", "resnet18"))
    with pytest.raises(UnsupportedModelError, match="registered: convnext"):
        register_architecture(ArchSpec("resnet9000", "nofamily", "torchvision", "resnet18"))


def test_the_family_decides_how_a_model_is_built() -> None:
    # timm's registered name differs from its builder's; the ViT family passes the input size
    # (its position embeddings depend on it), the others get none.
    assert get_architecture("timm_resnet50").builder == "resnet50"
    assert build_model("vit_tiny_patch16_224", 10, input_size=32).patch_embed.img_size == (32, 32)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "vit_tiny_patch16_224"])
def test_build_adapts_classes_and_channels(name: str) -> None:
    model = build_model(name, 7, in_chans=1, input_size=32)
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 7)


@pytest.fixture(scope="module")
def small() -> torch.nn.Module:
    return build_model("resnet18", 10, in_chans=1, input_size=16)


def test_safetensors_roundtrip(small: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(small, path)
    fresh = load_weights(build_model("resnet18", 10, in_chans=1), path)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(fresh(x), small(x))


def test_wrapped_state_dict_with_module_prefix(small: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in small.state_dict().items()}}, path
    )
    state = read_state_dict(path)
    assert set(state) == set(small.state_dict())


def test_pickled_module_is_refused_without_running_code(
    small: torch.nn.Module, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    with path.open("wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)
    with pytest.raises(BadCheckpointError, match="weights-only"):
        read_state_dict(path)
    assert not marker.exists()
    whole = tmp_path / "module.pt"
    torch.save(small, whole)
    with pytest.raises(BadCheckpointError):
        read_state_dict(whole)


def test_mismatch_names_first_bad_keys(tmp_path: Path) -> None:
    other = build_model("resnet34", 10, in_chans=1)
    path = tmp_path / "r34.safetensors"
    save_weights(other, path)
    with pytest.raises(BadCheckpointError, match=r"unexpected \d+ keys \(first: layer1\.2"):
        load_weights(build_model("resnet18", 10, in_chans=1), path)
    wrong_classes = tmp_path / "c5.safetensors"
    save_weights(build_model("resnet18", 5, in_chans=1), wrong_classes)
    with pytest.raises(BadCheckpointError, match=r"fc\.weight \(5, 512\) != \(10, 512\)"):
        load_weights(build_model("resnet18", 10, in_chans=1), wrong_classes)


def test_corrupt_and_nonfinite_weights(small: torch.nn.Module, tmp_path: Path) -> None:
    good = tmp_path / "w.safetensors"
    save_weights(small, good)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(BadCheckpointError):
        read_state_dict(truncated)
    state = {k: v.clone() for k, v in small.state_dict().items()}
    state["fc.bias"][0] = float("nan")
    nan = tmp_path / "nan.safetensors"
    save_file(state, str(nan))
    with pytest.raises(BadCheckpointError, match="NaN"):
        load_weights(build_model("resnet18", 10, in_chans=1), nan)
    with pytest.raises(BadCheckpointError, match="not found"):
        read_state_dict(tmp_path / "missing.pt")

"""Architecture registry and safe weight loading.

Architectures are built by name from torchvision or timm; a user's ``nn.Module`` is never
unpickled. Weights come from safetensors or from ``torch.load(weights_only=True)`` state dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from flow_compress.errors import BadCheckpointError, UnsupportedModelError
from flow_compress.registry import get_architecture


def build_model(
    name: str,
    num_classes: int,
    *,
    in_chans: int = 3,
    input_size: int | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """Build a registered architecture with its classifier sized to ``num_classes``."""
    spec = get_architecture(name)
    size = input_size or spec.default_input_size
    model = spec.build(num_classes, in_chans, size, pretrained)
    model.eval()
    return model


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    return None


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``path`` of ``model`` (indices of Sequential/ModuleList too)."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, nn.Sequential | nn.ModuleList) and attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def adapt_in_chans(model: nn.Module, in_chans: int) -> nn.Module:
    """Swap the stem convolution for one taking ``in_chans`` channels.

    Pretrained RGB kernels are folded (mean over RGB, repeated) so a grey model starts from
    the same response to luminance; random kernels are simply re-initialised.
    """
    found = _first_conv(model)
    if found is None:
        raise UnsupportedModelError("model has no Conv2d stem to adapt to in_chans")
    path, conv = found
    if conv.in_channels == in_chans:
        return model
    new = nn.Conv2d(
        in_chans,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        conv.stride,  # type: ignore[arg-type]
        conv.padding,  # type: ignore[arg-type]
        conv.dilation,  # type: ignore[arg-type]
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    with torch.no_grad():
        mean = conv.weight.mean(dim=1, keepdim=True)
        new.weight.copy_(mean.repeat(1, in_chans, 1, 1) * (conv.in_channels / in_chans))
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    replace_module(model, path, new)
    return model


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Replace the last Linear layer (the classifier) by one with ``num_classes`` outputs."""
    last: tuple[str, nn.Linear] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise UnsupportedModelError("no Linear classifier found to resize")
    path, head = last
    if head.out_features != num_classes:
        replace_module(model, path, nn.Linear(head.in_features, num_classes))


# --------------------------------------------------------------------------- weights


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without unpickling arbitrary objects.

    Accepts safetensors files and ``torch.save``-d dicts loadable with ``weights_only=True``,
    including dicts that wrap the weights under ``state_dict`` or ``model``; ``module.``
    prefixes (DataParallel/DDP) are stripped. Anything else is a ``BadCheckpointError``.
    """
    path = Path(path)
    if not path.is_file():
        raise BadCheckpointError(f"weights file not found: {path}")
    with path.open("rb") as fh:
        head = fh.read(16)
    state: object
    if _looks_like_safetensors(head):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise BadCheckpointError(f"corrupt safetensors file {path.name}: {exc}") from exc
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refusals and corrupt zips raise many types
            raise BadCheckpointError(
                f"{path.name} is neither safetensors nor a weights-only state dict "
                f"(pickled modules are refused): {type(exc).__name__}: {str(exc)[:300]}"
            ) from exc
    return _normalise_state(state)


def _looks_like_safetensors(head: bytes) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON object.
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n < 100_000_000 and head[8:9] == b"{"


def _normalise_state(state: object) -> dict[str, torch.Tensor]:
    if isinstance(state, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = state.get(key)
            if isinstance(inner, Mapping):
                state = inner
                break
    if not isinstance(state, Mapping) or not state:
        raise BadCheckpointError("checkpoint holds no state dict")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise BadCheckpointError(f"checkpoint entry {key!r} is not a named tensor")
        out[key.removeprefix("module.")] = value
    return out


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights into ``model`` strictly; mismatches name the first offending keys."""
    state = read_state_dict(path)
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    return model


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys (first: {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (first: {'; '.join(wrong[:3])})")
    if problems:
        raise BadCheckpointError("weights do not fit the architecture: " + "; ".join(problems))
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise BadCheckpointError(f"weights contain NaN or inf values (first: {k})")


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the model's state dict as safetensors (contiguous, CPU, no shared storage)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def classifier_path(model: nn.Module) -> str:
    """Module path of the final Linear layer, whose outputs are never pruned."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise UnsupportedModelError("no Linear classifier found")
    return last


def infer_default_size(name: str) -> int:
    return get_architecture(name).default_input_size

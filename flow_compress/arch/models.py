"""Building architectures by name, and safe weight loading.

A model reference (``flow_compress.arch.catalogue``) is a registered name, ``timm:NAME``,
``torchvision:NAME`` or ``hf-hub:ORG/NAME``. A registered family builds its names as before;
a timm or torchvision model no family registers is built as the ``auto`` family, whose rules
are structural. A user's ``nn.Module`` is never unpickled and no code from a checkpoint runs:
weights come from safetensors or from ``torch.load(weights_only=True)`` state dicts. Nothing
is downloaded: published weights come from the local caches the caller passes in
(``WeightCaches``), or the call fails with ``weights_not_available``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from flow_compress.arch import (
    AUTO_FAMILY,
    ArchSpec,
    find_registered,
    get_architecture,
    get_family,
    list_architectures,
)
from flow_compress.arch.catalogue import NameSource, WeightCaches, resolve_name
from flow_compress.arch.surgery import adapt_in_chans, replace_head
from flow_compress.config import DataConfig
from flow_compress.contract import Normalization
from flow_compress.errors import (
    BadCheckpointError,
    InvalidConfigError,
    UnsupportedModelError,
    WeightsNotAvailableError,
)

# The files a Hugging Face (timm) model folder or snapshot may hold its weights in, best first.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference, resolved.

    ``spec`` builds it; ``architecture`` is the name that rebuilds it with no cache (plan.json:
    ``timm:NAME`` for an ``hf-hub:`` reference). For an ``hf-hub:`` reference, ``weights`` is
    the snapshot's weight file, ``num_classes`` its classifier's size and ``pretrained_cfg``
    its normalisation and input size, as its config.json says."""

    reference: str
    spec: ArchSpec
    architecture: str
    weights: Path | None = None
    num_classes: int | None = None
    pretrained_cfg: Mapping[str, Any] | None = None


@functools.cache
def _timm_names() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


@functools.cache
def _torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def resolve_model(name: str, *, caches: WeightCaches | None = None) -> ResolvedModel:
    """Resolve a model reference (the grammar of ``flow_compress.arch.catalogue``).

    Registered names keep their family; ``timm:``/``torchvision:`` names a registered family
    builds (``torchvision:resnet18``) get that family, the others the ``auto`` family.
    ``hf-hub:ORG/NAME`` is read from ``caches.hub_cache`` (``weights_not_available`` when it is
    not there). Unknown or ambiguous names raise ``UnsupportedModelError``.
    """
    registered = list_architectures()
    if name in registered:  # no timm/torchvision listing needed for today's names
        return ResolvedModel(name, get_architecture(name), name)
    found = resolve_name(
        name,
        registered=registered,
        plugin=(),
        timm=_timm_names(),
        torchvision=_torchvision_names(),
    )
    if found.source is NameSource.HF_HUB:
        return _resolve_hub(name, found.name, caches)
    return ResolvedModel(name, _source_spec(found.source.value, found.name), found.canonical)


def _source_spec(source: str, builder: str) -> ArchSpec:
    spec = find_registered(source, builder)
    if spec is not None:
        return spec
    return ArchSpec(
        f"{source}:{builder}",
        AUTO_FAMILY,
        source,  # type: ignore[arg-type]
        builder,
        default_input_size=_default_size(source, builder),
    )


def _default_size(source: str, builder: str) -> int:
    """The input side the source's published weights were made for (224 if it says none)."""
    try:
        if source == "timm":
            import timm

            cfg = timm.models.get_pretrained_cfg(builder)
            return int(cfg.input_size[-1]) if cfg is not None else 224
        import torchvision

        transforms = torchvision.models.get_model_weights(builder).DEFAULT.transforms
        return int(transforms.keywords.get("crop_size", 224))
    except (LookupError, ValueError, AttributeError, TypeError):
        return 224


def hub_snapshot(repo: str, hub_cache: Path | None) -> Path:
    """The folder of ``repo``'s ``main`` snapshot in a local Hugging Face cache (the standard
    ``models--ORG--NAME/{refs/main,snapshots/<rev>}`` layout); ``WeightsNotAvailableError``
    when it is not there (nothing is downloaded)."""
    if hub_cache is None:
        raise WeightsNotAvailableError(
            f"hf-hub:{repo} needs a local Hugging Face cache, and none was given"
        )
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "config.json", cache_dir=hub_cache)
    if not isinstance(found, str):
        raise WeightsNotAvailableError(
            f"hf-hub:{repo} is not in the local Hugging Face cache (no config.json of it "
            f"there); download it on this machine first (huggingface-cli download {repo})"
        )
    return Path(found).parent


def _resolve_hub(reference: str, repo: str, caches: WeightCaches | None) -> ResolvedModel:
    folder = hub_snapshot(repo, caches.hub_cache if caches else None)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise BadCheckpointError(f"hf-hub:{repo}: unreadable config.json: {exc}") from exc
    arch = config.get("architecture") if isinstance(config, dict) else None
    if not isinstance(arch, str):
        raise UnsupportedModelError(
            f"hf-hub:{repo}: config.json names no timm 'architecture' (only timm models on "
            "the Hub are supported)"
        )
    timm_name = resolve_name(
        f"timm:{arch}", registered=(), plugin=(), timm=_timm_names(), torchvision=None
    ).name
    weights = next((folder / f for f in HF_WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise WeightsNotAvailableError(
            f"hf-hub:{repo}: the cached snapshot has no {' or '.join(HF_WEIGHT_FILES)}"
        )
    classes = config.get("num_classes")
    cfg = config.get("pretrained_cfg")
    return ResolvedModel(
        reference,
        _source_spec("timm", timm_name),
        f"timm:{timm_name}",
        weights=weights,
        num_classes=int(classes) if isinstance(classes, int) else None,
        pretrained_cfg=cfg if isinstance(cfg, dict) else None,
    )


def build_model(
    name: str,
    num_classes: int,
    *,
    in_chans: int = 3,
    input_size: int | None = None,
    pretrained: bool = False,
    caches: WeightCaches | None = None,
) -> nn.Module:
    """Build an architecture (any reference ``resolve_model`` takes) with its classifier
    sized to ``num_classes`` and its stem to ``in_chans``, in eval mode.

    ``pretrained`` starts from the source's published weights found in ``caches`` (the head
    is then replaced; timm adapts the stem's weights to ``in_chans``); when they are not there,
    ``WeightsNotAvailableError`` (nothing is downloaded). An ``hf-hub:`` reference builds its
    timm architecture; its weights are loaded by ``load_weights``. Raises
    ``UnsupportedModelError`` for an unknown name or a model without a conv stem or a linear
    classifier.
    """
    spec = resolve_model(name, caches=caches).spec
    size = input_size or spec.default_input_size
    try:
        model = _build(spec, num_classes, in_chans, size, pretrained, caches)
    except LookupError as exc:
        raise UnsupportedModelError(f"{name}: {exc}") from exc
    model.eval()
    return model


def _build(
    spec: ArchSpec,
    num_classes: int,
    in_chans: int,
    size: int,
    pretrained: bool,
    caches: WeightCaches | None,
) -> nn.Module:
    if spec.family == AUTO_FAMILY:
        # The structural family: the input size goes to the builders that take one.
        size_args: tuple[str | None, ...] = (
            ("img_size", None) if spec.source == "timm" else ("image_size", None)
        )
    else:
        size_args = (get_family(spec.family).input_size_arg.get(spec.source),)
    if spec.source == "custom":
        assert spec.factory is not None
        if pretrained:
            raise WeightsNotAvailableError(f"{spec.name} has no published weights")
        model = spec.factory(num_classes=num_classes, in_chans=in_chans, input_size=size)
        if not isinstance(model, nn.Module):
            raise UnsupportedModelError(f"{spec.name}'s factory did not return an nn.Module")
        return model
    if spec.source == "timm":
        return _build_timm(spec.builder, num_classes, in_chans, size, size_args, pretrained, caches)
    import torchvision

    if pretrained:
        model = _torchvision_pretrained(spec.builder, caches)
        replace_head(model, num_classes)
    else:
        model = _first_that_takes(
            lambda **kw: torchvision.models.get_model(
                spec.builder, weights=None, num_classes=num_classes, **kw
            ),
            size_args,
            size,
        )
    return adapt_in_chans(model, in_chans)


def replace_classifier(model: nn.Module, num_classes: int) -> None:
    """A new classifier of ``num_classes`` outputs: timm's own ``reset_classifier`` where the
    model has one (it knows heads with several layers), the last linear layer otherwise."""
    reset = getattr(model, "reset_classifier", None)
    if callable(reset):
        reset(num_classes)
    else:
        replace_head(model, num_classes)


def _first_that_takes(build: Any, size_args: tuple[str | None, ...], size: int) -> nn.Module:
    """``build(**{arg: size})`` with the first of ``size_args`` the builder accepts (None:
    no size argument); a builder refuses an argument it does not know with ``TypeError``."""
    for i, arg in enumerate(size_args):
        try:
            return build(**({arg: size} if arg else {}))  # type: ignore[no-any-return]
        except TypeError:
            if i == len(size_args) - 1:
                raise
    raise AssertionError("unreachable")


def _build_timm(
    builder: str,
    num_classes: int,
    in_chans: int,
    size: int,
    size_args: tuple[str | None, ...],
    pretrained: bool,
    caches: WeightCaches | None,
) -> nn.Module:
    import timm

    extra: dict[str, Any] = {}
    if pretrained:
        # timm replaces the head and adapts the stem; the state dict is read here, safely,
        # from the local cache (timm would otherwise download).
        state = read_state_dict(_timm_cached(builder, caches))
        extra = {"pretrained": True, "pretrained_cfg_overlay": {"state_dict": state}}
    return _first_that_takes(
        lambda **kw: timm.create_model(
            builder, num_classes=num_classes, in_chans=in_chans, **extra, **kw
        ),
        size_args,
        size,
    )


def _timm_cached(builder: str, caches: WeightCaches | None) -> Path:
    import timm

    cfg = timm.models.get_pretrained_cfg(builder)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        raise WeightsNotAvailableError(f"timm:{builder} has no published weights on the Hub")
    folder = hub_snapshot(repo, caches.hub_cache if caches else None)
    weights = next((folder / f for f in HF_WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise WeightsNotAvailableError(f"{repo}: the cached snapshot holds no weights file")
    return weights


def _torchvision_pretrained(builder: str, caches: WeightCaches | None) -> nn.Module:
    import torchvision

    weights = torchvision.models.get_model_weights(builder).DEFAULT
    file = Path(urlparse(weights.url).path).name
    folder = caches.torch_hub / "checkpoints" if caches and caches.torch_hub else None
    if folder is None or not (folder / file).is_file():
        raise WeightsNotAvailableError(
            f"torchvision:{builder}'s weights ({file}) are not in the local torch hub cache"
            + (f" ({folder})" if folder else " (none was given)")
        )
    model = torchvision.models.get_model(
        builder, weights=None, num_classes=len(weights.meta["categories"])
    )
    state = read_state_dict(folder / file)
    check_state_dict(model, state)
    model.load_state_dict(state)
    return model


def pretrained_normalization(
    spec: ArchSpec, pretrained_cfg: Mapping[str, object] | None = None
) -> Normalization:
    """The preprocessing architecture ``name`` publishes with its pretrained weights: timm's
    ``pretrained_cfg`` (mean, std, interpolation, crop_pct) or the transforms of
    torchvision's default weights (mean, std, interpolation, crop/resize sizes). Metadata
    only: nothing is downloaded. ``pretrained_cfg`` (an ``hf-hub:`` model's own config.json)
    wins over the source's. ``InvalidConfigError`` when the architecture publishes none.
    """
    name = spec.name
    if pretrained_cfg is not None and pretrained_cfg.get("mean"):
        return Normalization.from_pretrained_cfg(dict(pretrained_cfg))
    if spec.source == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.builder)
        if cfg is None or not getattr(cfg, "mean", None):
            raise InvalidConfigError(f"{name}: timm publishes no pretrained_cfg for it")
        return Normalization.from_pretrained_cfg(cfg.to_dict())
    import torchvision

    try:
        transforms = torchvision.models.get_model_weights(spec.builder).DEFAULT.transforms()
    except (ValueError, AttributeError, KeyError) as exc:
        raise InvalidConfigError(f"{name}: torchvision publishes no weights for it") from exc
    crop = transforms.crop_size[0] / transforms.resize_size[0]
    return Normalization.from_pretrained_cfg(
        {
            "mean": transforms.mean,
            "std": transforms.std,
            "interpolation": transforms.interpolation.value,
            "crop_pct": crop,
        }
    )


def resolve_normalization(
    spec: ArchSpec, data: DataConfig, pretrained_cfg: Mapping[str, object] | None = None
) -> Normalization | None:
    """The normalisation to hand ``load_dataset`` for ``data.normalization``: the
    architecture's own for ``pretrained`` (``pretrained_normalization``), else None (the data
    module applies the configured values or the default)."""
    if data.normalization != "pretrained":
        return None
    return pretrained_normalization(spec, pretrained_cfg)


# --------------------------------------------------------------------------- weights


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without unpickling arbitrary objects.

    Accepts safetensors files, ``torch.save``-d dicts loadable with ``weights_only=True``
    (``pytorch_model.bin`` included), and a folder in the timm / Hugging Face layout holding
    ``model.safetensors`` or ``pytorch_model.bin``. Training checkpoints that wrap the
    weights under ``state_dict``, ``model_state_dict``, ``model`` or an EMA key
    (``state_dict_ema``, ``model_ema``, ``ema``) are unwrapped; ``module.`` prefixes
    (DataParallel/DDP) are stripped. Anything else is a ``BadCheckpointError``.
    """
    path = Path(path)
    if path.is_dir():
        found = next((path / f for f in HF_WEIGHT_FILES if (path / f).is_file()), None)
        if found is None:
            raise BadCheckpointError(
                f"weights folder {path.name} holds none of {', '.join(HF_WEIGHT_FILES)}"
            )
        path = found
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


# Where training scripts keep the weights inside a checkpoint dict, in the order tried (the
# trained weights before their EMA: a checkpoint holding both is usually evaluated on the
# former unless its author says otherwise).
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema", "ema")


def _normalise_state(state: object) -> dict[str, torch.Tensor]:
    for _ in range(2):  # e.g. {"model": {"state_dict": ...}}
        if isinstance(state, Mapping) and not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            inner = next(
                (state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None
            )
            if inner is not None:
                state = inner
    if not isinstance(state, Mapping) or not state:
        raise BadCheckpointError("checkpoint holds no state dict")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise BadCheckpointError(f"checkpoint entry {key!r} is not a named tensor")
        out[key.removeprefix("module.")] = value
    return out


# Prefixes wrappers add to every key (Lightning's ``model.``, torch.compile's ``_orig_mod.``).
_WRAPPER_PREFIXES = ("model.", "_orig_mod.", "net.", "backbone.")


def align_keys(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with a prefix every key shares and the model's keys lack removed, when that
    makes the keys match (a Lightning module's ``model.``, a compiled module's
    ``_orig_mod.``); otherwise ``state`` unchanged."""
    expected = set(model.state_dict())
    if set(state) == expected:
        return dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            stripped = {k.removeprefix(prefix): v for k, v in state.items()}
            if set(stripped) == expected:
                return stripped
    return dict(state)


def load_weights(model: nn.Module, path: str | Path, *, reference: str | None = None) -> nn.Module:
    """Load weights into ``model`` strictly; mismatches name the first offending keys and,
    when ``reference`` (the name the model was built from) is given and the keys fit the
    same name in the other source, say so."""
    state = align_keys(model, read_state_dict(path))
    try:
        check_state_dict(model, state)
    except BadCheckpointError as exc:
        hint = checkpoint_hint(reference, state) if reference else None
        if hint:
            raise BadCheckpointError(f"{exc.message}; {hint}") from None
        raise
    model.load_state_dict(state, strict=True)
    return model


def checkpoint_hint(reference: str, state: Mapping[str, torch.Tensor]) -> str | None:
    """A hint when a checkpoint of another architecture was given: its keys are those of
    the same name in the other source (timm vs torchvision name their layers differently).
    Cheap: the candidates are built on the meta device (no memory, no initialisation)."""
    bare = reference.split(":", 1)[-1].split(".", 1)[0]
    keys = set(state)
    for source, names in (("timm", _timm_names()), ("torchvision", _torchvision_names())):
        if bare not in names or reference == f"{source}:{bare}":
            continue
        spec = _source_spec(source, bare)
        if spec.name == reference:
            continue
        try:
            with torch.device("meta"):
                candidate = _build(spec, 1000, 3, spec.default_input_size, False, None)
        except Exception:  # a hint must never hide the real error
            continue
        theirs = {k for k in candidate.state_dict() if not k.endswith("num_batches_tracked")}
        mine = {k for k in keys if not k.endswith("num_batches_tracked")}
        if theirs and len(theirs & mine) >= 0.9 * max(len(theirs), len(mine)):
            return f"keys look like {source}'s `{bare}`; name it {source}:{bare}"
    return None


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

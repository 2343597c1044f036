"""The input contract: how an image must be prepared before the exported model sees it.

Whoever deploys ``model.onnx`` needs the normalisation, the resize, the channel order and the
layout the model was trained and compressed with. ``InputContract`` states them; the data
pipeline (``flow_compress.data.BatchTransform``) is built *from* it, so the contract cannot
drift from what the pipeline really did. It travels with every artifact: ONNX
``metadata_props`` (``METADATA_KEY`` holds the JSON, a few flat keys repeat the essentials),
TorchScript ``_extra_files`` (``preprocessing.json``), the ``preprocessing.json`` artifact and
the report.

The recipe, from a decoded image (uint8, height × width × channels):

1. channels: grey images are replicated to three channels for an RGB model; colour images are
   averaged over R, G, B for a grey model (``rgb_to_grey = "mean"``);
2. resize the whole image (aspect ratio not kept) to ``resize.size`` with
   ``resize.interpolation``, half-pixel centres (``align_corners=False``), antialiased when
   shrinking, values clamped to ``value_range``; then, if ``crop`` is set, cut the centred
   ``crop`` window (top = round((H - h) / 2), left likewise);
3. ``x = (pixel / pixel_divisor - mean[c]) / std[c]`` in float32 (``pixel_divisor`` = 255, so
   values lie in ``value_range`` = [0, 1] before normalisation);
4. lay the batch out as ``layout`` (NCHW) and feed it to ``input_name``; ``output_name`` holds
   logits (no softmax), class ``i`` being ``class_names[i]`` when the dataset names them.

Torch-free: the API and the report schema import it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The default normalisation (one source of truth: the data pipeline reads these through the
# contract). ImageNet statistics for three channels; grey and other channel counts use a
# fixed 0.5 / 0.25 per channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN = 0.5
GREY_STD = 0.25

CONTRACT_FILE = "preprocessing.json"
METADATA_KEY = "flow_compress.input_contract"
METADATA_PREFIX = "flow_compress."

Interpolation = Literal["bilinear", "bicubic", "nearest"]
NormalizationSource = Literal["default", "pretrained", "config"]
Positive = Annotated[float, Field(gt=0, le=1000)]
Level = Annotated[float, Field(ge=-1000, le=1000)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Normalization(_Frozen):
    """A model's own preprocessing (``data.custom_normalization``, or an architecture's
    published one): per-channel mean and std of the [0, 1] image (None: the default for the
    channel count, ``default_normalization``), the resize interpolation, and the share of the
    resized image kept by the centre crop (timm's ``crop_pct``; None: no crop, the image is
    resized to the input size).

    Three values for a grey model are averaged into one (a timm or torchvision RGB
    ``pretrained_cfg`` applied to a grey stem); otherwise there is one value per channel.
    """

    mean: tuple[Level, ...] | None = Field(None, min_length=1, max_length=4)
    std: tuple[Positive, ...] | None = Field(None, min_length=1, max_length=4)
    interpolation: Interpolation = "bilinear"
    crop_pct: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _same_length(self) -> Normalization:
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
        return self

    @classmethod
    def from_pretrained_cfg(cls, cfg: Mapping[str, Any]) -> Normalization:
        """From a timm ``pretrained_cfg`` (``mean``, ``std``, ``interpolation``,
        ``crop_pct``); an interpolation other than bilinear/bicubic/nearest (timm's
        ``random``, ``lanczos``, ...) becomes bicubic, the nearest supported one. A
        ``crop_pct`` of 1 means no crop."""
        interp = str(cfg.get("interpolation") or "bilinear").lower()
        crop = cfg.get("crop_pct")
        return cls(
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bicubic",  # type: ignore[arg-type]
            crop_pct=None if crop is None or float(crop) >= 1 else float(crop),
        )

    def for_channels(self, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) with one value per channel of a model with ``channels`` inputs."""
        default_mean, default_std = _default_stats(channels)
        return (
            _fit(self.mean, channels, "mean") if self.mean is not None else default_mean,
            _fit(self.std, channels, "std") if self.std is not None else default_std,
        )


def _fit(values: tuple[float, ...], channels: int, what: str) -> tuple[float, ...]:
    n = len(values)
    if n == channels:
        return tuple(values)
    if channels == 1:
        return (sum(values) / n,)
    if n == 1:
        return tuple(values) * channels
    raise ValueError(f"a {what} of {n} channels does not fit a model of {channels} channels")


def _default_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (GREY_MEAN,) * channels, (GREY_STD,) * channels


def default_normalization(channels: int) -> Normalization:
    """What the pipeline uses unless told otherwise: ImageNet mean/std for three channels,
    0.5/0.25 per channel for any other count, bilinear resize, no crop."""
    mean, std = _default_stats(channels)
    return Normalization(mean=mean, std=std)


class Resize(_Frozen):
    """The whole image resized to ``size`` (height, width), aspect ratio not kept."""

    size: tuple[int, int]
    interpolation: Interpolation = "bilinear"
    antialias: bool = Field(True, description="Antialiased when shrinking (never when growing).")
    align_corners: bool = Field(False, description="False: half-pixel centres.")


class InputContract(_Frozen):
    """Everything a deployment must do to an image before the exported model sees it (see the
    module docstring for the recipe, step by step)."""

    contract_version: int = 1
    input_name: str = "input"
    output_name: str = "logits"
    output: Literal["logits"] = Field("logits", description="Raw logits; no softmax applied.")
    height: int = Field(..., ge=1)
    width: int = Field(..., ge=1)
    channels: int = Field(..., ge=1, le=4)
    channel_order: Literal["RGB", "grey", "unspecified"]
    rgb_to_grey: Literal["mean"] = Field(
        "mean", description="How a colour image becomes grey for a one-channel model."
    )
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    source_dtype: Literal["uint8"] = "uint8"
    pixel_divisor: float = Field(255.0, description="The uint8 pixels are divided by it first.")
    value_range: tuple[float, float] = Field(
        (0.0, 1.0),
        description="Range after the division (and after the resize, clamped to it), before "
        "normalisation.",
    )
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: Resize
    crop: tuple[int, int] | None = Field(
        None, description="Centre crop (height, width) after the resize; None: no crop."
    )
    normalization_source: NormalizationSource = Field(
        "default",
        description="default: the pipeline's; pretrained: the architecture's published "
        "preprocessing (timm pretrained_cfg, torchvision weights); config: "
        "data.custom_normalization.",
    )
    class_names: tuple[str, ...] | None = Field(
        None, description="Name of each logit, when the dataset names its classes."
    )

    @model_validator(mode="after")
    def _consistent(self) -> InputContract:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need one value per channel ({self.channels})")
        final = self.crop or self.resize.size
        if final != (self.height, self.width):
            raise ValueError(
                f"resize {self.resize.size} and crop {self.crop} do not give the input size "
                f"{(self.height, self.width)}"
            )
        return self

    def to_json(self) -> str:
        """The canonical JSON text (the same bytes in every artifact)."""
        return self.model_dump_json(indent=2) + "\n"

    def metadata(self) -> dict[str, str]:
        """ONNX ``metadata_props``: the whole contract under ``METADATA_KEY``, plus flat keys
        for tools that read a single value."""
        return {
            METADATA_KEY: self.to_json(),
            METADATA_PREFIX + "input_size": f"{self.height}x{self.width}",
            METADATA_PREFIX + "channels": str(self.channels),
            METADATA_PREFIX + "channel_order": self.channel_order,
            METADATA_PREFIX + "layout": self.layout,
            METADATA_PREFIX + "pixel_divisor": repr(self.pixel_divisor),
            METADATA_PREFIX + "mean": json.dumps(list(self.mean)),
            METADATA_PREFIX + "std": json.dumps(list(self.std)),
            **(
                {METADATA_PREFIX + "class_names": json.dumps(list(self.class_names))}
                if self.class_names
                else {}
            ),
        }

    @classmethod
    def from_metadata(cls, props: Mapping[str, str]) -> InputContract:
        """The contract from ONNX ``metadata_props`` (as a name → value mapping)."""
        return cls.model_validate_json(props[METADATA_KEY])


def build_contract(
    input_size: int,
    channels: int,
    normalization: Normalization | None = None,
    *,
    source: NormalizationSource | None = None,
    class_names: tuple[str, ...] | None = None,
) -> InputContract:
    """The contract of a square ``input_size`` model with ``channels`` inputs.

    Without ``normalization`` the default (``default_normalization``) applies. With a
    ``crop_pct`` the image is resized to ``floor(input_size / crop_pct)`` and centre-cropped to
    ``input_size`` (timm's evaluation transform); otherwise resized to ``input_size``.
    """
    norm = normalization or default_normalization(channels)
    mean, std = norm.for_channels(channels)
    if norm.crop_pct is None:
        resized, crop = input_size, None
    else:
        resized = max(input_size, math.floor(input_size / norm.crop_pct))
        crop = (input_size, input_size) if resized != input_size else None
    order = {1: "grey", 3: "RGB"}.get(channels, "unspecified")
    return InputContract(
        height=input_size,
        width=input_size,
        channels=channels,
        channel_order=order,  # type: ignore[arg-type]
        mean=mean,
        std=std,
        resize=Resize(size=(resized, resized), interpolation=norm.interpolation),
        crop=crop,
        normalization_source=source or ("default" if normalization is None else "config"),
        class_names=class_names,
    )


__all__ = [
    "CONTRACT_FILE",
    "GREY_MEAN",
    "GREY_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "METADATA_KEY",
    "InputContract",
    "Normalization",
    "Resize",
    "build_contract",
    "default_normalization",
]

"""Device selection and seeding."""

from __future__ import annotations

import random

import numpy as np
import torch


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when available; an explicit ``cuda`` without a GPU falls back loudly."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from flow_compress.errors import InvalidConfigError

        raise InvalidConfigError(f"device {spec!r} requested but CUDA is not available")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)

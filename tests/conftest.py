"""Test-wide settings: offline hubs, deterministic and small thread pools (CI has 2 cores)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault(
    "TORCH_HOME", os.path.join(os.path.dirname(__file__), "..", ".cache", "torch")
)
os.environ.setdefault("MPLBACKEND", "Agg")

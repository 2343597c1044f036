"""Test-wide settings: offline hubs, deterministic and small thread pools (CI has 2 cores)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault(
    "TORCH_HOME", os.path.join(os.path.dirname(__file__), "..", ".cache", "torch")
)
os.environ.setdefault("MPLBACKEND", "Agg")
# One intra-op thread in the test process (torch reads this when it is imported), as the
# service processes the tests start already have. With two, every small operator waits at an
# OpenMP barrier for both threads, and on a 2-core machine any other busy process (a worker's
# job, a browser, a neighbour's build) keeps one of them waiting for a time slice: beside one
# such process test_architectures.py took 547 s instead of 117 s. On an idle machine one
# thread was as fast as two (the models here are small).
os.environ.setdefault("OMP_NUM_THREADS", "1")

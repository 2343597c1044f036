"""Project rules that code review would otherwise have to catch: lint, and the layering of
DESIGN.md (api never imports torch; the library knows nothing of the service)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_library_does_not_know_the_service() -> None:
    service = re.compile(r"^\s*(import|from)\s+(fastapi|celery|redis|kombu|api|worker)\b", re.M)
    env = re.compile(r"os\.environ|getenv\(")
    for path in _sources("flow_compress"):
        text = path.read_text()
        assert not service.search(text), f"{path} imports the service layer"
        assert not env.search(text), f"{path} reads environment variables"


def test_torch_pruning_behind_one_adapter() -> None:
    tp = re.compile(r"^\s*(import torch_pruning|from torch_pruning)", re.M)
    users = [p.name for p in _sources("flow_compress") if tp.search(p.read_text())]
    assert users == ["tp_adapter.py"]


def test_no_unsafe_torch_load() -> None:
    for package in ("flow_compress", "api", "worker"):
        for path in _sources(package):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if "torch.load(" in line:
                    assert "weights_only=True" in line, f"{path}:{n} calls torch.load unsafely"

"""The example plug-in package (tests/plugins/acme_models), installed for one test session
into a temporary folder with pip (never into the shared environment); processes that should
see it get that folder on their PYTHONPATH."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ACME = Path(__file__).resolve().parent / "acme_models"


def install_acme(target: Path) -> Path:
    """``pip install --no-deps --no-build-isolation --target target`` of the example package;
    returns ``target``. Built from a copy: setuptools writes build/ and egg-info beside the
    sources, which must stay clean (tests may run side by side)."""
    with tempfile.TemporaryDirectory(prefix="acme-src-") as tmp:
        source = Path(tmp) / "acme_models"
        shutil.copytree(ACME, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
        _pip_install(source, target)
    return target


def _pip_install(source: Path, target: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )  # fmt: skip

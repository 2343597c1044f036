"""Operators' own architectures (issue 12, item 4): a package installed beside flow-compress
registers a family through the ``flow_compress.architectures`` entry points; the library finds
it before its first registry lookup (torch-free), the CLI lists it, the catalogue names it
``plugin``, and a broken plug-in is named without taking the others down. The example package
(tests/plugins/acme_models) is installed into a temporary folder that only the processes
started here see."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.plugins.support import install_acme

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def acme(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_acme(tmp_path_factory.mktemp("acme"))


def run(acme: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{acme}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


def test_the_library_discovers_the_plugin_before_its_first_lookup_without_torch(
    acme: Path,
) -> None:
    code = (
        "import json, sys\n"
        "from flow_compress.arch import get_architecture, list_architectures, plugins\n"
        "spec = get_architecture('acme_tinynet')\n"
        "print(json.dumps({'family': spec.family, 'source': spec.source,\n"
        "    'listed': 'acme_tinynet' in list_architectures(),\n"
        "    'plugins': plugins.plugin_families(), 'errors': plugins.plugin_errors(),\n"
        "    'torch': [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]}))\n"
    )
    result = run(acme, "-c", code)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["family"] == "acme" and out["source"] == "custom" and out["listed"]
    assert out["plugins"] == {"acme": "acme"}
    assert [name for name, _ in out["errors"]] == ["acme_broken"]
    assert "model zoo server is unreachable" in out["errors"][0][1]
    assert out["torch"] == []
    assert "acme_broken" in result.stderr  # logged with its name


def test_the_plugin_model_builds_and_its_block_rule_finds_candidates(acme: Path) -> None:
    code = (
        "import torch\n"
        "from flow_compress.arch.blocks import find_candidates\n"
        "from flow_compress.arch.models import build_model\n"
        "m = build_model('acme_tinynet', 10, in_chans=1, input_size=16)\n"
        "x = torch.zeros(2, 1, 16, 16)\n"
        "assert m(x).shape == (2, 10)\n"
        "print(len(find_candidates(m, x[:1], allow_projection=False)))\n"
    )
    result = run(acme, "-c", code)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) == 4  # its four residual blocks


def test_the_cli_and_the_catalogue_list_the_plugin(acme: Path, tmp_path: Path) -> None:
    listed = run(acme, "-m", "flow_compress.cli", "architectures", "--source", "plugin")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split("\n")[0].split("\t") == ["acme_tinynet", "plugin", "acme"]
    assert "acme_broken" in listed.stderr
    out = tmp_path / "catalogue.json"
    built = run(acme, "-m", "flow_compress.arch.catalogue", str(out))
    assert built.returncode == 0, built.stderr
    catalogue = json.loads(out.read_text())
    assert catalogue["plugin"] == ["acme_tinynet"]
    assert "acme_tinynet" not in catalogue["registered"]
    assert catalogue["plugin_errors"][0].startswith("acme_broken: RuntimeError")

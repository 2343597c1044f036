"""The model catalogue kept between worker starts (``worker.catalogue.cached_or_built``): a
start whose installation fingerprint is unchanged publishes the kept copy without building;
a changed fingerprint (a library upgraded, a plug-in installed or edited) builds again. The
fingerprint is read without importing torch, as the worker's main process must stay
torch-free."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flow_compress.arch.catalogue import Catalogue
from tests.worker.support import REPO
from worker.broker import redis_client
from worker.catalogue import (
    CatalogueStep,
    cache_path,
    cached_or_built,
    catalogue_key,
)
from worker.settings import WorkerSettings

FINGERPRINT: dict[str, object] = {"versions": {"torch": "2.14.1", "timm": "1.0.15"}}


def counting_build(catalogue: Catalogue) -> tuple[Callable[[], str], list[int]]:
    calls: list[int] = []

    def build() -> str:
        calls.append(1)
        return catalogue.model_dump_json()

    return build, calls


def test_a_second_start_with_the_same_fingerprint_reuses_the_kept_catalogue(
    tmp_path: Path,
) -> None:
    build, calls = counting_build(Catalogue(registered=("resnet18",), timm=("resnet50",)))
    first, kept = cached_or_built(tmp_path, FINGERPRINT, build)
    assert (kept, len(calls)) == (False, 1)
    assert cache_path(tmp_path, FINGERPRINT).read_text() == first
    # An equal fingerprint built anew (key order does not matter) finds it.
    same = json.loads(json.dumps(FINGERPRINT))
    second, kept = cached_or_built(tmp_path, same, build)
    assert (second, kept, len(calls)) == (first, True, 1)


def test_a_changed_fingerprint_builds_again(tmp_path: Path) -> None:
    build, calls = counting_build(Catalogue(registered=("resnet18",)))
    cached_or_built(tmp_path, FINGERPRINT, build)
    upgraded = {"versions": {"torch": "2.14.1", "timm": "1.0.16"}}
    _, kept = cached_or_built(tmp_path, upgraded, build)
    assert (kept, len(calls)) == (False, 2)
    assert cache_path(tmp_path, upgraded) != cache_path(tmp_path, FINGERPRINT)
    # Both installations keep theirs (two virtual environments may share one cache).
    assert cached_or_built(tmp_path, FINGERPRINT, build)[1]
    assert cached_or_built(tmp_path, upgraded, build)[1]
    assert len(calls) == 2


def test_an_unreadable_kept_catalogue_is_built_again_and_replaced(tmp_path: Path) -> None:
    build, calls = counting_build(Catalogue(registered=("resnet18",)))
    path = cache_path(tmp_path, FINGERPRINT)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"registered": ["resnet18"')  # cut short, e.g. by a full disk
    text, kept = cached_or_built(tmp_path, FINGERPRINT, build)
    assert (kept, len(calls)) == (False, 1)
    assert Catalogue.model_validate_json(path.read_text()) == Catalogue.model_validate_json(text)


def test_a_catalogue_with_plugin_errors_is_not_kept(tmp_path: Path) -> None:
    # Installing a broken plug-in's missing dependency fixes it without changing the
    # fingerprint: the next start must look again.
    build, calls = counting_build(Catalogue(plugin_errors=("acme_broken: ImportError: x",)))
    cached_or_built(tmp_path, FINGERPRINT, build)
    _, kept = cached_or_built(tmp_path, FINGERPRINT, build)
    assert (kept, len(calls)) == (False, 2)
    assert not cache_path(tmp_path, FINGERPRINT).exists()


def test_no_fingerprint_builds_and_keeps_nothing(tmp_path: Path) -> None:
    build, calls = counting_build(Catalogue(registered=("resnet18",)))
    assert not cached_or_built(tmp_path, None, build)[1]
    assert not cached_or_built(tmp_path, None, build)[1]
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def _fingerprint_in_child(extra_path: Path | None = None) -> dict[str, Any]:
    """The fingerprint as a fresh process computes it, which must not import torch."""
    code = (
        "import json, sys\n"
        "from flow_compress.arch.catalogue import installation_fingerprint\n"
        "fp = installation_fingerprint()\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad[:5]\n"
        "print(json.dumps(fp))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (REPO, extra_path) if p is not None)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    fingerprint: dict[str, Any] = json.loads(result.stdout)
    return fingerprint


def _fake_plugin(folder: Path, version: str) -> Path:
    """An installed distribution declaring one ``flow_compress.architectures`` entry point
    (metadata and module only: nothing of it is imported here)."""
    info = folder / "zebra_models-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: zebra-models\nVersion: {version}\n"
    )
    (info / "entry_points.txt").write_text(
        "[flow_compress.architectures]\nzebra = zebra_models.flow:register\n"
    )
    package = folder / "zebra_models"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "flow.py").write_text("def register():\n    pass\n")
    return package


def test_the_fingerprint_is_read_torch_free_and_follows_the_plugins(tmp_path: Path) -> None:
    plain = _fingerprint_in_child()
    assert set(plain["versions"]) == {"torch", "torchvision", "timm", "flow-compress"}
    assert all(plain["versions"].values())
    assert plain == _fingerprint_in_child()  # nothing changed: the same key

    package = _fake_plugin(tmp_path, "1.0")
    with_plugin = _fingerprint_in_child(tmp_path)
    (plugin,) = with_plugin["plugins"]
    assert plugin["name"] == "zebra" and plugin["distribution"] == "zebra-models 1.0"
    assert {k: v for k, v in with_plugin.items() if k != "plugins"} == {
        k: v for k, v in plain.items() if k != "plugins"
    }

    # An upgrade of the plug-in, and an edit of an editable install's code, change it too.
    _fake_plugin(tmp_path, "1.1")
    upgraded = _fingerprint_in_child(tmp_path)
    assert upgraded != with_plugin
    (package / "flow.py").write_text("def register():\n    from zebra_models import more\n")
    assert _fingerprint_in_child(tmp_path) != upgraded


def test_a_worker_start_publishes_the_kept_catalogue_from_the_settings_cache_dir(
    redis_url: str, key_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOW_COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    settings = WorkerSettings(redis_url=redis_url, key_prefix=key_prefix)
    assert settings.cache_dir == tmp_path / "cache"
    # Fixed, so that an edit of the library's sources while this runs cannot change it.
    monkeypatch.setattr("worker.catalogue.installation_fingerprint", lambda: FINGERPRINT)
    # What an earlier start kept (marked: a real build has no name "kept").
    kept = Catalogue(registered=("kept",)).model_dump_json()
    path = cache_path(settings.cache_dir / "catalogue", FINGERPRINT)
    path.parent.mkdir(parents=True)
    path.write_text(kept)

    step = CatalogueStep(SimpleNamespace())
    step.start(SimpleNamespace(app=SimpleNamespace(settings=settings)))
    assert step._thread is not None
    step._thread.join(60)
    assert step._child is None  # no child process was started to build it
    client = redis_client(redis_url)
    try:
        assert client.get(catalogue_key(key_prefix)) == kept
    finally:
        client.close()

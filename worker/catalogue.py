"""The model catalogue the workers publish and the API validates job specs against.

The API never imports torch, so it cannot ask timm or torchvision which names they have, nor
import operators' plug-in families' model code. Each worker therefore lists, at start-up, every
name it can build (``flow_compress.arch.catalogue.build_catalogue``: registered, plug-in, timm
and torchvision names, with the library versions) in a child process — its own process stays
torch-free, like every worker main process — and writes the JSON to Redis::

    p catalogue      string: the newest published catalogue (each worker's start overwrites it)

The newest one wins: workers of one installation run the same image, and a rolling upgrade
converges on the new one. With none published yet (the first worker is still starting), the
API accepts registered names and syntactically valid ``source:name`` references and the worker
fails the job fast with ``unsupported_model`` when it cannot build it.

Building costs seconds of CPU (importing torch, timm and torchvision), paid again by every
worker start although the answer changes only with the installation. So the built JSON is
kept in ``cache_dir/catalogue/``, named after a digest of
``flow_compress.arch.catalogue.installation_fingerprint()`` (library versions, plug-in entry
points, the signature of the source files), which is read torch-free; a start whose
installation is unchanged publishes the kept copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import redis
from celery import bootsteps

from flow_compress.arch.catalogue import Catalogue, installation_fingerprint
from flow_compress.artifacts import atomic_write_text
from worker.broker import redis_client
from worker.process import AFTER_POOL, die_with_parent

log = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 600  # importing torch, timm and torchvision on a busy machine
# Catalogues kept per cache folder: several installations (virtual environments, checkouts)
# may share one user's cache, and each edit of an editable install makes a new one.
CACHE_KEEP = 8


def catalogue_key(prefix: str) -> str:
    return f"{prefix}catalogue"


def build_in_child(
    timeout_s: float = BUILD_TIMEOUT_S,
    started: Callable[[subprocess.Popen[bytes]], None] = lambda _p: None,
) -> str:
    """This installation's catalogue as JSON, built by ``python -m flow_compress.arch.catalogue``
    in a child process (which imports torch; this one does not). The child dies with this
    process; ``started`` receives it (so a stopping worker can end it)."""
    with tempfile.TemporaryDirectory(prefix="flow-catalogue-") as tmp:
        out = Path(tmp) / "catalogue.json"
        with subprocess.Popen(
            [sys.executable, "-m", "flow_compress.arch.catalogue", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent(),
        ) as proc:
            started(proc)
            try:
                _, err = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            if proc.returncode != 0:
                raise subprocess.CalledProcessError(proc.returncode, proc.args, stderr=err)
        text = out.read_text()
    Catalogue.model_validate_json(text)  # never publish what the API could not read
    return text


def cache_path(folder: Path, fingerprint: Mapping[str, object]) -> Path:
    """Where the catalogue of the installation ``fingerprint`` describes is kept."""
    canonical = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return folder / f"catalogue-{hashlib.sha256(canonical.encode()).hexdigest()[:32]}.json"


def cached_or_built(
    folder: Path,
    fingerprint: Mapping[str, object] | None,
    build: Callable[[], str] = build_in_child,
) -> tuple[str, bool]:
    """The catalogue JSON of this installation, and whether it came from ``folder``: the kept
    copy for ``fingerprint`` when there is a readable one, else ``build()``'s, kept for the
    next start (None: the installation could not be described; built, not kept). A catalogue
    naming plug-ins that failed to load is not kept: the usual fix (a missing dependency
    installed) leaves the fingerprint as it was."""
    if fingerprint is None:
        return build(), False
    path = cache_path(folder, fingerprint)
    try:
        text = path.read_text()
        Catalogue.model_validate_json(text)
        return text, True
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.warning("the kept model catalogue %s is unreadable (%s); building it again", path, exc)
    text = build()
    if not Catalogue.model_validate_json(text).plugin_errors:
        try:
            _keep(path, text)
        except OSError as exc:  # a read-only or full disk costs the next start a rebuild only
            log.warning("could not keep the model catalogue in %s: %s", folder, exc)
    return text, False


def _keep(path: Path, text: str) -> None:
    # Atomic: workers starting together never read a half-written file.
    atomic_write_text(path, text)
    ages: dict[Path, float] = {}
    for kept in path.parent.glob("catalogue-*.json"):
        with contextlib.suppress(OSError):  # another worker's clean-up got there first
            ages[kept] = kept.stat().st_mtime
    for old in sorted(ages, key=ages.__getitem__, reverse=True)[CACHE_KEEP:]:
        with contextlib.suppress(OSError):
            old.unlink()


def publish(client: redis.Redis, prefix: str, text: str) -> None:
    client.set(catalogue_key(prefix), text)


class CatalogueReader:
    """The newest published catalogue, parsed once per new publication (one GET a call)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._last: tuple[str, Catalogue] | None = None

    def get(self) -> Catalogue | None:
        raw = self.client.get(catalogue_key(self.prefix))
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        last = self._last
        if last is not None and last[0] == text:
            return last[1]
        try:
            catalogue = Catalogue.model_validate_json(text)
        except ValueError:
            log.error("the published model catalogue is unreadable; validating without it")
            return None
        self._last = (text, catalogue)
        return catalogue


class CatalogueStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: publish the catalogue (kept, or built) in a background thread at
    start-up (the worker consumes meanwhile; a failure is logged, the worker runs on)."""

    requires = AFTER_POOL  # worker.process: no thread may be mid-import at a fork

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._thread: threading.Thread | None = None
        self._child: subprocess.Popen[bytes] | None = None

    def start(self, parent: Any) -> None:
        settings = parent.app.settings
        assert settings.redis_url
        folder = settings.cache_dir / "catalogue"
        # On the main thread: the thread below must import nothing (worker.process), and
        # reading the installation's metadata may.
        fingerprint: dict[str, object] | None
        try:
            fingerprint = installation_fingerprint()
        except Exception as exc:  # odd metadata must not stop the worker; it builds instead
            log.warning("cannot describe this installation (%s): the catalogue is built", exc)
            fingerprint = None

        def run() -> None:
            try:
                text, kept = cached_or_built(
                    folder,
                    fingerprint,
                    lambda: build_in_child(started=lambda p: setattr(self, "_child", p)),
                )
                client = redis_client(settings.redis_url)
                try:
                    publish(client, settings.key_prefix, text)
                finally:
                    client.close()
                log.info(
                    "published the model catalogue (%d bytes, %s)",
                    len(text),
                    f"kept in {folder}" if kept else "built",
                )
            except subprocess.CalledProcessError as exc:
                log.error("building the model catalogue failed: %s", (exc.stderr or b"")[-2000:])
            except Exception as exc:  # the worker still runs jobs without it
                log.error("publishing the model catalogue failed: %s", exc)

        self._thread = threading.Thread(target=run, name="flow-catalogue", daemon=True)
        self._thread.start()

    def stop(self, parent: Any) -> None:
        # A worker stopped during start-up does not wait for the listing.
        if self._child is not None and self._child.poll() is None:
            self._child.kill()


__all__ = [
    "CatalogueReader",
    "CatalogueStep",
    "build_in_child",
    "cache_path",
    "cached_or_built",
    "catalogue_key",
    "publish",
]

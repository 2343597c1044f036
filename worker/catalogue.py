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
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from celery import bootsteps

from flow_compress.arch.catalogue import Catalogue
from worker.broker import redis_client
from worker.process import AFTER_POOL, die_with_parent

log = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 600  # importing torch, timm and torchvision on a busy machine


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
    """Worker bootstep: build and publish the catalogue in a background thread at start-up
    (the worker consumes meanwhile; a failure is logged, the worker runs on)."""

    requires = AFTER_POOL  # worker.process: no thread may be mid-import at a fork

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._thread: threading.Thread | None = None
        self._child: subprocess.Popen[bytes] | None = None

    def start(self, parent: Any) -> None:
        settings = parent.app.settings
        assert settings.redis_url

        def run() -> None:
            try:
                text = build_in_child(started=lambda p: setattr(self, "_child", p))
                client = redis_client(settings.redis_url)
                try:
                    publish(client, settings.key_prefix, text)
                finally:
                    client.close()
                log.info("published the model catalogue (%d bytes)", len(text))
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
    "catalogue_key",
    "publish",
]

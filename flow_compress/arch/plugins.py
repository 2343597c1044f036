"""Operators' own architectures: families registered by installed packages.

A package declares entry points in the group ``flow_compress.architectures``; each names a
module (importing it calls ``register_family``) or a callable (called with no arguments; it
calls ``register_family``)::

    [project.entry-points."flow_compress.architectures"]
    acme = "acme_models.flow:register"

They are loaded once, lazily, before the first lookup in the architecture registry, in every
process that looks a name up (library, CLI, API, workers). A plug-in that fails to load is
logged with its entry-point name and listed by ``plugin_errors``; the others load anyway.
Torch-free here; a plug-in module must import torch inside its functions, like the families in
this package, or the API process would import torch with it.
"""

from __future__ import annotations

import logging
import threading
from importlib.metadata import entry_points

from flow_compress.arch import _spec

log = logging.getLogger(__name__)

GROUP = "flow_compress.architectures"

_lock = threading.RLock()
_state: dict[str, bool] = {"loaded": False}
_errors: dict[str, str] = {}
_families: dict[str, str] = {}  # family name -> the entry point that registered it


def load_plugins(*, reload: bool = False) -> None:
    """Load every entry point of ``GROUP`` (once; ``reload`` looks again, for tests and for
    packages installed after start-up). Never raises for a broken plug-in."""
    with _lock:
        if _state["loaded"] and not reload:
            return
        _state["loaded"] = True  # before loading: a plug-in's own lookups must not recurse
        for ep in entry_points(group=GROUP):
            if ep.name in _errors or ep.name in _families.values():
                continue
            before = {f.name for f in _spec.families()}
            try:
                target = ep.load()
                if callable(target):
                    target()
            except Exception as exc:  # a plug-in's bug must not take the others down
                _errors[ep.name] = f"{type(exc).__name__}: {exc}"
                log.error("architecture plug-in %r (%s) failed to load: %s", ep.name, ep.value, exc)
                continue
            added = [f.name for f in _spec.families() if f.name not in before]
            for name in added:
                _families[name] = ep.name
            log.info("architecture plug-in %r registered %s", ep.name, ", ".join(added) or "none")


def plugin_errors() -> list[tuple[str, str]]:
    """``(entry point, error)`` of every plug-in that failed to load."""
    return sorted(_errors.items())


def plugin_families() -> dict[str, str]:
    """Family name -> the entry point that registered it."""
    return dict(_families)


def plugin_architectures() -> list[str]:
    """The architecture names plug-in families registered (still registered)."""
    return sorted(
        spec.name
        for family in _spec.families()
        if family.name in _families
        for spec in family.architectures
    )


__all__ = ["GROUP", "load_plugins", "plugin_architectures", "plugin_errors", "plugin_families"]

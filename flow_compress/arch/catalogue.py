"""Model names: the reference grammar, and the catalogue of every name a job may use.

Torch-free at import: the HTTP layer parses and resolves names with it. Only
``build_catalogue`` imports timm and torchvision (to list their models); the worker runs it
(``python -m flow_compress.arch.catalogue``) and publishes the JSON for the API to read.

Grammar of a model reference::

    NAME                    a registered name (a hand-written or plug-in family) as before;
                            otherwise a timm or torchvision model if exactly one of them has it
    timm:NAME[.TAG]         timm.create_model(NAME[.TAG])
    torchvision:NAME        torchvision.models.get_model(NAME)
    hf-hub:ORG/NAME         a timm model in the local Hugging Face cache (its config.json
                            names the architecture; its weights are the job's input weights)

An unknown name raises ``UnsupportedModelError`` with close matches (difflib); a bare name
both timm and torchvision have is refused and the message says to add a prefix.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.util
import re
import sys
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from enum import Enum
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from flow_compress.errors import UnsupportedModelError


class NameSource(str, Enum):
    """Where a name comes from (``flow-compress architectures --source``)."""

    REGISTERED = "registered"  # a family in flow_compress/arch/
    PLUGIN = "plugin"  # a family an installed package registered (entry points)
    TIMM = "timm"
    TORCHVISION = "torchvision"
    HF_HUB = "hf-hub"  # a reference, never listed: resolved from a local cache

    def __str__(self) -> str:
        return self.value


PREFIXED = (NameSource.TIMM, NameSource.TORCHVISION, NameSource.HF_HUB)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,150}$")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference: ``source`` is None for a bare name; ``name`` is the rest (an
    ``ORG/NAME`` repository for ``hf-hub``)."""

    source: NameSource | None
    name: str

    def __str__(self) -> str:
        return self.name if self.source is None else f"{self.source}:{self.name}"


def parse_model_ref(text: str) -> ModelRef:
    """Parse a model reference (syntax only); a malformed one raises
    ``UnsupportedModelError``."""
    raw = text.strip() if isinstance(text, str) else ""
    prefix, sep, rest = raw.partition(":")
    if not sep:
        if not _NAME.match(raw):
            raise UnsupportedModelError(f"malformed model name {text!r}")
        return ModelRef(None, raw)
    try:
        source = NameSource(prefix)
    except ValueError:
        raise UnsupportedModelError(
            f"unknown model source {prefix!r} in {text!r}; "
            f"use {', '.join(f'{s}:' for s in PREFIXED)} or a bare registered name"
        ) from None
    if source not in PREFIXED:
        raise UnsupportedModelError(
            f"{text!r}: registered and plug-in names take no prefix (write {rest!r})"
        )
    pattern = _REPO if source is NameSource.HF_HUB else _NAME
    if not pattern.match(rest):
        shape = "ORG/NAME" if source is NameSource.HF_HUB else "NAME"
        raise UnsupportedModelError(
            f"malformed model reference {text!r} (expected {source}:{shape})"
        )
    return ModelRef(source, rest)


@dataclass(frozen=True)
class Resolved:
    """What a reference names: ``source`` and the name in that source (the registered name,
    timm's or torchvision's constructor, or the Hub repository)."""

    source: NameSource
    name: str

    @property
    def canonical(self) -> str:
        """The unambiguous spelling (bare for registered and plug-in names)."""
        if self.source in (NameSource.REGISTERED, NameSource.PLUGIN):
            return self.name
        return f"{self.source}:{self.name}"


def resolve_name(
    text: str,
    *,
    registered: Collection[str],
    plugin: Collection[str],
    timm: Collection[str] | None,
    torchvision: Collection[str] | None,
) -> Resolved:
    """Resolve ``text`` against the names of each source (None: that source's list is not
    known; a prefixed name of it is then accepted on its syntax alone).

    Registered and plug-in names win for bare names (today's names keep their family). A
    timm name may carry a pretrained tag (``resnet18.a1_in1k``); the architecture before the
    dot must be listed.
    """
    ref = parse_model_ref(text)
    if ref.source is NameSource.HF_HUB:
        return Resolved(NameSource.HF_HUB, ref.name)
    lists = {NameSource.TIMM: timm, NameSource.TORCHVISION: torchvision}
    if ref.source is not None:
        names = lists[ref.source]
        arch = ref.name.split(".", 1)[0] if ref.source is NameSource.TIMM else ref.name
        if names is None or arch in names:
            return Resolved(ref.source, ref.name)
        raise UnsupportedModelError(
            f"{ref.source} has no model {arch!r}{_suggest(arch, {ref.source: names})}"
        )
    if ref.name in registered:
        return Resolved(NameSource.REGISTERED, ref.name)
    if ref.name in plugin:
        return Resolved(NameSource.PLUGIN, ref.name)
    found = [s for s, names in lists.items() if names is not None and ref.name in names]
    if len(found) == 1:
        return Resolved(found[0], ref.name)
    if len(found) > 1:
        raise UnsupportedModelError(
            f"{ref.name!r} is both a timm and a torchvision model (their layers and weights "
            f"differ): add a prefix, timm:{ref.name} or torchvision:{ref.name}"
        )
    if timm is None and torchvision is None:
        raise UnsupportedModelError(
            f"unknown architecture {ref.name!r}: not a registered name, and the timm and "
            f"torchvision names are not known here yet; name it with its source "
            f"(timm:{ref.name} or torchvision:{ref.name}){_suggest(ref.name, {})}"
        )
    pools: dict[NameSource, Collection[str]] = {
        NameSource.REGISTERED: registered,
        NameSource.PLUGIN: plugin,
        **{s: names for s, names in lists.items() if names is not None},
    }
    raise UnsupportedModelError(f"unknown architecture {ref.name!r}{_suggest(ref.name, pools)}")


def _suggest(name: str, pools: dict[NameSource, Collection[str]]) -> str:
    """``"; did you mean: a, timm:b?"`` with difflib's closest names (registered names bare,
    the others with their source), or nothing."""
    spelled: dict[str, str] = {}
    for source, names in pools.items():
        bare = source in (NameSource.REGISTERED, NameSource.PLUGIN)
        for n in names:
            spelled.setdefault(n, n if bare else f"{source}:{n}")
    close = difflib.get_close_matches(name, list(spelled), n=5, cutoff=0.6)
    return f"; did you mean: {', '.join(spelled[c] for c in close)}?" if close else ""


@dataclass(frozen=True)
class WeightCaches:
    """Local folders where published weights may already be, passed in by the caller (the
    library reads no environment; the CLI and the worker find these from ``HF_HOME`` /
    ``HF_HUB_CACHE`` and ``TORCH_HOME``).

    ``hub_cache``: a Hugging Face hub cache (``models--ORG--NAME/{refs,snapshots}``), where
    ``hf-hub:`` references and timm's published weights are looked up; ``torch_hub``: torch
    hub's folder, whose ``checkpoints/`` holds torchvision's weight files."""

    hub_cache: Path | None = None
    torch_hub: Path | None = None


class Catalogue(BaseModel):
    """Every name one installation can build, with the library versions that listed them.

    Written as JSON by code that has torch (``build_catalogue``), read torch-free (the API
    validates job specs with ``resolve``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = 1
    created_at: float = Field(default_factory=time.time)
    versions: dict[str, str] = Field(default_factory=dict)
    registered: tuple[str, ...] = ()
    plugin: tuple[str, ...] = ()
    plugin_errors: tuple[str, ...] = ()
    timm: tuple[str, ...] = ()
    torchvision: tuple[str, ...] = ()

    def resolve(self, text: str) -> Resolved:
        return resolve_name(
            text,
            registered=frozenset(self.registered),
            plugin=frozenset(self.plugin),
            timm=frozenset(self.timm),
            torchvision=frozenset(self.torchvision),
        )

    def entries(
        self, *, source: NameSource | None = None, pattern: str | None = None
    ) -> Iterator[tuple[NameSource, str]]:
        """``(source, name)`` pairs, registered first, filtered by source and by a
        shell-style ``pattern`` (``efficientnet*``) on the bare name."""
        for src, names in (
            (NameSource.REGISTERED, self.registered),
            (NameSource.PLUGIN, self.plugin),
            (NameSource.TIMM, self.timm),
            (NameSource.TORCHVISION, self.torchvision),
        ):
            if source is not None and src is not source:
                continue
            for name in names:
                if pattern is None or fnmatch.fnmatchcase(name, pattern):
                    yield src, name


def build_catalogue() -> Catalogue:
    """List this installation's names: registered and plug-in families (entry points are
    loaded first), timm's ``list_models()`` and torchvision's classification models.
    Imports torch, timm and torchvision."""
    import timm
    import torch
    import torchvision

    from flow_compress import __version__
    from flow_compress.arch import _spec, plugins

    plugins.load_plugins()
    plugin_names = set(plugins.plugin_architectures())
    return Catalogue(
        versions={
            "flow_compress": __version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "torchvision": torchvision.__version__,
        },
        registered=tuple(n for n in _spec.list_architectures() if n not in plugin_names),
        plugin=tuple(sorted(plugin_names)),
        plugin_errors=tuple(f"{name}: {error}" for name, error in plugins.plugin_errors()),
        timm=tuple(timm.list_models()),
        torchvision=tuple(sorted(torchvision.models.list_models(module=torchvision.models))),
    )


# The distributions whose versions decide what ``build_catalogue`` lists.
FINGERPRINT_DISTRIBUTIONS = ("torch", "torchvision", "timm", "flow-compress")


def installation_fingerprint() -> dict[str, object]:
    """What ``build_catalogue``'s answer depends on, read without importing torch (from the
    installed distributions' metadata and the files of the code that registers names), so a
    caller can tell whether a catalogue built earlier still holds: the versions of torch,
    torchvision, timm and flow-compress, the entry points of ``plugins.GROUP`` with their
    distributions, and the size and modification time of every source file of this package
    and of each plug-in's top-level package.

    Versions alone would not do: an editable install (a checkout, or an operator developing a
    plug-in) changes the families it registers without changing its version."""
    from flow_compress.arch.plugins import GROUP

    versions: dict[str, str | None] = {}
    for dist in FINGERPRINT_DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    plugins = []
    for ep in metadata.entry_points(group=GROUP):
        dist = ep.dist
        plugins.append(
            {
                "name": ep.name,
                "value": ep.value,
                "distribution": None if dist is None else f"{dist.name} {dist.version}",
                "sources": _sources_of(ep.module.split(".", 1)[0]),
            }
        )
    plugins.sort(key=lambda p: (str(p["name"]), str(p["value"])))
    return {
        "python": sys.version,
        "versions": versions,
        "flow_compress": _tree_signature(Path(__file__).resolve().parents[1]),
        "plugins": plugins,
    }


def _sources_of(top_level: str) -> list[tuple[str, int, int]] | None:
    """The signature of a top-level module's files, found without importing it (None when
    it cannot be found: the catalogue then records that plug-in's load error)."""
    try:
        spec = importlib.util.find_spec(top_level)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    if folders:
        return [entry for folder in folders for entry in _tree_signature(Path(folder))]
    if spec.origin and Path(spec.origin).is_file():
        stat = Path(spec.origin).stat()
        return [(spec.origin, stat.st_size, stat.st_mtime_ns)]
    return None


def _tree_signature(folder: Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of every Python source under ``folder``: any edit, reinstall or
    checkout of another revision changes it, and it costs a ``stat`` per file."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed meanwhile, or an editor's dangling lock link
            continue
        found.append((str(path), stat.st_size, stat.st_mtime_ns))
    return found


def main(argv: list[str] | None = None) -> None:
    """``python -m flow_compress.arch.catalogue OUT.json``: write this installation's
    catalogue (the worker runs it in a child process, so its own process stays torch-free)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m flow_compress.arch.catalogue OUT.json")
    out = Path(args[0])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(build_catalogue().model_dump_json())
    tmp.replace(out)


if __name__ == "__main__":
    main()


__all__ = [
    "Catalogue",
    "ModelRef",
    "NameSource",
    "Resolved",
    "WeightCaches",
    "build_catalogue",
    "installation_fingerprint",
    "parse_model_ref",
    "resolve_name",
]

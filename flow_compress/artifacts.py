"""Artifact files: atomic writes, sha256 digests and the manifest — the one implementation
the library, the worker and the API share (torch-free).

A reader (the API streaming a download, a CI job polling a folder) must never see a
half-written file. Every write goes to a temporary file in the destination's own folder (so
the final rename cannot cross file systems), is flushed to disk, and then replaces the
destination with ``os.replace``, which is atomic on POSIX and Windows.

``manifest.json`` is a ``Manifest``: every published file by plain name (no folders: the
service serves a file by the name in the URL), with its size and sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

MANIFEST_NAME = "manifest.json"


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows), hence best
    # effort.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: readers see the old file or the new one.

    The parent folder is created if needed. The new file gets mode 0644. On any failure the
    temporary file is removed and the previous content of ``path`` (if any) is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600; artifacts are meant to be served and downloaded.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path | str, text: str, encoding: str = "utf-8") -> None:
    """``atomic_write_bytes`` for text (UTF-8 by default, ``\\n`` line endings kept as is)."""
    atomic_write_bytes(path, text.encode(encoding))


def _plain_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise ValueError(f"artifact name {name!r} must be a plain file name in the folder")
    if name == MANIFEST_NAME:
        raise ValueError(f"{MANIFEST_NAME} cannot list itself")
    return name


class ManifestEntry(BaseModel):
    """One published file: a plain name inside the artifact folder, its size and sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    size: int = Field(..., ge=0)
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _plain_name(v)


class Manifest(BaseModel):
    """``manifest.json``: the files of one artifact folder, in the order they were listed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    files: list[ManifestEntry]

    def entry(self, name: str) -> ManifestEntry | None:
        return next((f for f in self.files if f.name == name), None)


def file_entry(out_dir: Path | str, name: str) -> ManifestEntry:
    """The manifest entry of file ``name`` in ``out_dir``; ``ValueError`` for a name that is
    not a plain file name, ``FileNotFoundError`` when it is not a file there."""
    path = Path(out_dir) / _plain_name(name)
    if not path.is_file():
        raise FileNotFoundError(f"artifact {name!r} is not a file in {out_dir}")
    return ManifestEntry(name=name, size=path.stat().st_size, sha256=sha256_file(path))


def write_manifest(out_dir: Path | str, names: Iterable[str]) -> Manifest:
    """Write ``out_dir/manifest.json`` listing ``names`` with their sizes and sha256 digests.

    Duplicates are listed once, in first-seen order. Written atomically; the same manifest is
    returned. Raises ``ValueError`` for a name that is not a plain file name and
    ``FileNotFoundError`` for one that is not a file, before anything is written.
    """
    out_dir = Path(out_dir)
    manifest = Manifest(files=[file_entry(out_dir, name) for name in dict.fromkeys(names)])
    atomic_write_text(out_dir / MANIFEST_NAME, manifest.model_dump_json(indent=2) + "\n")
    return manifest


def read_manifest(out_dir: Path | str) -> Manifest:
    """The manifest of ``out_dir`` (``ValidationError`` when it is malformed)."""
    return Manifest.model_validate_json((Path(out_dir) / MANIFEST_NAME).read_bytes())


def verify_manifest(out_dir: Path | str) -> list[str]:
    """Names in the manifest whose file is missing or whose size or sha256 differ."""
    out_dir = Path(out_dir)
    bad: list[str] = []
    for entry in read_manifest(out_dir).files:
        path = out_dir / entry.name
        if (
            not path.is_file()
            or path.stat().st_size != entry.size
            or sha256_file(path) != entry.sha256
        ):
            bad.append(entry.name)
    return bad


__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "ManifestEntry",
    "atomic_write_bytes",
    "atomic_write_text",
    "file_entry",
    "read_manifest",
    "sha256_file",
    "verify_manifest",
    "write_manifest",
]

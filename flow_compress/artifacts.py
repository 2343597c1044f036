"""Artifact files: atomic writes, sha256 digests and the manifest.

A reader (the API streaming a download, a CI job polling a folder) must never see a
half-written file. Every write goes to a temporary file in the destination's own folder (so
the final rename cannot cross file systems), is flushed to disk, and then replaces the
destination with ``os.replace``, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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


def _checked_name(name: str) -> str:
    """Manifest names are relative POSIX paths inside the artifact folder."""
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or "\\" in name or any(p in ("", "..") for p in pure.parts):
        raise ValueError(f"artifact name {name!r} must be a relative path inside the folder")
    if str(pure) != name:
        raise ValueError(f"artifact name {name!r} is not normalised (expected {str(pure)!r})")
    if name == MANIFEST_NAME:
        raise ValueError(f"{MANIFEST_NAME} cannot list itself")
    return name


def file_entry(out_dir: Path | str, name: str) -> dict[str, object]:
    """``{"name", "size", "sha256"}`` of one file in ``out_dir``."""
    path = Path(out_dir) / _checked_name(name)
    if not path.is_file():
        raise FileNotFoundError(f"artifact {name!r} is not a file in {out_dir}")
    return {"name": name, "size": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(out_dir: Path | str, names: Iterable[str]) -> dict[str, list[dict[str, object]]]:
    """Write ``out_dir/manifest.json`` listing ``names`` with their sizes and sha256 digests.

    ``names`` are relative paths inside ``out_dir`` (duplicates are listed once, in first-seen
    order). The manifest is ``{"files": [{"name", "size", "sha256"}, ...]}``, written
    atomically; the same dictionary is returned. Raises ``ValueError`` for a name that leaves
    the folder and ``FileNotFoundError`` for one that is not a file, before anything is written.
    """
    out_dir = Path(out_dir)
    entries = [file_entry(out_dir, name) for name in dict.fromkeys(names)]
    manifest: dict[str, list[dict[str, object]]] = {"files": entries}
    atomic_write_text(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(out_dir: Path | str) -> dict[str, list[dict[str, object]]]:
    """The manifest written by ``write_manifest``."""
    with open(Path(out_dir) / MANIFEST_NAME, encoding="utf-8") as fh:
        data: dict[str, list[dict[str, object]]] = json.load(fh)
    return data


def verify_manifest(out_dir: Path | str) -> list[str]:
    """Names in the manifest whose file is missing or whose size or sha256 differ."""
    out_dir = Path(out_dir)
    bad: list[str] = []
    for entry in read_manifest(out_dir)["files"]:
        name = str(entry["name"])
        path = out_dir / name
        if (
            not path.is_file()
            or path.stat().st_size != entry["size"]
            or sha256_file(path) != entry["sha256"]
        ):
            bad.append(name)
    return bad


__all__ = [
    "MANIFEST_NAME",
    "atomic_write_bytes",
    "atomic_write_text",
    "file_entry",
    "read_manifest",
    "sha256_file",
    "verify_manifest",
    "write_manifest",
]

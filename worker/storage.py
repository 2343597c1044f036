"""Artifact storage on the shared volume: folder layout, manifests, atomic publication.

Layout under the storage root::

    uploads/<job id>/      weights and the extracted dataset of a job (removed when it ends)
    scratch/<job id>/      a running job's working folder; the library writes output/ in it
                           and checkpoints in checkpoint/ (removed when the job ends,
                           whatever the outcome; checkpoint/ survives a redelivery)
    artifacts/<job id>/    published artifacts, with manifest.json; never written in place
    datasets/              server-side datasets that dataset references may name
    redis/                 the embedded Redis's data (``flow-compress serve`` without a URL)

A job's artifacts appear by one ``rename`` of ``scratch/<id>/output``, so a reader sees either
no folder or a complete one. Only files named in the manifest are ever served.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

MANIFEST = "manifest.json"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_CHUNK = 1 << 20


class ArtifactCorruptError(Exception):
    """The output of a job does not match its manifest (missing file, size or hash)."""


class ManifestEntry(BaseModel):
    # The library writes the manifest; unknown keys it may add later are ignored, not fatal.
    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    size: int = Field(..., ge=0)
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or v in (".", "..") or "/" in v or "\\" in v or "\x00" in v or v == MANIFEST:
            raise ValueError(f"manifest entry {v!r} is not a plain file name")
        return v


class Manifest(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    files: list[ManifestEntry]

    def entry(self, name: str) -> ManifestEntry | None:
        return next((f for f in self.files if f.name == name), None)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_job_id(job_id: str) -> str:
    """Job ids become folder names: only 32 lowercase hex digits are accepted."""
    if not JOB_ID.match(job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    return job_id


class Storage:
    """Paths and file operations of one storage root (shared by the API and the workers)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uploads_dir = self.root / "uploads"
        self.scratch_dir = self.root / "scratch"
        self.artifacts_dir = self.root / "artifacts"
        self.datasets_dir = self.root / "datasets"
        self.redis_dir = self.root / "redis"

    def ensure(self) -> None:
        for d in (self.uploads_dir, self.scratch_dir, self.artifacts_dir, self.datasets_dir):
            d.mkdir(parents=True, exist_ok=True)

    def uploads(self, job_id: str) -> Path:
        return self.uploads_dir / check_job_id(job_id)

    def scratch(self, job_id: str) -> Path:
        return self.scratch_dir / check_job_id(job_id)

    def artifacts(self, job_id: str) -> Path:
        return self.artifacts_dir / check_job_id(job_id)

    def resolve_inside(self, relative: str, base: Path | None = None) -> Path:
        """Resolve a user-supplied relative path under ``base`` (the root by default).

        Absolute paths, ``..`` and symlinks that lead outside are refused with ``ValueError``.
        """
        base = (base or self.root).resolve()
        if not relative or "\x00" in relative or Path(relative).is_absolute():
            raise ValueError("expected a relative path under the storage root")
        target = (base / relative).resolve()
        if not target.is_relative_to(base):
            raise ValueError("path leaves the storage root")
        return target

    # ------------------------------------------------------------------ manifests
    @staticmethod
    def _load_manifest(folder: Path) -> Manifest | None:
        path = folder / MANIFEST
        if not path.is_file():
            return None
        try:
            return Manifest.model_validate_json(path.read_bytes())
        except ValueError as exc:  # pydantic's ValidationError included
            raise ArtifactCorruptError(f"{MANIFEST} is malformed: {exc}") from exc

    def read_manifest(self, job_id: str) -> Manifest | None:
        """The published manifest, or None when the job has published nothing."""
        return self._load_manifest(self.artifacts(job_id))

    def artifact_file(self, job_id: str, name: str) -> tuple[Path, ManifestEntry] | None:
        """A published file by name, only if the manifest lists it."""
        manifest = self.read_manifest(job_id)
        entry = manifest.entry(name) if manifest else None
        if entry is None:
            return None
        folder = self.artifacts(job_id)
        path = folder / entry.name
        # Publication refuses links, but the folder is on a shared volume: never follow one
        # out of the job's folder, whatever put it there.
        if path.is_symlink() or not path.resolve().is_relative_to(folder.resolve()):
            return None
        return (path, entry) if path.is_file() else None

    # ------------------------------------------------------------------ lifecycle
    def output(self, job_id: str) -> Path:
        """Where the library writes a running job's artifacts (it creates the folder)."""
        return self.scratch(job_id) / "output"

    def checkpoint(self, job_id: str) -> Path:
        """Where the library checkpoints a running job's accepted steps (it creates it)."""
        return self.scratch(job_id) / "checkpoint"

    def fresh_scratch(self, job_id: str) -> Path:
        """Empty the job's scratch folder except its checkpoint (a redelivered job's partial
        output and the library's partial folders are discarded; its accepted steps are
        kept, to be resumed) and return the output path."""
        path = self.scratch(job_id)
        path.mkdir(parents=True, exist_ok=True)
        keep = self.checkpoint(job_id)
        for entry in path.iterdir():
            if entry == keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        return self.output(job_id)

    def publish(self, job_id: str) -> Manifest:
        """Verify the job's output against its manifest, then rename it into place.

        Raises ``ArtifactCorruptError`` if a listed file is missing or differs in size or
        sha256; the scratch folder is left for the caller to discard.
        """
        scratch = self.output(job_id)
        manifest = self._load_manifest(scratch)
        if manifest is None:
            raise ArtifactCorruptError(f"the job wrote no {MANIFEST}")
        for entry in manifest.files:
            path = scratch / entry.name
            if not path.is_file() or path.is_symlink():
                raise ArtifactCorruptError(f"{entry.name} is listed in the manifest but missing")
            if path.stat().st_size != entry.size:
                raise ArtifactCorruptError(f"{entry.name} size differs from the manifest")
            if sha256_file(path) != entry.sha256:
                raise ArtifactCorruptError(f"{entry.name} sha256 differs from the manifest")
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        # rename(2) is atomic within one filesystem; scratch/ and artifacts/ share the root.
        os.rename(scratch, self.artifacts(job_id))
        self.discard_scratch(job_id)
        return manifest

    def discard_scratch(self, job_id: str) -> None:
        shutil.rmtree(self.scratch(job_id), ignore_errors=True)

    def discard_output(self, job_id: str) -> None:
        """Remove everything of a job's scratch folder but its checkpoint (before a retry)."""
        if self.scratch(job_id).is_dir():
            self.fresh_scratch(job_id)

    def remove_uploads(self, job_id: str) -> None:
        shutil.rmtree(self.uploads(job_id), ignore_errors=True)

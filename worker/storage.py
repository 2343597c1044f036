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

``Storage`` is this local-folder backend and, by its public methods, the interface every
backend keeps: ``worker.s3.S3Storage`` keeps uploads and artifacts in an S3 bucket under the
same layout (``uploads/<id>/…``, ``artifacts/<id>/…``) while scratch, datasets and the embedded
Redis stay on the local root. ``open_storage(settings)`` picks the backend. Methods marked
*stored* below are the ones a backend implements; the others are local to each machine.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

# The manifest format and the digest are the library's (one implementation for the writer
# and every reader); sha256_file is re-exported for the API's uploads.
from flow_compress.artifacts import MANIFEST_NAME as MANIFEST
from flow_compress.artifacts import Manifest, ManifestEntry, sha256_file

if TYPE_CHECKING:
    from worker.jobs import JobPayload
    from worker.settings import WorkerSettings

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class ArtifactCorruptError(Exception):
    """The output of a job does not match its manifest (missing file, size or hash)."""


_CHUNK = 1 << 20  # read size when streaming a stored file


class StorageUnavailableError(ConnectionError):
    """The object store could not be reached or answered with a server error (transient: a
    ``ConnectionError``, so ``worker.errors.classify`` retries the job)."""


class Sink(Protocol):
    """An upload being written: chunks in order, then ``commit`` (the file exists) or
    ``abort`` (nothing of it is left). ``ref`` is what a job payload names it by."""

    ref: str

    def write(self, chunk: bytes) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class FileSink:
    """A local file written exclusively (``xb``): an existing file is never overwritten."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ref = str(path)
        self._fh: IO[bytes] | None = path.open("xb")

    def write(self, chunk: bytes) -> None:
        assert self._fh is not None, "write after commit or abort"
        self._fh.write(chunk)

    def commit(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def abort(self) -> None:
        self.commit()
        self.path.unlink(missing_ok=True)


def check_job_id(job_id: str) -> str:
    """Job ids become folder names: only 32 lowercase hex digits are accepted."""
    if not JOB_ID.match(job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    return job_id


class Storage:
    """Paths and file operations of one storage root (shared by the API and the workers).

    ``remote`` is False here: uploads and artifacts are files under ``root`` that the API
    serves from disk. A remote backend (``remote`` True) keeps them elsewhere and uses the
    local ``uploads/<id>`` folder only as the API's staging area for dataset archives.
    """

    remote = False

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

    def artifact_entry(self, job_id: str, name: str) -> ManifestEntry | None:
        """The manifest entry of a published file, only if the manifest lists it."""
        found = self.artifact_file(job_id, name)
        return found[1] if found else None

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
        manifest = self.verified_output(job_id)
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        # rename(2) is atomic within one filesystem; scratch/ and artifacts/ share the root.
        os.rename(scratch, self.artifacts(job_id))
        self.discard_scratch(job_id)
        return manifest

    def verified_output(self, job_id: str) -> Manifest:
        """The manifest of a job's output, after checking every listed file's size and
        sha256 (``ArtifactCorruptError`` otherwise)."""
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
        return manifest

    def discard_scratch(self, job_id: str) -> None:
        shutil.rmtree(self.scratch(job_id), ignore_errors=True)

    # ------------------------------------------------------------------ stored: uploads
    @property
    def url(self) -> str:
        """Where uploads and artifacts are kept, for logs and health checks."""
        return str(self.root)

    def check(self) -> None:
        """Raise ``StorageUnavailableError`` unless uploads and artifacts can be written."""
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            raise StorageUnavailableError("not writable")

    def open_upload(self, job_id: str, name: str) -> Sink:
        """Stream an upload into ``uploads/<id>/<name>`` (the folder exists: the API made it)."""
        return FileSink(self.uploads(job_id) / name)

    def store_upload_tree(self, job_id: str, local: Path) -> str:
        """Keep what the API unpacked under ``uploads(job_id)``; return the reference a job
        payload uses for ``local`` (here: the path itself, already in place)."""
        return str(local)

    def discard_staging(self, job_id: str) -> None:
        """Remove what the API kept locally of a job it has stored (here: nothing, the
        upload folder is where the job's inputs live)."""

    def upload_bytes(self, job_id: str) -> int:
        """Bytes a job's uploads occupy (what the owner's stored-bytes quota counts)."""
        return _tree_bytes(self.uploads(job_id))

    def stored_file(self, relative: str) -> tuple[str, str] | None:
        """A server-side file named relative to the storage root (``weights_uri``): its
        reference and sha256, or None when there is none. ``ValueError`` on a path that
        leaves the root."""
        path = self.resolve_inside(relative)
        if path.is_relative_to(self.redis_dir) or not path.is_file():
            return None
        return str(path), sha256_file(path)

    def stage_inputs(self, payload: JobPayload) -> JobPayload:
        """The payload with every input readable on this machine (here: already so)."""
        return payload

    # ------------------------------------------------------------------ stored: artifacts
    def read_artifact(self, job_id: str, name: str) -> bytes | None:
        """A published file's bytes (small files: the report), None when not published."""
        found = self.artifact_file(job_id, name)
        return found[0].read_bytes() if found else None

    def open_artifact(
        self, job_id: str, name: str, byte_range: tuple[int, int] | None = None
    ) -> Iterator[bytes]:
        """Stream a published file (``byte_range``: start and end, end exclusive)."""
        found = self.artifact_file(job_id, name)
        if found is None:
            raise FileNotFoundError(name)
        start, end = byte_range or (0, found[1].size)
        with found[0].open("rb") as fh:
            fh.seek(start)
            while start < end and (chunk := fh.read(min(_CHUNK, end - start))):
                start += len(chunk)
                yield chunk

    def presigned_url(self, job_id: str, name: str, ttl_s: int, disposition: str) -> str:
        """A time-limited URL the store itself serves the file at (remote stores only)."""
        raise NotImplementedError("a local storage folder has no presigned URLs")

    def artifact_bytes(self, job_id: str) -> int:
        """Bytes a job's published artifacts occupy (the manifest included)."""
        return _tree_bytes(self.artifacts(job_id))

    def remove_artifacts(self, job_id: str) -> None:
        """Remove a job's published artifacts: the manifest first, so a reader that still
        finds one also finds every file it lists."""
        folder = self.artifacts(job_id)
        (folder / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)

    def discard_output(self, job_id: str) -> None:
        """Remove everything of a job's scratch folder but its checkpoint (before a retry)."""
        if self.scratch(job_id).is_dir():
            self.fresh_scratch(job_id)

    def remove_uploads(self, job_id: str) -> None:
        shutil.rmtree(self.uploads(job_id), ignore_errors=True)


def _tree_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def open_storage(settings: WorkerSettings) -> Storage:
    """The backend the settings name: S3 for ``storage_url=s3://…``, else the local folder."""
    if settings.storage_url:
        from worker.s3 import S3Storage  # boto3 is imported only when S3 is configured

        return S3Storage(settings.storage_dir, settings.storage_url, settings)
    return Storage(settings.storage_dir)

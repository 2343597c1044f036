"""Which server-side weights a caller may name with ``weights_uri``.

A key may name exactly two kinds of file, and nothing else on the server:

- its own upload, ``uploads/<job id>/weights.bin`` of one of its jobs that still holds its
  upload (queued or running): the file is hard-linked into the new job's own upload folder,
  so the new job keeps it whatever happens to the first one, and its sha256 is the one
  recorded for the first job (nothing is hashed);
- a file inside a folder the operator declared shared (``FLOW_COMPRESS_SHARED_WEIGHTS_DIRS``,
  relative to the storage root), hashed once per file version (``api.hashing``).

Every refusal is the same error (code, message and field), whether the file is missing,
belongs to another key, lies outside the shared folders or tries to leave the storage root:
a refusal tells nothing about what exists. Whether a file exists is looked at only once the
caller is known to be allowed to name it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from starlette.concurrency import run_in_threadpool

from api.errors import ApiError
from api.hashing import FileHasher
from worker.storage import JOB_ID, Storage
from worker.store import JobStore

WEIGHTS_FILE = "weights.bin"


def refused(field: str) -> ApiError:
    return ApiError(
        "weights_not_found",
        "weights_uri names no weights file this key may use: name a file in a shared weights "
        "folder of this server, or uploads/<job id>/weights.bin of one of your own queued or "
        "running jobs",
        field=field,
    )


@dataclass(frozen=True)
class ServerWeights:
    path: Path
    sha256: str


class WeightsPolicy:
    """Resolves ``weights_uri`` for one owner; see the module docstring."""

    def __init__(
        self, storage: Storage, store: JobStore, hasher: FileHasher, shared_dirs: list[str]
    ) -> None:
        self.storage = storage
        self.store = store
        self.hasher = hasher
        self.shared = [shared_folder(storage, d) for d in shared_dirs]

    async def resolve(self, uri: str, owner: str, job_id: str, field: str) -> ServerWeights:
        """The weights the new job ``job_id`` reads, or ``weights_not_found``."""
        relative = uri.removeprefix("storage://")
        own = self._own_upload(relative)
        if own is not None:
            # A store lookup and a link: blocking calls, kept off the event loop.
            return await run_in_threadpool(self._link_own_upload, own, owner, job_id, field)
        try:
            path = self.storage.resolve_inside(relative)
        except ValueError:
            raise refused(field) from None
        if not any(path.is_relative_to(folder) for folder in self.shared):
            raise refused(field)
        # Allowed to name it: only now does it matter whether it exists.
        if not path.is_file():
            raise refused(field)
        try:
            digest = await self.hasher.sha256(path)
        except OSError:
            raise refused(field) from None
        return ServerWeights(path, digest)

    @staticmethod
    def _own_upload(relative: str) -> str | None:
        """The job id of an ``uploads/<id>/weights.bin`` reference, else None."""
        parts = PurePosixPath(relative).parts
        if len(parts) == 3 and parts[0] == "uploads" and parts[2] == WEIGHTS_FILE:
            return parts[1] if JOB_ID.match(parts[1]) else ""
        if parts[:1] == ("uploads",):
            return ""  # anything else under uploads/ is nobody's to name
        return None

    def _link_own_upload(
        self, source_id: str, owner: str, job_id: str, field: str
    ) -> ServerWeights:
        record = self.store.get(source_id) if source_id else None
        source = self.storage.uploads(source_id) / WEIGHTS_FILE if source_id else None
        if (
            record is None
            or source is None
            or record.owner != owner
            or record.weights != str(source)
            or record.weights_sha256 is None
        ):
            raise refused(field)
        target_dir = self.storage.uploads(job_id)
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / WEIGHTS_FILE
        try:
            if source.is_symlink():
                raise FileNotFoundError(source)
            # A hard link, not a copy: instant, no extra disk, and the first job's clean-up
            # (which removes its own folder) leaves this job's file in place.
            os.link(source, target)
        except OSError:
            raise refused(field) from None  # gone meanwhile (the first job ended)
        return ServerWeights(target, record.weights_sha256)


def shared_folder(storage: Storage, relative: str) -> Path:
    """A shared weights folder, checked at start-up: inside the storage root and clear of
    the folders the service manages (uploads, scratch, artifacts, the embedded Redis)."""
    try:
        folder = storage.resolve_inside(relative)
    except ValueError as exc:
        raise ValueError(f"shared weights folder {relative!r}: {exc}") from None
    managed = (storage.uploads_dir, storage.scratch_dir, storage.artifacts_dir, storage.redis_dir)
    if folder == storage.root or any(
        folder.is_relative_to(m) or m.is_relative_to(folder) for m in managed
    ):
        raise ValueError(
            f"shared weights folder {relative!r} must be a folder of its own under the "
            "storage root, apart from uploads/, scratch/, artifacts/ and redis/"
        )
    return folder

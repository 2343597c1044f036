"""sha256 of server-side files, computed once per file version and never on the event loop.

A JSON submission naming a server-side weights file (``weights_uri``) records the file's
sha256. Hashing a large file per request would let a few cheap requests keep the API busy
for minutes (45 requests naming a 1 GiB file held ``GET /v1/jobs`` back 20 s when every
request hashed it in the shared thread pool), so:

- a digest is cached under the file's identity (resolved path, inode, size, mtime in ns), in
  Redis (shared by every API process, kept ``CACHE_TTL_S``) and in memory; a changed file
  has a new identity and is hashed again;
- concurrent requests for the same file wait for one hash (single flight);
- hashing runs in a small executor of its own, so it never blocks the event loop nor starves
  the thread pool that serves the other routes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis

from worker.storage import sha256_file

CACHE_TTL_S = 30 * 24 * 3600
_MEMORY_ENTRIES = 1024


def file_identity(path: Path) -> str:
    """What makes a file version: a rewrite in place changes mtime or size, a replacement
    by rename changes the inode."""
    st = os.stat(path)
    return f"{path}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"


class FileHasher:
    """``await hasher.sha256(path)``: the file's hex sha256 (see the module docstring)."""

    def __init__(self, client: redis.Redis, prefix: str, *, threads: int = 2) -> None:
        self.r = client
        self.prefix = prefix
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sha256")
        self._memory: OrderedDict[str, str] = OrderedDict()
        self._pending: dict[str, asyncio.Future[str]] = {}
        self.hashed = 0  # files actually read, for operators' curiosity and the tests

    def _key(self, identity: str) -> str:
        return f"{self.prefix}sha256:{hashlib.sha256(identity.encode()).hexdigest()}"

    async def sha256(self, path: Path) -> str:
        loop = asyncio.get_running_loop()
        identity = await loop.run_in_executor(self._executor, file_identity, path)
        cached = self._memory.get(identity)
        if cached is not None:
            self._memory.move_to_end(identity)
            return cached
        pending = self._pending.get(identity)
        if pending is None:
            pending = loop.create_future()
            self._pending[identity] = pending
            try:
                digest, stable = await loop.run_in_executor(
                    self._executor, self._lookup, path, identity
                )
            except BaseException as exc:
                pending.set_exception(exc)
                # Retrieved here so a failure nobody else awaited is not reported as lost.
                pending.exception()
                raise
            finally:
                del self._pending[identity]
            pending.set_result(digest)
            if stable:
                self._remember(identity, digest)
            return digest
        return await asyncio.shield(pending)

    def _lookup(self, path: Path, identity: str) -> tuple[str, bool]:
        """Redis first; otherwise hash. Returns the digest and whether it may be cached (the
        file did not change while it was read)."""
        key = self._key(identity)
        cached = self.r.get(key)
        if cached:
            return str(cached), True
        digest = sha256_file(path)
        self.hashed += 1
        stable = file_identity(path) == identity
        if stable:
            self.r.set(key, digest, ex=CACHE_TTL_S)
        return digest, stable

    def _remember(self, identity: str, digest: str) -> None:
        self._memory[identity] = digest
        while len(self._memory) > _MEMORY_ENTRIES:
            self._memory.popitem(last=False)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

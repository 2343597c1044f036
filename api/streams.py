"""Reading a job's event stream without blocking the event loop (``redis.asyncio``).

An open ``GET /v1/jobs/{id}/events`` waits in ``XREAD BLOCK`` on its own pooled connection, so
a thousand open pages cost a thousand idle sockets, not a thousand threads, and the sync routes
keep the whole thread pool.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio

from worker.events import JobStreams

# Longest single XREAD wait. The socket timeout must exceed it, or redis-py would report a
# timeout for a wait that is merely idle.
BLOCK_S = 10.0


class EventReader:
    """Backlog and live reads of job event streams; one per API process."""

    def __init__(self, url: str, streams: JobStreams) -> None:
        self.streams = streams
        self.client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=5,
            socket_timeout=BLOCK_S + 20,
            health_check_interval=30,
        )

    async def backlog(self, job_id: str, after: str) -> list[tuple[str, str]]:
        """Every stored event after the id ``after`` (``0-0``: all), oldest first, as (id,
        JSON) pairs; bounded by the stream's cap."""
        entries: Any = await self.client.xrange(
            self.streams.events_key(job_id), min=f"({after}", max="+"
        )
        return [(entry_id, JobStreams.decode_event(fields)) for entry_id, fields in entries]

    async def wait(
        self, job_id: str, after: str, block_s: float = BLOCK_S
    ) -> list[tuple[str, str]]:
        """Events after ``after``; waits up to ``block_s`` for the first one (empty: none)."""
        key = self.streams.events_key(job_id)
        found: Any = await self.client.xread({key: after}, block=int(block_s * 1000))
        entries = found[0][1] if found else []
        return [(entry_id, JobStreams.decode_event(fields)) for entry_id, fields in entries]

    async def aclose(self) -> None:
        await self.client.aclose()

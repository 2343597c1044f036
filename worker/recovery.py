"""Jobs cut off by a lost broker connection go back on the queue as soon as Redis answers.

Why this exists: with ``worker_cancel_long_running_tasks_on_connection_loss`` Celery stops a
running job when the worker loses its broker connection, leaves the job's message
unacknowledged and relies on the broker to hand it out again. Kombu's Redis transport moves
unacknowledged messages back to the queue as the broken connection closes, but when Redis
itself is down (a crash, a restart) that move fails, and the message stays in kombu's
``unacked`` hash until the visibility timeout, which is above the hard time limit (hours).
Until then the job would sit in ``running`` with nothing running it.

So the worker's main process remembers every job Celery cut off this way, and once its
consumer has reconnected it puts each such job back to ``queued`` and its message back at the
head of the queue. The next delivery resumes from the job's last checkpoint; a Redis restart
counts as an attempt, not as a lost worker (``redeliveries`` is left alone).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from celery import Celery, bootsteps

from worker.broker import redis_client
from worker.settings import WorkerSettings
from worker.store import JobStore

log = logging.getLogger(__name__)

# Job id -> when its run was cut off. Only the worker's main process (Celery's consumer thread)
# reads or writes it: the cancel and the reconnect both happen there, so no lock is needed.
_cut_off: dict[str, float] = {}


def note_cut_off(job_id: str) -> None:
    """Remember that Celery stopped ``job_id``'s run because the broker connection was lost."""
    _cut_off.setdefault(job_id, time.time())


def requeue_cut_off_jobs(app: Celery, settings: WorkerSettings) -> None:
    """Put every remembered job back on the queue; keep those that could not be handled (the
    next reconnect tries again, and the visibility timeout remains the last resort)."""
    if not _cut_off:
        return
    assert settings.redis_url
    store = JobStore(
        redis_client(settings.redis_url), settings.key_prefix, events_ttl_s=settings.events_ttl_s
    )
    try:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            qos = channel.qos
            with channel.conn_or_acquire() as client:
                for job_id, since in list(_cut_off.items()):
                    _requeue_one(client, channel, qos, store, job_id, since)
                    del _cut_off[job_id]
    except Exception:
        # Whatever went wrong (Redis gone again, most likely), the consumer must keep running:
        # an exception here would stop the worker. What is left is tried at the next reconnect.
        log.warning(
            "could not requeue jobs cut off by the lost broker connection yet: %s",
            ", ".join(_cut_off),
            exc_info=True,
        )
    finally:
        store.r.close()


def _requeue_one(
    client: Any, channel: Any, qos: Any, store: JobStore, job_id: str, since: float
) -> None:
    # kombu's index of unacknowledged messages: delivery tag -> when it was delivered. Only a
    # message delivered before the cut-off is the one this worker was running; a later entry
    # means the broker already handed the job out again (kombu's own restore worked because
    # Redis stayed up) and another run owns it now.
    entries = client.zrange(channel.unacked_index_key, 0, -1, withscores=True)
    for tag, delivered_at in entries:
        if delivered_at > since:
            continue
        raw = client.hget(channel.unacked_key, tag)
        if raw is None:
            continue
        message, _exchange, _routing_key = json.loads(raw)
        if message.get("headers", {}).get("id") != job_id:
            continue
        # The record first: if this process dies between the two steps the message is still
        # unacknowledged and comes back after the visibility timeout, so nothing is lost.
        store.requeue(job_id, "requeued: the connection to Redis was lost while it ran")
        qos.restore_by_tag(tag, client)
        log.warning("job %s: cut off by the lost broker connection, back on the queue", job_id)
        return
    log.info("job %s: cut off by the lost broker connection, already redelivered", job_id)


def requeue_orphaned_jobs(app: Celery, settings: WorkerSettings) -> list[str]:
    """Put back every unacknowledged message, and its job, at the head of the queue.

    Only for a Redis that no live worker uses: ``flow-compress serve``'s embedded one as it
    starts, before its worker. Every unacknowledged message there was taken by the worker of
    an earlier ``serve`` that was killed outright (its worker died with it, see
    ``worker.process``); without this its job would wait for the visibility timeout (hours).
    Returns the job ids put back.
    """
    assert settings.redis_url
    store = JobStore(redis_client(settings.redis_url), settings.key_prefix)
    requeued: list[str] = []
    try:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            with channel.conn_or_acquire() as client:
                for tag in client.zrange(channel.unacked_index_key, 0, -1):
                    raw = client.hget(channel.unacked_key, tag)
                    if raw is None:
                        continue
                    message, _exchange, _routing_key = json.loads(raw)
                    job_id = message.get("headers", {}).get("id")
                    # The record first, as for a cut-off job (see _requeue_one).
                    if job_id:
                        store.requeue(job_id, "requeued: the service stopped while it ran")
                        requeued.append(job_id)
                    channel.qos.restore_by_tag(tag, client)
    finally:
        store.r.close()
    for job_id in requeued:
        log.warning("job %s: its worker died with the service; back on the queue", job_id)
    return requeued


class RequeueCutOffJobs(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: its ``start`` runs each time the consumer has (re)connected."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        requeue_cut_off_jobs(parent.app, parent.app.settings)


__all__ = ["RequeueCutOffJobs", "note_cut_off", "requeue_cut_off_jobs", "requeue_orphaned_jobs"]

"""Webhook delivery: a job's end, POSTed to its ``notify`` URL, signed, at least once.

When a job with ``notify`` ends, the job store records a pending ``WebhookDelivery`` on the
job and puts the job id in the ``webhooks:due`` sorted set (score: when the next attempt is
due) in the same transaction as the end. A dispatcher thread in each worker's main process
claims due deliveries and sends them:

- claiming moves the entry's due time one lease ahead (a Lua script, atomic): two
  dispatchers never send the same attempt, and a dispatcher that dies mid-attempt leaves the
  entry to come due again when the lease runs out, so nothing is lost to a worker restart
  (at least once: a receiver may see a delivery twice, with the same delivery id);
- a 2xx answer delivers it; anything else (an error status, a redirect — never followed —,
  a timeout, a refused connection) is retried with exponential backoff and jitter until
  ``webhook_max_elapsed_s`` after the first attempt, then the delivery is marked failed.
  The job's own state never changes.

The request: ``POST`` of ``WebhookPayload`` as JSON, with headers ``Flow-Compress-Delivery``
(the delivery id, the same on every attempt), ``Flow-Compress-Event`` and
``Flow-Compress-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>" keyed by the
secret>``; receivers check it with ``api.client.verify_signature``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
import threading
import time
from datetime import datetime, timezone
from typing import Any

import httpx
import redis
from celery import bootsteps
from pydantic import BaseModel, ConfigDict

from worker.broker import redis_client
from worker.jobs import JobError, JobRecord, JobState
from worker.notify import DeliveryState, WebhookDelivery, WebhookUrlError, check_target_url
from worker.process import AFTER_POOL
from worker.settings import WorkerSettings
from worker.store import JobStore

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Flow-Compress-Signature"
DELIVERY_HEADER = "Flow-Compress-Delivery"
EVENT_HEADER = "Flow-Compress-Event"
USER_AGENT = "flow-compress-webhooks/1"
IDLE_WAIT_S = 0.5  # how often an idle dispatcher looks for due deliveries

# Take the earliest entry due by ARGV[1] and push it ARGV[2] seconds ahead (the lease).
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #due == 0 then return false end
redis.call('ZADD', KEYS[1], ARGV[1] + ARGV[2], due[1])
return due[1]
"""


class JobSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    state: JobState
    message: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: JobError | None
    result: dict[str, float] | None
    links: dict[str, str]


class WebhookPayload(BaseModel):
    """The JSON body of a webhook request."""

    model_config = ConfigDict(extra="forbid")

    id: str  # the delivery id (also in the Flow-Compress-Delivery header)
    event: str  # job.succeeded, job.failed, job.cancelled
    created_at: datetime  # when the job ended
    job: JobSummary

    @classmethod
    def of(cls, record: JobRecord, delivery: WebhookDelivery) -> WebhookPayload:
        base = f"/v1/jobs/{record.id}"
        links = {"self": base}
        if record.state is JobState.succeeded:
            links |= {"report": f"{base}/report", "artifacts": f"{base}/artifacts"}
        return cls(
            id=delivery.id,
            event=delivery.event,
            created_at=_time(delivery.created_at),
            job=JobSummary(
                id=record.id,
                state=record.state,
                message=record.message,
                created_at=_time(record.created_at),
                started_at=_time(record.started_at) if record.started_at else None,
                finished_at=_time(record.finished_at) if record.finished_at else None,
                error=record.error,
                result=record.result,
                links=links,
            ),
        )


def _time(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Delay before attempt ``attempt + 1``: exponential from ``base_s``, capped, with the
    upper half jittered so receivers that failed together are not retried together.

    Written here rather than with a retry library: the schedule must survive a restart, so
    it lives in Redis as a due time, not in a sleeping retry loop.
    """
    delay = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    return delay / 2 + rng.uniform(0, delay / 2)


class WebhookDispatcher:
    """Claims due deliveries and sends them, one at a time."""

    def __init__(
        self,
        store: JobStore,
        settings: WorkerSettings,
        http: httpx.Client | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.http = http or httpx.Client(
            # Never follow a redirect: a receiver could send the signed body elsewhere.
            follow_redirects=False,
            timeout=httpx.Timeout(settings.webhook_timeout_s),
            headers={"User-Agent": USER_AGENT},
            trust_env=False,  # no proxy from the environment: the target is the target
        )
        self.rng = rng or random.Random()
        self._claim = store.r.register_script(_CLAIM)

    def claim(self, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        lease = self.settings.webhook_timeout_s * 2 + 30
        job_id = self._claim(keys=[self.store.webhooks_due_key], args=[now, lease])
        return job_id if job_id else None

    def run_once(self) -> bool:
        """Send one due delivery; False when none was due."""
        job_id = self.claim()
        if job_id is None:
            return False
        self.deliver(job_id)
        return True

    def deliver(self, job_id: str) -> WebhookDelivery | None:
        record = self.store.get(job_id)
        delivery = record.delivery if record else None
        if (
            record is None
            or record.notify is None
            or delivery is None
            or delivery.state is not DeliveryState.pending
        ):
            self.store.r.zrem(self.store.webhooks_due_key, job_id)
            return delivery
        now = time.time()
        status, error = self._attempt(record, delivery, now)
        attempts = delivery.attempts + 1
        update: dict[str, Any] = {
            "attempts": attempts,
            "last_attempt_at": now,
            "last_status": status,
            "last_error": error,
        }
        if error is None:
            update |= {"state": DeliveryState.delivered, "delivered_at": now}
            update["next_attempt_at"] = None
        else:
            delay = backoff_s(
                attempts,
                self.settings.webhook_backoff_s,
                self.settings.webhook_max_backoff_s,
                self.rng,
            )
            # Bounded from the job's end, whoever makes the attempts and however often the
            # workers restarted in between.
            deadline = delivery.created_at + self.settings.webhook_max_elapsed_s
            permanent = status == 0  # the target is refused outright: no retry
            if permanent or now + delay > deadline:
                update |= {"state": DeliveryState.failed, "next_attempt_at": None}
            else:
                update["next_attempt_at"] = now + delay
        new = delivery.model_copy(update=update)
        self.store.set_delivery(job_id, new)
        if new.state is DeliveryState.pending:
            assert new.next_attempt_at is not None
            self.store.r.zadd(self.store.webhooks_due_key, {job_id: new.next_attempt_at})
        else:
            self.store.r.zrem(self.store.webhooks_due_key, job_id)
            level = logging.INFO if new.state is DeliveryState.delivered else logging.WARNING
            log.log(
                level,
                "webhook %s of job %s %s after %d attempt(s)%s",
                new.id,
                job_id,
                new.state.value,
                attempts,
                f": {error}" if error else "",
            )
        return new

    def _attempt(
        self, record: JobRecord, delivery: WebhookDelivery, now: float
    ) -> tuple[int | None, str | None]:
        """One POST; returns (HTTP status or None, error or None). Status 0: refused here."""
        assert record.notify is not None
        try:
            check_target_url(record.notify.url, self.settings.webhook_allowed_hosts)
        except WebhookUrlError as exc:
            # The allow-list may have changed since the job was submitted.
            return 0, exc.message
        body = WebhookPayload.of(record, delivery).model_dump_json().encode()
        secret = record.notify.secret.get_secret_value()
        headers = {
            "Content-Type": "application/json",
            DELIVERY_HEADER: delivery.id,
            EVENT_HEADER: delivery.event,
            SIGNATURE_HEADER: sign(secret, int(now), body),
        }
        try:
            response = self.http.post(record.notify.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:300]
        if 200 <= response.status_code < 300:
            return response.status_code, None
        if response.is_redirect:
            return response.status_code, f"HTTP {response.status_code} (redirects are not followed)"
        return response.status_code, f"HTTP {response.status_code}"

    def loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                if self.run_once():
                    continue
            except redis.RedisError as exc:
                log.debug("webhook dispatcher: Redis unavailable: %s", exc)
            except Exception:
                # One bad delivery must not stop every other: its lease lets it come back.
                log.exception("webhook dispatcher: unexpected error")
            stop.wait(IDLE_WAIT_S)

    def close(self) -> None:
        self.http.close()


class WebhookStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: the dispatcher thread runs from the worker's start to its stop."""

    requires = AFTER_POOL  # worker.process: no thread may be mid-import at a fork

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dispatcher: WebhookDispatcher | None = None

    def start(self, parent: Any) -> None:
        settings: WorkerSettings = parent.app.settings
        assert settings.redis_url
        store = JobStore(redis_client(settings.redis_url), settings.key_prefix)
        self._dispatcher = WebhookDispatcher(store, settings)
        self._thread = threading.Thread(
            target=self._dispatcher.loop, args=(self._stop,), name="flow-webhooks", daemon=True
        )
        self._thread.start()

    def stop(self, parent: Any) -> None:
        self._stop.set()
        if self._thread is not None and self._dispatcher is not None:
            # An attempt in flight ends within its timeout; the thread is a daemon anyway.
            self._thread.join(timeout=self._dispatcher.settings.webhook_timeout_s + 5)
        if self._dispatcher is not None:
            self._dispatcher.close()
            self._dispatcher.store.r.close()


__all__ = [
    "DELIVERY_HEADER",
    "EVENT_HEADER",
    "SIGNATURE_HEADER",
    "WebhookDispatcher",
    "WebhookPayload",
    "WebhookStep",
    "backoff_s",
    "sign",
]

"""The Celery application: one job per device, late acks, fresh child per job.

Why each setting:
- ``worker_prefetch_multiplier=1`` and concurrency 1: a worker owns one device and must not
  hold a second job hostage while the first runs for hours.
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a job whose worker dies is redelivered,
  not lost; the job store decides whether a redelivery runs, takes over, or is a no-op.
- ``visibility_timeout`` above the hard time limit: Redis must not redeliver a job that is
  still legitimately running.
- ``worker_max_tasks_per_child=1``: every job runs in a fresh process, so GPU memory and
  library state never leak from one job into the next; torch is imported only in that child.
- ``worker_cancel_long_running_tasks_on_connection_loss``: if the broker connection drops the
  message is redelivered; stopping the local run avoids two workers on one job. When Redis
  itself went down, kombu cannot put the message back at that moment; the consumer step
  ``RequeueCutOffJobs`` does it on reconnecting (``worker.recovery``).
- The result backend is disabled: the job store is the single source of truth.
- ``CatalogueStep``: each worker publishes the model names it can build (``worker.catalogue``),
  which the API validates job specs against.
- ``RetentionStep``: each worker's main process sweeps expired jobs' files on a timer, one
  sweep at a time across workers (a Redis lock); see ``worker.retention`` for why not beat.
"""

from __future__ import annotations

from celery import Celery

from worker.broker import celery_broker_url
from worker.catalogue import CatalogueStep
from worker.recovery import RequeueCutOffJobs
from worker.retention import RetentionStep
from worker.settings import WorkerSettings
from worker.telemetry import HeartbeatStep
from worker.webhooks import WebhookStep

TASK_NAME = "flow_compress.compress_job"


class FlowCelery(Celery):
    """A Celery app that carries the service settings its tasks read."""

    settings: WorkerSettings


def create_celery(settings: WorkerSettings) -> FlowCelery:
    """Build the app for ``settings`` (the API uses it to enqueue, the worker to consume)."""
    if not settings.redis_url:
        raise ValueError("FLOW_COMPRESS_REDIS_URL is not set")
    app = FlowCelery(
        "flow_compress", broker=celery_broker_url(settings.redis_url), include=["worker.tasks"]
    )
    app.settings = settings
    app.steps["consumer"].add(RequeueCutOffJobs)
    app.steps["worker"].add(RetentionStep)  # the periodic retention sweep (worker.retention)
    app.steps["worker"].add(HeartbeatStep)
    app.steps["worker"].add(WebhookStep)
    app.steps["worker"].add(CatalogueStep)  # the names this worker builds, for the API
    app.conf.update(
        task_default_queue=settings.queue,
        task_routes={TASK_NAME: {"queue": settings.queue}},
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        # Retries of transient failures use Celery's own exponential backoff with full
        # jitter (the task's autoretry_for); 0 retries at once.
        task_annotations={
            TASK_NAME: {
                "max_retries": settings.max_retries,
                "retry_backoff": settings.retry_backoff_s,
                "retry_backoff_max": settings.retry_backoff_max_s,
                "default_retry_delay": settings.retry_backoff_s,
            }
        },
        task_soft_time_limit=settings.soft_time_limit,
        task_time_limit=settings.hard_time_limit,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # Celery's own keys share the store's namespace, so one Redis can host several
            # installations (or test sessions) side by side.
            "global_keyprefix": f"{settings.key_prefix}celery:",
        },
    )
    return app

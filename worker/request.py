"""What the worker's main process decides about a job's message, before and after its child.

Celery runs each job in a fresh pool process (``worker_max_tasks_per_child=1``). Two things
are better decided in the main process, which outlives those children:

- **A job that is already over is dropped before a child starts.** A job cancelled while
  queued keeps its message on the queue; running it in a child only to find it cancelled
  cost a fresh process each (about 2.5 s: 300 cancelled jobs held a valid job back 13.5
  minutes). The main process looks the job up (one Redis read) and acknowledges the message
  of a finished or unknown job without starting anything. The job store stays the one
  source of truth: no broadcast ``revoke`` that a worker started later would never hear of.
- **A job whose child died is requeued at once, at the head of the queue.** When the pool
  child is killed (SIGKILL, the kernel's OOM killer), Celery's own answer
  (``task_reject_on_worker_lost``) puts the message back at the *tail* of the queue, and the
  job keeps saying ``running`` until every job queued behind it has run. Here the job goes
  back to ``queued`` with the reason ("worker lost; requeued") and its message to the head,
  as a Redis crash already does (``worker.recovery``); past ``max_redeliveries`` deaths it
  fails with ``worker_lost`` instead of looping.

Both fall back to Celery's default handling when the job store cannot be reached.
"""

from __future__ import annotations

from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery.utils.log import get_logger
from celery.worker.request import Request
from celery.worker.state import task_ready

from worker.jobs import JobState

log = get_logger(__name__)


class JobRequest(Request):  # type: ignore[misc]
    """The task's request class (``CompressTask.Request``); see the module docstring."""

    _store_checked = False

    def revoked(self) -> bool:
        if super().revoked():
            return True
        if self._store_checked:
            return False
        # Checked once, when the message is about to go to the pool (execute_using_pool).
        self._store_checked = True
        try:
            over = self.task.job_is_over(self.id)
        except Exception as exc:
            log.warning(
                "job %s: could not look it up before starting (%s); running it", self.id, exc
            )
            return False
        if not over:
            return False
        log.info(
            "job %s is over (cancelled or finished): message dropped, no process started", self.id
        )
        # Acknowledges the message and marks the request done, as a revoked task is.
        self._announce_revoked("revoked", False, None, False)
        return True

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        # As Celery decides it: the pool reports a dead child as WorkerLostError, or, with
        # billiard >= 4.3, as the child's exit unless the worker itself stopped the task.
        stopped_here = self._already_cancelled or self._already_revoked
        lost = isinstance(exc, WorkerLostError) or (
            isinstance(exc, (SystemExit, KeyboardInterrupt)) and not stopped_here
        )
        if lost and not stopped_here and self._requeue_lost(exc):
            return None
        return super().on_failure(
            exc_info, send_failed_event=send_failed_event, return_ok=return_ok
        )

    def _requeue_lost(self, exc: BaseException) -> bool:
        try:
            record = self.task.worker_lost(self.id)
        except Exception as err:
            log.warning("job %s: worker lost, job store unreachable (%s)", self.id, err)
            return False  # Celery's own reject-and-requeue
        if record is None:
            return False  # the job was not running (it had ended): nothing of ours to do
        task_ready(self)
        if record.state is JobState.queued:
            # The record first: a worker that receives the message at once must find the
            # job queued, not running.
            message = self.message
            message.channel.qos.restore_by_tag(message.delivery_tag, leftmost=False)
            log.warning("job %s: worker lost (%s); requeued at the head of the queue", self.id, exc)
        else:
            log.error("job %s: worker lost (%s) too often; failed with worker_lost", self.id, exc)
        # Forgets the delivery (the message itself is back on the queue, or done with).
        self.acknowledge()
        return True

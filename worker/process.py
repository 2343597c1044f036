"""Child processes: ones that die with their parent, and the fork hazard of the worker's threads.

``flow-compress serve`` starts a worker and an embedded Redis. If ``serve`` is killed
outright (``kill -9``, the OOM killer), nothing of it can run to stop them: left alone they
would live on as orphans, and the orphan worker would go on taking jobs next to the one a
restarted ``serve`` starts. Linux's ``PR_SET_PDEATHSIG`` makes the kernel signal a child the
moment its parent dies; it is set in the child between fork and exec (``preexec_fn``) and
survives the exec. (Celery already does the same for its own pool children.)

The signal goes when the *thread* that started the child ends, so start such children from
a thread that lives as long as the process (the main thread).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from billiard.util import set_pdeathsig

# The worker's own background threads (heartbeat, webhooks, retention, catalogue) start only
# after Celery's pool has forked its first job process. The pool *forks* the main process, and a
# fork copies every lock in the state it is in: a thread that is halfway through importing a
# module (boto3 imports lazily while it builds a client) leaves that module's import lock held
# for ever in the child, and the job that imports the same module there hangs without a word.
# Threads started after the pool's first fork cannot be caught mid-import by it; whatever they
# need is imported, and their clients built, on the main thread in their step's ``start``, so
# the later forks (one per job) find them idle.
AFTER_POOL = ("celery.worker.components:Pool",)


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when its parent dies; None
    where the platform has no such thing (only Linux does)."""
    if not sys.platform.startswith("linux"):
        return None

    def preexec() -> None:
        set_pdeathsig(sig)

    return preexec


__all__ = ["AFTER_POOL", "die_with_parent"]

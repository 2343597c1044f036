"""Service load: status polls at fixed open-loop rates, with submissions, SSE streams and
Prometheus scrapes running alongside, against ``flow-compress serve``.

    python -m bench.service [--quick|--full] [--out DIR] [options]

Starts ``flow-compress serve --no-worker`` on a free loopback port with its own embedded
Redis and a throw-away storage folder, submits a few seed jobs, then for each poll rate in
``--rates`` (requests per second) runs for ``--duration`` seconds:

- status polls (``GET /v1/jobs/{id}`` of a random seed job) sent on a fixed schedule, one every
  1/rate seconds whether or not earlier ones have answered (open loop: a slow server cannot
  slow the load down, and each latency is measured from the request's *scheduled* time, so
  queueing inside the load generator counts too — no coordinated omission);
- submissions (``POST /v1/jobs``, a JSON ``JobSpec`` naming a weights file already in the
  storage folder) at ``--submit-rate`` per second, also open loop;
- ``--streams`` Server-Sent-Event streams (``GET /v1/jobs/{id}/events``) held open and read
  for the whole run, when the server has that route (otherwise reported as skipped);
- ``GET /metrics`` scraped every ``--scrape-every`` seconds, as Prometheus would (reported as
  skipped when the server has no such route);
- a first load of the web page every ``--page-every`` seconds, the jobs list (``GET /``) and
  a job's page (``GET /jobs/{id}``) in turn: the HTML, then every static file it names and
  the modules those import (each wave in parallel, each file on a new connection, nothing
  cached: a first visit), then the API call the page's script makes first (the job list, or
  the job). Latency: from the scheduled start to the last of these answers.

Before the rates, ``--page-loads`` first loads of each page run one after the other on the
otherwise idle service: the page's own cost, without queueing behind polls.

Reported per rate and operation: requests, achieved rate, p50/p90/p99/max latency, errors
(any answer other than the documented status, or a transport error); per rate for the SSE
streams: time to the response head and to the first event (the stored backlog), events and
heartbeats read, errors. At the end every
submitted job is cancelled, the service is stopped and its folder removed.

The load generator is one asyncio process on uvloop with a minimal HTTP/1.1 keep-alive client
(below): it shares the 2 cores with the server, and a heavier client (httpx costs about half a
millisecond of CPU per request) would measure itself more than the server. No worker runs:
the benchmark measures the API and the job store; the queued jobs never start. Everything
stays on 127.0.0.1 and is bounded in time and in count.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import posixpath
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    choose_protocol,
    command_line,
    figure,
    log,
    machine,
    machine_lines,
    make_parser,
    md_table,
    parse_floats,
    percentile,
    write_json,
    write_text,
)

NAME = "service"
HOST = "127.0.0.1"  # loopback only, by construction: the server is started here, on this host
BOOT_TIMEOUT_S = 120.0
WEIGHTS_URI = "models/resnet18-digits.safetensors"
MAX_IN_FLIGHT = 512  # connections the load generator may hold; a request beyond is an error
REQUEST_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 3.0  # reuse an idle connection only this long (uvicorn closes them after 5 s)

# A small but real job: what the documentation's curl example submits.
JOB_CONFIG: dict[str, Any] = {
    "model": "resnet18",
    "dataset": "digits",
    "in_chans": 1,
    "input_size": 16,
    "target_macs": 0.5,
    "max_drop": 3.0,
    "device": "cpu",
    "prune": {"steps": 3},
    "recovery": {"iters_per_step": 20, "trunc_iters": 20, "final_iters": 100},
}


@dataclass(frozen=True)
class Protocol:
    rates: tuple[float, ...]  # status polls per second, one phase each
    duration_s: float  # per rate
    submit_rate: float  # submissions per second, during every phase
    streams: int  # SSE streams held open during every phase
    scrape_every_s: float  # 0: no /metrics scrapes
    seed_jobs: int
    page_every_s: float  # 0: no page loads during the phases
    page_loads: int  # first loads of each page on the idle service, before the phases
    api_processes: int = 1  # serve --api-processes


QUICK = Protocol(
    rates=(100, 200, 350, 500),
    duration_s=15.0,
    submit_rate=1.0,
    streams=10,
    scrape_every_s=1.0,
    seed_jobs=16,
    page_every_s=1.0,
    page_loads=30,
)
FULL = Protocol(
    rates=(100, 200, 350, 500, 600),
    duration_s=60.0,
    submit_rate=1.0,
    streams=10,
    scrape_every_s=1.0,
    seed_jobs=16,
    page_every_s=1.0,
    page_loads=100,
)
# What a page loads (its HTML's href/src under /static/) and what a module imports.
STATIC_REF = re.compile(rb'(?:href|src)="(/static/[^"?#]+)"')
JS_IMPORT = re.compile(rb'(?:^|[\s;}])(?:import|from)\s*["\'](\./[^"\']+|/static/[^"\']+)["\']')
PAGES = ("jobs", "job")  # GET / and GET /jobs/{id}


@dataclass
class Sample:
    op: str
    t: float  # scheduled start, seconds since the phase started
    latency_ms: float
    ok: bool
    status: int | None
    error: str | None


# --------------------------------------------------------------------------- the service


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Service:
    """``flow-compress serve --no-worker`` in a child process, on loopback, in ``storage``."""

    def __init__(self, storage: Path, repo: Path = REPO, api_processes: int = 1) -> None:
        self.storage = storage
        self.repo = repo
        self.api_processes = api_processes
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = storage.parent / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import httpx

        # No FLOW_COMPRESS_* from the caller: serve starts its own embedded Redis and uses
        # only the folder given here.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOW_COMPRESS_")}
        env["PYTHONPATH"] = str(self.repo)
        # The benchmark's weights sit in a folder shared with every key (weights_uri).
        env["FLOW_COMPRESS_SHARED_WEIGHTS_DIRS"] = WEIGHTS_URI.split("/")[0]
        cmd = [
            sys.executable,
            "-m",
            "api.cli",
            "serve",
            "--no-worker",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--storage-dir",
            str(self.storage),
            "--log-level",
            "warning",
        ]
        if self.api_processes != 1:  # an older checkout may not have the option
            cmd += ["--api-processes", str(self.api_processes)]
        with self.log_path.open("wb") as fh:
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=self.repo, stdout=fh, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited early:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"serve not ready after {BOOT_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM (serve stops its embedded Redis on the way out), then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def write_weights(storage: Path) -> Path:
    """A real resnet18 state (random init) in the storage folder, for ``weights_uri``."""
    from flow_compress.arch.models import build_model, save_weights

    path = storage / WEIGHTS_URI
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_model(
        JOB_CONFIG["model"],
        10,
        in_chans=JOB_CONFIG["in_chans"],
        input_size=JOB_CONFIG["input_size"],
    )
    save_weights(model, path)
    return path


# --------------------------------------------------------------------------- HTTP client


class HttpError(Exception):
    pass


class Connection:
    """One HTTP/1.1 keep-alive connection: a request, then its whole response.

    Hand-written on purpose (see the module docstring): the server under test only sends
    ``Content-Length`` bodies on these routes, so that is all this client reads.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(HOST, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def request(
        self, method: str, path: str, body: bytes = b"", content_type: str = "application/json"
    ) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n"
        if body or method == "POST":
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        status, headers = await read_head(self.reader)
        length = headers.get("content-length")
        if length is None:
            raise HttpError(f"no Content-Length in the answer to {method} {path}")
        payload = await self.reader.readexactly(int(length))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, payload

    def close(self) -> None:
        self.writer.close()

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise HttpError(f"bad status line {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


class Pool:
    """Idle connections to reuse; a request with none idle opens one (open loop: never wait
    for a busy connection), up to ``MAX_IN_FLIGHT``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[Connection, float]] = []
        self.in_flight = 0

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.in_flight >= MAX_IN_FLIGHT:
            raise HttpError(f"over {MAX_IN_FLIGHT} requests in flight")
        self.in_flight += 1
        conn = None
        try:
            conn = self._reuse() or await Connection.open(self.port)
            status, payload = await asyncio.wait_for(
                conn.request(method, path, body), REQUEST_TIMEOUT_S
            )
            if not conn.closed:
                self.idle.append((conn, time.monotonic()))
            return status, payload
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        finally:
            self.in_flight -= 1

    def _reuse(self) -> Connection | None:
        """The most recently used idle connection, unless the server may have closed it:
        uvicorn drops keep-alive connections idle for 5 s."""
        while self.idle:
            conn, since = self.idle.pop()
            if time.monotonic() - since < KEEP_ALIVE_S and not conn.closed:
                return conn
            conn.close()
        return None

    def close(self) -> None:
        for conn, _ in self.idle:
            conn.close()
        self.idle.clear()


# --------------------------------------------------------------------------- load


@dataclass
class Phase:
    rate: float
    duration_s: float
    samples: list[Sample] = field(default_factory=list)
    streams_opened: int = 0
    stream_events: int = 0  # data: lines read (one per event)
    stream_heartbeats: int = 0  # comment lines (the server's pings)
    stream_head_ms: list[float] = field(default_factory=list)  # connect to response head
    stream_first_event_ms: list[float] = field(default_factory=list)  # connect to first event
    stream_errors: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    peak_in_flight: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)  # by process, during the phase
    load_avg: tuple[float, float, float] | None = None  # at the phase's end


@dataclass
class PageLoad:
    page: str
    latency_ms: float  # HTML, its static files and the first API call, all answered
    html_ms: float
    requests: int
    bytes: int
    ok: bool
    error: str | None


class SseLines:
    """The lines of a chunked ``text/event-stream`` body, as they arrive."""

    def __init__(self) -> None:
        self.raw = b""  # chunked transfer encoding, not yet decoded
        self.text = b""  # decoded body, not yet a whole line
        self.ended = False

    def feed(self, data: bytes) -> list[bytes]:
        self.raw += data
        while not self.ended:
            head_end = self.raw.find(b"\r\n")
            if head_end < 0:
                break
            size = int(self.raw[:head_end].split(b";")[0], 16)
            if len(self.raw) < head_end + 2 + size + 2:
                break
            self.text += self.raw[head_end + 2 : head_end + 2 + size]
            self.raw = self.raw[head_end + 2 + size + 2 :]
            self.ended = size == 0
        *lines, self.text = self.text.split(b"\n")
        return [line.rstrip(b"\r") for line in lines]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> dict[str, int]:
    """The server process and its children by role: the embedded Redis and, with
    ``--api-processes`` above 1, the API processes (``api 1``, ...) under the supervisor
    (then ``api``, which serves nothing itself)."""
    found = {"api": pid}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            try:
                name = Path(f"/proc/{kid}/comm").read_text().strip()
                cmdline = Path(f"/proc/{kid}/cmdline").read_bytes()
            except OSError:
                continue
            if "redis" in name:
                found["redis"] = int(kid)
            elif b"resource_tracker" in cmdline:
                continue  # multiprocessing's bookkeeping, idle
            elif b"spawn_main" in cmdline:  # a process uvicorn's supervisor started
                found[f"api {sum(k.startswith('api ') for k in found) + 1}"] = int(kid)
            else:
                found[name] = int(kid)
    return found


def api_cpu_s(cpu_s: dict[str, float]) -> float:
    """CPU seconds of every API process (and a supervisor's own)."""
    return sum(v for k, v in cpu_s.items() if k == "api" or k.startswith("api "))


class Load:
    def __init__(self, port: int, proto: Protocol, server_pid: int, seed: int = 0) -> None:
        self.port = port
        self.server_pid = server_pid
        self.proto = proto
        self.pool = Pool(port)
        self.rng = random.Random(seed)
        self.job_ids: list[str] = []
        self.seed_ids: list[str] = []
        self.submit_body = json.dumps({"config": JOB_CONFIG, "weights_uri": WEIGHTS_URI}).encode()
        self.has_events: bool | None = None
        self.has_metrics: bool | None = None
        self.page_rng = random.Random(seed + 1)
        self.next_page = 0

    # ---------------------------------------------------------------- operations
    async def submit(self) -> tuple[bool, int | None, str | None]:
        status, body = await self.pool.request("POST", "/v1/jobs", self.submit_body)
        if status == 202:
            self.job_ids.append(json.loads(body)["id"])
            return True, status, None
        return False, status, f"HTTP {status}: {body[:200]!r}"

    async def poll(self) -> tuple[bool, int | None, str | None]:
        job_id = self.rng.choice(self.seed_ids)
        status, body = await self.pool.request("GET", f"/v1/jobs/{job_id}")
        if status == 200 and job_id.encode() in body[:100]:
            return True, status, None
        return False, status, f"HTTP {status}: {body[:200]!r}"

    async def scrape(self) -> tuple[bool, int | None, str | None]:
        status, body = await self.pool.request("GET", "/metrics")
        if status == 200 and b"# TYPE" in body:
            return True, status, None
        return False, status, f"HTTP {status}: {body[:200]!r}"

    async def page(self) -> tuple[bool, int | None, str | None]:
        name = PAGES[self.next_page % len(PAGES)]
        self.next_page += 1
        load = await self.first_load(name, time.perf_counter())
        return load.ok, 200 if load.ok else None, load.error

    # ---------------------------------------------------------------- the web page
    async def fetch_new(self, path: str) -> tuple[int, bytes]:
        """One GET on a connection of its own (a first visit reuses nothing)."""
        conn = await Connection.open(self.port)
        try:
            return await asyncio.wait_for(conn.request("GET", path), REQUEST_TIMEOUT_S)
        finally:
            conn.close()

    async def first_load(self, page: str, start: float) -> PageLoad:
        """What a browser fetches on a first visit of ``page`` before it shows data: the
        HTML; its static files (stylesheet, module script, preloads, icon), then the modules
        those import, each wave in parallel; then the script's first API call."""
        job_id = self.page_rng.choice(self.seed_ids)
        if page == "jobs":
            html_path, data_path = "/", "/v1/jobs?limit=20&offset=0"  # jobs.js's first call
        else:
            html_path, data_path = f"/jobs/{job_id}", f"/v1/jobs/{job_id}"  # job.js's first
        requests, size = 0, 0

        def failed(error: str) -> PageLoad:
            ms = (time.perf_counter() - start) * 1000
            return PageLoad(page, ms, float("nan"), requests, size, False, error)

        status, body = await self.fetch_new(html_path)
        html_ms = (time.perf_counter() - start) * 1000
        requests, size = 1, len(body)
        if status != 200:
            return failed(f"HTTP {status} for {html_path}")
        seen: set[str] = set()
        wave = [ref.decode() for ref in STATIC_REF.findall(body)]
        while wave:
            wave = [path for path in dict.fromkeys(wave) if path not in seen]
            seen.update(wave)
            answers = await asyncio.gather(*(self.fetch_new(path) for path in wave))
            imports: list[str] = []
            for path, (status, data) in zip(wave, answers, strict=True):
                requests, size = requests + 1, size + len(data)
                if status != 200:
                    return failed(f"HTTP {status} for {path}")
                if path.endswith(".js"):
                    imports += [
                        posixpath.normpath(posixpath.join(posixpath.dirname(path), ref.decode()))
                        for ref in JS_IMPORT.findall(data)
                    ]
            wave = imports
        status, body = await self.fetch_new(data_path)
        requests, size = requests + 1, size + len(body)
        if status != 200:
            return failed(f"HTTP {status} for {data_path}")
        ms = (time.perf_counter() - start) * 1000
        return PageLoad(page, ms, html_ms, requests, size, True, None)

    async def idle_pages(self) -> list[PageLoad]:
        """``page_loads`` first loads of each page, one at a time, nothing else running."""
        loads = []
        for _ in range(self.proto.page_loads):
            for name in PAGES:
                try:
                    loads.append(await self.first_load(name, time.perf_counter()))
                except (
                    OSError,
                    asyncio.TimeoutError,
                    asyncio.IncompleteReadError,
                    HttpError,
                ) as exc:
                    loads.append(PageLoad(name, float("nan"), float("nan"), 0, 0, False, str(exc)))
        return loads

    async def _timed(self, phase: Phase, op: str, t0: float, scheduled: float) -> None:
        try:
            ok, status, error = await getattr(self, op)()
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, HttpError) as exc:
            ok, status, error = False, None, f"{type(exc).__name__}: {exc}"
        end = time.perf_counter()
        phase.samples.append(
            Sample(op, scheduled - t0, (end - scheduled) * 1000, ok, status, error)
        )
        phase.peak_in_flight = max(phase.peak_in_flight, self.pool.in_flight)

    async def _schedule(self, phase: Phase, op: str, rate: float, t0: float, end: float) -> None:
        """Start ``op`` every 1/rate s from t0 until ``end``, without waiting for answers."""
        tasks: list[asyncio.Task[None]] = []
        interval = 1.0 / rate
        i = 0
        while True:
            scheduled = t0 + i * interval
            if scheduled >= end:
                break
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self._timed(phase, op, t0, scheduled)))
            i += 1
        await asyncio.gather(*tasks)

    # ---------------------------------------------------------------- streams
    async def _probe_events(self) -> bool:
        """Whether the server has the SSE route: an unknown route answers 404 (the job
        exists). Probed on a connection of its own, closed after the status line."""
        conn = await Connection.open(self.port)
        try:
            conn.writer.write(
                f"GET /v1/jobs/{self.seed_ids[0]}/events HTTP/1.1\r\nHost: {HOST}\r\n"
                "Accept: text/event-stream\r\n\r\n".encode()
            )
            status, _ = await asyncio.wait_for(read_head(conn.reader), REQUEST_TIMEOUT_S)
        finally:
            conn.close()
        return status != 404

    async def _stream(self, phase: Phase, job_id: str, stop: asyncio.Event) -> None:
        """Hold one SSE stream open and read it until ``stop``."""
        start = time.perf_counter()
        try:
            conn = await Connection.open(self.port)
        except OSError as exc:
            phase.stream_errors.append(f"connect: {exc}")
            return
        try:
            conn.writer.write(
                f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: {HOST}\r\n"
                "Accept: text/event-stream\r\n\r\n".encode()
            )
            status, headers = await read_head(conn.reader)
            if status != 200 or "text/event-stream" not in headers.get("content-type", ""):
                phase.stream_errors.append(f"HTTP {status} {headers.get('content-type')}")
                return
            if headers.get("transfer-encoding", "").lower() != "chunked":
                phase.stream_errors.append("the stream is not chunked")
                return
            phase.stream_head_ms.append((time.perf_counter() - start) * 1000)
            phase.streams_opened += 1
            body = SseLines()
            first_event = True
            reading = asyncio.ensure_future(conn.reader.read(65536))
            while not stop.is_set():
                done, _ = await asyncio.wait({reading}, timeout=0.2)
                if not done:
                    continue
                chunk = reading.result()
                if not chunk:
                    break  # the server ended the stream (a finished job's stream may end)
                for line in body.feed(chunk):
                    if line.startswith(b"data:"):
                        phase.stream_events += 1
                        if first_event:
                            first_event = False
                            phase.stream_first_event_ms.append((time.perf_counter() - start) * 1000)
                    elif line.startswith(b":"):
                        phase.stream_heartbeats += 1
                if body.ended:
                    break
                reading = asyncio.ensure_future(conn.reader.read(65536))
            reading.cancel()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, HttpError) as exc:
            phase.stream_errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()

    # ---------------------------------------------------------------- phases
    async def seed(self) -> None:
        for _ in range(self.proto.seed_jobs):
            ok, _, error = await self.submit()
            if not ok:
                raise RuntimeError(f"could not submit a seed job: {error}")
        self.seed_ids = list(self.job_ids)
        self.has_events = await self._probe_events()
        status, _ = await self.pool.request("GET", "/metrics")
        self.has_metrics = status == 200

    async def phase(self, rate: float) -> Phase:
        proto = self.proto
        phase = Phase(rate=rate, duration_s=proto.duration_s)
        stop = asyncio.Event()
        streams: list[asyncio.Task[None]] = []
        if proto.streams:
            if self.has_events:
                streams = [
                    asyncio.create_task(
                        self._stream(phase, self.seed_ids[i % len(self.seed_ids)], stop)
                    )
                    for i in range(proto.streams)
                ]
                await asyncio.sleep(0.5)  # let them connect before the clock starts
            else:
                phase.skipped["streams"] = "the server has no GET /v1/jobs/{id}/events route"
        if proto.scrape_every_s and not self.has_metrics:
            phase.skipped["metrics"] = "the server has no /metrics route"
        procs = process_tree(self.server_pid)
        cpu0 = {name: cpu_seconds(pid) for name, pid in procs.items()}
        own0 = sum(os.times()[:2])
        t0 = time.perf_counter() + 0.05
        end = t0 + proto.duration_s
        schedules = [self._schedule(phase, "poll", rate, t0, end)]
        if proto.submit_rate:
            schedules.append(self._schedule(phase, "submit", proto.submit_rate, t0, end))
        if proto.scrape_every_s and self.has_metrics:
            schedules.append(self._schedule(phase, "scrape", 1 / proto.scrape_every_s, t0, end))
        if proto.page_every_s:
            schedules.append(self._schedule(phase, "page", 1 / proto.page_every_s, t0, end))
        await asyncio.gather(*schedules)
        phase.cpu_s = {name: cpu_seconds(pid) - cpu0[name] for name, pid in procs.items()}
        phase.cpu_s["load generator"] = sum(os.times()[:2]) - own0
        phase.load_avg = os.getloadavg()
        stop.set()
        await asyncio.gather(*streams)
        return phase

    async def cancel_all(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job_id in list(self.job_ids):
            try:
                status, _ = await self.pool.request("DELETE", f"/v1/jobs/{job_id}")
                key = str(status)
            except (OSError, asyncio.TimeoutError, HttpError) as exc:
                key = type(exc).__name__
            counts[key] = counts.get(key, 0) + 1
        return counts

    async def run(self) -> tuple[list[PageLoad], list[Phase], dict[str, int]]:
        await self.seed()
        log(f"service: {self.proto.page_loads} first loads of each page on the idle service")
        idle = await self.idle_pages()
        phases = []
        for rate in self.proto.rates:
            log(f"service: {rate:g} polls/s for {self.proto.duration_s:g} s")
            phases.append(await self.phase(rate))
            s = stats([x for x in phases[-1].samples if x.op == "poll"], self.proto.duration_s)
            cpu = ", ".join(
                f"{k} {v / self.proto.duration_s:.0%}" for k, v in phases[-1].cpu_s.items()
            )
            log(
                f"service:   polls p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, "
                f"{s['throughput_rps']:.0f}/s, {s['errors']} errors; CPU: {cpu}"
            )
            await asyncio.sleep(1.0)  # let the server drain between phases
        cancelled = await self.cancel_all()
        self.pool.close()
        return idle, phases, cancelled


# --------------------------------------------------------------------------- summary


def stats(samples: Sequence[Sample], duration_s: float) -> dict[str, Any]:
    lat = [s.latency_ms for s in samples]
    answered = [s for s in samples if s.status is not None]
    errors = [s for s in samples if not s.ok]
    kinds: dict[str, int] = {}
    for s in errors:
        key = (s.error or "error").split(":")[0]
        kinds[key] = kinds.get(key, 0) + 1
    return {
        "requests": len(samples),
        "ok": len(samples) - len(errors),
        "errors": len(errors),
        "error_kinds": kinds,
        "error_examples": [s.error for s in errors[:3]],
        "throughput_rps": len(answered) / duration_s if duration_s > 0 else 0.0,
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else float("nan"),
        "mean_ms": sum(lat) / len(lat) if lat else float("nan"),
    }


def _dist(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(values, 50),
        "p99_ms": percentile(values, 99),
        "max_ms": max(values) if values else float("nan"),
    }


def phase_summary(phase: Phase) -> dict[str, Any]:
    return {
        "rate": phase.rate,
        "duration_s": phase.duration_s,
        "stats": {
            op: stats([s for s in phase.samples if s.op == op], phase.duration_s)
            for op in ("poll", "submit", "scrape", "page")
        },
        "streams_opened": phase.streams_opened,
        "stream_events": phase.stream_events,
        "stream_heartbeats": phase.stream_heartbeats,
        "stream_head": _dist(phase.stream_head_ms),
        "stream_first_event": _dist(phase.stream_first_event_ms),
        "stream_errors": phase.stream_errors[:5],
        "skipped": phase.skipped,
        "peak_in_flight": phase.peak_in_flight,
        "cpu_s": phase.cpu_s,
        # CPU per answered request of every kind (polls, submissions, scrapes and page loads
        # together): where the 2 cores go.
        "cpu_ms_per_request": {
            name: 1000 * sec / max(1, sum(1 for x in phase.samples if x.status is not None))
            for name, sec in phase.cpu_s.items()
        },
        "load_avg": phase.load_avg,
    }


def pages_summary(loads: Sequence[PageLoad]) -> dict[str, Any]:
    out = {}
    for name in PAGES:
        mine = [x for x in loads if x.page == name]
        ok = [x for x in mine if x.ok]
        out[name] = {
            "loads": len(mine),
            "errors": len(mine) - len(ok),
            "error_examples": [x.error for x in mine if not x.ok][:3],
            "requests_per_load": max((x.requests for x in ok), default=0),
            "bytes_per_load": max((x.bytes for x in ok), default=0),
            "html": _dist([x.html_ms for x in ok]),
            "first_load": _dist([x.latency_ms for x in ok]),
        }
    return out


def _ms(value: float) -> str:
    return "–" if value != value else f"{value:.1f}"  # NaN: no sample


def _pair(d: dict[str, float]) -> str:
    return f"{_ms(d['p50_ms'])} / {_ms(d['p99_ms'])}"


def _processes_flag(proto: dict[str, Any]) -> str:
    n = proto.get("api_processes", 1)
    return f" --api-processes {n}" if n != 1 else ""


PAGE_PATHS = {"jobs": "`GET /` (jobs list)", "job": "`GET /jobs/{id}` (a job)"}


def markdown(payload: dict[str, Any]) -> str:
    proto = payload["protocol"]
    rows, sse_rows = [], []
    for ph in payload["phases"]:
        poll, submit, scrape, page = (ph["stats"][k] for k in ("poll", "submit", "scrape", "page"))
        load = ph.get("load_avg")
        rows.append(
            [
                f"{ph['rate']:g}",
                f"{poll['throughput_rps']:.0f}",
                _ms(poll["p50_ms"]),
                _ms(poll["p90_ms"]),
                _ms(poll["p99_ms"]),
                _ms(poll["max_ms"]),
                poll["errors"],
                f"{_ms(submit['p50_ms'])} / {_ms(submit['p99_ms'])}",
                f"{_ms(scrape['p50_ms'])} / {_ms(scrape['p99_ms'])}",
                f"{_ms(page['p50_ms'])} / {_ms(page['p99_ms'])}",
                submit["errors"] + scrape["errors"] + page["errors"],
                f"{1000 * api_cpu_s(ph['cpu_s']) / max(1, poll['requests']):.2f}",
                f"{load[0]:.2f}" if load else "–",
            ]
        )
        sse_rows.append(
            [
                f"{ph['rate']:g}",
                ph["streams_opened"],
                f"{_ms(ph['stream_head']['p50_ms'])} / {_ms(ph['stream_head']['max_ms'])}",
                f"{_ms(ph['stream_first_event']['p50_ms'])} / "
                f"{_ms(ph['stream_first_event']['max_ms'])}",
                ph["stream_events"],
                ph["stream_heartbeats"],
                len(ph["stream_errors"]),
            ]
        )
    page_rows = [
        [
            PAGE_PATHS[name],
            p["loads"],
            p["requests_per_load"],
            f"{p['bytes_per_load'] / 1024:.0f}",
            _pair(p["html"]),
            _pair(p["first_load"]),
            _ms(p["first_load"]["max_ms"]),
            p["errors"],
        ]
        for name, p in payload["idle_pages"].items()
    ]
    skipped = {k: v for ph in payload["phases"] for k, v in ph["skipped"].items()}
    lines = [
        f"# Service load ({payload['mode']} mode)",
        "",
        f"Command: `{payload['command']}`  ",
        f"Finished: {payload['finished']}",
        "",
        f"`flow-compress serve --no-worker{_processes_flag(proto)}` on {HOST} (embedded Redis, "
        "fresh storage folder). "
        f"Per row, {proto['duration_s']:g} s of status polls (`GET /v1/jobs/{{id}}`) at a fixed "
        f"open-loop rate, with {proto['submit_rate']:g} submission/s (JSON naming server-side "
        f"weights of {payload['weights_bytes'] / 1e6:.1f} MB), {proto['streams']} SSE streams "
        f"open, `/metrics` scraped every {proto['scrape_every_s']:g} s and a first load of the "
        f"web page every {proto['page_every_s']:g} s (the two pages in turn). Latency from each "
        "request's scheduled start. Load generator and server share the machine; the load "
        "average (1 min) is read at each row's end.",
        "",
        md_table(
            [
                "polls/s offered",
                "served/s",
                "poll p50 ms",
                "p90",
                "p99",
                "max",
                "poll errors",
                "submit p50 / p99 ms",
                "/metrics p50 / p99 ms",
                "page load p50 / p99 ms",
                "other errors",
                "API CPU ms per poll",
                "load avg",
            ],
            rows,
        ),
        "",
        "API CPU per poll: the API process's CPU time over the row divided by its polls "
        "(submissions, scrapes, streams and page loads included, so an upper bound).",
        "",
        "## SSE streams (`GET /v1/jobs/{id}/events`)",
        "",
        "Opened before each row's clock starts and read for the whole row; the jobs are "
        "queued (no worker), so each stream sends its stored backlog, then heartbeats.",
        "",
        md_table(
            [
                "polls/s offered",
                "streams open",
                "head p50 / max ms",
                "first event p50 / max ms",
                "events",
                "heartbeats",
                "errors",
            ],
            sse_rows,
        ),
        "",
        "## Web page, first load",
        "",
        f"{proto['page_loads']} first loads of each page on the otherwise idle service, one at "
        "a time: the HTML, its static files and the modules they import (each wave in "
        "parallel, each file on a new connection, nothing cached), then the page script's "
        "first API call. The same load ran during every row above (its `page load` column).",
        "",
        md_table(
            [
                "page",
                "loads",
                "requests per load",
                "KiB per load",
                "HTML p50 / p99 ms",
                "first load p50 / p99 ms",
                "max ms",
                "errors",
            ],
            page_rows,
        ),
        "",
    ]
    if skipped:
        lines += ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + ".", ""]
    lines += [
        f"Jobs submitted: {payload['jobs_submitted']}; cancelled afterwards: "
        + ", ".join(f"{n} (answer {code})" for code, n in payload["cancelled"].items())
        + ".",
        "",
        "![poll latency by rate](latency_cdf.png)",
        "",
        "## Machine",
        "",
        *machine_lines(payload["machine"]),
        "",
    ]
    return "\n".join(lines)


def plot_cdf(phases: Sequence[Phase], path: Path) -> None:
    fig, ax = figure(7.0, 4.0)
    for ph in phases:
        lat = sorted(s.latency_ms for s in ph.samples if s.op == "poll")
        if lat:
            ys = [100 * (i + 1) / len(lat) for i in range(len(lat))]
            ax.plot(lat, ys, label=f"{ph.rate:g} polls/s")
    ax.set_xscale("log")
    ax.set_xlabel("poll latency, ms (log scale)")
    ax.set_ylabel("polls at or below, %")
    ax.set_title("Status-poll latency at fixed offered rates")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(NAME, "Open-loop load against flow-compress serve on loopback.")
    g = parser.add_argument_group("protocol (defaults: the mode's)")
    g.add_argument("--rates", type=parse_floats, help="status polls per second, e.g. 100,500")
    g.add_argument("--duration", type=float, help="seconds per rate (at most 300)")
    g.add_argument("--submit-rate", type=float, help="submissions per second (0: none)")
    g.add_argument("--streams", type=int, help="SSE streams held open (at most 200)")
    g.add_argument("--scrape-every", type=float, help="seconds between /metrics scrapes (0: none)")
    g.add_argument(
        "--page-every", type=float, help="seconds between web page first loads (0: none)"
    )
    g.add_argument(
        "--page-loads", type=int, help="first loads of each page on the idle service (0: none)"
    )
    g.add_argument("--api-processes", type=int, help="serve --api-processes (default 1, at most 8)")
    g.add_argument(
        "--server-repo",
        type=Path,
        default=REPO,
        help="run the server from this checkout (to measure an older version)",
    )
    args = parser.parse_args(argv)
    proto = choose_protocol(
        args.mode,
        QUICK,
        FULL,
        rates=args.rates,
        duration_s=args.duration,
        submit_rate=args.submit_rate,
        streams=args.streams,
        scrape_every_s=args.scrape_every,
        page_every_s=args.page_every,
        page_loads=args.page_loads,
        api_processes=args.api_processes,
    )
    # Bounded by design: a load test must not become a denial of service of this machine.
    if not (
        proto.rates
        and all(0 < r <= 2000 for r in proto.rates)
        and 0 < proto.duration_s <= 300
        and 0 <= proto.submit_rate <= 50
        and 0 <= proto.streams <= 200
        and proto.scrape_every_s >= 0
        and proto.page_every_s >= 0
        and 0 <= proto.page_loads <= 1000
        and 1 <= proto.api_processes <= 8
    ):
        parser.error(
            "need 0 < rates <= 2000, 0 < duration <= 300, 0 <= submit-rate <= 50, "
            "0 <= streams <= 200, 0 <= page-loads <= 1000, 1 <= api-processes <= 8"
        )

    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        storage = Path(tmp) / "storage"
        storage.mkdir()
        weights_bytes = write_weights(storage).stat().st_size
        service = Service(storage, args.server_repo.resolve(), proto.api_processes)
        log(f"service: starting flow-compress serve on {service.url}")
        try:
            service.start()
            assert service.proc is not None
            log(f"service: server pid {service.proc.pid} (for a profiler: py-spy record -p PID)")
            load = Load(service.port, proto, service.proc.pid)
            # The weights above imported torch into this process: a full collection then
            # walks its objects too, stalling the load generator for ~80 ms (polls sent late
            # count as slow). Nothing made so far needs collecting.
            gc.collect()
            gc.freeze()
            idle, phases, cancelled = _run_loop(load.run())
        finally:
            service.stop()
        serve_log = service.log_tail()
        shutil.rmtree(storage, ignore_errors=True)

    payload: dict[str, Any] = {
        "benchmark": NAME,
        "mode": args.mode,
        "command": command_line(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "protocol": asdict(proto),
        "server_repo": str(args.server_repo),
        "job_config": JOB_CONFIG,
        "weights_bytes": weights_bytes,
        "idle_pages": pages_summary(idle),
        "phases": [phase_summary(ph) for ph in phases],
        "jobs_submitted": len(load.job_ids),
        "cancelled": cancelled,
        "serve_log_tail": serve_log[-1000:],
        "machine": machine(),
    }
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", payload)
    plot_cdf(phases, out / "latency_cdf.png")
    write_text(out / "RESULTS.md", markdown(payload))
    errors = sum(
        ph["stats"][op]["errors"]
        for ph in payload["phases"]
        for op in ("poll", "submit", "scrape", "page")
    ) + sum(p["errors"] for p in payload["idle_pages"].values())
    log(f"service: {len(phases)} rates, {errors} errors; wrote {out}")
    return 0 if errors == 0 else 1


def _run_loop(coro: Any) -> Any:
    """Run on uvloop when installed (it is, with uvicorn[standard]): the load generator's
    own overhead is part of what the 2 cores pay."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


if __name__ == "__main__":
    raise SystemExit(main())

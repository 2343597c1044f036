"""Service load: sustained status polls and job submissions against ``flow-compress serve``.

    python -m bench.service [--quick|--full] [--out DIR] [options]

Starts ``flow-compress serve --no-worker`` on a free loopback port with its own embedded
Redis and a throw-away storage folder, then runs ``--clients`` concurrent HTTP clients for
``--duration`` seconds (and at most ``--max-requests`` requests in all). Each client polls
job status (``GET /v1/jobs/{id}`` of a random job submitted earlier) and every
``--submit-every``-th request submits a job (``POST /v1/jobs``, a JSON ``JobSpec`` naming a
weights file already in the storage folder, so each submission validates the config, hashes
the weights, writes the job record and enqueues a Celery message). Reported per operation:
throughput, p50/p90/p99/max latency and errors (any answer other than the documented status,
or a transport error). At the end every submitted job is cancelled, the service is stopped
and its folder removed.

No worker runs: the benchmark measures the API and the job store — a compression worker on
the same cores would only compete with the load generator — and the queued jobs never
start. Everything stays on 127.0.0.1 and is bounded in time and in count.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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
    percentile,
    write_json,
    write_text,
)

NAME = "service"
HOST = "127.0.0.1"  # loopback only, by construction: the server is started here, on this host
BOOT_TIMEOUT_S = 120.0
WEIGHTS_URI = "models/resnet18-digits.safetensors"

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
    duration_s: float
    clients: int
    submit_every: int
    max_requests: int
    seed_jobs: int


QUICK = Protocol(duration_s=20.0, clients=4, submit_every=10, max_requests=5000, seed_jobs=4)
FULL = Protocol(duration_s=60.0, clients=16, submit_every=10, max_requests=50000, seed_jobs=16)


@dataclass
class Sample:
    op: str
    t: float  # seconds since the load started
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

    def __init__(self, storage: Path) -> None:
        self.storage = storage
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = storage.parent / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import httpx

        # No FLOW_COMPRESS_* from the caller: serve starts its own embedded Redis and uses
        # only the folder given here.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOW_COMPRESS_")}
        env["PYTHONPATH"] = str(REPO)
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
        with self.log_path.open("wb") as fh:
            self.proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
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
    from flow_compress.models import build_model, save_weights

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


# --------------------------------------------------------------------------- load


class Load:
    """Concurrent clients; samples and submitted job ids are shared under a lock."""

    def __init__(self, url: str, proto: Protocol, seed: int = 0) -> None:
        self.url = url
        self.proto = proto
        self.lock = threading.Lock()
        self.samples: list[Sample] = []
        self.job_ids: list[str] = []
        self.issued = 0
        self.rng = random.Random(seed)
        self.t0 = 0.0

    def submit(self, client: Any) -> tuple[bool, int | None, str | None]:
        r = client.post("/v1/jobs", json={"config": JOB_CONFIG, "weights_uri": WEIGHTS_URI})
        if r.status_code == 202:
            with self.lock:
                self.job_ids.append(r.json()["id"])
            return True, r.status_code, None
        return False, r.status_code, f"HTTP {r.status_code}: {r.text[:200]}"

    def poll(self, client: Any) -> tuple[bool, int | None, str | None]:
        with self.lock:
            job_id = self.rng.choice(self.job_ids)
        r = client.get(f"/v1/jobs/{job_id}")
        if r.status_code == 200 and r.json().get("id") == job_id:
            return True, r.status_code, None
        return False, r.status_code, f"HTTP {r.status_code}: {r.text[:200]}"

    def _take_ticket(self) -> int | None:
        with self.lock:
            if self.issued >= self.proto.max_requests:
                return None
            self.issued += 1
            return self.issued

    def client_loop(self, deadline: float) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=30) as client:
            while time.monotonic() < deadline:
                ticket = self._take_ticket()
                if ticket is None:
                    return
                op = "submit" if ticket % self.proto.submit_every == 0 else "poll"
                start = time.perf_counter()
                try:
                    ok, status, error = (self.submit if op == "submit" else self.poll)(client)
                except httpx.HTTPError as exc:
                    ok, status, error = False, None, f"{type(exc).__name__}: {exc}"
                end = time.perf_counter()
                sample = Sample(op, start - self.t0, (end - start) * 1000, ok, status, error)
                with self.lock:
                    self.samples.append(sample)

    def run(self) -> float:
        """Seed a few jobs, then load for ``duration_s``; returns the measured duration."""
        import httpx

        with httpx.Client(base_url=self.url, timeout=30) as client:
            for _ in range(self.proto.seed_jobs):
                ok, _, error = self.submit(client)
                if not ok:
                    raise RuntimeError(f"could not submit a seed job: {error}")
        self.t0 = time.perf_counter()
        deadline = time.monotonic() + self.proto.duration_s
        threads = [
            threading.Thread(target=self.client_loop, args=(deadline,), daemon=True)
            for _ in range(self.proto.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            # A request can be in flight at the deadline; its timeout (30 s) bounds the wait.
            t.join(timeout=self.proto.duration_s + 60)
        return time.perf_counter() - self.t0

    def cancel_all(self) -> dict[str, int]:
        """Cancel every submitted job (they are queued; the answer should be 200)."""
        import httpx

        counts: dict[str, int] = {}
        with httpx.Client(base_url=self.url, timeout=30) as client:
            for job_id in list(self.job_ids):
                try:
                    key = str(client.delete(f"/v1/jobs/{job_id}").status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                counts[key] = counts.get(key, 0) + 1
        return counts


# --------------------------------------------------------------------------- summary


def stats(samples: Sequence[Sample], duration_s: float) -> dict[str, Any]:
    lat = [s.latency_ms for s in samples]
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
        "throughput_rps": len(samples) / duration_s if duration_s > 0 else 0.0,
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else float("nan"),
        "mean_ms": sum(lat) / len(lat) if lat else float("nan"),
    }


def markdown(payload: dict[str, Any]) -> str:
    proto = payload["protocol"]
    rows = []
    for op in ("poll", "submit", "all"):
        s = payload["stats"][op]
        rows.append(
            [
                {
                    "poll": "status poll (GET /v1/jobs/{id})",
                    "submit": "submission (POST /v1/jobs)",
                    "all": "**all**",
                }[op],
                s["requests"],
                f"{s['throughput_rps']:.1f}",
                f"{s['p50_ms']:.1f}",
                f"{s['p90_ms']:.1f}",
                f"{s['p99_ms']:.1f}",
                f"{s['max_ms']:.1f}",
                s["errors"],
            ]
        )
    lines = [
        f"# Service load ({payload['mode']} mode)",
        "",
        f"Command: `{payload['command']}`  ",
        f"Finished: {payload['finished']}",
        "",
        f"`flow-compress serve --no-worker` on {HOST} (embedded Redis, fresh storage folder), "
        f"{proto['clients']} concurrent clients for {proto['duration_s']:g} s "
        f"(cap {proto['max_requests']} requests; measured {payload['duration_s']:.1f} s); one "
        f"request in {proto['submit_every']} is a JSON submission naming server-side weights "
        f"({payload['weights_bytes'] / 1e6:.1f} MB, hashed per submission), the rest poll a "
        f"random submitted job. Load generator and server share the same machine.",
        "",
        md_table(
            [
                "operation",
                "requests",
                "throughput (req/s)",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "errors",
            ],
            rows,
        ),
        "",
        f"Jobs submitted: {payload['jobs_submitted']} (including {proto['seed_jobs']} before "
        "the timed load); cancelled afterwards: "
        + ", ".join(f"{n} (answer {code})" for code, n in payload["cancelled"].items())
        + ".",
        "",
        "![latency distribution](latency_cdf.png)",
        "",
        "![throughput over time](throughput.png)",
        "",
    ]
    if payload["stats"]["all"]["errors"]:
        lines += [
            "Errors: "
            + ", ".join(f"{k} × {v}" for k, v in payload["stats"]["all"]["error_kinds"].items()),
            "",
        ]
    lines += ["## Machine", "", *machine_lines(payload["machine"]), ""]
    return "\n".join(lines)


def plot_cdf(samples: Sequence[Sample], path: Path) -> None:
    fig, ax = figure(7.0, 4.0)
    for op in ("poll", "submit"):
        lat = sorted(s.latency_ms for s in samples if s.op == op)
        if lat:
            ys = [100 * (i + 1) / len(lat) for i in range(len(lat))]
            ax.plot(lat, ys, label=f"{op} (n={len(lat)})")
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (log scale)")
    ax.set_ylabel("requests at or below, %")
    ax.set_title("Latency distribution under load")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def plot_throughput(samples: Sequence[Sample], duration_s: float, path: Path) -> None:
    fig, ax = figure(7.0, 3.5)
    n = max(1, int(duration_s + 0.999))
    for op in ("poll", "submit"):
        buckets = [0] * n
        for s in samples:
            if s.op == op:
                buckets[min(n - 1, int(s.t))] += 1
        ax.plot(range(n), buckets, label=op)
    ax.set_xlabel("second of the run")
    ax.set_ylabel("requests started per second")
    ax.set_title("Throughput over time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(NAME, "Sustained load against flow-compress serve on loopback.")
    g = parser.add_argument_group("protocol (defaults: the mode's)")
    g.add_argument("--duration", type=float, help="seconds of load (at most 600)")
    g.add_argument("--clients", type=int, help="concurrent clients (at most 64)")
    g.add_argument("--submit-every", type=int, help="one submission per N requests")
    g.add_argument("--max-requests", type=int, help="cap on requests in all")
    args = parser.parse_args(argv)
    proto = choose_protocol(
        args.mode,
        QUICK,
        FULL,
        duration_s=args.duration,
        clients=args.clients,
        submit_every=args.submit_every,
        max_requests=args.max_requests,
    )
    # Bounded by design: a load test must not become a denial of service of this machine.
    if not (
        0 < proto.duration_s <= 600
        and 0 < proto.clients <= 64
        and proto.submit_every >= 1
        and 0 < proto.max_requests <= 200_000
    ):
        parser.error(
            "need 0 < duration <= 600, 0 < clients <= 64, submit-every >= 1, "
            "0 < max-requests <= 200000"
        )

    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        storage = Path(tmp) / "storage"
        storage.mkdir()
        weights_bytes = write_weights(storage).stat().st_size
        service = Service(storage)
        log(f"service: starting flow-compress serve on {service.url}")
        try:
            service.start()
            load = Load(service.url, proto)
            log(f"service: {proto.clients} clients for {proto.duration_s:g} s")
            duration = load.run()
            log("service: cancelling the submitted jobs")
            cancelled = load.cancel_all()
        finally:
            service.stop()
        serve_log = service.log_tail()
        shutil.rmtree(storage, ignore_errors=True)

    samples = load.samples
    payload: dict[str, Any] = {
        "benchmark": NAME,
        "mode": args.mode,
        "command": command_line(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "protocol": asdict(proto),
        "job_config": JOB_CONFIG,
        "weights_bytes": weights_bytes,
        "duration_s": duration,
        "stats": {
            "poll": stats([s for s in samples if s.op == "poll"], duration),
            "submit": stats([s for s in samples if s.op == "submit"], duration),
            "all": stats(samples, duration),
        },
        "jobs_submitted": len(load.job_ids),
        "cancelled": cancelled,
        "serve_log_tail": serve_log[-1000:],
        "machine": machine(),
    }
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", payload)
    plot_cdf(samples, out / "latency_cdf.png")
    plot_throughput(samples, duration, out / "throughput.png")
    write_text(out / "RESULTS.md", markdown(payload))
    s = payload["stats"]["all"]
    log(
        f"service: {s['requests']} requests, {s['throughput_rps']:.1f} req/s, p50 "
        f"{s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, {s['errors']} errors; wrote {out}"
    )
    return 0 if s["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

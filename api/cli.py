"""``flow-compress``: the library's commands plus the service's.

Library (from ``flow_compress.cli``): ``train``, ``compress``. Service: ``serve`` (API and one
worker; an embedded Redis when ``FLOW_COMPRESS_REDIS_URL`` is unset), ``worker`` (a worker
alone), and the CI client ``submit``, ``status``, ``download``, ``cancel``.

Exit codes of the client commands: 0 success; 1 the job failed or was cancelled; 2 usage;
3 the job succeeded but missed its MACs target (``target_met`` false) or a ``--fail-if-*``
threshold; 4 the server refused the request or could not be reached; 5 ``--timeout`` passed
while waiting.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from api.client import ApiClientError, Client
from flow_compress.schema import TARGET_SLACK

if TYPE_CHECKING:
    from fastapi import FastAPI

EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_THRESHOLD = 3
EXIT_API_ERROR = 4
EXIT_TIMEOUT = 5
EXIT_PREFLIGHT = 6  # the preflight found a check that fails: nothing was submitted

log = logging.getLogger("flow_compress.service")


def _build_app() -> typer.Typer:
    """A Typer app with the library's commands (train, compress, ...) and the service's.

    The library's app is mounted without a group name, so its commands sit at the top level;
    mounting leaves ``flow_compress.cli.app`` itself unchanged. Its commands import torch
    lazily, which keeps ``flow-compress submit`` and the API torch-free.
    """
    from flow_compress.cli import app as library_app

    cli = typer.Typer(
        name="flow-compress",
        help="Compress trained PyTorch vision models with IDAP++, locally or as a service.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    cli.add_typer(library_app)
    return cli


app = _build_app()

Server = Annotated[
    str,
    typer.Option(
        "--server", envvar="FLOW_COMPRESS_SERVER", help="Base URL of the flow-compress API."
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="FLOW_COMPRESS_API_KEY", help="API key, if required."),
]
DEFAULT_SERVER = "http://127.0.0.1:8000"


# ---------------------------------------------------------------------------- running it
@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    storage_dir: Annotated[
        Path | None,
        typer.Option(help="Jobs, uploads and artifacts [env FLOW_COMPRESS_STORAGE_DIR]."),
    ] = None,
    worker: Annotated[bool, typer.Option(help="Also run one worker on this machine.")] = True,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    access_log: Annotated[
        bool, typer.Option(help="Log every request (the /metrics counters need no log).")
    ] = False,
    api_processes: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="API processes sharing the port, each with its own event loop (one per CPU "
            "core the API may use). Every process serves every job: they share the Redis and "
            "the storage folder, and /metrics adds up their request counters.",
        ),
    ] = 1,
) -> None:
    """Run the API and one worker here. Without FLOW_COMPRESS_REDIS_URL an embedded Redis is
    started, its data kept under the storage folder, so a restart keeps every job."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from api.app import create_app
    from api.metrics import METRICS_DIR_ENV
    from api.settings import ApiSettings
    from worker.broker import EmbeddedRedis
    from worker.celery_app import create_celery
    from worker.process import die_with_parent
    from worker.recovery import requeue_orphaned_jobs
    from worker.storage import Storage

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    overrides: dict[str, Any] = {"storage_dir": storage_dir} if storage_dir else {}
    settings = ApiSettings(**overrides)
    storage = Storage(settings.storage_dir)
    storage.ensure()
    embedded: EmbeddedRedis | None = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(storage.redis_dir)
        url = embedded.start()
        settings = settings.model_copy(update={"redis_url": url})
        log.info("embedded Redis started (data in %s)", storage.redis_dir)
        if worker:
            # No worker uses this Redis yet: what is unacknowledged was left by a worker that
            # died with an earlier serve (kill -9); its jobs go back to the head of the queue.
            requeue_orphaned_jobs(create_celery(settings), settings)
    worker_proc: subprocess.Popen[bytes] | None = None
    stopping = threading.Event()
    metrics_dir: Path | None = None
    try:
        options: dict[str, Any] = {
            "host": host,
            "port": port,
            "log_level": log_level,
            "server_header": False,  # the software and its version are nobody's business
            # Slow uploads end on their own (upload_idle_timeout_s); this bounds the rest.
            "timeout_graceful_shutdown": 30,
            # A log line per request costs more than the request itself on a status poll.
            "access_log": access_log,
        }
        stop_api: Callable[[], object]
        if api_processes == 1:
            server = uvicorn.Server(uvicorn.Config(create_app(settings), **options))
            stop_api = functools.partial(setattr, server, "should_exit", True)
            run_api = server.run
        else:
            # Spawned processes build their app from the environment: hand them this
            # serve's Redis and folder, and a fresh folder where prometheus_client keeps
            # each process's counters for a scrape (answered by any one of them) to add up.
            metrics_dir = Path(tempfile.mkdtemp(prefix="flow-compress-metrics-"))
            os.environ["FLOW_COMPRESS_REDIS_URL"] = str(settings.redis_url)
            os.environ["FLOW_COMPRESS_STORAGE_DIR"] = str(storage.root)
            os.environ[METRICS_DIR_ENV] = str(metrics_dir)
            config = uvicorn.Config(
                "api.cli:api_process_app", factory=True, workers=api_processes, **options
            )
            # uvicorn's supervisor: restarts a process that dies, and on SIGTERM or SIGINT
            # stops them all and returns (its handlers, set here, are the ones in force).
            supervisor = Multiprocess(config, sockets=[config.bind_socket()])
            stop_api = supervisor.should_exit.set
            run_api = supervisor.run
        if worker:
            env = {
                **{k: v for k, v in os.environ.items() if k != METRICS_DIR_ENV},
                "FLOW_COMPRESS_REDIS_URL": str(settings.redis_url),
                "FLOW_COMPRESS_STORAGE_DIR": str(storage.root),
            }
            cmd = [sys.executable, "-m", "api.cli", "worker", "--loglevel", log_level.upper()]
            # Dies with serve even when serve is killed outright (its pool children die with
            # it in turn): no orphan worker left taking jobs next to a restarted serve's.
            worker_proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent())

            def watch(proc: subprocess.Popen[bytes]) -> None:
                # A dead worker means jobs would queue forever: stop the whole service.
                code = proc.wait()
                if not stopping.is_set():
                    log.error("the worker exited (code %s); stopping", code)
                    stop_api()

            threading.Thread(target=watch, args=(worker_proc,), daemon=True).start()
        # uvicorn shuts down on SIGTERM, then re-raises the signal with the handler it found;
        # SIGTERM's default would kill this process before the cleanup below runs.
        if api_processes == 1:
            signal.signal(signal.SIGTERM, _exit_on_signal)
        run_api()
    finally:
        stopping.set()
        if worker_proc is not None:
            _stop_worker(worker_proc)
        if embedded is not None:
            embedded.stop()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def api_process_app() -> FastAPI:
    """The app of one of ``serve --api-processes N``'s processes, from the environment serve
    set. The process ends with serve even when serve is killed outright, as the worker does
    (``worker.process``): an orphan would keep the port and answer from a Redis that is gone."""
    from api.app import create_app
    from worker.process import die_with_parent

    # Set here, in the process itself: uvicorn's supervisor starts it without a preexec hook.
    set_death_signal = die_with_parent(signal.SIGTERM)
    if set_death_signal is not None:
        set_death_signal()
    return create_app()


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _stop_worker(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Warm shutdown, then cold (the running job's message is put back and resumes on the
    next start), then kill."""
    for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGKILL):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


@app.command()
def worker(
    queue: Annotated[
        str | None, typer.Option(help="Queue to consume [env FLOW_COMPRESS_QUEUE].")
    ] = None,
    gpu: Annotated[
        str | None, typer.Option(help="Pin this worker to one GPU (sets CUDA_VISIBLE_DEVICES).")
    ] = None,
    hostname: Annotated[str | None, typer.Option(help="Celery node name.")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run one worker: one job at a time, each in a fresh process. Start one per GPU."""
    from worker.celery_app import create_celery
    from worker.settings import WorkerSettings
    from worker.storage import Storage

    settings = WorkerSettings(**({"queue": queue} if queue else {}))
    if not settings.redis_url:
        typer.echo(
            "FLOW_COMPRESS_REDIS_URL is not set: point it at the service's Redis "
            "(or run `flow-compress serve`, which starts one)",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    Storage(settings.storage_dir).ensure()
    celery = create_celery(settings)
    celery.worker_main(
        [
            "worker",
            "--pool=prefork",
            f"--queues={settings.queue}",
            f"--loglevel={loglevel}",
            f"--hostname={hostname or f'{settings.queue}-{os.getpid()}@%h'}",
            # Mingle and gossip synchronise revokes between nodes; cancellation goes through
            # the job store instead, so they would only slow the start.
            "--without-mingle",
            "--without-gossip",
        ]
    )


# ---------------------------------------------------------------------------- CI client
def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    from flow_compress.config import set_dotted

    try:
        set_dotted(target, dotted, value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--set") from None


def build_spec(
    *,
    model: str | None,
    dataset: str | None,
    config_file: Path | None,
    sets: list[str],
    fields: dict[str, Any],
    weights_uri: str | None,
) -> dict[str, Any]:
    """The JobSpec JSON from a config file, flags and ``--set key.path=value`` overrides,
    checked against the library's CompressionConfig before anything is uploaded."""
    from pydantic import ValidationError

    from flow_compress.config import CompressionConfig

    config: dict[str, Any] = json.loads(config_file.read_text()) if config_file else {}
    for name, value in {"model": model, "dataset": dataset, **fields}.items():
        if value is not None:
            config[name] = value
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string such as --set prune.schedule=paper
        _set_dotted(config, key, value)
    try:
        CompressionConfig.model_validate(config)
    except ValidationError as exc:
        raise typer.BadParameter(str(exc), param_hint="config") from None
    spec: dict[str, Any] = {"config": config}
    if weights_uri:
        spec["weights_uri"] = weights_uri
    return spec


def _is_archive(value: str) -> bool:
    path = Path(value)
    return path.is_file() and path.name.lower().endswith(
        (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
    )


def _print_progress() -> Any:
    last: list[tuple[Any, ...]] = []

    def show(job: dict[str, Any]) -> None:
        key = (job["state"], job.get("stage"), job.get("step"), job.get("percent"))
        if last and last[-1] == key:
            return
        last.append(key)
        parts = [f"[{job.get('percent', 0):5.1f}%]", job["state"]]
        if job.get("stage"):
            parts.append(f"{job['stage']} {job.get('step', 0)}/{job.get('total_steps', 0)}")
        if job.get("macs") is not None:
            parts.append(f"MACs {job['macs'] / 1e6:.1f}M")
        if job.get("top1") is not None:
            parts.append(f"top-1 {job['top1']:.2f}%")
        if job.get("message"):
            parts.append(f"- {job['message']}")
        typer.echo("  ".join(parts))

    return show


def _fail(exc: ApiClientError) -> typer.Exit:
    typer.echo(f"error: {exc.code}: {exc.message}", err=True)
    return typer.Exit(EXIT_TIMEOUT if exc.code == "wait_timeout" else EXIT_API_ERROR)


@app.command()
def submit(
    model: Annotated[
        str | None,
        typer.Option(help="Model: resnet18, timm:NAME, torchvision:NAME or hf-hub:ORG/NAME."),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Weights to upload (safetensors or a weights-only state dict).",
        ),
    ] = None,
    weights_uri: Annotated[
        str | None, typer.Option(help="Weights already on the server (under its storage root).")
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Dataset reference (digits, fashion-mnist, imagefolder:PATH) or a "
            "local zip/tar of an ImageFolder to upload."
        ),
    ] = None,
    target_macs: Annotated[
        float | None, typer.Option(help="Fraction of the base MACs to keep (0-1].")
    ] = None,
    target_latency_ms: Annotated[
        float | None, typer.Option(help="Latency to reach on the deployment, ms per batch.")
    ] = None,
    target_speedup: Annotated[
        float | None, typer.Option(help="Speed-up over the base to reach on the deployment.")
    ] = None,
    max_drop: Annotated[float | None, typer.Option(help="Accuracy budget, top-1 points.")] = None,
    num_classes: Annotated[int | None, typer.Option()] = None,
    input_size: Annotated[int | None, typer.Option()] = None,
    in_chans: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", exists=True, dir_okay=False, help="CompressionConfig JSON."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config field: --set recovery.final_iters=100."),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the job to end, printing progress.")] = False,
    download: Annotated[
        Path | None, typer.Option(help="Download the artifacts here (implies --wait).")
    ] = None,
    fail_if_drop_above: Annotated[
        float | None, typer.Option(help="Exit 3 if the top-1 drop exceeds this (points).")
    ] = None,
    fail_if_macs_ratio_above: Annotated[
        float | None, typer.Option(help="Exit 3 if pruned/base MACs exceeds this.")
    ] = None,
    fail_if_speedup_below: Annotated[
        float | None,
        typer.Option(help="Exit 3 if the measured speed-up on the deployment is below this."),
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Resubmitting with the same key returns the same job.")
    ] = None,
    poll_interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 2.0,
    timeout: Annotated[float | None, typer.Option(help="Give up waiting after this.")] = None,
    preflight: Annotated[
        bool,
        typer.Option(
            help="Check the job first (POST /v1/preflight) and submit only if it passes; "
            "--no-preflight submits at once (the weights are uploaded once, not twice)."
        ),
    ] = True,
    server: Server = DEFAULT_SERVER,
    api_key: ApiKey = None,
) -> None:
    """Submit a compression job; with --wait, exit 0 only if it succeeds within thresholds.
    The job is preflighted first unless --no-preflight: a failed check exits 1 and submits
    nothing."""
    archive = Path(dataset) if dataset and _is_archive(dataset) else None
    spec = build_spec(
        model=model,
        dataset="upload" if archive else dataset,
        config_file=config,
        sets=set_ or [],
        fields={
            "target_macs": target_macs,
            "target_latency_ms": target_latency_ms,
            "target_speedup": target_speedup,
            "max_drop": max_drop,
            "num_classes": num_classes,
            "input_size": input_size,
            "in_chans": in_chans,
            "device": device,
        },
        weights_uri=weights_uri,
    )
    with Client(server, api_key) as client:
        try:
            if preflight:
                checked = client.preflight(spec, weights=weights)
                typer.echo(_describe_preflight(checked))
                if not checked.get("ok"):
                    typer.echo(
                        "error: preflight_failed: not submitted (--no-preflight skips the check)",
                        err=True,
                    )
                    raise typer.Exit(EXIT_PREFLIGHT)
            job = client.submit(
                spec, weights=weights, dataset_archive=archive, idempotency_key=idempotency_key
            )
            typer.echo(f"job {job['id']} {job['state']}")
            if not (wait or download):
                typer.echo(job["id"])
                return
            job = client.wait(
                job["id"], poll_interval=poll_interval, timeout=timeout, on_update=_print_progress()
            )
            _finish(
                client,
                job,
                download,
                fail_if_drop_above,
                fail_if_macs_ratio_above,
                fail_if_speedup_below,
            )
        except ApiClientError as exc:
            raise _fail(exc) from None


def _describe_preflight(r: dict[str, Any]) -> str:
    """The preflight report in a few lines: the failed checks first-hand, the rest summed up."""
    lines = [f"preflight: {'ok' if r.get('ok') else 'FAILED'} ({r.get('seconds', 0):.1f} s)"]
    if r.get("weights") == "bad":
        lines.append(f"  weights do not fit: {r.get('weights_error')}")
    if r.get("forward_error"):
        lines.append(f"  forward pass failed in {r.get('failing_layer')}: {r['forward_error']}")
        return "\n".join(lines)
    if r.get("graph_error"):
        lines.append(f"  pruning graph: {r['graph_error']}")
    if r.get("macs") is not None:
        lines.append(
            f"  base {r['macs'] / 1e6:.2f} MMACs; {r.get('prunable_groups', 0)} prunable groups, "
            f"{len(r.get('left_alone', []))} layers left alone, "
            f"{len(r.get('stage2_candidates', []))} stage-2 candidates"
        )
    if r.get("deployment_error"):
        lines.append(f"  deployment: {r['deployment_error']}")
    if r.get("reachable_ratio") is not None and r.get("target_macs") is not None:
        verdict = "reachable" if r.get("target_reachable") else "NOT reachable"
        lines.append(
            f"  target {r['target_macs']:.1%} of MACs: {verdict} (floor under the per-layer "
            f"caps {r['reachable_ratio']:.1%})"
        )
    for e in r.get("exports", []):
        if not e.get("passed"):
            lines.append(
                f"  export {e['format']} failed: {e.get('error') or e.get('max_abs_diff')}"
            )
    return "\n".join(lines)


def _finish(
    client: Client,
    job: dict[str, Any],
    download: Path | None,
    max_drop: float | None,
    max_macs_ratio: float | None,
    min_speedup: float | None = None,
) -> None:
    if job["state"] != "succeeded":
        err = job.get("error") or {"code": job["state"], "message": job.get("message", "")}
        typer.echo(f"error: {err['code']}: {err['message']}", err=True)
        raise typer.Exit(EXIT_JOB_FAILED)
    report = client.report(job["id"])
    typer.echo(
        f"succeeded: top-1 {report['base']['top1']:.2f}% -> {report['pruned']['top1']:.2f}% "
        f"(drop {report['top1_drop']:.2f}), MACs x{report['macs_ratio']:.3f}"
    )
    target = report["config"].get("target_macs")
    target_met = report.get("target_met")
    deployment = report.get("deployment")
    if target_met is not None and target is not None:
        macs_met = report["macs_ratio"] <= target * TARGET_SLACK
        verdict = "met" if macs_met else "MISSED within the accuracy budget"
        typer.echo(f"MACs target x{target:.3f}: {verdict}")
    if deployment is not None:
        line = (
            f"on {deployment['deployment']}: {deployment['base_ms']:.3g} -> "
            f"{deployment['pruned_ms']:.3g} ms, speed-up {deployment['speedup']:.2f}x "
            f"({deployment['verdict']})"
        )
        if deployment.get("latency_target_met") is not None:
            line += "; latency target " + ("met" if deployment["latency_target_met"] else "MISSED")
        typer.echo(line)
    if download is not None:
        for path in client.download(job["id"], download):
            typer.echo(f"downloaded {path}")
    missed = []
    if target_met is False:
        if target is not None and report["macs_ratio"] > target * TARGET_SLACK:
            missed.append(f"MACs target x{target:.3f} missed (reached x{report['macs_ratio']:.3f})")
        if deployment is not None and deployment.get("latency_target_met") is False:
            missed.append(f"latency target missed (speed-up {deployment['speedup']:.2f}x)")
    if min_speedup is not None:
        # Without a deployment the report's headline speed-up (its latency table) counts.
        speedup = deployment["speedup"] if deployment is not None else report.get("speedup")
        if speedup is None:
            missed.append("no speed-up was measured (give the job a deployment)")
        elif speedup < min_speedup:
            missed.append(f"speed-up {speedup:.2f}x < {min_speedup}")
    if max_drop is not None and report["top1_drop"] > max_drop:
        missed.append(f"top-1 drop {report['top1_drop']:.2f} > {max_drop}")
    if max_macs_ratio is not None and report["macs_ratio"] > max_macs_ratio:
        missed.append(f"MACs ratio {report['macs_ratio']:.3f} > {max_macs_ratio}")
    if missed:
        typer.echo(f"error: threshold_missed: {'; '.join(missed)}", err=True)
        raise typer.Exit(EXIT_THRESHOLD)


@app.command()
def status(
    job_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job as JSON.")] = False,
    server: Server = DEFAULT_SERVER,
    api_key: ApiKey = None,
) -> None:
    """Show a job. Exit 0 if it succeeded or is still going, 1 if it failed or was cancelled."""
    with Client(server, api_key) as client:
        try:
            job = client.job(job_id)
        except ApiClientError as exc:
            raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(job, indent=2))
    else:
        _print_progress()(job)
        if job.get("error"):
            typer.echo(f"error: {job['error']['code']}: {job['error']['message']}", err=True)
    if job["state"] in ("failed", "cancelled"):
        raise typer.Exit(EXIT_JOB_FAILED)


@app.command("download")
def download_cmd(
    job_id: str,
    dest: Annotated[Path, typer.Argument(help="Folder to write the artifacts to.")],
    name: Annotated[
        list[str] | None, typer.Option(help="Only these artifacts (repeatable).")
    ] = None,
    server: Server = DEFAULT_SERVER,
    api_key: ApiKey = None,
) -> None:
    """Download a succeeded job's artifacts (sha256-checked against its manifest)."""
    with Client(server, api_key) as client:
        try:
            for path in client.download(job_id, dest, name):
                typer.echo(f"downloaded {path}")
        except ApiClientError as exc:
            raise _fail(exc) from None


@app.command()
def cancel(job_id: str, server: Server = DEFAULT_SERVER, api_key: ApiKey = None) -> None:
    """Cancel a job: a queued one never starts, a running one stops at its next step."""
    with Client(server, api_key) as client:
        try:
            job = client.cancel(job_id)
        except ApiClientError as exc:
            raise _fail(exc) from None
    note = " (stops at the next step)" if job["state"] == "running" else ""
    typer.echo(f"job {job_id} {job['state']}{note}")


def main() -> None:
    """Console-script entry point (``flow-compress``)."""
    app()


if __name__ == "__main__":
    main()

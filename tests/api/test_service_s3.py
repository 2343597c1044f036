"""The service end to end on S3 storage, with nothing shared between the API and the worker
but Redis and the bucket: a real API process and a real Celery worker, each with its own
local root, a real S3-compatible server (moto's, in its own process), and a real tiny
compression (resnet18 on digits at 16 px, as in test_service_e2e.py).

Checked: the job succeeds; every artifact downloads through the API with the manifest's
sha256 (streamed; byte ranges and If-Range honoured) and through a 307 to a presigned URL;
the job's uploads and the worker's scratch are gone from the bucket and the disks; the owner's
DELETE removes the artifacts from the bucket and downloads answer 410.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.client import Client
from tests.api.test_service_e2e import FINISHED, JOB_TIMEOUT_S, TINY, base_weights
from tests.worker.s3support import CREDENTIALS, keys, s3_endpoint, s3_url
from tests.worker.support import service_env, settings_env, start_api, start_worker, stop

__all__ = ["base_weights", "s3_endpoint", "s3_url"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@pytest.fixture
def services(
    redis_url: str, key_prefix: str, s3_endpoint: str, s3_url: str, tmp_path: Path
) -> Iterator[dict[str, object]]:
    """A worker and two APIs (one streams downloads, one redirects), each on its own root.
    The worker finds the store through boto3's standard AWS_ENDPOINT_URL; the APIs through
    FLOW_COMPRESS_S3_ENDPOINT_URL."""
    queue = f"gpu-{uuid.uuid4().hex[:8]}"
    common = {"FLOW_COMPRESS_STORAGE_URL": s3_url, "FLOW_COMPRESS_QUEUE": queue, **CREDENTIALS}
    roots = {name: tmp_path / name for name in ("worker-root", "api-root", "api2-root")}
    procs = []
    try:
        worker = start_worker(
            service_env(
                **settings_env(redis_url, key_prefix, roots["worker-root"]),
                **common,
                AWS_ENDPOINT_URL=s3_endpoint,
            ),
            tmp_path / "worker.log",
        )
        procs.append(worker)
        urls = []
        for name, redirect in (("api-root", "false"), ("api2-root", "true")):
            proc, url = start_api(
                service_env(
                    **settings_env(redis_url, key_prefix, roots[name]),
                    **common,
                    FLOW_COMPRESS_S3_ENDPOINT_URL=s3_endpoint,
                    FLOW_COMPRESS_DOWNLOAD_REDIRECT=redirect,
                ),
                tmp_path / f"{name}.log",
            )
            procs.append(proc)
            urls.append(url)
        yield {"api": urls[0], "redirecting_api": urls[1], "roots": roots, "log": tmp_path}
    finally:
        for proc in procs:
            stop(proc)


def test_a_job_on_s3_with_no_shared_folder(
    services: dict[str, object], base_weights: Path, s3_endpoint: str, s3_url: str
) -> None:
    api, redirecting = str(services["api"]), str(services["redirecting_api"])
    roots: dict[str, Path] = services["roots"]  # type: ignore[assignment]
    log_dir: Path = services["log"]  # type: ignore[assignment]
    with httpx.Client(base_url=api, timeout=60) as http:
        assert http.get("/readyz").status_code == 200
        r = http.post(
            "/v1/jobs",
            files={
                "spec": (None, json.dumps({"config": TINY})),
                "weights": ("w", base_weights.read_bytes()),
            },
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while (job := http.get(f"/v1/jobs/{job_id}").json())["state"] not in FINISHED:
            assert time.monotonic() < deadline, (log_dir / "worker.log").read_text()[-4000:]
            time.sleep(0.5)
        assert job["state"] == "succeeded", (job, (log_dir / "worker.log").read_text()[-4000:])

        stored = keys(s3_endpoint, s3_url)
        assert not any(k.startswith("uploads/") for k in stored), stored  # inputs removed
        listed = http.get(f"/v1/jobs/{job_id}/artifacts").json()["files"]
        names = {f["name"] for f in listed}
        assert {"model.onnx", "model.ts", "weights.safetensors", "report.json"} <= names
        published = [f"artifacts/{job_id}/{n}" for n in [*names, "manifest.json"]]
        assert sorted(stored) == sorted(published)
        # Nothing of the job on either machine's disk.
        assert not (roots["api-root"] / "uploads" / job_id).exists()
        assert not (roots["worker-root"] / "scratch" / job_id).exists()
        assert not (roots["worker-root"] / "artifacts" / job_id).exists()

        bodies: dict[str, bytes] = {}
        for entry in listed:
            r = http.get(entry["url"])
            assert r.status_code == 200
            assert hashlib.sha256(r.content).hexdigest() == entry["sha256"], entry["name"]
            assert r.headers["x-content-sha256"] == entry["sha256"]
            assert r.headers["etag"] == f'"{entry["sha256"]}"'
            assert int(r.headers["content-length"]) == entry["size"] == len(r.content)
            bodies[entry["name"]] = r.content
        assert http.get(f"/v1/jobs/{job_id}/report").json()["macs_ratio"] < 1.0

        onnx = next(e for e in listed if e["name"] == "model.onnx")
        r = http.get(onnx["url"], headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == bodies["model.onnx"][10:20]
        assert r.headers["content-range"] == f"bytes 10-19/{onnx['size']}"
        etag = f'"{onnx["sha256"]}"'
        r = http.get(onnx["url"], headers={"Range": "bytes=10-19", "If-Range": etag})
        assert r.status_code == 206
        r = http.get(onnx["url"], headers={"Range": "bytes=10-19", "If-Range": '"stale"'})
        assert r.status_code == 200 and len(r.content) == onnx["size"]
        assert http.get(onnx["url"], headers={"Range": f"bytes={onnx['size']}-"}).status_code == 416

    with httpx.Client(base_url=redirecting, timeout=60) as http:
        r = http.get(onnx["url"])
        assert r.status_code == 307, r.text
        location = r.headers["location"]
        assert location.startswith(s3_endpoint) and "Signature" in location
        assert r.headers["x-content-sha256"] == onnx["sha256"]
        fetched = httpx.get(location, timeout=60)
        assert fetched.status_code == 200
        assert hashlib.sha256(fetched.content).hexdigest() == onnx["sha256"]
        assert "model.onnx" in fetched.headers["content-disposition"]
    # The CI client follows the redirect and checks every file against the manifest.
    with Client(redirecting) as client:
        written = client.download(job_id, log_dir / "downloaded")
    assert {p.name: p.read_bytes() for p in written} == bodies

    with httpx.Client(base_url=api, timeout=60) as http:
        artifact_bytes = http.get("/v1/usage").json()["usage"]["stored_bytes"]
        print(f"tiny job on S3: {artifact_bytes} bytes of artifacts stored, {len(stored)} objects")
        r = http.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 200 and r.json()["expired_reason"] == "deleted"
        assert keys(s3_endpoint, s3_url) == []
        r = http.get(onnx["url"])
        assert r.status_code == 410 and r.json()["error"]["code"] == "artifacts_expired"
        assert http.get("/v1/usage").json()["usage"]["stored_bytes"] == 0
    print(f"local roots after delete: api {_tree_bytes(roots['api-root'])} B, "
          f"worker {_tree_bytes(roots['worker-root'])} B")  # fmt: skip

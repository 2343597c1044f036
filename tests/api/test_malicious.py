"""Malicious and broken input, end to end through the real API and, for what only the
worker can judge (the content of weights files), through ``run_job`` with the real library.

Each refusal must carry a stable error code, leave no files behind (uploads, scratch,
artifacts) and leave the API serving. Complements test_api.py and test_archives.py (archive
traversal by name, oversize uploads, malformed multipart), which are not repeated here.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as safetensors_bytes
from torch import nn

from flow_compress.arch.models import build_model
from tests.api.conftest import storage_of, store_of
from worker.jobs import JobState
from worker.tasks import run_job

CONFIG: dict[str, Any] = {
    "model": "resnet18",
    "dataset": "digits",
    "input_size": 16,
    "target_macs": 0.5,
    "device": "cpu",
}


def _post(client: TestClient, weights: bytes, config: dict[str, Any] | None = None) -> Any:
    spec = json.dumps({"config": config or CONFIG})
    return client.post(
        "/v1/jobs", files={"spec": (None, spec), "weights": ("w.safetensors", weights)}
    )


def _nothing_left(client: TestClient, job_id: str | None = None) -> None:
    storage = storage_of(client)
    if job_id is None:
        assert list(storage.uploads_dir.iterdir()) == []
        return
    for folder in (storage.uploads(job_id), storage.scratch(job_id), storage.artifacts(job_id)):
        assert not folder.exists(), folder


def _resnet18_state(**overrides: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = {
        k: v.contiguous()
        for k, v in build_model("resnet18", 10, in_chans=3, input_size=16).state_dict().items()
    }
    return state | overrides


class _Marker:
    """Unpickling this creates ``path``: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


class _EvilModule(nn.Module):
    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:  # type: ignore[override]
        return (Path.touch, (self.marker,))


def _pickled(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _weights_payloads(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    """name → (bytes uploaded as weights, the words the error message must contain)."""
    marker = tmp_path / "PWNED"
    good = safetensors_bytes(_resnet18_state())
    torch.manual_seed(0)
    resnet34 = build_model("resnet34", 10, in_chans=3, input_size=16).state_dict()
    corrupt_header = (64).to_bytes(
        8, "little"
    ) + b'{"conv1.weight":{"dtype":"F32","shape":[9999999],'
    corrupt_header = corrupt_header.ljust(8 + 64, b" ") + b"\0" * 16
    nan = _resnet18_state(**{"fc.bias": torch.full((10,), math.nan)})
    inf = _resnet18_state(**{"conv1.weight": torch.full((64, 3, 7, 7), math.inf)})
    return {
        "pickled_module": (_pickled(_EvilModule(marker)), "pickled modules are refused"),
        "pickled_payload_in_dict": (_pickled({"state_dict": _Marker(marker)}), "refused"),
        "truncated_safetensors": (good[: len(good) // 2], "corrupt safetensors"),
        "corrupt_safetensors_header": (corrupt_header, "safetensors"),
        "wrong_architecture": (safetensors_bytes(resnet34), "do not fit the architecture"),
        "nan_weights": (safetensors_bytes(nan), "NaN or inf"),
        "inf_weights": (safetensors_bytes(inf), "NaN or inf"),
        "not_a_tensor_file": (b"\x89PNG\r\n\x1a\n" + b"\0" * 200, "neither safetensors"),
    }


def test_hostile_and_broken_weights_fail_the_job_with_bad_checkpoint_and_run_no_code(
    client: TestClient, tmp_path: Path
) -> None:
    store, storage = store_of(client), storage_of(client)
    marker = tmp_path / "PWNED"
    for name, (payload, words) in _weights_payloads(tmp_path).items():
        r = _post(client, payload)
        # The API never opens weights (it does not import torch): it stores and queues them.
        assert r.status_code == 202, (name, r.text)
        job_id = r.json()["id"]
        record = store.get(job_id)
        assert record is not None
        state = run_job(
            record.payload(), store=store, storage=storage, max_redeliveries=2, can_retry=False
        )
        rec = store.get(job_id)
        assert state is JobState.failed and rec is not None and rec.error is not None, name
        assert rec.error.code == "bad_checkpoint", (name, rec.error)
        assert words in rec.error.message, (name, rec.error.message)
        _nothing_left(client, job_id)
        assert not marker.exists(), f"{name}: unpickling ran code"
    assert client.get("/readyz").status_code == 200


def _zip(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink is not None:
            info = zipfile.ZipInfo("a/link.png")
            info.external_attr = (0o120777 << 16) | 0x20  # S_IFLNK
            zf.writestr(info, symlink)
    return buf.getvalue()


def _tar_with_symlink() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name in ("a/0.png", "b/0.png"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tf.addfile(info, io.BytesIO(b"\x89PNG"))
        link = tarfile.TarInfo("a/evil.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    return buf.getvalue()


@pytest.mark.parametrize(
    "archive",
    [
        # 64 MiB of zeros, about 64 KiB compressed; the server's cap is 1 MiB unpacked.
        pytest.param(_zip({"a/0.png": b"\0" * (64 << 20), "b/0.png": b"\0"}), id="zip_bomb"),
        pytest.param(_zip({"b/0.png": b"x"}, symlink="/etc/passwd"), id="zip_symlink"),
        pytest.param(_tar_with_symlink(), id="tar_symlink"),
        pytest.param(_zip({"a/0.png": b"x", "/etc/cron.d/evil": b"x"}), id="zip_absolute"),
        pytest.param(b"PK\x03\x04" + b"\0" * 64, id="truncated_zip"),
    ],
)
def test_hostile_dataset_archives_are_refused_and_leave_nothing(
    make_client: Callable[..., TestClient], archive: bytes
) -> None:
    client = make_client(max_extract_bytes=1 << 20)
    spec = json.dumps({"config": {**CONFIG, "dataset": "upload"}})
    r = client.post(
        "/v1/jobs",
        files={
            "spec": (None, spec),
            "weights": ("w", b"weights"),
            "dataset": ("ds", archive),
        },
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_archive"
    _nothing_left(client)
    assert client.get("/v1/jobs").json()["total"] == 0
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("target_macs", 0),
        ("target_macs", -0.5),
        ("target_macs", 1.5),
        ("target_macs", "NaN"),
        ("target_macs", "Infinity"),
        ("max_drop", -1),
        ("max_drop", "NaN"),
        ("input_size", 0),
        ("input_size", 10**9),
    ],
)
def test_absurd_targets_are_validation_errors_naming_the_field(
    client: TestClient, field: str, value: object
) -> None:
    spec = json.dumps({"config": {**CONFIG, field: "__VALUE__"}})
    # Written by hand: json.dumps cannot emit a bare NaN, and clients can.
    raw = spec.replace('"__VALUE__"', value if isinstance(value, str) else json.dumps(value))
    r = client.post("/v1/jobs", files={"spec": (None, raw), "weights": ("w", b"weights")})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "validation_error"
    assert error["field"] == f"spec.config.{field}", error
    _nothing_left(client)


@pytest.mark.parametrize(
    ("dataset", "code"),
    [
        ("no-such-dataset", "invalid_dataset"),
        ("imagefolder:../../../etc", "invalid_dataset"),
        ("imagefolder:/etc", "invalid_dataset"),
        ("imagefolder:%2e%2e/%2e%2e/etc", "dataset_not_found"),
        ("imagefolder:missing-folder", "dataset_not_found"),
        ("fashion-mnist:/proc/self", "invalid_dataset"),
        ("imagefolder:a\u0000b", "invalid_dataset"),
        ("upload", "validation_error"),  # no archive attached
    ],
)
def test_invalid_dataset_references_have_stable_codes(
    client: TestClient, dataset: str, code: str
) -> None:
    r = _post(client, b"weights", {**CONFIG, "dataset": dataset})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == code, error
    assert error["field"].startswith("spec.config.dataset"), error
    _nothing_left(client)


# ---------------------------------------------------------------------------- round two
# (issue 15: what an outside attacker and a careless client found)
ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"X-API-Key": "key-bob"}


def _json_job(client: TestClient, uri: str, headers: dict[str, str], **config: Any) -> Any:
    return client.post(
        "/v1/jobs", json={"config": {**CONFIG, **config}, "weights_uri": uri}, headers=headers
    )


def test_weights_uri_reaches_only_your_own_uploads_and_shared_folders_and_refusals_match(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = make_client(api_keys="key-alice,key-bob", shared_weights_dirs=["models"])
    storage, store = storage_of(client), store_of(client)
    (storage.root / "models").mkdir()
    (storage.root / "models" / "shared.safetensors").write_bytes(b"shared weights")
    (storage.root / "private.bin").write_bytes(b"not shared")
    r = client.post(
        "/v1/jobs",
        files={"spec": (None, json.dumps({"config": CONFIG})), "weights": ("w", b"alice's")},
        headers=ALICE,
    )
    alice_job = r.json()["id"]
    # A link planted in the shared folder towards Alice's upload.
    os.symlink(storage.uploads(alice_job) / "weights.bin", storage.root / "models" / "link.bin")
    ghost = "0" * 32
    refused = [
        f"uploads/{alice_job}/weights.bin",  # another key's upload, while its job is queued
        f"storage://uploads/{alice_job}/weights.bin",
        f"uploads/{ghost}/weights.bin",  # a job that never existed
        f"artifacts/{alice_job}/report.json",  # the existence oracle of round one
        f"artifacts/{ghost}/report.json",
        f"uploads/{alice_job}/../{alice_job}/weights.bin",
        "models/../private.bin",
        "private.bin",  # inside the storage root, outside every shared folder
        "models/link.bin",
        "models/missing.safetensors",
        "redis/jobs.rdb",
        "/etc/passwd",
        "../outside",
    ]
    bodies = set()
    for uri in refused:
        r = _json_job(client, uri, BOB)
        assert r.status_code == 422, (uri, r.text)
        bodies.add(r.text)
    # One answer for all of them: nothing tells an existing target from a missing one.
    assert len(bodies) == 1, bodies
    error = json.loads(bodies.pop())["error"]
    assert (error["code"], error["field"]) == ("weights_not_found", "weights_uri")
    assert str(storage.root) not in error["message"]
    assert client.get("/v1/jobs", headers=BOB).json()["total"] == 0

    # The owner may reuse her own upload: a hard link in the new job's folder, same digest.
    r = _json_job(client, f"uploads/{alice_job}/weights.bin", ALICE, target_macs=0.7)
    assert r.status_code == 202, r.text
    reused = store.get(r.json()["id"])
    first = store.get(alice_job)
    assert reused is not None and first is not None
    assert reused.weights == str(storage.uploads(reused.id) / "weights.bin")
    assert reused.weights_sha256 == first.weights_sha256
    client.delete(f"/v1/jobs/{alice_job}", headers=ALICE)  # the first job's folder goes
    assert Path(reused.weights).read_bytes() == b"alice's"  # the second keeps its weights
    # ... and once that upload is gone, naming it is refused like everything else.
    r = _json_job(client, f"uploads/{alice_job}/weights.bin", ALICE)
    assert r.status_code == 422 and r.json()["error"]["code"] == "weights_not_found"
    # A shared file is anyone's.
    assert _json_job(client, "models/shared.safetensors", BOB).status_code == 202


def test_an_idempotency_key_is_bound_to_its_request(client: TestClient) -> None:
    first = _post_keyed(client, b"weights", "k-1", CONFIG)
    assert first.status_code == 202
    # The same request again, its JSON spelled differently: replayed.
    respelled = json.dumps({"config": dict(reversed(list(CONFIG.items())))}, indent=3)
    again = client.post(
        "/v1/jobs",
        files={"spec": (None, respelled), "weights": ("w.safetensors", b"weights")},
        headers={"Idempotency-Key": "k-1"},
    )
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    for other in (
        _post_keyed(client, b"weights", "k-1", {**CONFIG, "target_macs": 0.4}),
        _post_keyed(client, b"other weights", "k-1", CONFIG),
    ):
        assert other.status_code == 422, other.text
        assert other.json()["error"]["code"] == "idempotency_key_reused"
        assert other.json()["error"]["field"] == "Idempotency-Key"
    assert client.get("/v1/jobs").json()["total"] == 1
    assert len(list(storage_of(client).uploads_dir.iterdir())) == 1


def _post_keyed(client: TestClient, weights: bytes, key: str, config: dict[str, Any]) -> Any:
    return client.post(
        "/v1/jobs",
        files={
            "spec": (None, json.dumps({"config": config})),
            "weights": ("w.safetensors", weights),
        },
        headers={"Idempotency-Key": key},
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 1e40),
        ("seed", -1),
        ("input_size", 1024),
        ("recovery.final_iters", 10**12),
        ("recovery.batch_size", 10**6),
        ("data.num_workers", 4096),
        ("latency.runs", 10**9),
        ("latency.batch_sizes", [1, 10**6]),
        ("truncate.max_layers", 10**6),
        ("export.formats", ["onnx"] * 100),
    ],
)
def test_unbounded_work_is_refused_naming_the_field(
    client: TestClient, field: str, value: object
) -> None:
    config: dict[str, Any] = json.loads(json.dumps(CONFIG))
    node = config
    *parents, leaf = field.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    r = _post(client, b"weights", config)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "validation_error"
    assert r.json()["error"]["field"].startswith(f"spec.config.{field}"), r.json()
    _nothing_left(client)


def test_operator_caps_on_steps_and_images(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_job_steps=1000, max_job_images=50_000)
    # 8 steps x 3 tries x 150 iterations alone exceed 1000 steps.
    r = _post(client, b"weights")
    assert r.status_code == 422 and r.json()["error"]["code"] == "job_too_large", r.text
    assert r.json()["error"]["field"] == "spec.config.recovery"
    small = {
        **CONFIG,
        "prune": {"steps": 1, "retries": 0},
        "truncate": {"enabled": False},
        "recovery": {"iters_per_step": 100, "final_iters": 300, "batch_size": 256},
    }
    r = _post(client, b"weights", small)  # 400 steps of 256 images: 102,400 > 50,000
    assert r.status_code == 422 and r.json()["error"]["field"] == "spec.config.recovery.batch_size"
    small["recovery"]["batch_size"] = 64
    assert _post(client, b"weights", small).status_code == 202


def test_downloads_are_the_operators_decision(make_client: Callable[..., TestClient]) -> None:
    closed = make_client()
    wants = {**CONFIG, "dataset": "cifar10", "data": {"download": True}}
    r = _post(closed, b"weights", wants)
    assert r.status_code == 422 and r.json()["error"]["code"] == "download_not_allowed", r.text
    assert r.json()["error"]["field"] == "spec.config.data.download"
    _nothing_left(closed)
    opened = make_client(download_datasets="cifar10")
    assert _post(opened, b"weights", wants).status_code == 202
    r = _post(opened, b"weights", {**wants, "dataset": "food101"})  # not on the list
    assert r.status_code == 422 and r.json()["error"]["code"] == "download_not_allowed"


def _published(client: TestClient, files: dict[str, bytes]) -> str:
    r = _post(client, b"weights")
    job_id = str(r.json()["id"])
    storage, store = storage_of(client), store_of(client)
    out = storage.fresh_scratch(job_id)
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    manifest = [
        {"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
        for n, d in files.items()
    ]
    (out / "manifest.json").write_text(json.dumps({"files": manifest}))
    storage.publish(job_id)
    store.start(job_id, max_redeliveries=2)
    store.finish(job_id, JobState.succeeded)
    return job_id


def test_artifact_downloads_speak_http_properly(client: TestClient) -> None:
    data = bytes(range(256)) * 40
    job_id = _published(client, {"model.onnx": data, "report.json": b"{}"})
    url = f"/v1/jobs/{job_id}/artifacts/model.onnx"
    etag = f'"{hashlib.sha256(data).hexdigest()}"'
    head = client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(data)) and head.headers["etag"] == etag
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304
    assert client.get(url, headers={"If-None-Match": f'W/{etag}, "x"'}).status_code == 304
    assert client.get(url, headers={"If-None-Match": '"other"'}).content == data
    part = client.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == data[10:20]
    for bad in ("bytes=abc", "pages=1-2", "bytes=20-10", "bytes="):
        r = client.get(url, headers={"Range": bad})
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["code"] == "invalid_range", bad
    r = client.get(url, headers={"Range": f"bytes={len(data) + 5}-"})
    assert r.status_code == 416 and r.json()["error"]["code"] == "range_not_satisfiable"
    assert r.headers["content-range"] == f"bytes */{len(data)}"
    # Another owner's job or a missing artifact: HEAD is a 404 like GET.
    assert client.head(f"/v1/jobs/{'0' * 32}/artifacts/model.onnx").status_code == 404


def test_answers_carry_security_headers_and_docs_need_a_key(
    make_client: Callable[..., TestClient],
) -> None:
    keyed = make_client(api_keys="key-bob")
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert keyed.get(path).status_code == 401, path
        assert keyed.get(path, headers=BOB).status_code == 200, path
    docs = keyed.get("/docs", headers=BOB).text + keyed.get("/redoc", headers=BOB).text
    assert "https://" not in docs and "http://" not in docs  # nothing from a CDN
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        r = keyed.get(f"/docs/static/{asset}")
        assert r.status_code == 200 and len(r.content) > 10_000, asset
    assert keyed.get("/docs/static/..%2F..%2Fsettings.py").status_code == 404
    opened = make_client(api_keys="key-bob", public_docs=True)
    assert opened.get("/openapi.json").status_code == 200
    for r in (keyed.get("/v1/jobs", headers=BOB), keyed.get("/v1/jobs"), keyed.get("/healthz")):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-store"


def test_no_server_path_in_refusals_or_job_views(client: TestClient, tmp_path: Path) -> None:
    storage = storage_of(client)
    server_paths = (str(storage.root), str(tmp_path), "/usr/share/datasets")
    (tmp_path / "allowed" / "ds").mkdir(parents=True)
    answers = [
        _post(client, b"w", {**CONFIG, "dataset": "imagefolder:/etc"}),
        _post(client, b"w", {**CONFIG, "dataset": "imagefolder:../../etc"}),
        _post(client, b"w", {**CONFIG, "dataset": "imagefolder:missing"}),
        _post(client, b"w", {**CONFIG, "dataset": f"imagefolder:{tmp_path}/allowed/nope"}),
    ]
    for r in answers:
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert not any(p in message for p in server_paths[:2]), message
        assert "/usr/share" not in message, message
    job = _post(client, b"w", {**CONFIG, "dataset": f"imagefolder:{tmp_path}/allowed/ds"}).json()
    assert job["config"]["dataset"] == f"imagefolder:{tmp_path}/allowed/ds"  # as sent
    view = client.get(f"/v1/jobs/{job['id']}").text + client.get("/v1/jobs").text
    assert str(storage.root) not in view


def test_failed_jobs_show_no_server_paths_nor_server_folder_names(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    """``imagefolder:<a dataset root>`` and a built-in dataset missing on the server fail in
    the worker (the real library): their errors name neither server folders nor paths."""
    root = tmp_path / "allowed"
    for secret in ("secret-project-a", "secret-project-b"):
        (root / secret).mkdir(parents=True)  # folders without images
    client = make_client()
    store, storage = store_of(client), storage_of(client)
    for dataset, code in ((f"imagefolder:{root}", "invalid_dataset"), ("cifar10", None)):
        r = _post(client, b"weights", {**CONFIG, "dataset": dataset})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        record = store.get(job_id)
        assert record is not None
        run_job(record.payload(), store=store, storage=storage, max_redeliveries=2, can_retry=False)
        failed = store.get(job_id)
        assert failed is not None and failed.error is not None, failed
        if code:
            assert failed.error.code == code
        message = failed.error.message
        beyond_the_reference = message.replace(dataset, "")  # the client's own words may stay
        assert "secret-project" not in message and str(tmp_path) not in beyond_the_reference
        assert str(Path.home()) not in message and "/.cache" not in message, message
        assert dataset.partition(":")[0] in message
        assert client.get(f"/v1/jobs/{job_id}").json()["error"]["message"] == message


def test_the_published_report_shows_the_clients_reference_not_the_server_path(
    tmp_path: Path,
) -> None:
    from flow_compress.artifacts import verify_manifest, write_manifest
    from flow_compress.config import CompressionConfig
    from flow_compress.report import write_report
    from tests.flow_compress.test_report import make_report
    from worker.jobs import JobPayload
    from worker.tasks import client_report

    server = f"imagefolder:{tmp_path}/storage/uploads/{'a' * 32}/dataset/pets"
    client_config = CompressionConfig(model="resnet18", dataset="upload", num_classes=2)
    ran = client_config.model_copy(update={"dataset": server})
    out = tmp_path / "out"
    names = write_report(make_report(config=ran, dataset=server), out)
    write_manifest(out, names)
    payload = JobPayload(job_id="a" * 32, config=client_config, dataset_path=server)
    report = client_report(out, payload)
    assert report.dataset == "upload" and report.config == client_config
    for name in ("report.json", "report.md", "manifest.json"):
        assert str(tmp_path) not in (out / name).read_text(), name
    assert verify_manifest(out) == []

"""Malicious and broken input, end to end through the real API and, for what only the
worker can judge (the content of weights files), through ``run_job`` with the real library.

Each refusal must carry a stable error code, leave no files behind (uploads, scratch,
artifacts) and leave the API serving. Complements test_api.py and test_archives.py (archive
traversal by name, oversize uploads, malformed multipart), which are not repeated here.
"""

from __future__ import annotations

import io
import json
import math
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

from flow_compress.models import build_model
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

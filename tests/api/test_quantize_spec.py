"""The job spec embeds the library's CompressionConfig, quantization options included: a bad
option is refused with 422 and the project's error shape before anything is stored."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import storage_of

CONFIG = {"model": "resnet18", "dataset": "digits", "target_macs": 0.5}


def _post(client: TestClient, config: dict[str, Any]) -> Any:
    files = {
        "spec": (None, json.dumps({"config": config}), "application/json"),
        "weights": ("w.safetensors", b"weights", "application/octet-stream"),
    }
    return client.post("/v1/jobs", files=files)


@pytest.mark.parametrize(
    ("quantize", "extra", "field"),
    [
        ({"modes": ["int4"]}, {}, "spec.config.quantize.modes.0"),
        ({"modes": ["fp16"], "bits": 8}, {}, "spec.config.quantize.bits"),
        (
            {"modes": ["int8_static"], "min_agreement": 101},
            {},
            "spec.config.quantize.min_agreement",
        ),
        ({"modes": ["fp16", "fp16"]}, {}, "spec.config.quantize"),
        ({"modes": ["fp16"]}, {"export": {"formats": ["torchscript"]}}, "spec.config"),
    ],
)
def test_bad_quantize_options_are_422_with_the_field(
    client: TestClient, quantize: dict[str, Any], extra: dict[str, Any], field: str
) -> None:
    r = _post(client, {**CONFIG, **extra, "quantize": quantize})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["code"], error["field"]) == ("validation_error", field)
    assert error["message"]
    assert list(storage_of(client).uploads_dir.iterdir()) == []
    assert client.get("/v1/jobs").json()["total"] == 0


def test_quantize_options_travel_with_the_job(client: TestClient) -> None:
    quantize = {"modes": ["int8_static", "fp16"], "calibration_samples": 128}
    r = _post(client, {**CONFIG, "quantize": quantize})
    assert r.status_code == 202, r.text
    saved = client.get(f"/v1/jobs/{r.json()['id']}").json()["config"]["quantize"]
    assert saved["modes"] == ["int8_static", "fp16"] and saved["calibration_samples"] == 128

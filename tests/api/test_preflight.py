"""POST /v1/preflight and ``submit``'s preflight: a real child process runs the library's
check on a real model (resnet18 at 16 px, one grey channel) with real weights; the API
process stays torch-free. Checked: a passing and a failing answer, errors with stable codes
before and after the child, the busy and timeout refusals, and that nothing of a preflight
is left on disk."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from api.auth import PUBLIC_OWNER
from api.cli import EXIT_PREFLIGHT
from api.cli import app as cli
from flow_compress.arch.models import build_model, save_weights
from tests.api.conftest import storage_of, store_of
from tests.api.test_client import server_url

__all__ = ["server_url"]

pytestmark = pytest.mark.timeout(300)

CONFIG: dict[str, Any] = {
    "model": "resnet18",
    "dataset": "digits",
    "in_chans": 1,
    "input_size": 16,
    "target_macs": 0.5,
    "export": {"formats": ["torchscript"]},
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("preflight") / "resnet18.safetensors"
    save_weights(build_model("resnet18", 10, in_chans=1, input_size=16), path)
    return path


def _post(client: TestClient, config: dict[str, Any], weights: Path | None) -> Any:
    spec = json.dumps({"config": config})
    if weights is None:
        headers = {"content-type": "application/json"}
        return client.post("/v1/preflight", content=spec, headers=headers)
    return client.post(
        "/v1/preflight",
        files={"spec": (None, spec, "application/json"), "weights": ("w", weights.read_bytes())},
    )


def _leftovers(client: TestClient) -> list[str]:
    root = storage_of(client).root
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "preflight" in str(p)) + [
        str(p.relative_to(root)) for p in (root / "uploads").glob("*")
    ]


def test_a_failing_check_is_a_200_report_that_says_why(client: TestClient, weights: Path) -> None:
    # A 20 % cap per layer cannot remove half the MACs, and the checkpoint has 10 classes
    # where the job says 7: two checks fail, and the answer names both.
    config = {**CONFIG, "num_classes": 7, "prune": {"max_layer_ratio": 0.2}}
    r = _post(client, config, weights)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["ok"] is False
    assert report["weights"] == "bad" and "fc" in report["weights_error"]
    assert report["target_reachable"] is False and report["reachable_ratio"] > 0.5
    assert [(e["format"], e["passed"]) for e in report["exports"]] == [("torchscript", True)]
    assert _leftovers(client) == []


def test_refusals_keep_stable_codes_and_leave_nothing(
    make_client: Callable[..., TestClient], weights: Path
) -> None:
    client = make_client(preflight_timeout_s=0.5, preflight_queue_s=0.2)
    # Refused before any child runs: the same static validation as a job.
    r = _post(client, {**CONFIG, "model": "resnet181"}, weights)
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_model"
    assert "resnet18" in r.json()["error"]["message"]  # the close match is suggested
    r = _post(client, {**CONFIG, "target_macs": 1.5}, None)
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    # A child that runs past the limit is stopped: 504 timeout.
    r = _post(client, CONFIG, weights)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
    # Every slot taken: 503 with Retry-After, before the body is read.
    service = client.app.state.preflight  # type: ignore[attr-defined]
    service._slots._value = 0  # the one slot held by a preflight that is still running
    try:
        r = _post(client, CONFIG, weights)
    finally:
        service._slots._value = 1
    assert r.status_code == 503 and r.json()["error"]["code"] == "preflight_busy"
    assert int(r.headers["retry-after"]) >= 1
    assert _leftovers(client) == []


def test_submit_preflights_and_submits_only_a_job_that_passes(
    client: TestClient, server_url: str, weights: Path, tmp_path: Path
) -> None:
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(CONFIG))
    bad.write_text(json.dumps({**CONFIG, "prune": {"max_layer_ratio": 0.2}}))
    runner = CliRunner()
    common = ["submit", "--server", server_url, "--weights", str(weights)]

    refused = runner.invoke(cli, [*common, "--config", str(bad)])
    assert refused.exit_code == EXIT_PREFLIGHT, refused.output
    assert "NOT reachable" in refused.output and "preflight_failed" in refused.output
    assert store_of(client).list(PUBLIC_OWNER)[1] == 0  # nothing was submitted

    accepted = runner.invoke(cli, [*common, "--config", str(good)])
    assert accepted.exit_code == 0, accepted.output
    assert "preflight: ok" in accepted.output and "queued" in accepted.output
    records, total = store_of(client).list(PUBLIC_OWNER)
    assert total == 1 and records[0].config.model == "resnet18"

    skipped = runner.invoke(cli, [*common, "--config", str(bad), "--no-preflight"])
    assert skipped.exit_code == 0 and "preflight" not in skipped.output
    assert store_of(client).list(PUBLIC_OWNER)[1] == 2

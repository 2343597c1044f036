"""Webhooks without a compression run: submission checks, and the delivery machinery
(``worker.webhooks.WebhookDispatcher``) against a real Redis and a real HTTP receiver, for a
job cancelled while queued (a terminal state that needs no worker). The end-to-end run with
a real worker and succeeded jobs is in test_ops_e2e.py."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.client import verify_signature
from tests.api.conftest import storage_of, store_of
from tests.api.receiver import receiver
from worker.notify import DeliveryState
from worker.webhooks import DELIVERY_HEADER, SIGNATURE_HEADER, WebhookDispatcher, backoff_s

SECRET = "s3cret-for-the-tests-0123456789"
CONFIG: dict[str, Any] = {"model": "resnet18", "dataset": "digits", "target_macs": 0.5}


def _weights(client: TestClient) -> str:
    path = storage_of(client).root / "models" / "w.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not read before the job runs")
    return "models/w.bin"


def _submit(client: TestClient, notify: dict[str, Any]) -> Any:
    return client.post(
        "/v1/jobs",
        json={"config": CONFIG, "weights_uri": _weights(client), "notify": notify},
    )


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("ftp://example.com/hook", "invalid_webhook_url"),
        ("file:///etc/passwd", "invalid_webhook_url"),
        ("javascript:alert(1)", "invalid_webhook_url"),
        ("http:///no-host", "invalid_webhook_url"),
        ("http://user:pw@example.com/hook", "invalid_webhook_url"),
        ("http://example.com:99999/hook", "invalid_webhook_url"),
    ],
)
def test_non_http_urls_are_refused_at_submission(client: TestClient, url: str, code: str) -> None:
    r = _submit(client, {"url": url, "secret": SECRET})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["field"] == "notify.url"
    assert store_of(client).list("public")[1] == 0  # nothing was created


def test_the_allow_list_refuses_other_hosts(make_client: Callable[..., TestClient]) -> None:
    client = make_client(webhook_allowed_hosts=["hooks.example.com", "*.ci.example.org"])
    for url in ("https://hooks.example.com/x", "https://a.b.ci.example.org/y"):
        assert _submit(client, {"url": url, "secret": SECRET}).status_code == 202
    for url in ("https://evil.example.com/x", "https://ci.example.org.evil/", "http://127.0.0.1/"):
        r = _submit(client, {"url": url, "secret": SECRET})
        assert r.status_code == 422, url
        assert r.json()["error"]["code"] == "webhook_host_not_allowed"


def test_notify_is_strict_and_the_secret_is_never_shown(client: TestClient) -> None:
    for bad in (
        {"url": "https://example.com/h", "secret": SECRET, "extra": 1},
        {"url": "https://example.com/h"},
        {"url": "https://example.com/h", "secret": "short"},
    ):
        r = _submit(client, bad)
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", bad
    r = _submit(client, {"url": "https://example.com/h", "secret": SECRET})
    assert r.status_code == 202
    job_id = r.json()["id"]
    for view in (r.text, client.get(f"/v1/jobs/{job_id}").text, client.get("/v1/jobs").text):
        assert SECRET not in view
    assert r.json()["notify"] == {"url": "https://example.com/h"}
    assert r.json()["delivery"] is None  # nothing to deliver until the job ends
    assert SECRET not in repr(store_of(client).get(job_id))


def _cancelled_job(client: TestClient, url: str) -> str:
    r = _submit(client, {"url": url, "secret": SECRET})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    assert client.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"
    return job_id


def test_a_delivery_is_retried_until_it_succeeds_with_one_delivery_id(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(webhook_timeout_s=0.5, webhook_backoff_s=0.05)
    settings = client.app.state.settings  # type: ignore[attr-defined]
    with receiver([500, "slow", 503, 200], slow_s=1.5) as hook:
        job_id = _cancelled_job(client, hook.url)
        view = client.get(f"/v1/jobs/{job_id}").json()
        assert view["delivery"]["state"] == "pending"
        assert view["delivery"]["event"] == "job.cancelled"
        dispatcher = WebhookDispatcher(store_of(client), settings)
        deadline = time.monotonic() + 30
        while client.get(f"/v1/jobs/{job_id}").json()["delivery"]["state"] == "pending":
            assert time.monotonic() < deadline
            dispatcher.run_once()
            time.sleep(0.02)
        dispatcher.close()
        delivery = client.get(f"/v1/jobs/{job_id}").json()["delivery"]
        assert delivery["state"] == "delivered", delivery
        assert delivery["attempts"] == 4
        assert delivery["last_status"] == 200 and delivery["last_error"] is None
        assert delivery["delivered_at"] >= delivery["created_at"]
        assert len(hook.requests) == 4
        ids = {req.headers[DELIVERY_HEADER] for req in hook.requests}
        assert ids == {delivery["id"]}
        for req in hook.requests:
            assert verify_signature(SECRET, req.body, req.headers[SIGNATURE_HEADER])
            assert not verify_signature(
                "another-secret-0123456789", req.body, req.headers[SIGNATURE_HEADER]
            )
            assert not verify_signature(SECRET, req.body + b" ", req.headers[SIGNATURE_HEADER])
            stale = time.time() + 3600  # a replay an hour later
            assert not verify_signature(SECRET, req.body, req.headers[SIGNATURE_HEADER], now=stale)
        payload = json.loads(hook.requests[-1].body)
        assert payload["id"] == delivery["id"] and payload["event"] == "job.cancelled"
        assert payload["job"]["id"] == job_id and payload["job"]["state"] == "cancelled"
        assert SECRET not in hook.requests[-1].body.decode()
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"


def test_a_claimed_delivery_whose_dispatcher_died_comes_back_after_its_lease(
    client: TestClient,
) -> None:
    settings = client.app.state.settings  # type: ignore[attr-defined]
    with receiver([200]) as hook:
        job_id = _cancelled_job(client, hook.url)
        dead = WebhookDispatcher(store_of(client), settings)
        assert dead.claim() == job_id  # ... and dies before sending
        other = WebhookDispatcher(store_of(client), settings)
        assert other.claim() is None  # leased: not sent twice meanwhile
        lease_over = time.time() + 2 * settings.webhook_timeout_s + 31
        assert other.claim(now=lease_over) == job_id
        assert other.deliver(job_id).state is DeliveryState.delivered  # type: ignore[union-attr]
        assert len(hook.requests) == 1
        other.close()
        dead.close()


def test_redirects_are_not_followed_and_the_delivery_fails_after_the_bound(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(webhook_backoff_s=0.05, webhook_max_elapsed_s=1.0)
    settings = client.app.state.settings  # type: ignore[attr-defined]
    with receiver([200]) as elsewhere, receiver(["redirect"], redirect_to=elsewhere.url) as hook:
        job_id = _cancelled_job(client, hook.url)
        dispatcher = WebhookDispatcher(store_of(client), settings)
        deadline = time.monotonic() + 30
        while client.get(f"/v1/jobs/{job_id}").json()["delivery"]["state"] == "pending":
            assert time.monotonic() < deadline
            dispatcher.run_once()
            time.sleep(0.02)
        dispatcher.close()
        delivery = client.get(f"/v1/jobs/{job_id}").json()["delivery"]
        assert delivery["state"] == "failed"
        assert delivery["last_status"] == 302 and "not followed" in delivery["last_error"]
        assert delivery["attempts"] >= 2
        assert elsewhere.requests == []
        # Retries stopped at the bound: nothing is due any more.
        assert store_of(client).r.zscore(store_of(client).webhooks_due_key, job_id) is None


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    import random

    rng = random.Random(0)
    for attempt, full in ((1, 2.0), (2, 4.0), (3, 8.0), (10, 60.0)):
        delays = [backoff_s(attempt, 2.0, 60.0, rng) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays)
        assert max(delays) - min(delays) > full / 4  # jittered

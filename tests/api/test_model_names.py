"""The API validates model names torch-free against the catalogue workers publish
(``worker.catalogue``): before any is published, registered names and ``source:name``
references pass on their syntax; after, unknown and ambiguous names are refused at
submission with ``unsupported_model`` and a fix. Jobs whose weights come from the worker's
caches (``hf-hub:``, ``pretrained``) need no upload."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from flow_compress.arch.catalogue import Catalogue
from tests.api.conftest import store_of
from tests.api.test_api import error_of, post_job
from worker.catalogue import catalogue_key, publish


def config(model: str) -> dict[str, Any]:
    return {"model": model, "dataset": "digits", "target_macs": 0.5}


@pytest.fixture(scope="module")
def published() -> str:
    # A small catalogue, as a worker would publish it (the real one: test_names.py).
    return Catalogue(
        versions={"timm": "1.0"},
        registered=("resnet18", "efficientnet_b0"),
        plugin=("acme_tinynet",),
        timm=("tf_efficientnet_lite0", "efficientnet_b0", "efficientnet_b5"),
        torchvision=("efficientnet_b0", "efficientnet_b5", "regnet_x_400mf"),
    ).model_dump_json()


def test_before_a_catalogue_is_published_prefixed_names_pass_on_syntax(
    client: TestClient,
) -> None:
    assert store_of(client).r.get(catalogue_key(store_of(client).prefix)) is None
    assert post_job(client, config("resnet18")).status_code == 202
    assert post_job(client, config("timm:tf_efficientnet_lite0")).status_code == 202
    r = post_job(client, config("tf_efficientnet_lite0"))
    assert r.status_code == 422
    assert error_of(r)["code"] == "unsupported_model"
    assert "timm:tf_efficientnet_lite0" in error_of(r)["message"]
    assert error_of(r)["field"] == "spec.config.model"
    assert error_of(post_job(client, config("nosuch:x")))["code"] == "unsupported_model"


def test_the_published_catalogue_decides(client: TestClient, published: str) -> None:
    store = store_of(client)
    publish(store.r, store.prefix, published)
    for ok in ("resnet18", "acme_tinynet", "tf_efficientnet_lite0", "torchvision:regnet_x_400mf"):
        assert post_job(client, config(ok)).status_code == 202, ok
    refused = {
        "timm:nope_net": "timm has no model 'nope_net'",
        "tf_efficientnet_lite9": "did you mean: timm:tf_efficientnet_lite0",
        "efficientnet_b5": "add a prefix, timm:efficientnet_b5 or torchvision:efficientnet_b5",
    }
    for name, words in refused.items():
        r = post_job(client, config(name))
        assert r.status_code == 422, name
        assert error_of(r)["code"] == "unsupported_model"
        assert words in error_of(r)["message"]
    # a newer publication replaces it
    newer = json.loads(published) | {"timm": ["nope_net"]}
    publish(store.r, store.prefix, json.dumps(newer))
    assert post_job(client, config("timm:nope_net")).status_code == 202


def test_hub_and_pretrained_jobs_need_no_weights(client: TestClient) -> None:
    def without_weights(cfg: dict[str, Any]) -> Any:
        spec = json.dumps({"config": cfg})
        return client.post("/v1/jobs", files={"spec": (None, spec, "application/json")})

    assert without_weights(config("hf-hub:acme/lite0-digits")).status_code == 202
    assert without_weights(config("timm:resnet18") | {"pretrained": True}).status_code == 202
    # the CI client sends a JSON body when it uploads nothing
    hub_json = client.post("/v1/jobs", json={"config": config("hf-hub:acme/lite0-digits")})
    assert hub_json.status_code == 202, hub_json.text
    assert client.post("/v1/jobs", json={"config": config("resnet18")}).status_code == 422
    r = without_weights(config("resnet18"))
    assert r.status_code == 422
    assert error_of(r)["field"] == "weights"

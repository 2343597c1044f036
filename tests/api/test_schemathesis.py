"""Property-based testing of the HTTP API from its own OpenAPI document (schemathesis).

Over a thousand generated requests across every route, in three set-ups: no API keys (open
server), API keys with a valid key, API keys without one. Each response is checked by
schemathesis: no 5xx, status code declared in the spec, body and headers conforming to the
declared schema, schema-invalid requests refused with 4xx, declared authentication enforced.
Schemathesis's ``positive_data_acceptance`` check is left out: the spec cannot say that
``config.model`` must be a registered architecture or that a weights path must exist, so a
schema-valid request is not necessarily an acceptable one (those refusals are 422s with a
declared body, which the conformance checks still verify).

Transport: schemathesis' ASGI transport against the real application object
(``create_app``) with the real Redis job store and the real Celery producer. In-process
because it runs about ten times as many cases per CI second as HTTP through uvicorn would,
and an unhandled exception surfaces here with its traceback instead of as a bare 500; what
it does not cover (uvicorn's HTTP parsing, real sockets) is exercised by the load and
end-to-end tests, which use a real uvicorn on loopback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings

from tests.api.conftest import storage_of, store_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EXAMPLES_PER_OPERATION = 50
MIN_CASES = 1000
KEY = "key-schemathesis"


def _run(client: TestClient, headers: dict[str, str] | None) -> int:
    """Every operation of the served spec, EXAMPLES_PER_OPERATION cases each (fewer for
    operations without inputs); returns the number of cases sent."""
    # With keys configured the document itself needs one (the open server ignores it).
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app, headers={"X-API-Key": KEY})
    sent = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,  # CI must be reproducible: same cases on every run
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            nonlocal sent
            sent += 1
            case.call_and_validate(
                headers=headers,
                excluded_checks=[schemathesis.checks.positive_data_acceptance],
            )

        check()
    return sent


def test_generated_requests_never_5xx_and_conform_to_the_spec(
    make_client: Callable[..., TestClient],
) -> None:
    cases = 0
    open_server = make_client()
    cases += _run(open_server, None)
    keyed = make_client(api_keys=KEY)
    cases += _run(keyed, {"X-API-Key": KEY})
    cases += _run(keyed, None)
    print(f"schemathesis: {cases} generated cases")
    assert cases >= MIN_CASES, cases
    # Nothing half-done left behind: an upload folder exists only for a job that exists.
    for client in (open_server, keyed):
        store = store_of(client)
        for folder in storage_of(client).uploads_dir.iterdir():
            assert store.get(folder.name) is not None, folder


def _bounded_fields(
    schema: dict[str, Any], components: dict[str, Any], path: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every numeric, string and array field of a JobSpec schema, with its dotted path."""
    if "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[1]]
    for option in schema.get("anyOf", []):
        if option.get("type") != "null":
            yield from _bounded_fields(option, components, path)
    if schema.get("type") == "object":
        for name, sub in schema.get("properties", {}).items():
            yield from _bounded_fields(sub, components, f"{path}.{name}" if path else name)
    elif schema.get("type") in ("integer", "number", "string", "array"):
        yield path, schema


def test_every_spec_field_has_an_upper_bound_and_refuses_values_past_it(
    make_client: Callable[..., TestClient],
) -> None:
    """The property behind the bounds: no number, string or list a client sends is
    unbounded, and one past any bound is a 422 naming that field (no job, no 5xx)."""
    client = make_client(shared_weights_dirs=["models"])
    models = storage_of(client).root / "models"
    models.mkdir()
    (models / "w.safetensors").write_bytes(b"w")
    doc = client.get("/openapi.json").json()
    components = doc["components"]["schemas"]
    fields = dict(_bounded_fields(components["JobSpec"], components, ""))
    unbounded = [
        path
        for path, schema in fields.items()
        if not ({"maximum", "exclusiveMaximum", "maxLength", "maxItems", "enum", "pattern"}
                & set(schema) or schema.get("items", {}).get("enum"))
    ]  # fmt: skip
    assert unbounded == [], unbounded
    base = {"model": "resnet18", "dataset": "digits"}
    checked = 0
    for path, schema in fields.items():
        if "maximum" not in schema and "exclusiveMaximum" not in schema:
            continue
        too_big = schema.get("maximum", schema.get("exclusiveMaximum"))
        too_big = too_big + 1 if schema.get("type") == "integer" else too_big * 2 + 1
        spec: dict[str, Any] = {"config": dict(base), "weights_uri": "models/w.safetensors"}
        node = spec
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = too_big
        r = client.post("/v1/jobs", json=spec)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error"]["field"] == path, (path, r.json())
        checked += 1
    assert checked >= 40, checked
    assert client.get("/v1/jobs").json()["total"] == 0


def test_the_spec_declares_the_error_responses(make_client: Callable[..., TestClient]) -> None:
    doc = make_client().get("/openapi.json").json()
    paths = doc["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if path.startswith("/v1/"):
                assert {"500", "503"} <= set(responses), (method, path)
                # Open server: no route requires a key, none answers 401.
                assert "401" not in responses and "security" not in operation
            for status, response in responses.items():
                if status.startswith(("4", "5")):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, status)
    assert "404" in paths["/v1/jobs/{job_id}"]["delete"]["responses"]
    assert {"413", "415", "422", "429"} <= set(paths["/v1/jobs"]["post"]["responses"])
    for result in ("report", "artifacts", "artifacts/{name}"):
        assert {"404", "409", "410"} <= set(
            paths[f"/v1/jobs/{{job_id}}/{result}"]["get"]["responses"]
        )
    assert "/v1/usage" in paths
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    keyed = make_client(api_keys=KEY).get("/openapi.json", headers={"X-API-Key": KEY}).json()
    assert "401" in keyed["paths"]["/v1/jobs"]["get"]["responses"]
    assert keyed["components"]["securitySchemes"]

"""The OpenAPI document lists the errors every route can give (api/openapi_docs.py), and a 405
names every method of the path (api/errors.py). The fuzzer (tests/e2e/test_openapi_fuzz.py)
checks the whole; these pin the parts quickly."""
import pytest
from fastapi.testclient import TestClient

from api.main import app

ERROR_REF = "#/components/schemas/ErrorResponse"


@pytest.fixture(scope="module")
def spec():
    return TestClient(app).get("/openapi.json").json()


def _operations(spec):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield f"{method.upper()} {path}", operation


def _schema_ref(response):
    return response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")


def test_every_error_response_has_this_apis_error_shape(spec):
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for label, operation in _operations(spec):
        for status, response in operation["responses"].items():
            if label == "GET /readyz":
                continue  # its 503 is the probe's own report (Health)
            if status.startswith(("4", "5")) and "application/json" in response.get("content", {}):
                assert _schema_ref(response) == ERROR_REF, (label, status)


def test_keyed_routes_document_401_and_their_bodies_400_413_422(spec):
    for label, operation in _operations(spec):
        codes = set(operation["responses"])
        if operation.get("security"):
            assert "401" in codes, label
        if label.startswith(("GET /v1/jobs", "POST /v1/jobs")):  # they read the job store
            assert "503" in codes, label
        if "requestBody" in operation:
            assert {"400", "413", "422"} <= codes, label
    events = spec["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]
    assert {"401", "404", "422"} <= set(events)


def test_refusals_of_switched_off_features_are_documented_403s(spec):
    # Not 422 (the request matches the document) and not 5xx (nothing failed).
    secret = spec["paths"]["/v1/webhooks/secret"]["get"]["responses"]
    assert "webhooks_not_configured" in secret["403"]["description"]
    for path in ("/v1/jobs", "/v1/jobs/batch"):
        refused = spec["paths"][path]["post"]["responses"]["403"]["description"]
        for code in ("source_forbidden", "webhook_address_blocked", "webhooks_not_configured",
                     "credentials_not_accepted"):
            assert code in refused, (path, code)


def test_the_cursor_has_a_documented_pattern(spec):
    (cursor,) = [p for p in spec["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "cursor"]
    assert cursor["schema"]["anyOf"][0]["pattern"] == "^[0-9]{15}:[0-9a-f-]{36}$"


@pytest.mark.parametrize("method, path, allow", [
    ("OPTIONS", "/v1/jobs", "GET, POST"),  # two routes share the path
    ("OPTIONS", "/v1/jobs/batch", "POST"),  # its own path, not /v1/jobs/{job_id}'s
    ("DELETE", "/v1/jobs/some-id", "GET"),
    ("PUT", "/readyz", "GET"),
])
def test_405_allow_lists_every_method_of_the_path(method, path, allow):
    r = TestClient(app).request(method, path)
    assert r.status_code == 405 and r.headers["allow"] == allow
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_an_unreadable_body_is_400_malformed_body(settings, keys):
    from shared.settings import get_settings

    app.dependency_overrides[get_settings] = lambda: settings
    try:
        r = TestClient(app, headers=keys.headers("alice")).post(
            "/v1/jobs", content=b"\xff\xfe{", headers={"Content-Type": "application/json"})
    finally:
        app.dependency_overrides.clear()
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_body"

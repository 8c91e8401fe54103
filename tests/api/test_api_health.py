"""/healthz and /readyz."""
from fastapi.testclient import TestClient

from api.main import app
from deploy.local import free_port
from shared.settings import get_settings


def _client_for(settings):
    app.dependency_overrides[get_settings] = lambda: settings
    return TestClient(app, raise_server_exceptions=False)


def test_healthz_needs_nothing(make_settings):
    dead = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    try:
        r = _client_for(dead).get("/healthz")
    finally:
        app.dependency_overrides.clear()
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_readyz_when_redis_and_s3_answer(settings, storage):
    try:
        r = _client_for(settings).get("/readyz")
    finally:
        app.dependency_overrides.clear()
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "checks": {"redis": "ok", "s3": "ok"}}


def test_readyz_503_when_redis_is_down(make_settings, storage):
    settings = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    try:
        r = _client_for(settings).get("/readyz")
    finally:
        app.dependency_overrides.clear()
    assert r.status_code == 503
    assert r.json()["checks"] == {"redis": "unreachable", "s3": "ok"}


def test_readyz_503_when_s3_is_down(make_settings):
    settings = make_settings(s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    try:
        r = _client_for(settings).get("/v1/readyz")  # also served under /v1
    finally:
        app.dependency_overrides.clear()
    assert r.status_code == 503
    assert r.json()["checks"] == {"redis": "ok", "s3": "unreachable"}


def test_metrics_in_prometheus_text_format(settings, storage):
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = _client_for(settings).get("/metrics")
    finally:
        app.dependency_overrides.clear()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"attnonly_jobs", "attnonly_queue_depth", "attnonly_live_workers", "attnonly_stage_seconds",
            "attnonly_bytes"} <= names


class _CountingProbe:
    def __init__(self, answers):
        self.answers, self.pings = list(answers), 0

    def ping(self) -> bool:
        self.pings += 1
        return self.answers.pop(0)


def test_readyz_asks_s3_once_per_few_seconds_and_keeps_a_fresh_success(settings):
    """Under a burst of probes, one S3 request; a probe that times out right after S3 answered
    does not flip the service to not-ready."""
    from api.deps import get_probe_storage

    reached = _CountingProbe([True, False])
    never = _CountingProbe([False, False])
    try:
        client = _client_for(settings)
        app.dependency_overrides[get_probe_storage] = lambda: reached
        answers = [client.get("/readyz").status_code for _ in range(5)]
        app.dependency_overrides[get_probe_storage] = lambda: never
        down = [client.get("/readyz").status_code for _ in range(2)]
    finally:
        app.dependency_overrides.clear()
    assert answers == [200] * 5 and reached.pings == 1
    assert down == [503, 503] and never.pings == 2  # failures are not kept: each probe asks again

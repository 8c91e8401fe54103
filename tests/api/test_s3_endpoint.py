"""source_credentials.s3_endpoint_url at submission: its documented pattern against the check
(every URL the pattern allows is accepted or refused for its address, never as malformed), a
literal blocked address refused with 403 s3_endpoint_blocked (a batch whole), and the endpoint
sealed in the record, never in clear, never returned."""
import json
import re

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings, strategies as st

from api.deps import get_queue, get_settings
from api.main import app
from api.schemas import JobCreate
from api.url_patterns import S3_ENDPOINT_PATTERN
from shared.credentials import new_key, unseal
from shared.fetch import FetchError
from shared.jobs import JobStore, redis_client
from shared.s3_endpoint import check_endpoint
from recording_queue import RecordingQueue  # tests/ is on sys.path (pytest's rootdir-based import)

SOURCE = "s3://users-bucket/model/"
KEYS = {"s3_access_key": "user-key", "s3_secret_key": "user-secret"}
FUZZ = settings(max_examples=400, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.from_regex(S3_ENDPOINT_PATTERN, fullmatch=True).filter(lambda url: len(url) <= 2048))
def test_every_endpoint_of_the_pattern_is_accepted_or_blocked_for_its_address(url):
    body = JobCreate(source_url=SOURCE, source_credentials={**KEYS, "s3_endpoint_url": url})
    assert body.source_credentials.s3_endpoint_url == url
    try:
        check_endpoint(url, (), resolve_names=False)
    except FetchError as exc:
        assert exc.code == "s3_endpoint_blocked", (url, exc.message)


def test_the_schema_publishes_the_pattern():
    schema = JobCreate.model_json_schema()
    credentials = schema["$defs"]["SourceCredentialsIn"]["properties"]["s3_endpoint_url"]
    assert credentials["anyOf"][0]["pattern"] == S3_ENDPOINT_PATTERN


@pytest.mark.parametrize("url", ["https://s3.example.org", "http://minio.internal.example:9000",
                                 "https://account.r2.cloudflarestorage.com/", "https://8.8.8.8:443/s3"])
def test_ordinary_endpoints_match(url):
    assert re.fullmatch(S3_ENDPOINT_PATTERN, url)


@pytest.mark.parametrize("url", ["https://s3.example.org/?x=1", "https://s3.example.org#f", "ftp://s3.example.org",
                                 "https://user:pw@s3.example.org", "https://s3.example.org:99999"])
def test_what_the_pattern_leaves_out(url):
    assert not re.fullmatch(S3_ENDPOINT_PATTERN, url)


@pytest.fixture
def client(make_settings, keys):
    settings = make_settings(credentials_key=new_key(), rate_limit_jobs=0, fetch_allow_hosts=[])
    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides[get_queue] = lambda: RecordingQueue()
    try:
        yield TestClient(app, headers=keys.headers("alice")), settings
    finally:
        app.dependency_overrides.clear()


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9000", "http://169.254.169.254/", "http://10.0.0.7:9000",
                                      "http://[::1]:9000", "http://[fd00::1]"])
def test_a_literal_blocked_endpoint_is_refused(client, endpoint):
    client, _ = client
    body = {"source_url": SOURCE, "source_credentials": {**KEYS, "s3_endpoint_url": endpoint}}
    refused = client.post("/v1/jobs", json=body)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "s3_endpoint_blocked", refused.text
    before = len(client.get("/v1/jobs").json()["jobs"])
    batch = client.post("/v1/jobs/batch", json=[{"source_url": "https://example.org/m/"}, body])
    assert batch.status_code == 403 and batch.json()["error"]["code"] == "s3_endpoint_blocked"
    assert batch.json()["error"]["message"].startswith("[1].")
    assert len(client.get("/v1/jobs").json()["jobs"]) == before


def test_the_endpoint_is_sealed_and_never_returned(client, caplog):
    client, settings = client
    endpoint = "https://users-s3.example.org:8443/storage"
    body = {"source_url": SOURCE, "source_credentials": {**KEYS, "s3_endpoint_url": endpoint}}
    created = client.post("/v1/jobs", json=body)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    store = JobStore(redis_client(settings.redis_url), settings.redis_key_prefix)
    raw = store.redis.get(f"{settings.redis_key_prefix}:job:{job_id}")
    assert "users-s3" not in raw and json.loads(raw)["sealed_credentials"]
    shown = client.get(f"/v1/jobs/{job_id}").text + client.get("/v1/jobs").text + created.text
    assert "users-s3" not in shown
    opened = unseal(store.get(job_id).sealed_credentials, settings.credentials_key)
    assert settings.fetch_limits("alice", opened).s3_endpoint_url == endpoint
    assert "users-s3" not in caplog.text

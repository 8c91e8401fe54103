"""Per-job source credentials: sealed in Redis (the raw record never holds them in clear),
never returned by an endpoint, dropped when the job ends, opened by the worker for the fetch."""
import json

from fastapi.testclient import TestClient

from api.deps import get_queue, get_settings
from api.main import app
from shared.credentials import SourceCredentials, new_key, seal, unseal
from shared.jobs import JobState, JobStore, redis_client
from recording_queue import RecordingQueue  # tests/ is on sys.path (pytest's rootdir-based import)

TOKEN = "hf_secret_token_for_tests_0123456789"


def test_seal_round_trip_and_key_mismatch():
    key = new_key()
    from pydantic import SecretStr

    sealed = seal(SourceCredentials(hub_token=TOKEN), SecretStr(key))
    assert TOKEN not in sealed
    assert unseal(sealed, SecretStr(key)).hub_token.get_secret_value() == TOKEN
    try:
        unseal(sealed, SecretStr(new_key()))
    except ValueError as exc:
        assert TOKEN not in str(exc)
    else:
        raise AssertionError("a wrong key opened the credentials")


def test_credentials_are_sealed_never_shown_and_dropped(make_settings, keys, caplog):
    settings = make_settings(credentials_key=new_key(), rate_limit_jobs=0)
    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides[get_queue] = lambda: RecordingQueue()
    try:
        client = TestClient(app, headers=keys.headers("alice"))
        body = {"source_url": "hf://org/gated", "source_credentials": {"hub_token": TOKEN}}
        created = client.post("/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        store = JobStore(redis_client(settings.redis_url), settings.redis_key_prefix)
        raw = store.redis.get(f"{settings.redis_key_prefix}:job:{job_id}")
        assert TOKEN not in raw and json.loads(raw)["sealed_credentials"]
        shown = client.get(f"/v1/jobs/{job_id}").text + client.get("/v1/jobs").text
        assert TOKEN not in shown and "sealed_credentials" not in shown
        opened = unseal(store.get(job_id).sealed_credentials, settings.credentials_key)
        assert settings.fetch_limits("alice", opened).hub_token == TOKEN
        assert TOKEN not in repr(settings.fetch_limits("alice", opened)) and TOKEN not in repr(opened)
        store.finish(job_id, JobState.failed)
        assert json.loads(store.redis.get(f"{settings.redis_key_prefix}:job:{job_id}"))["sealed_credentials"] is None
        assert TOKEN not in caplog.text
        # without a key the service refuses credentials instead of storing them in clear
        app.dependency_overrides[get_settings] = lambda: make_settings(rate_limit_jobs=0)
        refused = client.post("/v1/jobs", json=body)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "credentials_not_accepted"
        # ... and a batch whole, before any of its jobs is created
        before = len(client.get("/v1/jobs").json()["jobs"])
        plain = {"source_url": "https://example.org/m/"}
        batch = client.post("/v1/jobs/batch", json=[plain, body])
        assert batch.status_code == 403 and batch.json()["error"]["code"] == "credentials_not_accepted"
        assert len(client.get("/v1/jobs").json()["jobs"]) == before
    finally:
        app.dependency_overrides.clear()

"""The /v1/jobs routes through FastAPI's test client, on real Redis and S3; the queue is a
recorder (the end-to-end tests use the real one)."""
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from api.deps import get_queue
from api.main import app
from shared.jobs import Artifact, JobError, JobState
from shared.settings import get_settings
from recording_queue import RecordingQueue  # tests/ is on sys.path (pytest's rootdir-based import)


@pytest.fixture
def queue():
    return RecordingQueue()


@pytest.fixture
def client(settings, queue, storage, keys):
    """A client that sends alice's API key."""
    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides[get_queue] = lambda: queue
    with TestClient(app, raise_server_exceptions=False, headers=keys.headers("alice")) as c:
        yield c
    app.dependency_overrides.clear()


def test_create_job_queues_it(client, queue, store):
    r = client.post("/v1/jobs", json={"source_url": "https://example.org/gpt2/"})
    assert r.status_code == 202
    body = r.json()
    assert body["state"] == "queued"
    assert body["links"]["self"].endswith(f"/v1/jobs/{body['id']}")
    assert body["links"]["cancel"].endswith(f"/v1/jobs/{body['id']}/cancel")
    assert queue.sent == [body["id"]]
    stored = store.get(body["id"])
    assert stored.source_url == "https://example.org/gpt2/"
    assert stored.options.calibration.tokens == 256  # defaults filled in


def test_options_are_stored_as_given(client, store, make_settings):
    # s3:// sources need a scope (tests/api/test_api_access.py tests the scopes themselves).
    scoped = make_settings(s3_source_scopes="alice=models/gpt2")
    app.dependency_overrides[get_settings] = lambda: scoped
    options = {"tolerance": 1e-6, "dtype": "float64", "calibration": {"token_ids": [[1, 2, 3], [4]]},
               "construction": "compact", "checks": ["local", "local", "greedy"], "greedy_tokens": 4}
    r = client.post("/v1/jobs", json={"source_url": "s3://models/gpt2", "options": options})
    assert r.status_code == 202
    job = client.get(r.json()["links"]["self"]).json()
    assert job["options"]["dtype"] == "float64"
    assert job["options"]["calibration"] == {"token_ids": [[1, 2, 3], [4]]}
    assert job["options"]["checks"] == ["local", "greedy"]
    kwargs = store.get(r.json()["id"]).options.to_conversion_kwargs()
    assert kwargs["calibration_token_ids"] == [[1, 2, 3], [4]] and kwargs["tolerance"] == 1e-6


@pytest.mark.parametrize("body, location, path", [
    ({"source_url": "ftp://example.org/m"}, "body", "source_url"),
    ({"source_url": "file:///etc/passwd"}, "body", "source_url"),
    ({"source_url": "s3://169.254.169.254/key"}, "body", "source_url"),  # parsed as the worker would
    ({"source_url": "s3://models:9000/key"}, "body", "source_url"),
    ({}, "body", "source_url"),
    ({"source_url": "https://x/", "options": {"dtype": "float16"}}, "body", "options.dtype"),
    ({"source_url": "https://x/", "options": {"tolerance": 2}}, "body", "options.tolerance"),
    ({"source_url": "https://x/", "options": {"calibration": {"tokens": 0}}}, "body", "options.calibration.tokens"),
    ({"source_url": "https://x/", "options": {"calibration": {"seq_len": 1}}}, "body", "options.calibration.seq_len"),
    ({"source_url": "https://x/", "options": {"calibration": {"token_ids": [[]]}}}, "body",
     "options.calibration.token_ids[0]"),
    ({"source_url": "https://x/", "options": {"calibration": {"token_ids": [[1, -1]]}}}, "body",
     "options.calibration.token_ids[0][1]"),
    # Strict: a JSON boolean is no integer, a string no number.
    ({"source_url": "https://x/", "options": {"seed": False}}, "body", "options.seed"),
    ({"source_url": "https://x/", "options": {"greedy_tokens": "5"}}, "body", "options.greedy_tokens"),
    ({"source_url": "https://x/", "options": {"tolerance": True}}, "body", "options.tolerance"),
    ({"source_url": "https://x/", "options": {"seed": 5.5}}, "body", "options.seed"),  # 5.0 is fine, below
    ({"source_url": "https://x/", "force": 0}, "body", "force"),
    ({"source_url": "example.org/m"}, "body", "source_url"),  # the documented pattern
    ({"source_url": "https://x/", "options": {"construction": "factored"}}, "body", "options.construction"),
    ({"source_url": "https://x/", "options": {"checks": ["vibes"]}}, "body", "options.checks[0]"),
    ({"source_url": "https://x/", "options": {"colour": "red"}}, "body", "options.colour"),
    ({"source_url": "https://x/", "idempotency_key": "has space"}, "body", "idempotency_key"),
])
def test_invalid_requests_are_422_with_field_paths(client, queue, body, location, path):
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "validation_error"
    assert {"location": location, "path": path} in [{k: f[k] for k in ("location", "path")} for f in err["fields"]]
    assert all(f["message"] for f in err["fields"])
    assert queue.sent == []


def test_integers_may_be_written_with_a_zero_fraction(client, queue, store):
    # JSON Schema's integer takes 5.0: schema-driven clients send it, and it means 5.
    options = {"seed": 7.0, "greedy_tokens": 16.0, "calibration": {"token_ids": [[1.0, 2], [3e2]]}}
    r = client.post("/v1/jobs", json={"source_url": "https://example.org/m/", "options": options})
    assert r.status_code == 202, r.text
    stored = store.get(r.json()["id"]).options
    assert (stored.seed, stored.greedy_tokens, stored.calibration.token_ids) == (7, 16, [[1, 2], [300]])
    assert isinstance(stored.seed, int)


def test_batch_creates_one_job_per_body(client, queue):
    bodies = [{"source_url": f"https://example.org/m{i}/"} for i in range(3)]
    r = client.post("/v1/jobs/batch", json=bodies)
    assert r.status_code == 202
    ids = [j["id"] for j in r.json()["jobs"]]
    assert len(set(ids)) == 3 and queue.sent == ids
    assert all(j["state"] == "queued" for j in r.json()["jobs"])


def test_batch_validates_every_body_before_creating_any(client, queue):
    r = client.post("/v1/jobs/batch", json=[{"source_url": "https://ok/"}, {"source_url": "gopher://no"}])
    assert r.status_code == 422
    assert r.json()["error"]["fields"][0]["path"] == "[1].source_url"
    assert queue.sent == []
    assert client.post("/v1/jobs/batch", json=[]).status_code == 422


def test_idempotency_key_returns_the_first_job(client, queue):
    body = {"source_url": "https://example.org/m/", "idempotency_key": "upload-42"}
    first = client.post("/v1/jobs", json=body)
    again = client.post("/v1/jobs", json=body)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    assert queue.sent == [first.json()["id"]]


def test_get_unknown_job_is_404(client):
    r = client.get("/v1/jobs/does-not-exist")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "job_not_found"


def test_job_view_shows_progress_error_and_artifacts(client, store, storage):
    job, _ = store.create("https://example.org/m/", owner="alice")
    store.claim(job.id)
    store.finish(job.id, JobState.failed, error=JobError(code="unsupported_architecture", message="no"))
    body = client.get(f"/v1/jobs/{job.id}").json()
    assert body["state"] == "failed"
    assert body["error"] == {"code": "unsupported_architecture", "message": "no"}
    assert body["progress"].keys() >= {"percent", "stage", "layers_done", "layers_total"}
    assert body["started_at"] and body["finished_at"]
    assert "owner" not in body


def test_list_filters_and_paginates(client):
    ids = [client.post("/v1/jobs", json={"source_url": f"https://e/{i}/"}).json()["id"] for i in range(5)]
    client.post(f"/v1/jobs/{ids[0]}/cancel")
    page1 = client.get("/v1/jobs", params={"limit": 2}).json()
    page2 = client.get("/v1/jobs", params={"limit": 2, "cursor": page1["next_cursor"]}).json()
    page3 = client.get("/v1/jobs", params={"limit": 2, "cursor": page2["next_cursor"]}).json()
    listed = [j["id"] for p in (page1, page2, page3) for j in p["jobs"]]
    assert listed == list(reversed(ids))
    assert page3["next_cursor"] is None
    cancelled = client.get("/v1/jobs", params={"state": "cancelled"}).json()["jobs"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert client.get("/v1/jobs", params={"state": "exploded"}).status_code == 422
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422
    bad = client.get("/v1/jobs", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 422 and bad.json()["error"]["fields"][0]["path"] == "cursor"
    # The cursor's documented shape is a position: one after every job lists them all.
    anywhere = client.get("/v1/jobs", params={"cursor": "9" * 15 + ":" + "f" * 36, "limit": 10})
    assert [j["id"] for j in anywhere.json()["jobs"]] == list(reversed(ids))


def test_cancel(client, store):
    queued = client.post("/v1/jobs", json={"source_url": "https://e/q/"}).json()["id"]
    r = client.post(f"/v1/jobs/{queued}/cancel")
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    assert client.post(f"/v1/jobs/{queued}/cancel").status_code == 202  # again: same answer

    running = client.post("/v1/jobs", json={"source_url": "https://e/r/"}).json()["id"]
    store.claim(running)
    r = client.post(f"/v1/jobs/{running}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"] is True and r.json()["state"] == "downloading"
    assert store.cancel_requested(running)

    done = client.post("/v1/jobs", json={"source_url": "https://e/d/"}).json()["id"]
    store.claim(done)
    store.finish(done, JobState.succeeded)
    r = client.post(f"/v1/jobs/{done}/cancel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"
    assert client.post("/v1/jobs/nope/cancel").status_code == 404


def test_artifact_redirects_to_a_presigned_url(client, store, storage, settings):
    job, _ = store.create("https://example.org/m/", owner="alice")
    key = f"jobs/{job.id}/report.json"
    storage.client.put_object(Bucket=settings.s3_bucket, Key=key, Body=b'{"passed": true}')
    store.claim(job.id)
    store.finish(job.id, JobState.succeeded, artifacts=[Artifact(name="report.json", size=16, key=key)])

    view = client.get(f"/v1/jobs/{job.id}").json()
    assert view["artifacts"] == [{"name": "report.json", "size": 16, "sha256": None,  # a record from before hashes
                                  "url": f"http://testserver/v1/jobs/{job.id}/artifacts/report.json"}]
    r = client.get(f"/v1/jobs/{job.id}/artifacts/report.json", follow_redirects=False)
    assert r.status_code == 307
    location = r.headers["location"]
    assert urlsplit(location).netloc == urlsplit(settings.s3_endpoint_url).netloc
    assert "X-Amz-Signature=" in location and f"X-Amz-Expires={settings.presign_ttl_seconds}" in location
    assert settings.presign_ttl_seconds == 300  # short-lived by default
    assert r.headers["cache-control"] == "no-store"
    import httpx

    assert httpx.get(location).json() == {"passed": True}

    missing = client.get(f"/v1/jobs/{job.id}/artifacts/model.safetensors", follow_redirects=False)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "artifact_not_found"
    assert client.get("/v1/jobs/nope/artifacts/report.json").status_code == 404


def test_report_redirects_to_the_html_page(client, store, storage, settings, keys, tmp_path):
    import hashlib
    import httpx

    page = b"<!DOCTYPE html><html><body>PASSED</body></html>"
    job, _ = store.create("https://example.org/m/", owner="alice")
    (tmp_path / "report.html").write_bytes(page)
    store.claim(job.id)
    store.finish(job.id, JobState.succeeded, artifacts=storage.upload_job_files(job.id, tmp_path, ["report.html"]))

    view = client.get(f"/v1/jobs/{job.id}").json()
    assert view["artifacts"] == [{"name": "report.html", "size": len(page), "sha256": hashlib.sha256(page).hexdigest(),
                                  "url": f"http://testserver/v1/jobs/{job.id}/artifacts/report.html"}]
    r = client.get(f"/v1/jobs/{job.id}/report", follow_redirects=False)
    assert r.status_code == 307 and r.headers["cache-control"] == "no-store"
    location = r.headers["location"]
    assert "X-Amz-Signature=" in location and f"X-Amz-Expires={settings.presign_ttl_seconds}" in location
    shown = httpx.get(location)
    assert shown.content == page and shown.headers["content-type"].startswith("text/html")
    assert "attachment" not in shown.headers.get("content-disposition", "")  # read in the browser

    # Another owner's job does not exist for you; a job without report.html has no report.
    with TestClient(app, raise_server_exceptions=False, headers=keys.headers("bob")) as bob:
        r = bob.get(f"/v1/jobs/{job.id}/report", follow_redirects=False)
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    assert client.get("/v1/jobs/nope/report").json()["error"]["code"] == "job_not_found"
    queued, _ = store.create("https://example.org/q/", owner="alice")
    r = client.get(f"/v1/jobs/{queued.id}/report", follow_redirects=False)
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_finished"
    assert "queued" in r.json()["error"]["message"]


def test_missing_artifacts_of_a_job_not_succeeded_are_409_with_a_reason(client, store):
    job, _ = store.create("https://example.org/m/", owner="alice")
    r = client.get(f"/v1/jobs/{job.id}/artifacts/model.safetensors", follow_redirects=False)
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_finished"
    assert "queued" in r.json()["error"]["message"]
    client.post(f"/v1/jobs/{job.id}/cancel")  # queued: cancelled at once, with no artifacts
    r = client.get(f"/v1/jobs/{job.id}/report", follow_redirects=False)
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_succeeded"
    assert "cancelled" in r.json()["error"]["message"]


def test_queue_down_is_503_and_the_job_does_not_linger(client, store, queue):
    app.dependency_overrides[get_queue] = lambda: RecordingQueue(fail=True)
    body = {"source_url": "https://example.org/m/", "idempotency_key": "first-try"}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_unavailable"
    assert store.list(state=JobState.queued)[0] == []
    assert [j.error.code for j in store.list(state=JobState.failed)[0]] == ["queue_unavailable"]
    # The idempotency key was freed: the same submission, once the queue is back, is a new job.
    app.dependency_overrides[get_queue] = lambda: queue
    again = client.post("/v1/jobs", json=body)
    assert again.status_code == 202 and "idempotent-replayed" not in again.headers
    assert queue.sent == [again.json()["id"]]


def test_redis_down_is_503_without_internals(make_settings, queue, keys):
    from deploy.local import free_port

    dead = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    app.dependency_overrides[get_settings] = lambda: dead
    app.dependency_overrides[get_queue] = lambda: queue
    try:
        with TestClient(app, raise_server_exceptions=False, headers=keys.headers()) as c:
            r = c.post("/v1/jobs", json={"source_url": "https://example.org/m/"})
    finally:
        app.dependency_overrides.clear()
    assert r.status_code == 503
    assert r.json() == {"error": {"code": "store_unavailable", "message": "the job store is unavailable; retry shortly"}}


def test_openapi_documents_the_api(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/batch", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
            "/v1/jobs/{job_id}/artifacts/{name}", "/healthz", "/readyz"} <= set(spec["paths"])
    create = spec["paths"]["/v1/jobs"]["post"]
    assert {"202", "401", "413", "429"} <= set(create["responses"])
    assert create["security"] == [{"ApiKey": []}]
    assert spec["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    assert "security" not in spec["paths"]["/readyz"]["get"]
    assert "JobOptions" in spec["components"]["schemas"]
    report = spec["paths"]["/v1/jobs/{job_id}/report"]["get"]
    assert {"307", "401", "404"} <= set(report["responses"]) and report["security"] == [{"ApiKey": []}]
    assert "artifact_not_found" in report["responses"]["404"]["description"]
    assert "sha256" in spec["components"]["schemas"]["ArtifactOut"]["properties"]

"""Access control through FastAPI's test client on real Redis and S3: API keys, owners,
the per-owner rate limit, the request body cap and short-lived download links.
(tests/e2e/test_access.py repeats the essentials against uvicorn.)"""
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from api.auth import hash_key, identify, main as auth_main, new_key
from api.deps import get_queue
from api.main import app
from shared.jobs import Artifact, JobState
from shared.settings import Settings, get_settings
from recording_queue import RecordingQueue  # tests/ is on sys.path (pytest's rootdir-based import)


@pytest.fixture
def make_client(storage, keys):
    """make_client(settings, key name or None) -> a TestClient sending that key."""
    opened = []

    def make(settings, who="alice", queue=None):
        app.dependency_overrides[get_settings] = lambda: settings
        app.dependency_overrides[get_queue] = lambda: queue or RecordingQueue()
        c = TestClient(app, raise_server_exceptions=False, headers=keys.headers(who) if who else {})
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.close()
    app.dependency_overrides.clear()


ROUTES = [
    ("get", "/v1/jobs", None),
    ("post", "/v1/jobs", {"source_url": "https://example.org/m/"}),
    ("post", "/v1/jobs/batch", [{"source_url": "https://example.org/m/"}]),
    ("get", "/v1/jobs/some-id", None),
    ("post", "/v1/jobs/some-id/cancel", None),
    ("get", "/v1/jobs/some-id/artifacts/report.json", None),
]


@pytest.mark.parametrize("method, path, body", ROUTES)
@pytest.mark.parametrize("authorization", [
    None, "Bearer not-a-key", "Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer " + "x" * 600, "bearer  ",
])
def test_every_jobs_route_needs_a_valid_key(make_client, settings, method, path, body, authorization):
    client = make_client(settings, who=None)
    headers = {"Authorization": authorization} if authorization is not None else {}
    r = client.request(method, path, json=body, headers=headers, follow_redirects=False)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")
    if authorization is not None:
        assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_a_valid_key_is_accepted_and_the_scheme_is_case_insensitive(make_client, settings, keys):
    client = make_client(settings, who=None)
    r = client.get("/v1/jobs", headers={"Authorization": f"bearer {keys.plain['bob']}"})
    assert r.status_code == 200 and r.json()["jobs"] == []


def test_probes_and_docs_stay_open(make_client, settings):
    client = make_client(settings, who=None)
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/v1/readyz").status_code == 200
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").status_code == 200


def test_without_configured_keys_everything_is_refused(make_client, make_settings, keys):
    client = make_client(make_settings(api_keys=[]), who="alice")
    r = client.get("/v1/jobs")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert client.get("/v1/jobs", headers={"Authorization": ""}).status_code == 401


def test_allow_anonymous_serves_keyless_requests_as_one_separate_owner(make_client, make_settings, storage):
    settings = make_settings(allow_anonymous=True)
    anonymous = make_client(settings, who=None)
    mine = anonymous.post("/v1/jobs", json={"source_url": "https://example.org/a/"})
    assert mine.status_code == 202
    assert anonymous.get(f"/v1/jobs/{mine.json()['id']}").status_code == 200
    alice = make_client(settings, who="alice")
    assert alice.get(f"/v1/jobs/{mine.json()['id']}").status_code == 404
    assert alice.get("/v1/jobs").json()["jobs"] == []
    # A key that is sent is still checked.
    assert anonymous.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_jobs_belong_to_the_key_that_created_them(make_client, settings, store, storage):
    alice, bob = make_client(settings, "alice"), make_client(settings, "bob")
    created = alice.post("/v1/jobs", json={"source_url": "https://example.org/m/", "idempotency_key": "k"})
    job_id = created.json()["id"]
    assert store.get(job_id).owner == "alice"

    # Bob cannot see, cancel or download it: 404, as for a job that does not exist.
    for r in (bob.get(f"/v1/jobs/{job_id}"), bob.post(f"/v1/jobs/{job_id}/cancel"),
              bob.get(f"/v1/jobs/{job_id}/artifacts/report.json", follow_redirects=False)):
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", r.text
    assert store.get(job_id).state == JobState.queued  # bob's cancel did nothing
    assert bob.get("/v1/jobs").json()["jobs"] == []
    assert bob.get("/v1/jobs", params={"state": "queued"}).json()["jobs"] == []

    # The same idempotency key is bob's own: a new job for him, the old one for alice.
    theirs = bob.post("/v1/jobs", json={"source_url": "https://example.org/m/", "idempotency_key": "k"})
    assert theirs.json()["id"] != job_id and "idempotent-replayed" not in theirs.headers
    again = alice.post("/v1/jobs", json={"source_url": "https://example.org/m/", "idempotency_key": "k"})
    assert again.json()["id"] == job_id and again.headers["idempotent-replayed"] == "true"

    assert [j["id"] for j in alice.get("/v1/jobs").json()["jobs"]] == [job_id]
    assert [j["id"] for j in bob.get("/v1/jobs").json()["jobs"]] == [theirs.json()["id"]]
    assert [j["id"] for j in alice.get("/v1/jobs", params={"state": "queued"}).json()["jobs"]] == [job_id]

    # Alice's artifacts: a short-lived presigned URL; bob still gets 404 for the same name.
    key = f"jobs/{job_id}/report.json"
    storage.client.put_object(Bucket=settings.s3_bucket, Key=key, Body=b"{}")
    store.claim(job_id)
    store.finish(job_id, JobState.succeeded, artifacts=[Artifact(name="report.json", size=2, key=key)])
    r = alice.get(f"/v1/jobs/{job_id}/artifacts/report.json", follow_redirects=False)
    assert r.status_code == 307
    assert parse_qs(urlsplit(r.headers["location"]).query)["X-Amz-Expires"] == ["300"]
    assert bob.get(f"/v1/jobs/{job_id}/artifacts/report.json", follow_redirects=False).status_code == 404
    assert alice.post(f"/v1/jobs/{job_id}/cancel").status_code == 409


def test_rotated_keys_under_one_name_share_the_jobs(make_client, make_settings, keys):
    second = new_key()
    entries = keys.entries(["alice"]) + f",alice:{hash_key(second)}"
    settings = make_settings(api_keys=entries)
    first = make_client(settings, "alice")
    job_id = first.post("/v1/jobs", json={"source_url": "https://example.org/m/"}).json()["id"]
    rotated = make_client(settings, None)
    r = rotated.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {second}"})
    assert r.status_code == 200


def test_rate_limit_per_owner_with_retry_after(make_client, make_settings):
    settings = make_settings(rate_limit_jobs=3, rate_limit_window_seconds=60)
    queue = RecordingQueue()
    alice, bob = make_client(settings, "alice", queue), make_client(settings, "bob", queue)
    body = {"source_url": "https://example.org/m/"}
    assert [alice.post("/v1/jobs", json=body).status_code for _ in range(2)] == [202, 202]
    # A batch counts each job: two more do not fit in the one slot left, and none is made.
    r = alice.post("/v1/jobs/batch", json=[body, body])
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert len(queue.sent) == 2
    assert alice.post("/v1/jobs", json=body).status_code == 202  # the last slot
    r = alice.post("/v1/jobs", json=body)
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
    assert len(queue.sent) == 3
    # Another owner has a quota of their own; reading is never limited.
    assert bob.post("/v1/jobs/batch", json=[body] * 3).status_code == 202
    assert alice.get("/v1/jobs").status_code == 200
    # A batch above the limit can never pass, and says so.
    r = bob.post("/v1/jobs/batch", json=[body] * 4)
    assert r.status_code == 429 and "smaller batches" in r.json()["error"]["message"]


def test_rate_limit_window_slides(make_client, make_settings):
    settings = make_settings(rate_limit_jobs=2, rate_limit_window_seconds=1)
    alice = make_client(settings, "alice")
    body = {"source_url": "https://example.org/m/"}
    assert alice.post("/v1/jobs", json=body).status_code == 202
    assert alice.post("/v1/jobs", json=body).status_code == 202
    r = alice.post("/v1/jobs", json=body)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    time.sleep(1.1)
    assert alice.post("/v1/jobs", json=body).status_code == 202


def test_rate_limit_zero_means_unlimited(make_client, make_settings):
    alice = make_client(make_settings(rate_limit_jobs=0), "alice")
    assert alice.post("/v1/jobs/batch", json=[{"source_url": "https://e/m/"}] * 100).status_code == 202


def test_body_cap_with_content_length(make_client, make_settings):
    settings = make_settings(max_request_bytes=2048)
    queue = RecordingQueue()
    client = make_client(settings, "alice", queue)
    big = {"source_url": "https://example.org/m/", "idempotency_key": "x" * 100,
           "options": {"calibration": {"token_ids": [[1] * 2000]}}}
    r = client.post("/v1/jobs", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert queue.sent == []
    small = client.post("/v1/jobs", json={"source_url": "https://example.org/m/"})
    assert small.status_code == 202


def test_body_cap_without_content_length(make_client, make_settings):
    settings = make_settings(max_request_bytes=4096)
    queue = RecordingQueue()
    client = make_client(settings, "alice", queue)

    def chunks(total):
        yield b'{"source_url": "https://example.org/m/", "idempotency_key": "'
        for _ in range(total // 512):
            yield b"a" * 512
        yield b'"}'

    r = client.post("/v1/jobs", content=chunks(64 * 1024), headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # Under the cap, a streamed body is read whole and handled as usual (here: the key
    # is over its 200-character limit).
    r = client.post("/v1/jobs", content=chunks(1024), headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert queue.sent == []


def test_presign_ttl_is_clamped():
    assert Settings().presign_ttl_seconds == 300
    assert Settings(presign_ttl_seconds=7 * 24 * 3600).presign_ttl_seconds == 3600
    assert Settings(presign_ttl_seconds=1).presign_ttl_seconds == 10


def test_identify_compares_hashes(keys):
    settings = Settings(api_keys=keys.entries())
    assert identify(keys.plain["bob"], settings).owner == "bob"
    from api.errors import ApiError

    with pytest.raises(ApiError) as info:
        identify(keys.plain["bob"] + "x", settings)
    assert info.value.status_code == 401


def test_key_generator_prints_a_working_entry(capsys):
    assert auth_main(["carol"]) == 0
    out = capsys.readouterr().out
    key = out.split("\n")[1].strip()
    entry = out.split("\n")[3].strip()
    assert key.startswith("ak_") and entry == f"carol:{hash_key(key)}"
    assert identify(key, Settings(api_keys=entry)).owner == "carol"
    assert key not in entry


def test_s3_sources_are_limited_to_the_owners_scopes(make_client, make_settings, store):
    bucket = make_settings().s3_bucket  # the artifacts bucket of this test
    settings = make_settings(
        # Even a scope that names the artifacts bucket does not open it.
        s3_source_scopes=f"alice=alice-models/team-a, bob=bob-models, *={bucket}/jobs",
        rate_limit_jobs=3,
    )
    queue = RecordingQueue()
    alice, bob = make_client(settings, "alice", queue), make_client(settings, "bob", queue)
    job_id = alice.post("/v1/jobs", json={"source_url": "s3://alice-models/team-a/gpt2/"}).json()["id"]
    assert store.get(job_id).owner == "alice"

    # Bob asks for alice's converted model straight from the artifacts bucket: refused.
    stolen = f"s3://{bucket}/jobs/{job_id}/"
    r = bob.post("/v1/jobs", json={"source_url": stolen})
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert error["code"] == "source_forbidden" and stolen in error["message"]
    # ... and so are alice's scope and a bucket whose name only starts like his own.
    for url in ("s3://alice-models/team-a/gpt2/", "s3://bob-models-2/x/", f"s3://{bucket}//jobs/{job_id}/"):
        r = bob.post("/v1/jobs", json={"source_url": url})
        assert r.status_code == 403 and r.json()["error"]["code"] == "source_forbidden", url
        message = r.json()["error"]["message"]
        assert not any(scope in message for scope in ("alice=", "bob=", "*=")), message  # no scopes listed
    assert "alice-models" not in bob.post("/v1/jobs", json={"source_url": "s3://bob-models-2/x/"}).text
    # A batch with one forbidden job is refused whole, naming the job; nothing is created.
    ok = {"source_url": "s3://bob-models/gpt2/"}
    r = bob.post("/v1/jobs/batch", json=[ok, {"source_url": stolen}])
    assert r.status_code == 403 and r.json()["error"]["code"] == "source_forbidden"
    assert r.json()["error"]["message"].startswith("[1].source_url: ")
    assert bob.get("/v1/jobs").json()["jobs"] == [] and queue.sent == [job_id]

    # Bob's own bucket is his (refusals used none of his rate limit: 3 jobs still fit).
    r = bob.post("/v1/jobs/batch", json=[ok, ok, {"source_url": "s3://bob-models/x/model.tar.gz"}])
    assert r.status_code == 202, r.text
    assert len(bob.get("/v1/jobs").json()["jobs"]) == 3
    # http(s) sources are not affected by the S3 scopes.
    assert alice.post("/v1/jobs", json={"source_url": "https://example.org/m/"}).status_code == 202


def test_without_s3_scopes_no_s3_source_is_accepted(make_client, make_settings):
    anonymous = make_client(make_settings(allow_anonymous=True), who=None)
    alice = make_client(make_settings(allow_anonymous=True), "alice")
    for client in (anonymous, alice):
        r = client.post("/v1/jobs", json={"source_url": "s3://models/gpt2/"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "source_forbidden"
    assert "'anonymous'" in anonymous.post("/v1/jobs", json={"source_url": "s3://models/x/"}).json()["error"]["message"]


def test_active_jobs_quota_per_owner(make_client, make_settings, store):
    settings = make_settings(rate_limit_jobs=0, max_active_jobs_per_owner=3)
    alice, bob = make_client(settings, "alice"), make_client(settings, "bob")
    body = {"source_url": "https://example.org/m/"}
    ids = [alice.post("/v1/jobs", json=body).json()["id"] for _ in range(3)]
    r = alice.post("/v1/jobs", json=body)
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded" and "retry-after" in r.headers
    assert alice.post("/v1/jobs/batch", json=[body]).status_code == 429  # a batch too, refused whole
    assert bob.post("/v1/jobs", json=body).status_code == 202  # another owner's own cap
    from shared.jobs import JobState, JobStore, redis_client

    JobStore(redis_client(settings.redis_url), settings.redis_key_prefix).finish(ids[0], JobState.succeeded)
    assert alice.post("/v1/jobs", json=body).status_code == 202  # one finished: room for one more


def test_events_stream_until_the_job_ends_and_resume(make_client, make_settings):
    """SSE: the job's states as they change, an `end` event, then the stream closes; with
    Last-Event-ID a reconnecting client gets only what it has not seen. Others get 404."""
    import json
    import threading

    from shared.jobs import JobState, JobStore, Progress, redis_client

    settings = make_settings(rate_limit_jobs=0)
    alice, bob = make_client(settings, "alice"), make_client(settings, "bob")
    job_id = alice.post("/v1/jobs", json={"source_url": "https://example.org/m/"}).json()["id"]
    store = JobStore(redis_client(settings.redis_url), settings.redis_key_prefix)

    def worker():
        time.sleep(0.6)
        job = store.claim(job_id)
        time.sleep(0.6)
        store.advance(job_id, JobState.converting, Progress(percent=40.0, stage="calibrating"), attempt=job.attempts)
        time.sleep(0.6)
        store.finish(job_id, JobState.succeeded)

    threading.Thread(target=worker).start()
    events = []
    with alice.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        fields = {}
        for line in response.iter_lines():
            if line.startswith(("id:", "event:", "data:")):
                key, _, value = line.partition(": ")
                fields[key.rstrip(":")] = value
            elif not line and fields:
                events.append((int(fields["id"]), fields["event"], json.loads(fields["data"])["state"]))
                fields = {}
    states = [state for _, _, state in events]
    assert states[0] == "queued" and states[-1] == "succeeded" and "converting" in states
    assert events[-1][1] == "end" and [e[0] for e in events] == sorted({e[0] for e in events})
    with alice.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(events[-1][0])}) as response:
        assert [line for line in response.iter_lines() if line.startswith("data:")] == []  # nothing new, then closed
    assert bob.get(f"/v1/jobs/{job_id}/events").status_code == 404


def test_events_stream_of_a_waiting_job_ends_after_events_stream_seconds(make_client, make_settings):
    """A job that stays queued holds no stream open for long: after events_stream_seconds the
    stream closes without an `end` event (the client reconnects with Last-Event-ID)."""
    alice = make_client(make_settings(events_stream_seconds=1.0), "alice")
    job_id = alice.post("/v1/jobs", json={"source_url": "https://example.org/m/"}).json()["id"]
    started = time.monotonic()
    with alice.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        kinds = [line for line in response.iter_lines() if line.startswith("event:")]
    assert kinds == ["event: job"]
    assert 1.0 <= time.monotonic() - started < 10

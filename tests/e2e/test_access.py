"""Access control against the API served by uvicorn over a real socket: API keys,
owners, the rate limit and the body cap (streamed bodies included), and open probes.
tests/api/test_api_access.py covers the cases in detail in-process."""
from __future__ import annotations

import time

import httpx
import pytest

LIMIT, WINDOW = 3, 3


@pytest.fixture(scope="module")
def access(make_stack):
    """An API with a small rate limit and body cap. No worker: the jobs stay queued."""
    stack = make_stack("access", rate_limit_jobs=LIMIT, rate_limit_window_seconds=WINDOW,
                       max_request_bytes=64 * 1024)
    stack.start_api()
    return stack


def test_keys_owners_and_open_probes(access, keys):
    anonymous, alice, bob = access.client(None), access.client("alice"), access.client("bob")
    for r in (anonymous.get("/v1/jobs"),
              anonymous.post("/v1/jobs", json={"source_url": "https://example.org/m/"}),
              anonymous.get("/v1/jobs", headers={"Authorization": "Bearer " + keys.plain["alice"][:-1]})):
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert anonymous.get("/healthz").status_code == 200
    assert anonymous.get("/readyz").status_code == 200

    job_id = alice.post("/v1/jobs", json={"source_url": "https://example.org/m/"}).raise_for_status().json()["id"]
    assert alice.get(f"/v1/jobs/{job_id}").status_code == 200
    for r in (bob.get(f"/v1/jobs/{job_id}"), bob.post(f"/v1/jobs/{job_id}/cancel"),
              bob.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors")):
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    assert job_id not in [j["id"] for j in bob.get("/v1/jobs").json()["jobs"]]
    assert job_id in [j["id"] for j in alice.get("/v1/jobs").json()["jobs"]]


def test_rate_limit_answers_429_with_retry_after(access):
    bob, alice = access.client("bob"), access.client("alice")
    time.sleep(WINDOW)  # a window of bob's own, whatever ran before
    body = {"source_url": "https://example.org/m/"}
    assert bob.post("/v1/jobs/batch", json=[body] * LIMIT).status_code == 202
    limited = bob.post("/v1/jobs", json=body)
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    retry_after = int(limited.headers["retry-after"])
    assert 1 <= retry_after <= WINDOW
    assert alice.get("/v1/jobs").status_code == 200  # reading is not limited
    time.sleep(retry_after + 0.2)
    assert bob.post("/v1/jobs", json=body).status_code == 202


def test_body_cap_holds_for_declared_and_streamed_bodies(access):
    alice = access.client("alice")
    big = {"source_url": "https://example.org/m/", "options": {"calibration": {"token_ids": [[7] * 40_000]}}}
    r = alice.post("/v1/jobs", json=big)  # ~120 KB, with a Content-Length
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def stream():  # chunked: no Content-Length for the server to check up front
        yield b'{"source_url": "https://example.org/m/", "options": {"calibration": {"token_ids": [['
        for _ in range(2000):
            yield b"7," * 100
        yield b"7]]}}}"

    with httpx.Client(base_url=access.url, headers=access.keys.headers("alice"), timeout=30) as c:
        r = c.post("/v1/jobs", content=stream(), headers={"content-type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # The API is fine afterwards.
    assert alice.get("/v1/jobs").status_code == 200

"""Signed webhooks end to end: an API and a Celery worker with a signing key, a tiny
conversion, and a receiver on loopback (allowed like the test sources, through
ATTNONLY_FETCH_ALLOW_HOSTS) that verifies every request with the secret the API gives alice."""
import time

import pytest

from webhook_receiver import Receiver  # tests/ is on sys.path (pytest's rootdir-based import)

FAST = {"calibration": {"tokens": 64, "seq_len": 16}, "greedy_tokens": 4}


@pytest.fixture(scope="module")
def hooks_stack(make_stack):
    stack = make_stack("webhooks", webhook_signing_key="e2e-webhook-signing-key-0123456789",
                       webhook_progress_interval_seconds=1, device="cpu", rate_limit_jobs=0)
    stack.start_worker()
    stack.start_api()
    return stack


def test_a_conversion_reports_started_progress_completed_to_a_verifying_receiver(hooks_stack, checkpoints):
    client = hooks_stack.client("alice")
    secret = client.get("/v1/webhooks/secret").raise_for_status().json()["secret"]
    with Receiver(secret) as rx:
        created = client.post("/v1/jobs", json={"source_url": checkpoints.base + "gpt2/", "options": FAST,
                                                "webhook_url": rx.url})
        assert created.status_code == 202, created.text
        job = hooks_stack.wait_for(client, created.json()["id"])
        assert job["state"] == "succeeded", (job, hooks_stack.logs())
        seen = rx.wait_for(lambda reqs: any(r.payload and r.payload["type"] == "job.completed" for r in reqs))

    assert seen and all(r.verified for r in seen), hooks_stack.logs()
    types = [r.payload["type"] for r in seen]
    assert types[0] == "job.started" and types[-1] == "job.completed", types
    assert set(types[1:-1]) == {"job.progress"}, types
    stages = [r.payload["data"]["progress"]["stage"] for r in seen[1:-1]]
    assert {"downloading", "calibrating", "uploading"} <= set(stages), stages
    assert all(r.payload["data"]["job_id"] == job["id"] for r in seen)
    outcome = seen[-1].payload["data"]["outcome"]
    assert outcome["error_code"] is None
    assert {a["name"] for a in outcome["artifacts"]} == {a["name"] for a in job["artifacts"]}

    # Every attempt is in the job's API view (the last may land just after the job finished).
    deliveries = hooks_stack.wait_for(client, job["id"])["webhook_deliveries"]
    for _ in range(50):
        if len(deliveries) == len(seen):
            break
        time.sleep(0.1)
        deliveries = client.get(f"/v1/jobs/{job['id']}").json()["webhook_deliveries"]
    assert [(d["event"], d["status"], d["error"]) for d in deliveries] == \
        [(t.removeprefix("job."), 200, None) for t in types]
    assert [d["message_id"] for d in deliveries] == [r.headers["webhook-id"] for r in seen]

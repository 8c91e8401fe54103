"""The job task's webhook events, run in-process against real Redis and S3 and a real
receiver on loopback; the download and the conversion are stand-ins (test_worker_tasks)."""
import time

import pytest
from pydantic import SecretStr

from shared.jobs import JobState
from shared.webhook_delivery import dispatcher
from shared.webhook_signing import owner_secret
from test_worker_tasks import FakeConvert, run  # same folder: on sys.path (rootdir-based import)
from webhook_receiver import Receiver

KEY = "worker-test-signing-key-0123456789"


@pytest.fixture
def hook_settings(make_settings):
    return make_settings(webhook_signing_key=KEY, webhook_retry_base_delay=0.05, webhook_attempts=3)


def _types(requests):
    return [r.payload["type"] for r in requests]


def test_a_job_sends_started_progress_completed_signed(store, storage, hook_settings):
    secret = owner_secret(SecretStr(KEY), "alice")
    settings = hook_settings.model_copy(update={"webhook_progress_interval_seconds": 3600})
    with Receiver(secret) as rx:
        job, _ = store.create("https://example.org/m/", None, owner="alice", webhook_url=rx.url)
        assert run(store, storage, settings, job.id, convert=FakeConvert()) == JobState.succeeded
        seen = rx.wait_for(lambda reqs: any(r.payload and r.payload["type"] == "job.completed" for r in reqs))
        assert dispatcher().idle(10)
    assert all(r.verified for r in seen), [r.headers for r in seen]
    types = _types(seen)
    assert types[0] == "job.started" and types[-1] == "job.completed" and "job.progress" in types
    assert set(types[1:-1]) == {"job.progress"}
    # Rate-limited: one progress event per stage (the interval is an hour), in stage order.
    stages = [r.payload["data"]["progress"]["stage"] for r in seen if r.payload["type"] == "job.progress"]
    assert len(stages) == len(set(stages)) and stages[0] == "downloading" and stages[-1] == "uploading"
    completed = seen[-1].payload["data"]
    assert completed["state"] == "succeeded" and completed["outcome"]["error_code"] is None
    assert {a["name"] for a in completed["outcome"]["artifacts"]} >= {"config.json", "model.safetensors"}
    # Every attempt is in the job record, one per request the receiver saw.
    deliveries = store.get(job.id).webhook_deliveries
    assert [(d.event.value, d.status) for d in deliveries] == [(t.removeprefix("job."), 200) for t in types]
    assert len({d.message_id for d in deliveries}) == len(deliveries)


def test_only_the_asked_events_are_sent_and_a_failure_is_reported(store, storage, hook_settings):
    from shared.fetch import FetchError

    def refuse(url, dest, limits, progress=None, on_config=None, on_weights=None):
        raise FetchError("source_not_found", "no such model")

    with Receiver(owner_secret(SecretStr(KEY), None)) as rx:
        job, _ = store.create("https://example.org/m/", None, webhook_url=rx.url, webhook_events=["completed"])
        assert run(store, storage, hook_settings, job.id, fetch=refuse) == JobState.failed
        seen = rx.wait_for(lambda reqs: len(reqs) >= 1)
        assert dispatcher().idle(10)
    assert _types(rx.requests) == ["job.completed"] and seen[0].verified
    assert seen[0].payload["data"]["outcome"] == {"error_code": "source_not_found",
                                                  "error_message": "no such model", "artifacts": []}


def test_a_slow_or_failing_receiver_never_holds_the_job(store, storage, hook_settings):
    # Each answer takes 2 s and is a 500: the job must not wait for any of them.
    with Receiver(owner_secret(SecretStr(KEY), None), statuses=[500] * 100, delay=2.0) as rx:
        job, _ = store.create("https://example.org/m/", None, webhook_url=rx.url)
        started = time.monotonic()
        assert run(store, storage, hook_settings, job.id, convert=FakeConvert()) == JobState.succeeded
        took = time.monotonic() - started
        assert took < 2.0, took
        assert store.get(job.id).state == JobState.succeeded
        rx.wait_for(lambda reqs: len(reqs) >= 1)
    # Retried and recorded as failures, in the background.
    deadline = time.monotonic() + 15
    while not store.get(job.id).webhook_deliveries and time.monotonic() < deadline:
        time.sleep(0.1)
    first = store.get(job.id).webhook_deliveries[0]
    assert (first.event.value, first.status, first.error) == ("started", 500, "webhook_http_error")


def test_a_job_cancelled_while_queued_gets_its_completed_event_once(store, storage, hook_settings):
    with Receiver(owner_secret(SecretStr(KEY), None)) as rx:
        job, _ = store.create("https://example.org/m/", None, webhook_url=rx.url)
        store.request_cancel(job.id)
        assert run(store, storage, hook_settings, job.id) == JobState.cancelled
        seen = rx.wait_for(lambda reqs: len(reqs) >= 1)
        assert dispatcher().idle(10)
        assert run(store, storage, hook_settings, job.id) == JobState.cancelled  # the attempt is recorded now
        assert dispatcher().idle(10)
    assert [(r.payload["type"], r.payload["data"]["state"]) for r in rx.requests] == [("job.completed", "cancelled")]
    assert seen[0].payload["data"]["outcome"]["error_code"] == "cancelled"

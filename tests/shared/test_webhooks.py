"""Webhook signing, delivery and payloads (shared/webhook_*.py), against a real HTTP receiver on
loopback that verifies signatures with the ``standardwebhooks`` package."""
import base64
import json
import time

import pytest
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from shared.jobs import Artifact, JobError, JobState, Progress
from shared.webhook_delivery import (
    Delivery, DeliveryPolicy, Dispatcher, WebhookTargetError, check_target, send_once,
)
from shared.webhook_notify import JobWebhooks, payload
from shared.webhook_records import WebhookEvent
from shared.webhook_signing import owner_secret, signed_headers
from webhook_receiver import Receiver  # tests/ is on sys.path (pytest's rootdir-based import)

KEY = SecretStr("test-signing-key-" + "x" * 16)
LOOPBACK = ("127.0.0.1",)


# --- signing ---------------------------------------------------------------------------

def test_signature_matches_the_spec_vector():
    # The example of the Standard Webhooks / Svix test suites, computed by neither.
    headers = signed_headers("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek",
                             1614265330, '{"test": 2432232314}')
    assert headers == {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }


def test_owner_secrets_verify_their_own_signatures_only():
    alice, bob = owner_secret(KEY, "alice"), owner_secret(KEY, "bob")
    assert alice.startswith("whsec_") and len(base64.b64decode(alice.removeprefix("whsec_"))) == 32
    assert alice != bob != owner_secret(KEY, None)
    assert alice == owner_secret(SecretStr(KEY.get_secret_value()), "alice")  # derived, stable
    assert alice != owner_secret(SecretStr("another-key"), "alice")
    body = '{"type":"job.started"}'
    headers = signed_headers(alice, "msg_1", int(time.time()), body)
    assert Webhook(alice).verify(body, headers) == {"type": "job.started"}
    with pytest.raises(WebhookVerificationError):
        Webhook(bob).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(alice).verify(body.replace("started", "completed"), headers)


# --- SSRF ------------------------------------------------------------------------------

@pytest.mark.parametrize("url, code", [
    ("http://127.0.0.1:9/hook", "webhook_address_blocked"),
    ("http://2130706433/hook", "webhook_address_blocked"),  # 127.0.0.1, written as one number
    ("http://169.254.169.254/latest", "webhook_address_blocked"),
    ("http://[::ffff:10.0.0.1]/", "webhook_address_blocked"),
    ("ftp://example.org/hook", "webhook_url_invalid"),
    ("s3://bucket/key", "webhook_url_invalid"),
    ("http://user@example.org/hook", "webhook_url_invalid"),
])
def test_check_target_refuses_blocked_and_odd_urls(url, code):
    with pytest.raises(WebhookTargetError) as caught:
        check_target(url, allow_hosts=())
    assert caught.value.code == code


def test_check_target_allows_public_names_and_allow_listed_loopback():
    check_target("https://hooks.example.org/x?y=1", allow_hosts=())  # names are checked at delivery
    check_target("http://127.0.0.1:8080/hook", allow_hosts=LOOPBACK)


def _delivery(url, secret, recorded, policy=None, body='{"n":1}'):
    return Delivery(job_id="job-1", event=WebhookEvent.started, url=url, secret=secret, body=body,
                    message_id="msg_test", policy=policy or DeliveryPolicy(allow_hosts=LOOPBACK),
                    record=recorded.append)


def test_delivery_to_a_loopback_receiver_is_refused_without_the_allow_list():
    secret = owner_secret(KEY, "alice")
    with Receiver(secret) as rx:
        # A name that resolves to loopback: only the delivery-time check can catch it.
        url = rx.url.replace("127.0.0.1", "localhost")
        delivery = _delivery(url, secret, [], DeliveryPolicy(attempts=1, allow_hosts=()))
        delivery.attempt = 1
        attempt = send_once(delivery)
        time.sleep(0.2)
        assert rx.requests == []
    assert attempt.error == "webhook_address_blocked" and attempt.status is None


def test_redirects_are_not_followed():
    secret = owner_secret(KEY, "alice")
    with Receiver(secret, statuses=[302], location="/elsewhere") as rx:
        recorded = []
        delivery = _delivery(rx.url, secret, recorded, DeliveryPolicy(attempts=1, allow_hosts=LOOPBACK))
        delivery.attempt = 1
        attempt = send_once(delivery)
        time.sleep(0.2)
        assert [r.path for r in rx.requests] == ["/hook"]
    assert attempt.status == 302 and attempt.error == "webhook_http_error"


# --- retries ---------------------------------------------------------------------------

def test_non_2xx_is_retried_with_backoff_and_every_attempt_recorded():
    secret = owner_secret(KEY, "alice")
    recorded = []
    policy = DeliveryPolicy(attempts=4, base_delay=0.2, total_seconds=30, timeout=5, allow_hosts=LOOPBACK)
    with Receiver(secret, statuses=[500, 503]) as rx:
        dispatcher = Dispatcher()
        assert dispatcher.submit(_delivery(rx.url, secret, recorded, policy))
        assert dispatcher.idle(timeout=20)
        seen = rx.requests
    assert [(a.attempt, a.status, a.error) for a in recorded] == [
        (1, 500, "webhook_http_error"), (2, 503, "webhook_http_error"), (3, 200, None)]
    assert [r.answered for r in seen] == [500, 503, 200]
    assert all(r.verified for r in seen)  # each attempt signed afresh, and correctly
    assert {r.headers["webhook-id"] for r in seen} == {"msg_test"}  # one message, retried
    # Backoff: waits of about 0.2 s then 0.4 s (each + up to 20 % jitter).
    gaps = [(b.at - a.at).total_seconds() for a, b in zip(recorded, recorded[1:])]
    # (Upper bounds loose: the machine may be busy.)
    assert 0.2 <= gaps[0] < 0.2 * 1.2 + 1.0 and 0.4 <= gaps[1] < 0.4 * 1.2 + 1.0, gaps
    assert gaps[1] > gaps[0]


def test_retries_stop_at_the_attempt_limit_and_on_network_errors():
    recorded = []
    policy = DeliveryPolicy(attempts=3, base_delay=0.05, total_seconds=30, timeout=1, allow_hosts=LOOPBACK)
    with Receiver(None) as rx:  # a port nobody listens on once the receiver is gone
        url = rx.url
    dispatcher = Dispatcher()
    dispatcher.submit(_delivery(url, owner_secret(KEY, "alice"), recorded, policy))
    assert dispatcher.idle(timeout=20)
    assert [(a.attempt, a.status, a.error) for a in recorded] == [
        (1, None, "webhook_unreachable"), (2, None, "webhook_unreachable"), (3, None, "webhook_unreachable")]


def test_no_retry_after_the_total_time():
    recorded = []
    # The first retry would come after 1 s, past the 0.5 s allowed in all.
    policy = DeliveryPolicy(attempts=5, base_delay=1.0, total_seconds=0.5, timeout=1, allow_hosts=LOOPBACK)
    with Receiver(owner_secret(KEY, "alice"), statuses=[500, 500, 500]) as rx:
        dispatcher = Dispatcher()
        dispatcher.submit(_delivery(rx.url, owner_secret(KEY, "alice"), recorded, policy))
        assert dispatcher.idle(timeout=10)
    assert [a.status for a in recorded] == [500]


# --- payloads and the job record -------------------------------------------------------

SECRET_VALUES = ("AKIAEXAMPLESECRETKEY", "s3-secret-value", "hf_token_value", "X-Amz-Signature")


def _job_with_secrets(store, settings):
    from shared.credentials import SourceCredentials, seal, new_key

    settings = settings.model_copy(update={"credentials_key": SecretStr(new_key())})
    creds = SourceCredentials(s3_access_key=SECRET_VALUES[0], s3_secret_key=SECRET_VALUES[1],
                              hub_token=SECRET_VALUES[2])
    job, _ = store.create(
        f"https://example.org/model.tar?{SECRET_VALUES[3]}=abc", owner="alice",
        sealed_credentials=seal(creds, settings.credentials_key), webhook_url="https://hooks.example.org/x",
    )
    return job


def test_payloads_carry_no_credentials(store, settings):
    job = _job_with_secrets(store, settings)
    job.state, job.attempts = JobState.converting, 1
    job.progress = Progress(percent=40.0, stage="calibrating", layers_done=1, layers_total=2)
    started = json.loads(payload(WebhookEvent.started, job))
    progress = json.loads(payload(WebhookEvent.progress, job, 1, 2))
    job.state, job.error = JobState.failed, JobError(code="check_failed", message="see report.json")
    job.artifacts = [Artifact(name="report.json", size=10, key="internal-prefix/s3-object/report.json", sha256="ab" * 32)]
    completed = json.loads(payload(WebhookEvent.completed, job))

    assert started["type"] == "job.started" and started["data"]["job_id"] == job.id
    assert progress["data"]["progress"] == {"stage": "calibrating", "done": 1, "total": 2, "percent": 40.0}
    outcome = completed["data"]["outcome"]
    assert outcome["error_code"] == "check_failed"
    assert outcome["artifacts"] == [{"name": "report.json", "size": 10, "sha256": "ab" * 32,
                                     "path": f"/v1/jobs/{job.id}/artifacts/report.json"}]
    assert job.sealed_credentials  # the record has them; no payload does
    for body in (started, progress, completed):
        text = json.dumps(body)
        for secret in (*SECRET_VALUES, job.sealed_credentials, "example.org/model.tar", "s3-object"):
            assert secret not in text


def test_attempts_are_recorded_in_the_job(store, settings):
    settings = settings.model_copy(update={"webhook_signing_key": KEY, "webhook_retry_base_delay": 0.05})
    with Receiver(owner_secret(KEY, "alice"), statuses=[500]) as rx:
        job, _ = store.create("https://example.org/m/", owner="alice", webhook_url=rx.url,
                              webhook_events=[WebhookEvent.started, WebhookEvent.completed])
        hooks = JobWebhooks.for_job(job, settings, store)
        hooks.send(WebhookEvent.started, job)
        hooks.send(WebhookEvent.progress, job)  # not asked for: never sent
        rx.wait_for(lambda reqs: len(reqs) == 2)
        deadline = time.monotonic() + 10
        while len(store.get(job.id).webhook_deliveries) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    deliveries = store.get(job.id).webhook_deliveries
    assert [(d.event, d.attempt, d.status, d.error) for d in deliveries] == [
        (WebhookEvent.started, 1, 500, "webhook_http_error"), (WebhookEvent.started, 2, 200, None)]
    assert all(r.verified and r.payload["type"] == "job.started" for r in rx.requests)

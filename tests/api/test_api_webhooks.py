"""Webhooks through the API: webhook_url and webhook_events at submission, and the owner's
secret at GET /v1/webhooks/secret (FastAPI's test client, real Redis; the queue records)."""
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.deps import get_queue
from api.main import app
from shared.settings import get_settings
from shared.webhook_signing import owner_secret
from recording_queue import RecordingQueue  # tests/ is on sys.path (pytest's rootdir-based import)

SIGNING_KEY = "test-signing-key-0123456789abcdef"


@pytest.fixture
def queue():
    return RecordingQueue()


@pytest.fixture
def use(make_settings, queue, keys):
    """use(**settings) -> a client sending alice's key to an app with those settings."""
    with TestClient(app, raise_server_exceptions=False, headers=keys.headers("alice")) as client:
        def make(**overrides):
            settings = make_settings(**overrides)
            app.dependency_overrides[get_settings] = lambda: settings
            app.dependency_overrides[get_queue] = lambda: queue
            return client

        yield make
    app.dependency_overrides.clear()


def test_webhook_fields_are_stored_and_shown(use, store):
    client = use(webhook_signing_key=SIGNING_KEY)
    r = client.post("/v1/jobs", json={"source_url": "https://example.org/gpt2/",
                                      "webhook_url": "https://hooks.example.org/attnonly?team=a",
                                      "webhook_events": ["completed", "started", "completed"]})
    assert r.status_code == 202, r.text
    job = client.get(r.json()["links"]["self"]).json()
    assert job["webhook_url"] == "https://hooks.example.org/attnonly?team=a"
    assert job["webhook_events"] == ["completed", "started"]
    assert job["webhook_deliveries"] == []
    assert store.get(job["id"]).webhook_url == "https://hooks.example.org/attnonly?team=a"

    plain = client.post("/v1/jobs", json={"source_url": "https://example.org/gpt2/"}).json()
    shown = client.get(plain["links"]["self"]).json()
    assert shown["webhook_url"] is None and shown["webhook_events"] == ["started", "progress", "completed"]
    # Events without a URL are kept and unused (no rule ties the two fields together).
    unused = client.post("/v1/jobs", json={"source_url": "https://example.org/gpt2/", "webhook_events": ["completed"]})
    assert unused.status_code == 202, unused.text
    shown = client.get(unused.json()["links"]["self"]).json()
    assert shown["webhook_url"] is None and shown["webhook_events"] == ["completed"]


def test_without_a_signing_key_webhooks_are_refused(use, queue):
    client = use()
    r = client.post("/v1/jobs", json={"source_url": "https://example.org/gpt2/",
                                      "webhook_url": "https://hooks.example.org/x"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "webhooks_not_configured"
    assert queue.sent == []
    secret = client.get("/v1/webhooks/secret")
    assert secret.status_code == 403 and secret.json()["error"]["code"] == "webhooks_not_configured"
    # Jobs without a webhook are not affected.
    assert client.post("/v1/jobs", json={"source_url": "https://example.org/gpt2/"}).status_code == 202


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/hook", "http://[::1]/hook", "http://[::ffff:7f00:1]/",
                                 "http://169.254.169.254/latest/meta-data", "http://10.1.2.3/"])
def test_literal_blocked_addresses_are_refused_at_submission(use, queue, url):
    client = use(webhook_signing_key=SIGNING_KEY, fetch_allow_hosts=[])
    r = client.post("/v1/jobs", json={"source_url": "https://example.org/gpt2/", "webhook_url": url})
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "webhook_address_blocked"
    assert queue.sent == []


def test_a_batch_with_one_blocked_webhook_is_refused_whole(use, queue):
    client = use(webhook_signing_key=SIGNING_KEY, fetch_allow_hosts=[])
    bodies = [{"source_url": "https://example.org/a/", "webhook_url": "https://hooks.example.org/x"},
              {"source_url": "https://example.org/b/", "webhook_url": "http://192.168.0.1/x"}]
    r = client.post("/v1/jobs/batch", json=bodies)
    assert r.status_code == 403 and r.json()["error"]["code"] == "webhook_address_blocked"
    assert r.json()["error"]["message"].startswith("[1].webhook_url")
    assert queue.sent == []


@pytest.mark.parametrize("body", [
    {"webhook_url": "ftp://hooks.example.org/x"},
    # Addresses only in dotted-decimal or [IPv6] form: other spellings do not match the pattern.
    {"webhook_url": "http://0x7f.1/hook"},
    {"webhook_url": "http://2130706433/hook"},
    {"webhook_url": "http://[fe80::1%25eth0]/hook"},
    {"webhook_url": "http://hooks.example.123/x"},
    {"webhook_url": "http://user@hooks.example.org/x"},
    {"webhook_url": "http://hooks.example.org:0/x"},
    {"webhook_url": "https://hooks.example.org/x", "webhook_events": ["finished"]},
    {"webhook_url": "https://hooks.example.org/x", "webhook_events": []},
])
def test_bad_webhook_fields_are_validation_errors(use, queue, body):
    client = use(webhook_signing_key=SIGNING_KEY)
    r = client.post("/v1/jobs", json={"source_url": "https://example.org/gpt2/", **body})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", r.text
    assert queue.sent == []


def test_each_owner_reads_their_own_secret(use, keys):
    client = use(webhook_signing_key=SIGNING_KEY)
    alice = client.get("/v1/webhooks/secret")
    bob = client.get("/v1/webhooks/secret", headers=keys.headers("bob"))
    assert alice.status_code == bob.status_code == 200
    assert alice.headers["cache-control"] == "no-store"
    alice_secret, bob_secret = alice.json()["secret"], bob.json()["secret"]
    assert alice_secret.startswith("whsec_") and alice_secret != bob_secret
    assert SIGNING_KEY not in alice.text
    # The secret the API shows is the one a worker derives and signs with.
    assert alice_secret == owner_secret(SecretStr(SIGNING_KEY), "alice")
    assert client.get("/v1/webhooks/secret", headers={"Authorization": "Bearer nope"}).status_code == 401

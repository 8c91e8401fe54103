"""A job whose own S3 endpoint (source_credentials.s3_endpoint_url) names a blocked host: the
worker resolves it, refuses it before any S3 client exists, and fails the job with
s3_endpoint_blocked, without naming the endpoint in the job's error."""
from pydantic import SecretStr

from shared.credentials import SourceCredentials, new_key, seal
from shared.jobs import JobState
from worker.tasks import run_job


class NoConvert:
    def __call__(self, *args, **kwargs):
        raise AssertionError("nothing was fetched, so nothing may be converted")


def test_a_job_whose_endpoint_resolves_to_a_blocked_address_fails(store, storage, make_settings, monkeypatch):
    import boto3

    key = new_key()
    settings = make_settings(credentials_key=key, fetch_allow_hosts=[])  # no loopback allowance
    endpoint = "http://localhost:9000/storage"  # a name: only the worker's resolution finds loopback
    sealed = seal(SourceCredentials(s3_access_key="user-key", s3_secret_key="user-secret", s3_endpoint_url=endpoint),
                  SecretStr(key))
    job, _ = store.create("s3://users-bucket/model/", None, owner="alice", sealed_credentials=sealed)
    clients = []
    real_client = boto3.client
    monkeypatch.setattr(boto3, "client", lambda *a, **k: clients.append(k.get("endpoint_url")) or real_client(*a, **k))
    assert run_job(job.id, settings=settings, store=store, storage=storage, device="cpu",
                   convert=NoConvert()) == JobState.failed
    failed = store.get(job.id)
    assert failed.error.code == "s3_endpoint_blocked", failed.error
    assert "localhost" not in failed.error.message and "9000" not in failed.error.message
    assert endpoint not in clients  # no S3 client was ever pointed at it
    assert failed.sealed_credentials is None

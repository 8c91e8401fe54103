"""Fixtures for the service's tests: a private Redis and an S3-compatible server.

Each test session starts its own redis-server on a free loopback port (the same
building blocks as ``python -m deploy.local``), so the tests never touch a Redis that
someone else uses. Each test gets its own key prefix and bucket on top of that.

Two API keys, ``alice`` and ``bob``, are configured in every test's settings; the keys
themselves are made fresh for each session and only their hashes reach the settings.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import uuid
from contextlib import ExitStack
from pathlib import Path

import pytest

from deploy.local import free_port, redis_answers, start_redis_server, start_s3_server

_KEYS = {name: "ak_test_" + secrets.token_urlsafe(24) for name in ("alice", "bob")}


def _key_entries(names=("alice", "bob")) -> str:
    return ",".join(f"{n}:{hashlib.sha256(_KEYS[n].encode()).hexdigest()}" for n in names)


class ApiKeys:
    """The session's test keys: ``keys.headers("bob")``, ``keys.entries()``."""

    plain = _KEYS

    @staticmethod
    def headers(name: str = "alice") -> dict:
        return {"Authorization": f"Bearer {_KEYS[name]}"}

    @staticmethod
    def entries(names=("alice", "bob")) -> str:
        """The ATTNONLY_API_KEYS value that accepts the keys of ``names``."""
        return _key_entries(names)


@pytest.fixture(scope="session")
def keys() -> ApiKeys:
    return ApiKeys()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    url = os.environ.get("ATTNONLY_TEST_REDIS_URL")
    if url:
        return url
    if shutil.which("redis-server") is None:
        if redis_answers("redis://127.0.0.1:6379/15"):
            return "redis://127.0.0.1:6379/15"
        pytest.fail("the tests need redis-server (Debian: apt-get install redis-server; .ci/run installs it)")
    with ExitStack() as stack:
        port = free_port()
        start_redis_server(port, stack, tmp_path_factory.mktemp("redis-logs"))
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    with ExitStack() as stack:
        yield start_s3_server(stack)


@pytest.fixture
def make_settings(redis_url, s3_endpoint, tmp_path):
    """Settings for one test: its own Redis key prefix, bucket and work folder."""
    from shared.settings import Settings

    tag = uuid.uuid4().hex[:10]

    def make(**overrides):
        values = dict(
            redis_url=redis_url,
            redis_key_prefix=f"test-{tag}",
            s3_endpoint_url=s3_endpoint,
            s3_access_key="test-key",
            s3_secret_key="test-secret",
            s3_bucket=f"test-{tag}",
            gpu_queue=f"test-{tag}",
            fetch_allow_hosts=["127.0.0.1", "localhost"],
            work_dir=Path(tmp_path) / "work",
            api_keys=_key_entries(),
            # Outages are simulated: give up on them quickly.
            storage_attempts=2,
            storage_retry_base_delay=0.05,
            store_retry_seconds=2,
        )
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings):
    return make_settings()


@pytest.fixture
def store(settings):
    from shared.jobs import JobStore, redis_client

    client = redis_client(settings.redis_url)
    yield JobStore(client, settings.redis_key_prefix, settings.job_ttl_seconds)
    keys = list(client.scan_iter(f"{settings.redis_key_prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def storage(settings):
    from shared.storage import Storage

    storage = Storage(settings)
    storage.ensure_bucket()
    return storage

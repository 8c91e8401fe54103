"""Settings: environment variables, defaults, validation."""
import pytest
from pydantic import ValidationError

from shared.settings import Settings


def test_defaults_are_safe(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("ATTNONLY_"):
            monkeypatch.delenv(name)
    s = Settings()
    assert s.allow_pickle is False
    assert s.fetch_allow_hosts == []  # loopback and private hosts are refused by default
    assert s.s3_source_scopes == [] and s.s3_source_access_key is None  # no s3:// source is read
    assert s.s3_endpoint_url is None
    assert s.visibility_timeout > s.task_time_limit
    assert s.gpu_queue == "gpu"


def test_reads_prefixed_environment(monkeypatch):
    monkeypatch.setenv("ATTNONLY_REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("ATTNONLY_FETCH_ALLOW_HOSTS", "127.0.0.1, localhost")
    monkeypatch.setenv("ATTNONLY_S3_SECRET_KEY", "hunter2")
    monkeypatch.setenv("ATTNONLY_ALLOW_PICKLE", "true")
    s = Settings()
    assert s.redis_url == "redis://example:6380/2"
    assert s.fetch_allow_hosts == ["127.0.0.1", "localhost"]
    assert s.allow_pickle is True
    assert s.s3_credentials()[1] == "hunter2"
    assert "hunter2" not in repr(s)  # secrets stay out of logs


def test_visibility_timeout_must_exceed_time_limit():
    with pytest.raises(ValidationError, match="visibility_timeout"):
        Settings(task_time_limit=3600, visibility_timeout=3600)
    assert Settings(task_time_limit=3600, visibility_timeout=3601).visibility_timeout == 3601


def test_public_endpoint_falls_back_to_the_internal_one():
    assert Settings(s3_endpoint_url="http://minio:9000").public_s3_endpoint == "http://minio:9000"
    s = Settings(s3_endpoint_url="http://minio:9000", s3_public_endpoint_url="http://localhost:9000")
    assert s.public_s3_endpoint == "http://localhost:9000"


def test_fetch_limits_carry_the_settings():
    s = Settings(max_download_bytes=1234, fetch_allow_hosts=["127.0.0.1"], fetch_max_redirects=2,
                 s3_endpoint_url="http://s3:9000", s3_access_key="a", s3_secret_key="b")
    limits = s.fetch_limits()
    assert limits.max_download_bytes == 1234
    assert tuple(limits.allow_hosts) == ("127.0.0.1",)
    assert limits.max_redirects == 2
    assert limits.allow_pickle is False
    assert (limits.s3_endpoint_url, limits.s3_access_key, limits.s3_secret_key) == ("http://s3:9000", "a", "b")


def test_access_defaults_are_safe(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("ATTNONLY_"):
            monkeypatch.delenv(name)
    s = Settings()
    assert s.api_keys == [] and s.allow_anonymous is False  # no key: nothing is served
    assert s.rate_limit_jobs > 0 and s.rate_limit_window_seconds == 60
    assert s.max_request_bytes == 1024 * 1024
    assert s.presign_ttl_seconds == 300


def test_api_keys_from_the_environment(monkeypatch):
    import hashlib

    digest = hashlib.sha256(b"secret-key").hexdigest()
    other = hashlib.sha256(b"other-key").hexdigest()
    monkeypatch.setenv("ATTNONLY_API_KEYS", f"alice:{digest.upper()}, {other} ,")
    s = Settings()
    assert [(k.name, k.sha256) for k in s.api_keys] == [("alice", digest), (f"key-{other[:12]}", other)]
    assert "secret-key" not in repr(s)


@pytest.mark.parametrize("entry, message", [
    ("alice:secret-key", "never the key itself"),
    ("ak_plain_key_pasted_by_mistake", "SHA-256"),
    ("bad name:" + "a" * 64, "letters, digits"),
    ("alice:" + "a" * 63, "64 hex"),
    ("alice:" + "a" * 64 + ",bob:" + "a" * 64, "two names"),
])
def test_bad_api_key_entries_are_refused(monkeypatch, entry, message):
    monkeypatch.setenv("ATTNONLY_API_KEYS", entry)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_short_timeouts_for_tests_still_keep_their_order():
    s = Settings(task_time_limit=9, visibility_timeout=10)
    assert s.visibility_timeout > s.task_time_limit
    with pytest.raises(ValidationError):
        Settings(task_time_limit=4, visibility_timeout=10)


def test_sources_are_read_with_the_source_credentials_where_set(monkeypatch):
    s = Settings(s3_endpoint_url="http://s3:9000", s3_access_key="a", s3_secret_key="b")
    limits = s.fetch_limits(owner="alice")
    assert (limits.s3_endpoint_url, limits.s3_access_key, limits.s3_secret_key) == ("http://s3:9000", "a", "b")
    assert limits.s3_source_rules.owner == "alice" and limits.s3_source_rules.scopes == ()
    assert limits.s3_source_rules.artifacts_bucket == s.s3_bucket

    monkeypatch.setenv("ATTNONLY_S3_SOURCE_ACCESS_KEY", "read-only")
    monkeypatch.setenv("ATTNONLY_S3_SOURCE_SECRET_KEY", "ro-secret")
    monkeypatch.setenv("ATTNONLY_S3_SOURCE_ENDPOINT_URL", "http://sources:9000")
    s = Settings(s3_endpoint_url="http://s3:9000", s3_access_key="a", s3_secret_key="b")
    limits = s.fetch_limits()
    assert (limits.s3_endpoint_url, limits.s3_access_key, limits.s3_secret_key) == (
        "http://sources:9000", "read-only", "ro-secret")
    assert s.s3_credentials() == ("a", "b")  # the artifacts keep theirs
    assert "ro-secret" not in repr(s)


def test_source_credentials_come_in_pairs_and_stay_on_their_endpoint():
    with pytest.raises(ValidationError, match="together"):
        Settings(s3_source_access_key="read-only")
    with pytest.raises(ValidationError, match="artifact credentials are not sent elsewhere"):
        Settings(s3_endpoint_url="http://s3:9000", s3_access_key="a", s3_secret_key="b",
                 s3_source_endpoint_url="http://elsewhere:9000")
    same = Settings(s3_endpoint_url="http://s3:9000", s3_source_endpoint_url="http://s3:9000")
    assert same.fetch_limits().s3_endpoint_url == "http://s3:9000"

"""A job's own S3 endpoint (SourceCredentials.s3_endpoint_url): the job's keys are sent there
and only there, the service's keys never; its addresses are checked (resolved names too)
before the S3 client exists, and errors do not name it."""

import pytest
from pydantic import SecretStr

from shared.credentials import SourceCredentials, new_key, seal, unseal
from shared.fetch import FetchError, parse_url
from shared.fetch.s3_remote import S3Remote

CLOSED = "http://127.0.0.1:1"  # nothing listens there: a request sent to it fails


@pytest.fixture(scope="module")
def users_s3():
    """The user's own S3-compatible service (a moto server on loopback) with one object."""
    import boto3
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="user-key",
                          aws_secret_access_key="user-secret", region_name="us-east-1")
    client.create_bucket(Bucket="users-bucket")
    client.put_object(Bucket="users-bucket", Key="model/config.json", Body=b'{"model_type": "gpt2"}')
    yield endpoint
    moto.stop()


def _own(endpoint=None, keys=True):
    return SourceCredentials(s3_access_key="user-key" if keys else None, s3_secret_key="user-secret" if keys else None,
                             s3_endpoint_url=endpoint)


def test_the_jobs_keys_go_to_the_jobs_endpoint_only(make_settings):
    settings = make_settings(s3_endpoint_url="http://service-s3:9000", s3_source_endpoint_url=None)
    limits = settings.fetch_limits("alice", _own("https://users-s3.example.org"))
    assert (limits.s3_endpoint_url, limits.s3_access_key, limits.s3_secret_key) == (
        "https://users-s3.example.org", "user-key", "user-secret")
    assert limits.s3_endpoint_checked and "users-s3" not in repr(limits)
    # keys without an endpoint: today's behaviour, the service's source endpoint
    limits = settings.fetch_limits("alice", _own())
    assert (limits.s3_endpoint_url, limits.s3_access_key) == ("http://service-s3:9000", "user-key")
    assert not limits.s3_endpoint_checked
    # an endpoint without keys is unused: the service's keys never go to the job's endpoint
    limits = settings.fetch_limits("alice", _own("https://users-s3.example.org", keys=False))
    assert (limits.s3_endpoint_url, limits.s3_access_key) == ("http://service-s3:9000", "test-key")
    assert not limits.s3_endpoint_checked


def test_the_endpoint_is_sealed_with_the_keys():
    key = SecretStr(new_key())
    sealed = seal(_own("https://users-s3.example.org"), key)
    assert "users-s3" not in sealed
    opened = unseal(sealed, key)
    assert opened.s3_endpoint_url == "https://users-s3.example.org"
    assert "users-s3" not in repr(opened) and "users-s3" not in str(opened)


def test_the_s3_client_reads_from_the_jobs_endpoint(make_settings, users_s3):
    # The service's own endpoint is closed: only the job's endpoint can answer.
    settings = make_settings(s3_endpoint_url=CLOSED, s3_source_endpoint_url=None, fetch_connect_timeout=1.0)
    remote = S3Remote(parse_url("s3://users-bucket/model"), settings.fetch_limits("alice", _own(users_s3)))
    try:
        assert remote.client.meta.endpoint_url == users_s3
        assert remote.exists("config.json") and not remote.exists("missing.json")
    finally:
        remote.close()
    # the same keys without the endpoint go to the service's endpoint, where nothing answers
    remote = S3Remote(parse_url("s3://users-bucket/model"), settings.fetch_limits("alice", _own()))
    try:
        assert remote.client.meta.endpoint_url == CLOSED
        with pytest.raises(FetchError) as refused:
            remote.exists("config.json")
        assert refused.value.code == "source_unreachable"
    finally:
        remote.close()


@pytest.mark.parametrize("endpoint", [
    "http://localhost:{port}",          # a name: resolved, then refused for its loopback address
    "http://127.0.0.1:{port}",
    "http://169.254.169.254",           # cloud metadata
    "http://10.1.2.3:9000/prefix",
    "http://[::ffff:127.0.0.1]:{port}",
])
def test_a_blocked_endpoint_is_refused_before_any_client_exists(make_settings, users_s3, monkeypatch, endpoint):
    import boto3

    port = users_s3.rsplit(":", 1)[1]
    endpoint = endpoint.format(port=port)
    settings = make_settings(fetch_allow_hosts=[])  # the tests' loopback allowance withdrawn
    made = []
    monkeypatch.setattr(boto3, "client", lambda *a, **k: made.append(a) or pytest.fail("an S3 client was made"))
    with pytest.raises(FetchError) as refused:
        S3Remote(parse_url("s3://users-bucket/model"), settings.fetch_limits("alice", _own(endpoint)))
    assert refused.value.code == "s3_endpoint_blocked"
    assert made == []
    host = parse_url(endpoint).host
    assert host not in refused.value.message and port not in refused.value.message


def test_errors_from_the_jobs_endpoint_do_not_name_it(make_settings):
    settings = make_settings(fetch_connect_timeout=1.0)  # loopback allowed: the closed port is tried
    limits = settings.fetch_limits("alice", _own(CLOSED))
    remote = S3Remote(parse_url("s3://users-bucket/model"), limits)
    try:
        with pytest.raises(FetchError) as failed:
            remote.exists("config.json")
    finally:
        remote.close()
    assert failed.value.code == "source_unreachable"
    assert "127.0.0.1" not in failed.value.message and CLOSED not in failed.value.message


@pytest.mark.parametrize("endpoint", ["ftp://example.org", "https://example.org/?a=1", "https://example.org/#f",
                                      "https://user@example.org", "s3://bucket"])
def test_an_endpoint_that_is_not_plain_http_is_invalid(endpoint):
    from shared.s3_endpoint import check_endpoint

    with pytest.raises(FetchError) as refused:
        check_endpoint(endpoint, (), resolve_names=False)
    assert refused.value.code == "s3_endpoint_invalid"

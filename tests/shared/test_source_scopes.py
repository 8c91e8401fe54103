"""S3 source scopes: the setting's syntax and the rule that decides which s3:// sources an
owner may read (shared/source_scopes.py)."""
import pytest
from pydantic import ValidationError

from shared.fetch import parse_url
from shared.safefiles import FetchError
from shared.settings import Settings
from shared.source_scopes import (
    SourceRules, SourceScope, check_s3_source, check_source_url, parse_scopes, s3_source_allowed,
)

SCOPES = "alice=models/team-a, bob=bob-models, *=public-models/released"


def allowed(url: str, owner, settings: Settings) -> bool:
    parsed = parse_url(url)
    return s3_source_allowed(parsed.host, parsed.target, SourceRules.for_owner(settings, owner))


@pytest.fixture
def settings():
    return Settings(s3_bucket="artifacts", s3_source_scopes=SCOPES)


# --- the setting --------------------------------------------------------------------------

def test_scopes_parse_from_the_environment(monkeypatch):
    monkeypatch.setenv("ATTNONLY_S3_SOURCE_SCOPES", " alice=models/team-a/ ,*=public-models, bob=s3://b-b/x/y ,")
    assert Settings().s3_source_scopes == [
        SourceScope("alice", "models", ("team-a",)),
        SourceScope("*", "public-models", ()),
        SourceScope("bob", "b-b", ("x", "y")),
    ]
    assert [str(s) for s in Settings().s3_source_scopes] == ["alice=models/team-a", "*=public-models", "bob=b-b/x/y"]


def test_scopes_default_to_none(monkeypatch):
    monkeypatch.delenv("ATTNONLY_S3_SOURCE_SCOPES", raising=False)
    assert Settings().s3_source_scopes == []


@pytest.mark.parametrize("entry, message", [
    ("models/team-a", "OWNER=BUCKET"),
    ("alice=", "OWNER=BUCKET"),
    ("=models", "OWNER=BUCKET"),
    ("bad owner=models", "API key name"),
    ("alice=Models", "not a bucket name"),
    ("alice=ab", "not a bucket name"),
    ("alice=-models", "not a bucket name"),
    ("alice=my..bucket", "two dots"),
    ("alice=192.168.1.10", "IP address"),
    ("alice=under_score", "not a bucket name"),
    ("alice=models/../artifacts", "plain path segments"),
    ("alice=models/team-a/..", "plain path segments"),
    ("alice=models/./team-a", "plain path segments"),
    ("alice=models//team-a", "plain path segments"),
    ("alice=models/%2e%2e/x", "plain path segments"),
    ("alice=models/a b", "plain path segments"),
    ("alice=models/a\\b", "plain path segments"),
])
def test_bad_scope_entries_are_refused_with_the_reason(monkeypatch, entry, message):
    monkeypatch.setenv("ATTNONLY_S3_SOURCE_SCOPES", f"*=fine-bucket,{entry}")
    with pytest.raises(ValidationError, match="s3_source_scopes entry") as info:
        Settings()
    assert message in str(info.value)


# --- the rule -----------------------------------------------------------------------------

def test_an_owner_reads_inside_their_own_scope_only(settings):
    assert allowed("s3://models/team-a/", "alice", settings)
    assert allowed("s3://models/team-a", "alice", settings)
    assert allowed("s3://models/team-a/gpt2/", "alice", settings)
    assert allowed("s3://models/team-a/gpt2.tar.gz", "alice", settings)
    assert allowed("s3://bob-models/anything/at/all/", "bob", settings)
    # Not someone else's, not outside the prefix.
    assert not allowed("s3://models/team-a/", "bob", settings)
    assert not allowed("s3://bob-models/x/", "alice", settings)
    assert not allowed("s3://models/", "alice", settings)
    assert not allowed("s3://models/team-b/", "alice", settings)
    assert not allowed("s3://other-bucket/team-a/", "alice", settings)


def test_a_star_scope_applies_to_every_owner_and_the_anonymous_one(settings):
    for owner in ("alice", "bob", "carol", None):
        assert allowed("s3://public-models/released/gpt2/", owner, settings)
        assert not allowed("s3://public-models/drafts/gpt2/", owner, settings)
    assert not allowed("s3://models/team-a/", None, settings)  # anonymous gets only "*"
    # A key named "anonymous" is an owner like any other; it is not the anonymous owner.
    named = Settings(s3_bucket="artifacts", s3_source_scopes="anonymous=models")
    assert allowed("s3://models/x/", "anonymous", named) and not allowed("s3://models/x/", None, named)


def test_prefixes_match_whole_segments(settings):
    assert not allowed("s3://models/team-ab/", "alice", settings)
    assert not allowed("s3://models/team-a.tar.gz", "alice", settings)
    assert not allowed("s3://models/team-a-old/x/", "alice", settings)
    assert not allowed("s3://public-models/released2/", "alice", settings)
    assert allowed("s3://public-models/released/", "alice", settings)


def test_the_artifacts_bucket_is_never_a_source():
    s = Settings(s3_bucket="artifacts", s3_source_scopes="alice=artifacts, *=artifacts/jobs")
    for owner in ("alice", "bob", None):
        for url in ("s3://artifacts/jobs/0b5e0e0e-1111-4222-8333-444455556666/", "s3://artifacts/",
                    "s3://artifacts/other/model.tar.gz"):
            assert not allowed(url, owner, s)
    with pytest.raises(FetchError) as info:
        check_s3_source("artifacts", "jobs/x/", SourceRules.for_owner(s, "alice"))
    assert info.value.code == "source_forbidden" and "artifacts bucket" in info.value.message


@pytest.mark.parametrize("key", [
    "models/team-a/../team-b/", "team-a/../../x", "..", "x/..", "./x", "x/./y",
    "x//y", "/x", "%2e%2e/x", "x/%2E%2e/y", "x/%2e/y",
])
def test_dot_segments_and_empty_segments_are_refused_outright(key):
    rules = SourceRules(owner="alice", scopes=tuple(parse_scopes("alice=models")), artifacts_bucket="artifacts")
    assert s3_source_allowed("models", "x/y/", rules)  # the scope covers the whole bucket...
    with pytest.raises(FetchError) as info:  # ...and still none of these
        check_s3_source("models", key, rules)
    assert info.value.code == "source_forbidden"


def test_a_dotdot_url_cannot_climb_into_another_prefix(settings):
    assert not allowed("s3://models/team-a/../team-b/", "alice", settings)
    assert not allowed("s3://models/team-a/%2e%2e/team-b/", "alice", settings)
    assert not allowed("s3://models/team-a//../team-b/", "alice", settings)


def test_an_empty_setting_refuses_every_s3_source():
    s = Settings(s3_bucket="artifacts", s3_source_scopes="")
    for owner in ("alice", None):
        for url in ("s3://models/team-a/", "s3://public-models/", "s3://x-y/z.tar.gz"):
            assert not allowed(url, owner, s)
    assert not s3_source_allowed("models", "x/", None)  # no rules at all: nothing


def test_the_message_names_the_source_and_never_other_owners_scopes(settings):
    with pytest.raises(FetchError) as info:
        check_source_url("s3://bob-models/secret/", "alice", settings)
    message = info.value.message
    assert info.value.code == "source_forbidden"
    assert "s3://bob-models/secret/" in message and "'alice'" in message and "not in" in message
    assert "team-a" not in message and "bob=" not in message and "public-models" not in message


def test_check_source_url_leaves_other_schemes_to_the_fetcher(settings):
    check_source_url("https://example.org/m/", "alice", settings)
    check_source_url("http://127.0.0.1/", "alice", settings)  # refused later, by the fetcher
    check_source_url("s3://models/team-a/x/", "alice", settings)
    with pytest.raises(FetchError):
        check_source_url("S3://models/team-b/x/", "alice", settings)  # scheme in capitals

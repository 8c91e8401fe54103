"""Which s3:// sources an owner may read (``ATTNONLY_S3_SOURCE_SCOPES``).

The worker reads s3:// sources with the service's own S3 credentials (or the separate
``ATTNONLY_S3_SOURCE_*`` ones), so without a rule any owner could read any bucket those
credentials reach, including the artifacts bucket with every other owner's converted
models. A source is therefore read only when it lies inside a scope granted to its owner.

Syntax of the setting: comma-separated entries ``OWNER=BUCKET`` or
``OWNER=BUCKET/PREFIX``, where OWNER is an API key name (the NAME of an
``ATTNONLY_API_KEYS`` entry) or ``*`` for every owner, anonymous included::

    ATTNONLY_S3_SOURCE_SCOPES="alice=models/team-a, bob=bob-models, *=public-models/released"

(``OWNER=s3://BUCKET/PREFIX`` is read the same; a trailing slash does not matter.)

Rules (``check_s3_source``):

* Empty setting: no s3:// source is allowed at all (the default).
* The artifacts bucket (``ATTNONLY_S3_BUCKET``) is never a source, whatever the scopes say.
* A prefix matches whole path segments: ``models/team-a`` allows ``models/team-a`` and
  ``models/team-a/x/``, never ``models/team-ab/`` nor ``models/team-a.tar.gz``.
  ``BUCKET`` alone allows the whole bucket.
* Keys are not normalised but refused when they could be read in two ways: a key with a
  ``..`` or ``.`` segment (also percent-encoded) or an empty one (``a//b``) is never
  allowed, so the key checked is exactly the key read. Trailing slashes do not count
  (the fetcher strips them too).
* Owners are compared exactly; the anonymous owner (``ATTNONLY_ALLOW_ANONYMOUS``) gets
  the ``*`` entries only.

A refused source raises ``FetchError("source_forbidden", ...)``; its message names the
bucket and key asked for, never anybody's scopes.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional, Union
from urllib.parse import unquote

from shared.safefiles import FetchError

if TYPE_CHECKING:
    from shared.settings import Settings

ANY_OWNER = "*"
FORBIDDEN = "source_forbidden"

# S3 bucket naming rules: 3-63 characters of lower-case letters, digits, dots and
# hyphens, beginning and ending with a letter or digit, no "..", not an IPv4 address.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")  # as API key names (shared.settings)
_PREFIX_CHARS = re.compile(r"^[^\x00-\x20\x7f\\?#]*$")


@dataclass(frozen=True)
class SourceScope:
    """One entry: ``owner`` (a key name or ``*``) may read ``bucket`` under ``prefix``
    (path segments; empty: the whole bucket)."""

    owner: str
    bucket: str
    prefix: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.owner}={self.bucket}" + "".join(f"/{p}" for p in self.prefix)

    def applies_to(self, owner: Optional[str]) -> bool:
        return self.owner == ANY_OWNER or (owner is not None and self.owner == owner)

    def covers(self, bucket: str, segments: tuple[str, ...]) -> bool:
        return bucket == self.bucket and segments[:len(self.prefix)] == self.prefix


def bucket_problem(bucket: str) -> Optional[str]:
    """Why ``bucket`` is not a valid S3 bucket name, or None."""
    if not _BUCKET.match(bucket):
        return ("a bucket name has 3 to 63 lower-case letters, digits, dots and hyphens, "
                "and begins and ends with a letter or digit")
    if ".." in bucket:
        return "a bucket name has no two dots in a row"
    try:
        ipaddress.IPv4Address(bucket)
    except ValueError:
        return None
    return "a bucket name is not an IP address"


def _bad_segment(segment: str) -> bool:
    return segment == "" or unquote(segment) in (".", "..")


def parse_scope(entry: str) -> SourceScope:
    """``OWNER=BUCKET`` or ``OWNER=BUCKET/PREFIX``; ValueError with the reason otherwise."""
    text = entry.strip()
    owner, sep, location = text.partition("=")
    owner, location = owner.strip(), location.strip()
    if not sep or not owner or not location:
        raise ValueError(f"s3_source_scopes entry {text!r}: write OWNER=BUCKET or OWNER=BUCKET/PREFIX "
                         f"(OWNER a key name or *)")
    if owner != ANY_OWNER and not _OWNER.match(owner):
        raise ValueError(f"s3_source_scopes entry {text!r}: the owner is an API key name "
                         f"(letters, digits and . _ @ -, at most 64) or *")
    location = location.removeprefix("s3://")
    bucket, _, prefix = location.partition("/")
    problem = bucket_problem(bucket)
    if problem:
        raise ValueError(f"s3_source_scopes entry {text!r}: {bucket!r} is not a bucket name ({problem})")
    prefix = prefix.rstrip("/")
    segments = tuple(prefix.split("/")) if prefix else ()
    if not _PREFIX_CHARS.match(prefix) or any(_bad_segment(s) for s in segments):
        raise ValueError(f"s3_source_scopes entry {text!r}: the prefix must be plain path segments "
                         f"(no '..', '.', '//', spaces, backslashes, '?' or '#')")
    return SourceScope(owner=owner, bucket=bucket, prefix=segments)


def parse_scopes(value: Union[str, Iterable[Union[str, SourceScope]], None]) -> list[SourceScope]:
    """The setting's value: a comma-separated string, or a list of entries or scopes."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [e for e in value.split(",") if e.strip()]
    return [e if isinstance(e, SourceScope) else parse_scope(e) for e in value]


@dataclass(frozen=True)
class SourceRules:
    """What one owner may read: the scopes that apply to them, minus the artifacts bucket.
    Carried by ``FetchLimits.s3_source_rules``; None there allows no s3:// source."""

    owner: Optional[str]
    scopes: tuple[SourceScope, ...] = ()
    artifacts_bucket: Optional[str] = None
    # The job reads with its own S3 keys: their permissions are the scope (the artifacts
    # bucket and unsafe keys are still refused).
    own_credentials: bool = False

    @classmethod
    def for_owner(cls, settings: "Settings", owner: Optional[str], own_credentials: bool = False) -> "SourceRules":
        return cls(
            owner=owner,
            scopes=tuple(s for s in settings.s3_source_scopes if s.applies_to(owner)),
            artifacts_bucket=settings.s3_bucket,
            own_credentials=own_credentials,
        )


def _forbidden(message: str) -> FetchError:
    return FetchError(FORBIDDEN, message)


def check_s3_source(bucket: str, key: str, rules: Optional[SourceRules]) -> None:
    """Return if ``rules`` let their owner read s3://bucket/key (a prefix or an object),
    else raise FetchError ``source_forbidden``. ``key`` is the key exactly as it will be
    read (``ParsedUrl.target`` of an s3 URL)."""
    shown = f"s3://{bucket}/{key}"
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    if rules is not None and rules.artifacts_bucket and bucket.lower() == rules.artifacts_bucket.lower():
        raise _forbidden(f"{shown} is in the service's artifacts bucket, which is never read as a source")
    trimmed = key.rstrip("/")
    segments = tuple(trimmed.split("/")) if trimmed else ()
    if any(_bad_segment(s) for s in segments):
        raise _forbidden(f"{shown}: keys with '..', '.' or empty ('//') path segments are refused")
    if rules is None:
        raise _forbidden(f"{shown}: no S3 source scopes apply here, so no s3:// source is read")
    if rules.own_credentials:
        return
    if not any(s.applies_to(rules.owner) and s.covers(bucket, segments) for s in rules.scopes):
        owner = rules.owner if rules.owner is not None else "anonymous"
        raise _forbidden(f"{shown} is not in the S3 source scopes of owner {owner!r}; "
                         f"an operator grants scopes in ATTNONLY_S3_SOURCE_SCOPES")


def s3_source_allowed(bucket: str, key: str, rules: Optional[SourceRules]) -> bool:
    try:
        check_s3_source(bucket, key, rules)
    except FetchError:
        return False
    return True


def check_source_url(url: str, owner: Optional[str], settings: "Settings", own_credentials: bool = False) -> None:
    """The API's check of a submitted source: an s3:// URL outside ``owner``'s scopes
    raises FetchError ``source_forbidden``. The URL is parsed by the fetcher's own parser,
    so the bucket and key checked are those the worker would read; other schemes, and
    URLs the fetcher refuses to parse (the job then fails with that error), pass here."""
    from shared.fetch import parse_url  # lazily: httpcore is only needed here

    try:
        parsed = parse_url(url)
    except FetchError:
        return
    if parsed.scheme == "s3":
        check_s3_source(parsed.host, parsed.target, SourceRules.for_owner(settings, owner, own_credentials))

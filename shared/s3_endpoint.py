"""The check of a job's own S3 endpoint (``SourceCredentials.s3_endpoint_url``): an address the
worker connects to with the job's keys, so it passes the same address guard as sources
(shared.fetch: blocked ranges minus ATTNONLY_FETCH_ALLOW_HOSTS).

The API checks a literal address at submission (a name's addresses may change); the worker
resolves the name and checks every address right before it creates the S3 client. Messages
never name the endpoint, its host or its addresses: they end up in the job's error, and the
endpoint is one of the job's credentials (never returned)."""
from __future__ import annotations

from urllib.parse import urlsplit

from shared.safefiles import FetchError

BLOCKED = "s3_endpoint_blocked"
INVALID = "s3_endpoint_invalid"
SCHEMES = ("http", "https")


def check_endpoint(url: str, allow_hosts: tuple[str, ...] | list[str], resolve_names: bool) -> None:
    """Raise FetchError ``s3_endpoint_invalid`` for an endpoint that is not a plain
    http(s)://host[:port][/path] URL, ``s3_endpoint_blocked`` for one whose address (a
    literal one; with ``resolve_names``, every address its name resolves to as well) is in a
    blocked range; ``source_unreachable`` for a name that does not resolve."""
    from shared.fetch import AddressPolicy, parse_url, resolve

    try:
        parsed = parse_url(url)
        split = urlsplit(url)
    except (FetchError, ValueError):
        raise FetchError(INVALID, "the job's s3_endpoint_url is not a valid URL") from None
    if parsed.scheme not in SCHEMES or split.query or split.fragment or "?" in url or "#" in url:
        raise FetchError(INVALID, "the job's s3_endpoint_url must be http(s)://host[:port][/path], "
                                  "without query or fragment")
    if parsed.ip is not None:
        addresses = [parsed.ip]
    elif resolve_names:
        try:
            addresses = resolve(parsed.host, parsed.effective_port)
        except FetchError:
            raise FetchError("source_unreachable", "the job's s3_endpoint_url host does not resolve") from None
    else:
        return
    try:
        AddressPolicy(tuple(allow_hosts)).check(parsed.host, addresses)
    except FetchError:
        raise FetchError(BLOCKED, "the job's s3_endpoint_url is (or resolves to) a private, loopback, "
                                  "link-local or otherwise blocked address; refusing to connect") from None

"""URLs parsed once, here, the way browsers parse hosts (decimal, hex, octal and short IPv4
forms, IDNA, trailing dots); every request is built from this parse, so no second parser can
disagree about the host."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from shared.hub import parse_hub_url
from shared.safefiles import FetchError

from .addresses import blocked_error, blocked_reason

ALLOWED_SCHEMES = ("http", "https", "s3", "hf")
MAX_URL_LENGTH = 8192


@dataclass(frozen=True)
class ParsedUrl:
    scheme: str
    host: str                     # IDNA/lower-cased name, dotted IPv4, or bare IPv6
    ip: object | None             # ipaddress object when the host is a literal address
    port: int | None              # None: the scheme's default
    target: str                   # path + query, percent-encoded, for the request line

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def effective_port(self) -> int:
        return self.port or (443 if self.scheme == "https" else 80)

    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"

    def __str__(self) -> str:
        # Messages show no query string: presigned URLs carry credentials there.
        return f"{self.scheme}://{self.authority()}{self.path}"


def _invalid(url: str, why: str) -> FetchError:
    # Echo the URL without its query (presigned URLs carry credentials there), shortened.
    shown = url.split("?", 1)[0]
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    return FetchError("url_invalid", f"{why}: {shown!r}")


def parse_url(url: str) -> ParsedUrl:
    """Parse and normalise a source URL; refuse anything ambiguous."""
    if not isinstance(url, str) or not url:
        raise FetchError("url_invalid", "the URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise _invalid(url, f"URL is longer than {MAX_URL_LENGTH} characters")
    # Parsers disagree on whitespace, control characters and backslashes in URLs;
    # refusing them removes the disagreement.
    if any(ord(c) <= 0x20 or ord(c) == 0x7F or c == "\\" for c in url):
        raise _invalid(url, "URL contains whitespace, control characters or backslashes")
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", url)
    if not match:
        raise _invalid(url, "URL has no scheme")
    scheme = match.group(1).lower()
    if scheme not in ALLOWED_SCHEMES:
        raise FetchError("url_scheme_not_allowed",
                         f"scheme {scheme!r} is not allowed; use {', '.join(ALLOWED_SCHEMES)}")
    if not url[len(scheme) + 1:].startswith("//"):
        raise _invalid(url, "URL must have the form scheme://host/path")
    if scheme == "hf":
        hub = parse_hub_url(url)
        return ParsedUrl("hf", hub.repo_id, None, None, hub.revision)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise _invalid(url, f"malformed URL ({exc})") from None
    if "@" in parts.netloc:
        raise _invalid(url, "credentials in URLs (user@host) are not accepted")
    host_text, port = _split_host_port(url, parts.netloc)
    if scheme == "s3":
        return _parse_s3(url, parts, host_text, port)
    host, ip = _normalise_host(url, host_text)
    target = _encode_target(parts.path or "/", parts.query)
    return ParsedUrl(scheme, host, ip, port, target)


def _split_host_port(url: str, netloc: str) -> tuple[str, int | None]:
    if netloc.startswith("["):
        close = netloc.find("]")
        if close < 0:
            raise _invalid(url, "unterminated IPv6 address")
        host, rest = netloc[:close + 1], netloc[close + 1:]
        if rest and not rest.startswith(":"):
            raise _invalid(url, "unexpected text after the IPv6 address")
        port_text = rest[1:] if rest else ""
    elif ":" in netloc:
        host, port_text = netloc.rsplit(":", 1)
    else:
        host, port_text = netloc, ""
    if not port_text:
        return host, None
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _invalid(url, f"port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def _normalise_host(url: str, host: str):
    """(host string used for DNS/SNI/Host header, ip object if the host is an address)."""
    if host.startswith("["):
        return _parse_ipv6_literal(url, host[1:-1])
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")  # IDNA maps e.g. fullwidth digits to ASCII
        except UnicodeError:
            raise _invalid(url, "host is not a valid internationalised domain name") from None
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]                    # "localhost." is "localhost"
    if not host:
        raise _invalid(url, "URL has no host")
    if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", host) or len(host) > 253:
        raise _invalid(url, "host contains characters that are not allowed in a host name")
    if _ends_in_number(host):
        ip = _parse_ipv4(host)
        if ip is None:
            raise _invalid(url, "host looks like an IPv4 address but is not a valid one")
        return str(ip), ip
    return host, None


def _parse_ipv6_literal(url: str, text: str):
    address, _, zone = text.replace("%25", "%", 1).partition("%")
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        raise _invalid(url, "invalid IPv6 address") from None
    if zone:
        # A zone only means something for link-local addresses, which are blocked anyway.
        reason = blocked_reason(ip)
        if reason:
            raise blocked_error(str(ip), ip, reason)
        raise _invalid(url, "IPv6 zone identifiers are not accepted")
    return str(ip), ip


def _ends_in_number(host: str) -> bool:
    # WHATWG URL standard: a host whose last label is numeric must be an IPv4 address.
    last = host.split(".")[-1]
    return last.isdigit() or bool(re.fullmatch(r"0x[0-9a-f]*", last))


def _parse_ipv4_part(part: str) -> int | None:
    if part.startswith("0x"):
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        return int(part[1:], 8) if re.fullmatch(r"[0-7]+", part[1:]) else None
    return int(part) if part.isdigit() else None


def _parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """IPv4 in every form inet_aton and browsers accept: 2130706433, 0x7f.1, 0177.0.0.1, 127.1."""
    parts = host.split(".")
    if len(parts) > 4 or any(p == "" for p in parts):
        return None
    try:
        numbers = [_parse_ipv4_part(p) for p in parts]
    except ValueError:
        return None
    if any(n is None for n in numbers):
        return None
    *leading, last = numbers
    if any(n > 255 for n in leading) or last >= 256 ** (5 - len(numbers)):
        return None
    value = last
    for i, n in enumerate(leading):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _encode_target(path: str, query: str) -> str:
    # Keep existing %-escapes and reserved characters; encode anything else (non-ASCII).
    safe = "/%:@!$&'()*+,;=-._~"
    target = quote(path, safe=safe)
    return f"{target}?{quote(query, safe=safe + '?')}" if query else target


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _parse_s3(url: str, parts, bucket: str, port: int | None) -> ParsedUrl:
    if port is not None or parts.query or parts.fragment:
        raise _invalid(url, "s3 URLs have the form s3://bucket/key, without port or query")
    if not _BUCKET.match(bucket) or ".." in bucket or _parse_ipv4(bucket) is not None:
        raise _invalid(url, f"{bucket!r} is not a valid S3 bucket name")
    return ParsedUrl("s3", bucket, None, None, parts.path.lstrip("/"))


"""Downloading a user-supplied source model without being turned against our own network.

`fetch_source(url, dest_dir, limits)` accepts http(s) URLs of a Hugging Face style
directory or of a .tar/.tar.gz/.tgz archive, and s3:// URLs of either. The defences:

* URLs are parsed once, here, the way browsers parse hosts (decimal, hex, octal and short
  IPv4 forms, IDNA, trailing dots), and every request is built from that parse, so no
  second parser can disagree about the host.
* A host is resolved once per fetch; every address is checked against the blocked ranges
  (loopback, private, link-local/metadata, CGNAT, multicast, ... and IPv6 forms that embed
  an IPv4 address) and the connection goes to a checked address only. A DNS answer that
  changes later (rebinding) is never consulted.
* Redirects are followed by hand, each target checked like the first URL.
* Timeouts on connect and read; a byte budget enforced while streaming.
* Archives are unpacked and headers validated by `shared.safefiles`.
* s3:// sources are read only inside the owner's scopes (`shared.source_scopes`, carried
  by `FetchLimits.s3_source_rules`; none allows no s3:// source), never from the
  artifacts bucket; checked before any S3 client exists.
* A job's own S3 endpoint (`FetchLimits.s3_endpoint_checked`) is resolved and every address
  checked before its S3 client exists (`shared.s3_endpoint`); boto3 then resolves the name
  again itself, so unlike http(s) sources its connection is not pinned to the checked address.
* On any failure `dest_dir` is left empty.
* `post_checked` sends webhook events (shared/webhook_delivery.py) through the same
  address checks and pinned connections; it follows no redirect.

Error codes (FetchError.code) are part of the job API; never rename one.
"""
from __future__ import annotations

import ipaddress
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import quote, urljoin, urlsplit

import httpcore

from shared.safefiles import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    MAX_INDEX_BYTES,
    PICKLE_FILE,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    FetchError,
    extract_archive,
    read_index_shards,
    validate_config,
    validate_model_dir,
    validate_safetensors_header,
)
from shared.hub import HubSource, parse_hub_url
from shared.source_scopes import SourceRules, check_s3_source

__all__ = [
    "ERROR_CODES", "FetchError", "FetchLimits", "fetch_source", "post_checked",
    "validate_config", "validate_safetensors_header",
]

ERROR_CODES = (
    "url_invalid", "url_scheme_not_allowed", "url_address_blocked", "too_many_redirects",
    "download_timeout", "source_not_found", "source_http_error", "source_unreachable",
    "download_too_large", "source_missing_file", "pickle_not_allowed",
    "archive_unsafe_member", "archive_too_large", "archive_invalid",
    "safetensors_invalid", "config_invalid", "source_forbidden", "source_unauthorized",
)

ALLOWED_SCHEMES = ("http", "https", "s3", "hf")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
MAX_URL_LENGTH = 8192
USER_AGENT = b"model-convert-fetch/1"
_CHUNK = 1 << 16
_PROGRESS_INTERVAL_S = 0.25

Progress = Callable[[int, "int | None"], None]
WeightHashes = Callable[[Path, "dict[str, str]"], None]


@dataclass(frozen=True)
class FetchLimits:
    max_download_bytes: int = 20 * 2**30      # total over all files, enforced while streaming
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_redirects: int = 3
    allow_hosts: tuple[str, ...] = ()         # names or IPs/CIDRs that may be loopback/private
    max_archive_files: int = 10_000
    max_unpacked_bytes: int = 40 * 2**30
    allow_pickle: bool = False
    s3_endpoint_url: str | None = field(default=None, repr=False)
    # The endpoint is the job's own (SourceCredentials.s3_endpoint_url): its addresses are
    # checked before the client exists, and errors do not name it.
    s3_endpoint_checked: bool = False
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_region: str = "us-east-1"
    max_tensors: int = 100_000
    # Which s3:// sources this fetch may read (the job owner's scopes); None: none at all.
    s3_source_rules: SourceRules | None = None
    # hf:// sources: the hub's endpoint, and the job's token for it (sent to that host only)
    hub_endpoint: str = "https://huggingface.co"
    hub_token: str | None = field(default=None, repr=False)
    # The whole fetch must end within this many seconds, whatever the read timeouts allow (a
    # server that drips one byte per read timeout is stopped here). None: no deadline.
    deadline_seconds: float | None = None


# --- URL parsing ----------------------------------------------------------------------

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
            raise _blocked(str(ip), ip, reason)
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


# --- address policy -------------------------------------------------------------------

_BLOCKED_V4 = [(ipaddress.IPv4Network(net), label) for net, label in [
    ("0.0.0.0/8", "unspecified, 'this network'"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT, shared address space"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local, incl. the 169.254.169.254 cloud metadata service"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignment"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
]]
_BLOCKED_V6 = [(ipaddress.IPv6Network(net), label) for net, label in [
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/23", "IETF protocol assignment, incl. Teredo"),
    ("2001:db8::/32", "documentation"),
    ("fc00::/7", "unique local, ULA"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
]]
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a mapped, compatible, NAT64 or 6to4 IPv6 address leads to."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _V4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _blocked(host: str, ip, reason: str) -> FetchError:
    subject = f"{ip} is" if str(ip) == host else f"{host} resolves to {ip}, which is"
    return FetchError("url_address_blocked", f"{subject} in a blocked range ({reason}); refusing to connect")


def blocked_reason(ip) -> str | None:
    """Why connecting to `ip` is refused, or None when it is a public unicast address."""
    if ip.version == 6:
        ip = ipaddress.IPv6Address(int(ip))           # drop any zone id
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            reason = blocked_reason(embedded)
            return f"{reason}; IPv4 {embedded} embedded in IPv6" if reason else None
        table = _BLOCKED_V6
    else:
        table = _BLOCKED_V4
    for network, label in table:
        if ip in network:
            return label
    # Catch-all for special ranges the tables above do not name.
    return None if ip.is_global else "non-global"


class AddressPolicy:
    """Blocked ranges, minus the operator's explicit allowlist (names, addresses, CIDRs)."""

    def __init__(self, allow_hosts: tuple[str, ...]):
        self.names: set[str] = set()
        self.networks = []
        for entry in allow_hosts:
            entry = entry.strip().lower().rstrip(".")
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.names.add(entry)

    def _allowed(self, host: str, ip) -> bool:
        if host in self.names:
            return True
        candidates = [ip]
        if ip.version == 6 and _embedded_ipv4(ip) is not None:
            candidates.append(_embedded_ipv4(ip))
        return any(c.version == n.version and c in n for c in candidates for n in self.networks)

    def check(self, host: str, addresses: list) -> None:
        for ip in addresses:
            reason = blocked_reason(ip)
            if reason and not self._allowed(host, ip):
                raise _blocked(host, ip, reason)


def resolve(host: str, port: int) -> list:
    """All addresses of `host`, from one getaddrinfo call."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError("source_unreachable", f"cannot resolve host {host!r}: {exc}") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    if not addresses:
        raise FetchError("source_unreachable", f"host {host!r} has no addresses")
    return addresses


# --- streaming with a budget ----------------------------------------------------------

class _Meter:
    """Bytes downloaded over the whole fetch: the size cap and the progress callback."""

    def __init__(self, limit: int, progress: Progress | None, deadline_seconds: float | None = None):
        self.limit, self.progress, self.deadline_seconds = limit, progress, deadline_seconds
        self.deadline = None if deadline_seconds is None else time.monotonic() + deadline_seconds
        self.done = 0
        self.total: int | None = None
        self._last_report = 0.0

    def expect(self, declared: int | None) -> None:
        # A declared size over the budget fails before any body byte is read;
        # the running count below still catches bodies that lie or declare nothing.
        if declared is not None and self.done + declared > self.limit:
            raise self._too_large(self.done + declared)

    def add(self, n: int) -> None:
        self.done += n
        if self.done > self.limit:
            raise self._too_large(self.done)
        self.check_deadline()
        self.report(force=False)

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise FetchError("download_timeout", f"the download did not finish within its deadline of "
                                                 f"{self.deadline_seconds:g} s ({self.done} bytes arrived)")

    def report(self, force: bool) -> None:
        now = time.monotonic()
        if self.progress and (force or now - self._last_report >= _PROGRESS_INTERVAL_S):
            self._last_report = now
            self.progress(self.done, self.total)

    def _too_large(self, size: int) -> FetchError:
        return FetchError("download_too_large",
                          f"the download exceeds the limit of {self.limit} bytes (reached {size})")


def _write_stream(chunks, dest: Path, meter: _Meter, cap: tuple[int, FetchError] | None) -> None:
    """Stream chunks to `dest`, counting every byte against the budget (and a per-file cap)."""
    written = 0
    with open(dest, "xb") as out:
        for chunk in chunks:
            written += len(chunk)
            if cap and written > cap[0]:
                raise cap[1]
            meter.add(len(chunk))
            out.write(chunk)
    meter.report(force=True)


class _NotFound(FetchError):
    """404 / no such key: callers catch it for optional files; uncaught it is source_not_found."""


def _not_found(what: str) -> _NotFound:
    return _NotFound("source_not_found", f"{what} does not exist (HTTP 404 / no such key)")


# --- HTTP -----------------------------------------------------------------------------

class _PinnedBackend(httpcore.SyncBackend):
    """Connects only to addresses checked beforehand, never to a fresh DNS answer.

    httpcore still sends the original host name in the Host header and as TLS SNI (and
    checks the certificate against it); only the TCP connection target is pinned.
    """

    def __init__(self):
        super().__init__()
        self._pins: dict[str, list] = {}

    def pin(self, host: str, addresses: list) -> None:
        self._pins[host] = addresses

    def is_pinned(self, host: str) -> bool:
        return host in self._pins

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        addresses = self._pins.get(host)
        if not addresses:
            raise httpcore.ConnectError(f"{host} was not checked before connecting")
        error = None
        for ip in addresses:
            try:
                return super().connect_tcp(str(ip), port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        raise error


_TIMEOUTS = (httpcore.ConnectTimeout, httpcore.ReadTimeout, httpcore.WriteTimeout, httpcore.PoolTimeout)


def _network_error(exc: Exception, url: ParsedUrl) -> FetchError:
    if isinstance(exc, _TIMEOUTS):
        return FetchError("download_timeout", f"timed out talking to {url.authority()}: "
                                              f"{type(exc).__name__}")
    return FetchError("source_unreachable", f"cannot download from {url.authority()}: "
                                            f"{type(exc).__name__}: {exc}")


class _HttpRemote:
    """Files under an http(s) base URL (or the URL itself), fetched through pinned connections."""

    def __init__(self, base: ParsedUrl, limits: FetchLimits, token: str | None = None, hub: bool = False):
        self.base, self.limits = base, limits
        self.hub = hub  # a model hub's resolve URLs: HEAD answers carry the files' SHA-256
        # a bearer token goes to the base URL's own scheme, host and port, never elsewhere
        self.token = token
        self.token_origin = (base.scheme, base.host, base.effective_port)
        self.policy = AddressPolicy(limits.allow_hosts)
        self.backend = _PinnedBackend()
        self.pool = httpcore.ConnectionPool(network_backend=self.backend, retries=0, max_connections=4)
        self.timeouts = {"connect": limits.connect_timeout, "read": limits.read_timeout,
                         "write": limits.read_timeout, "pool": limits.connect_timeout}

    def close(self) -> None:
        self.pool.close()

    def url_for(self, name: str | None) -> ParsedUrl:
        if name is None:
            return self.base
        directory = self.base.path.rstrip("/")
        query = self.base.target[len(self.base.path):]
        return ParsedUrl(self.base.scheme, self.base.host, self.base.ip, self.base.port,
                         f"{directory}/{quote(name)}{query}")

    def check(self, url: ParsedUrl) -> None:
        """Resolve once per host and check every address; later requests reuse the pin."""
        if url.scheme not in ("http", "https"):
            raise FetchError("url_scheme_not_allowed", f"scheme {url.scheme!r} is not allowed here")
        if self.backend.is_pinned(url.host):
            return
        addresses = [url.ip] if url.ip is not None else resolve(url.host, url.effective_port)
        self.policy.check(url.host, addresses)
        self.backend.pin(url.host, addresses)

    def _authorization(self, url: ParsedUrl) -> list:
        if self.token and (url.scheme, url.host, url.effective_port) == self.token_origin:
            return [(b"Authorization", f"Bearer {self.token}".encode())]
        return []

    def _send(self, url: ParsedUrl, method: bytes = b"GET", body: bytes | None = None,
              headers: list | None = None) -> httpcore.Response:
        framing = [] if body is None else [(b"Content-Length", str(len(body)).encode())]
        request = httpcore.Request(
            method,
            httpcore.URL(scheme=url.scheme.encode(), host=url.host.encode(), port=url.port,
                         target=url.target.encode()),
            headers=[(b"Host", url.authority().encode()), (b"User-Agent", USER_AGENT),
                     (b"Accept-Encoding", b"identity")] + framing + (headers or []) + self._authorization(url),
            content=body,
            extensions={"timeout": self.timeouts},
        )
        try:
            return self.pool.handle_request(request)
        except httpcore.TimeoutException as exc:
            raise _network_error(exc, url) from None
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
            raise _network_error(exc, url) from None

    def open(self, name: str | None) -> tuple[httpcore.Response, ParsedUrl]:
        """A 200 response for `name`, following at most max_redirects checked redirects."""
        url = self.url_for(name)
        for hop in range(self.limits.max_redirects + 1):
            self.check(url)
            response = self._send(url)
            if response.status not in REDIRECT_STATUSES:
                return self._accept(response, url), url
            location = _header(response, b"location")
            response.close()
            if location is None:
                raise FetchError("source_http_error", f"HTTP {response.status} without a Location from {url}")
            url = _redirect_target(url, location)
        raise FetchError("too_many_redirects",
                         f"more than {self.limits.max_redirects} redirects fetching {self.url_for(name)}")

    def _accept(self, response: httpcore.Response, url: ParsedUrl) -> httpcore.Response:
        if response.status == 200:
            encoding = (_header(response, b"content-encoding") or "identity").lower()
            if encoding == "identity":
                return response
            response.close()
            raise FetchError("source_http_error", f"{url} sent Content-Encoding {encoding!r}; "
                                                  "only unencoded bodies are accepted")
        response.close()
        if response.status == 404:
            raise _not_found(str(url))
        if response.status in (401, 403):
            raise FetchError("source_unauthorized", f"HTTP {response.status} from {url}: the source needs credentials"
                                                    + (" that give access" if self.token else ""))
        raise FetchError("source_http_error", f"HTTP {response.status} from {url}")

    def exists(self, name: str) -> bool:
        try:
            response, _ = self.open(name)
        except _NotFound:
            return False
        response.close()  # only the status was wanted; the body is never read
        return True

    def linked_sha256(self, name: str) -> str | None:
        """The SHA-256 the hub declares for a (large, LFS-stored) file, from a HEAD of its
        resolve URL: the hub answers with ``X-Linked-Etag: "<sha256>"``, on the redirect to
        its storage. None when the hub gives none (a small file, another server)."""
        if not self.hub:
            return None
        url = self.url_for(name)
        for _ in range(self.limits.max_redirects + 1):
            self.check(url)
            response = self._send(url, b"HEAD")
            try:
                response.read()  # a HEAD answer has no body; this returns the connection to the pool
            except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as exc:
                raise _network_error(exc, url) from None
            finally:
                response.close()
            digest = _sha256_etag(_header(response, b"x-linked-etag"))
            if digest is not None:
                return digest
            location = _header(response, b"location")
            if response.status not in REDIRECT_STATUSES or location is None:
                if response.status in (404, 401, 403):
                    self._accept(response, url)  # raises the same error a GET would
                return None
            url = _redirect_target(url, location)
        return None

    def download(self, name: str | None, dest: Path, meter: _Meter, cap=None) -> None:
        response, url = self.open(name)
        try:
            declared = _content_length(response)
            if name is None:
                meter.total = declared
            if cap and declared is not None and declared > cap[0]:
                raise cap[1]
            meter.expect(declared)
            _write_stream(self._body(response, url), dest, meter, cap)
        finally:
            response.close()

    @staticmethod
    def _body(response: httpcore.Response, url: ParsedUrl):
        try:
            yield from response.iter_stream()
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as exc:
            raise _network_error(exc, url) from None


def post_checked(url: str, body: bytes, headers: list[tuple[bytes, bytes]], limits: FetchLimits) -> int:
    """POST ``body`` to an http(s) ``url`` through the same address checks and pinned
    connection as a download (limits: timeouts and allow_hosts); returns the HTTP status.
    Redirects are not followed: a 3xx is returned like any other status. The answer's body
    is never read (a receiver dripping one could hold the caller for long). Raises FetchError
    (url_invalid, url_scheme_not_allowed, url_address_blocked, source_unreachable,
    download_timeout)."""
    parsed = parse_url(url)
    remote = _HttpRemote(parsed, limits)
    try:
        remote.check(parsed)
        response = remote._send(parsed, b"POST", body, headers)
        response.close()
        return response.status
    finally:
        remote.close()


def _header(response: httpcore.Response, name: bytes) -> str | None:
    for key, value in response.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def _sha256_etag(value: str | None) -> str | None:
    """``"<64 hex>"`` (or a weak ``W/"..."``) -> the digest; anything else (a git blob id) -> None."""
    if value is None:
        return None
    value = value.strip().removeprefix("W/").strip('"').lower()
    return value if _SHA256_HEX.match(value) else None


def _content_length(response: httpcore.Response) -> int | None:
    value = _header(response, b"content-length")
    return int(value) if value is not None and value.strip().isdigit() else None


def _redirect_target(current: ParsedUrl, location: str) -> ParsedUrl:
    # Resolve a relative Location against the current URL, then parse it afresh:
    # the new target gets the full scheme, syntax and address checks.
    absolute = urljoin(f"{current.scheme}://{current.authority()}{current.target}", location.strip())
    target = parse_url(absolute)
    if target.scheme in ("s3", "hf"):
        raise FetchError("url_scheme_not_allowed", f"a redirect to an {target.scheme}:// URL is not followed")
    return target


# --- S3 -------------------------------------------------------------------------------

class _S3Remote:
    """Objects under s3://bucket/prefix (or the object itself), through boto3."""

    def __init__(self, base: ParsedUrl, limits: FetchLimits):
        # The owner's scopes, checked on the very bucket and key read below (the API checked
        # them at submission too; this holds for jobs that reach the worker any other way).
        check_s3_source(base.host, base.target, limits.s3_source_rules)
        import boto3
        from botocore.config import Config

        self.bucket, self.key = base.host, base.target
        self.base = base
        self.endpoint_checked = limits.s3_endpoint_checked
        if self.endpoint_checked:
            from shared.s3_endpoint import check_endpoint

            check_endpoint(limits.s3_endpoint_url, limits.allow_hosts, resolve_names=True)
        config = Config(
            connect_timeout=limits.connect_timeout, read_timeout=limits.read_timeout,
            retries={"max_attempts": 3, "mode": "standard"},
            # Path-style keeps the bucket name out of the host name on custom endpoints.
            s3={"addressing_style": "path"} if limits.s3_endpoint_url else {},
        )
        self.client = boto3.client(
            "s3", endpoint_url=limits.s3_endpoint_url, region_name=limits.s3_region,
            aws_access_key_id=limits.s3_access_key, aws_secret_access_key=limits.s3_secret_key,
            config=config,
        )

    def close(self) -> None:
        self.client.close()

    def _key_for(self, name: str | None) -> str:
        if name is None:
            return self.key
        prefix = self.key.rstrip("/")
        return f"{prefix}/{name}" if prefix else name

    def _call(self, what: str, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
                raise _not_found(what) from None
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise FetchError("source_http_error", f"S3 error {code} (HTTP {status}) for {what}") from None
        except (ConnectTimeoutError, ReadTimeoutError) as exc:
            detail = type(exc).__name__ if self.endpoint_checked else exc  # botocore's names the endpoint
            raise FetchError("download_timeout", f"timed out reading {what}: {detail}") from None
        except BotoCoreError as exc:
            detail = type(exc).__name__ if self.endpoint_checked else exc
            raise FetchError("source_unreachable", f"cannot read {what}: {detail}") from None

    def exists(self, name: str) -> bool:
        key = self._key_for(name)
        try:
            self._call(f"s3://{self.bucket}/{key}", self.client.head_object, Bucket=self.bucket, Key=key)
        except _NotFound:
            return False
        return True

    def download(self, name: str | None, dest: Path, meter: _Meter, cap=None) -> None:
        key = self._key_for(name)
        what = f"s3://{self.bucket}/{key}"
        response = self._call(what, self.client.get_object, Bucket=self.bucket, Key=key)
        body = response["Body"]
        try:
            declared = response.get("ContentLength")
            if name is None:
                meter.total = declared
            if cap and declared is not None and declared > cap[0]:
                raise cap[1]
            meter.expect(declared)
            chunks = iter(lambda: self._call(what, body.read, amt=_CHUNK), b"")
            _write_stream(chunks, dest, meter, cap)
        finally:
            body.close()


# --- the model directory --------------------------------------------------------------

# Files a directory may carry beside its weights (the tokenizer the conversion calibrates
# with); each is optional, and each is capped.
OPTIONAL_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                  "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json",
                  "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja")
MAX_OPTIONAL_FILE_BYTES = 64 * 2**20


def _download_hf_directory(remote, model_dir: Path, meter: _Meter, limits: FetchLimits,
                           on_config: Callable[[Path], None] | None = None,
                           on_weights: WeightHashes | None = None) -> None:
    """config.json (then `on_config(model_dir)`, which may refuse the model before any weights
    come), the tokenizer's files where present, then (`on_weights`, where the hub declares
    the weights' hashes) model.safetensors, or the index and its shards, or (if allowed) a
    pickle."""
    config_cap = (MAX_CONFIG_BYTES, FetchError("config_invalid", f"config.json is larger than {MAX_CONFIG_BYTES} bytes"))
    remote.download(CONFIG_FILE, model_dir / CONFIG_FILE, meter, config_cap)
    validate_config(model_dir / CONFIG_FILE)
    if on_config is not None:
        on_config(model_dir)
    for name in OPTIONAL_FILES:
        cap = (MAX_OPTIONAL_FILE_BYTES, FetchError("download_too_large", f"{name} is larger than {MAX_OPTIONAL_FILE_BYTES} bytes"))
        try:
            remote.download(name, model_dir / name, meter, cap)
        except _NotFound:
            pass
    index_cap = (MAX_INDEX_BYTES, FetchError("safetensors_invalid", f"{SAFETENSORS_INDEX} is larger than {MAX_INDEX_BYTES} bytes"))
    if on_weights is not None and getattr(remote, "hub", False):
        hashes = _hub_weight_hashes(remote, model_dir, meter, limits, index_cap)
        if hashes is not None:
            on_weights(model_dir, hashes)
    try:
        remote.download(SAFETENSORS_FILE, model_dir / SAFETENSORS_FILE, meter)
        return
    except _NotFound:
        pass
    try:
        if not (model_dir / SAFETENSORS_INDEX).is_file():  # _hub_weight_hashes may have it already
            remote.download(SAFETENSORS_INDEX, model_dir / SAFETENSORS_INDEX, meter, index_cap)
    except _NotFound:
        _download_pickle(remote, model_dir, meter, limits)
        return
    for shard in read_index_shards(model_dir / SAFETENSORS_INDEX, limits.max_tensors):
        try:
            remote.download(shard, model_dir / shard, meter)
        except _NotFound:
            raise FetchError("source_missing_file", f"shard {shard} named by {SAFETENSORS_INDEX} "
                                                    "does not exist") from None


def _hub_weight_hashes(remote: _HttpRemote, model_dir: Path, meter: _Meter, limits: FetchLimits,
                       index_cap) -> dict[str, str] | None:
    """The hub's SHA-256 of each weight file the fetch will download (model.safetensors, else
    the index's shards, the index itself downloaded here), without downloading them; None
    when the hub does not declare them all (or the source has no safetensors weights)."""
    try:
        digest = remote.linked_sha256(SAFETENSORS_FILE)
        return None if digest is None else {SAFETENSORS_FILE: digest}
    except _NotFound:
        pass
    try:
        remote.download(SAFETENSORS_INDEX, model_dir / SAFETENSORS_INDEX, meter, index_cap)
    except _NotFound:
        return None
    hashes: dict[str, str] = {}
    for shard in read_index_shards(model_dir / SAFETENSORS_INDEX, limits.max_tensors):
        try:
            digest = remote.linked_sha256(shard)
        except _NotFound:
            return None  # the download that follows reports the missing shard
        if digest is None:
            return None
        hashes[shard] = digest
    return hashes


def _download_pickle(remote, model_dir: Path, meter: _Meter, limits: FetchLimits) -> None:
    if not limits.allow_pickle:
        # Only the status is asked for: a refused pickle is never downloaded, let alone loaded.
        if remote.exists(PICKLE_FILE):
            raise FetchError("pickle_not_allowed",
                             f"the source has only {PICKLE_FILE}, a pickle; pickle checkpoints are "
                             "disabled (allow_pickle is off). Convert it to safetensors.")
        raise FetchError("source_missing_file",
                         f"the source has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}")
    try:
        remote.download(PICKLE_FILE, model_dir / PICKLE_FILE, meter)
    except _NotFound:
        raise FetchError("source_missing_file", f"the source has none of {SAFETENSORS_FILE}, "
                                                f"{SAFETENSORS_INDEX}, {PICKLE_FILE}") from None


def _is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES)


def _remote(url: ParsedUrl, limits: FetchLimits):
    if url.scheme == "s3":
        return _S3Remote(url, limits)
    if url.scheme == "hf":
        base = parse_url(HubSource(url.host, url.target).base_url(limits.hub_endpoint))
        return _HttpRemote(base, limits, token=limits.hub_token, hub=True)
    return _HttpRemote(url, limits)


def _download(url: ParsedUrl, staging: Path, limits: FetchLimits, meter: _Meter, on_config=None,
              on_weights=None) -> Path:
    remote = _remote(url, limits)
    try:
        if _is_archive(url.path):
            archive = staging / "archive"
            remote.download(None, archive, meter)
            tree = staging / "tree"
            tree.mkdir()
            model_dir = extract_archive(archive, tree, limits)
            if on_config is not None and (model_dir / CONFIG_FILE).is_file():
                validate_config(model_dir / CONFIG_FILE)
                on_config(model_dir)
            return model_dir
        model_dir = staging / "model"
        model_dir.mkdir()
        _download_hf_directory(remote, model_dir, meter, limits, on_config, on_weights)
        return model_dir
    finally:
        remote.close()


# --- the destination directory --------------------------------------------------------

def _empty_dir(path: Path) -> None:
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _publish(model_dir: Path, dest_dir: Path) -> None:
    for entry in list(model_dir.iterdir()):
        entry.replace(dest_dir / entry.name)


def fetch_source(url: str, dest_dir: Path, limits: FetchLimits, progress: Progress | None = None,
                 on_config: Callable[[Path], None] | None = None,
                 on_weights: WeightHashes | None = None) -> Path:
    """Download the model at `url` into `dest_dir` and return `dest_dir`.

    `on_config(directory)` runs as soon as config.json is in (for a directory URL: before any
    weights are requested), and may raise to refuse the model without downloading it.
    `on_weights(directory, {weight file: sha256})` runs, for hf:// sources whose hub declares
    the weights' hashes, once every other file is in and before any weights are requested; it
    may raise to stop the fetch (the worker does when an earlier job converted the same).

    `dest_dir` belongs to the fetch: anything already in it is removed first (a job
    delivered again after a crash starts clean), and it is left empty on any failure.
    `progress(bytes_done, bytes_total)` is called while downloading; bytes_total is None
    when unknown. Raises FetchError with a stable `code`; other exceptions (for example
    one raised by `progress` to cancel) propagate unchanged after the same cleanup.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    _empty_dir(dest_dir)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=dest_dir))
    try:
        parsed = parse_url(url)
        meter = _Meter(limits.max_download_bytes, progress, limits.deadline_seconds)
        model_dir = _download(parsed, staging, limits, meter, on_config, on_weights)
        validate_model_dir(model_dir, limits)
        _publish(model_dir, dest_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _empty_dir(dest_dir)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return dest_dir

"""http(s) sources through connections pinned to checked addresses; redirects followed by hand,
each target checked like the first URL; webhook POSTs through the same checks."""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote, urljoin

import httpcore

from shared.safefiles import FetchError

from .addresses import AddressPolicy, resolve
from .limits import FetchLimits
from .meter import Meter, NotFound, not_found, write_stream
from .urls import ParsedUrl, parse_url

REDIRECT_STATUSES = (301, 302, 303, 307, 308)
USER_AGENT = b"model-convert-fetch/1"


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


class HttpRemote:
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
            raise not_found(str(url))
        if response.status in (401, 403):
            raise FetchError("source_unauthorized", f"HTTP {response.status} from {url}: the source needs credentials"
                                                    + (" that give access" if self.token else ""))
        raise FetchError("source_http_error", f"HTTP {response.status} from {url}")

    def exists(self, name: str) -> bool:
        try:
            response, _ = self.open(name)
        except NotFound:
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

    def download(self, name: str | None, dest: Path, meter: Meter, cap=None) -> None:
        response, url = self.open(name)
        try:
            declared = _content_length(response)
            if name is None:
                meter.total = declared
            if cap and declared is not None and declared > cap[0]:
                raise cap[1]
            meter.expect(declared)
            write_stream(self._body(response, url), dest, meter, cap)
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
    remote = HttpRemote(parsed, limits)
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


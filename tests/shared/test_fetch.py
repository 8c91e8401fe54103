"""fetch_source over real loopback HTTP (and a moto S3 server): URL safety, redirects,
timeouts, size caps, Hugging Face directory layouts and pickle refusal.

The test server lives on 127.0.0.1, which the fetcher blocks by default; legitimate
cases pass allow_hosts=("127.0.0.1",). Cases that must be refused run under a guard that
records every socket connect and lets none through to anything but loopback (and, for
the hostile URL forms, not even that), and under a fake resolver, so no test depends on
real DNS or reaches a real network.
"""
import dataclasses
import io
import ipaddress
import json
import os
import pickle
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shared.fetch import FetchError, FetchLimits, fetch_source
from shared.source_scopes import SourceRules, parse_scopes

LOCAL = FetchLimits(allow_hosts=("127.0.0.1",), connect_timeout=2.0, read_timeout=2.0)
REAL_GETADDRINFO = socket.getaddrinfo
REAL_CONNECT = socket.socket.connect


# --- a small routable HTTP server -----------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        self.server.log.append((path, self.headers.get("Host")))
        route = self.server.routes.get(path)
        if route is None:
            send(self, 404, b"not found")
        else:
            route(self)

    def log_message(self, *args):
        pass


def send(handler, status, body=b"", headers=()):
    handler.send_response(status)
    headers = dict(headers)
    headers.setdefault("Content-Length", str(len(body)))
    for key, value in headers.items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(body)


def serve_bytes(body, **headers):
    return lambda h: send(h, 200, body, headers)


def redirect(status, location):
    return lambda h: send(h, status, b"", {"Location": location})


def endless(chunked, stop):
    """An infinite body: chunked, or close-delimited with no Content-Length at all."""
    def route(h):
        h.send_response(200)
        h.send_header("Transfer-Encoding" if chunked else "Connection", "chunked" if chunked else "close")
        h.end_headers()
        h.close_connection = True
        block = b"\0" * 65536
        try:
            while not stop.is_set():
                h.wfile.write(b"10000\r\n" + block + b"\r\n" if chunked else block)
        except OSError:
            pass  # the client hung up, as it should
    return route


def stall(seconds, stop, after_headers):
    def route(h):
        if after_headers:
            h.send_response(200)
            h.send_header("Content-Length", "1000")
            h.end_headers()
            h.wfile.flush()
        stop.wait(seconds)
    return route


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients hanging up mid-body is what several tests provoke


class Server:
    def __init__(self):
        self.httpd = _QuietServer(("127.0.0.1", 0), _Handler)
        self.httpd.routes, self.httpd.log = {}, []
        self.port = self.httpd.server_address[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def routes(self):
        return self.httpd.routes

    @property
    def log(self):
        return self.httpd.log

    def url(self, path, host="127.0.0.1"):
        return f"http://{host}:{self.port}{path}"

    def add_dir(self, prefix, files):
        for name, body in files.items():
            self.routes[f"{prefix}/{name}"] = serve_bytes(body)
        return self.url(prefix + "/")

    def requested(self, prefix):
        return [path for path, _ in self.log if path.startswith(prefix)]

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


# --- checkpoints ----------------------------------------------------------------------

def _read_dir(path):
    return {p.name: p.read_bytes() for p in Path(path).iterdir()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny random GPT-2 saved by transformers, whole and in four shards."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    whole, sharded = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("sharded")
    model.save_pretrained(whole)
    model.save_pretrained(sharded, max_shard_size="6KB")
    return {"whole": _read_dir(whole), "sharded": _read_dir(sharded)}


def config_only(checkpoints):
    return {"config.json": checkpoints["whole"]["config.json"]}


class _Payload:
    """Pickles to a call of os.system: loading it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_with_payload(marker):
    return pickle.dumps({"transformer.wte.weight": _Payload(marker)})


# --- network guard and fake DNS -------------------------------------------------------

FAKE_DNS = {
    "loop.test": ["127.0.0.1"],
    "meta.test": ["169.254.169.254"],
    "metadata.google.internal": ["169.254.169.254"],
    "mapped.test": ["::ffff:10.0.0.1"],
    "mixed.test": ["93.184.216.34", "127.0.0.1"],
    "ula.test": ["fd12:3456::1"],
    "cgnat.test": ["100.64.1.1"],
    "private6to4.test": ["2002:c0a8:101::1"],
    "127.0.0.1.nip.test": ["127.0.0.1"],
    "zero.test": ["0.0.0.0"],
}


class Net:
    """Fake resolver plus a connect guard that records every connection attempt."""

    def __init__(self):
        self.dns = dict(FAKE_DNS)
        self.lookups = []
        self.connects = []
        self.loopback_ok = False

    def getaddrinfo(self, host, port, *args, **kwargs):
        if host in self.dns:
            self.lookups.append(host)
            answer = self.dns[host]
            addresses = answer() if callable(answer) else answer
            return [_addrinfo(a, port) for a in addresses]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":  # /etc/hosts only: never real DNS
                raise socket.gaierror(socket.EAI_NONAME, f"{host} is not in the test's fake DNS")
            self.lookups.append(host)
        return REAL_GETADDRINFO(host, port, *args, **kwargs)

    def connect(self, sock, address):
        self.connects.append(address[0])
        if self.loopback_ok and address[0] == "127.0.0.1":
            return REAL_CONNECT(sock, address)
        raise ConnectionRefusedError(f"test guard: no connection to {address[0]}")


def _addrinfo(address, port):
    if ":" in address:
        return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))


@pytest.fixture
def net(monkeypatch):
    n = Net()
    monkeypatch.setattr(socket, "getaddrinfo", n.getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: n.connect(sock, address))
    return n


def fetch_error(url, dest, limits=LOCAL, **kwargs) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch_source(url, dest, limits, **kwargs)
    assert list(dest.iterdir()) == [], "a failed fetch must leave dest_dir empty"
    return info.value


# --- hostile URL forms: refused before any connection ---------------------------------

HOSTILE_URLS = [
    # IPv4 loopback spelled every way a client accepts
    ("http://127.0.0.1/", "url_address_blocked"),
    ("http://2130706433/", "url_address_blocked"),             # decimal
    ("http://0x7f000001/", "url_address_blocked"),             # hex
    ("http://0x7f.0.0.1/", "url_address_blocked"),             # hex octet
    ("http://0177.0.0.1/", "url_address_blocked"),             # octal
    ("http://017700000001/", "url_address_blocked"),           # octal, whole
    ("http://127.1/", "url_address_blocked"),                  # short form
    ("http://127.0.0.1./", "url_address_blocked"),             # trailing dot
    ("HTTP://127.0.0.1:8080/", "url_address_blocked"),         # upper-case scheme, port
    ("http://１２７．０．０．１/", "url_address_blocked"),          # fullwidth digits (IDNA)
    # other blocked IPv4 ranges
    ("http://0.0.0.0/", "url_address_blocked"),
    ("http://0/", "url_address_blocked"),
    ("http://10.0.0.1/", "url_address_blocked"),
    ("http://172.16.5.4/", "url_address_blocked"),
    ("http://192.168.1.1/", "url_address_blocked"),
    ("http://169.254.169.254/latest/meta-data/", "url_address_blocked"),
    ("http://0251.0376.0251.0376/", "url_address_blocked"),    # metadata, octal
    ("http://169.254.43518/", "url_address_blocked"),          # metadata, short form
    ("http://0xa9fea9fe/", "url_address_blocked"),             # metadata, hex
    ("http://100.64.0.1/", "url_address_blocked"),             # CGNAT
    ("http://224.0.0.1/", "url_address_blocked"),              # multicast
    ("http://255.255.255.255/", "url_address_blocked"),        # broadcast
    ("http://240.0.0.1/", "url_address_blocked"),              # reserved
    # IPv6
    ("http://[::1]/", "url_address_blocked"),
    ("http://[0:0:0:0:0:0:0:1]:80/", "url_address_blocked"),
    ("http://[::]/", "url_address_blocked"),
    ("http://[::ffff:127.0.0.1]/", "url_address_blocked"),     # IPv4-mapped
    ("http://[::ffff:7f00:1]/", "url_address_blocked"),        # IPv4-mapped, hex
    ("http://[::ffff:169.254.169.254]/", "url_address_blocked"),
    ("http://[::127.0.0.1]/", "url_address_blocked"),          # IPv4-compatible
    ("http://[2002:7f00:1::]/", "url_address_blocked"),        # 6to4 of 127.0.0.1
    ("http://[64:ff9b::a9fe:a9fe]/", "url_address_blocked"),   # NAT64 of metadata
    ("http://[fd00::1]/", "url_address_blocked"),              # ULA
    ("http://[fe80::1]/", "url_address_blocked"),              # link-local
    ("http://[fe80::1%25eth0]/", "url_address_blocked"),       # link-local with zone id
    ("http://[fec0::1]/", "url_address_blocked"),              # site-local
    ("http://[ff02::1]/", "url_address_blocked"),              # multicast
    # names that resolve to blocked addresses
    ("http://localhost/", "url_address_blocked"),
    ("http://LOCALHOST./", "url_address_blocked"),
    ("http://ⓛⓞⓒⓐⓛⓗⓞⓢⓣ/", "url_address_blocked"),           # IDNA maps it to localhost
    ("http://loop.test/", "url_address_blocked"),
    ("http://127.0.0.1.nip.test/", "url_address_blocked"),
    ("http://meta.test/", "url_address_blocked"),
    ("http://metadata.google.internal/computeMetadata/v1/", "url_address_blocked"),
    ("http://mapped.test/", "url_address_blocked"),            # AAAA ::ffff:10.0.0.1
    ("http://mixed.test/", "url_address_blocked"),             # one public, one loopback address
    ("http://ula.test/", "url_address_blocked"),
    ("http://cgnat.test/", "url_address_blocked"),
    ("http://private6to4.test/", "url_address_blocked"),
    ("http://zero.test./", "url_address_blocked"),             # trailing-dot name
    # userinfo and parser-confusion tricks
    ("http://huggingface.co@127.0.0.1/", "url_invalid"),
    ("http://huggingface.co:pw@169.254.169.254/", "url_invalid"),
    ("http://127.0.0.1\\@huggingface.co/", "url_invalid"),
    ("http://127.0.0.1 /", "url_invalid"),
    ("http://%31%32%37.0.0.1/", "url_invalid"),
    ("http://1.2.3.4.5/", "url_invalid"),
    ("http://[2606:4700::1%25eth0]/", "url_invalid"),          # zone id on a global address
    ("http://127.0.0.1:99999/", "url_invalid"),
    ("http:///etc/passwd", "url_invalid"),
    ("http:127.0.0.1/", "url_invalid"),
    ("s3://169.254.169.254/key", "url_invalid"),               # an IP is no bucket name
    # schemes
    ("file:///etc/passwd", "url_scheme_not_allowed"),
    ("gopher://127.0.0.1:6379/_FLUSHALL", "url_scheme_not_allowed"),
    ("ftp://example.com/model.tar", "url_scheme_not_allowed"),
    ("data:text/plain;base64,aGVsbG8=", "url_scheme_not_allowed"),
    ("dict://127.0.0.1:11211/stats", "url_scheme_not_allowed"),
    ("jar:http://127.0.0.1/x.jar!/", "url_scheme_not_allowed"),
]


@pytest.mark.parametrize("url, code", HOSTILE_URLS, ids=[u for u, _ in HOSTILE_URLS])
def test_hostile_url_is_refused_before_connecting(url, code, net, tmp_path):
    error = fetch_error(url, tmp_path, FetchLimits())
    assert error.code == code, str(error)
    assert net.connects == []


def test_there_are_at_least_30_hostile_url_forms():
    assert len(HOSTILE_URLS) >= 30


def test_hostname_is_resolved_only_once_per_fetch(net, tmp_path):
    error = fetch_error("http://mixed.test/", tmp_path, FetchLimits())
    assert error.code == "url_address_blocked" and "127.0.0.1" in error.message
    assert net.lookups == ["mixed.test"]


# --- legitimate fetches and the allowlist ---------------------------------------------

def test_fetches_a_hf_directory_from_an_allowed_host(server, checkpoints, tmp_path):
    url = server.add_dir("/whole", checkpoints["whole"])
    seen = []
    result = fetch_source(url, tmp_path / "dest", LOCAL, progress=lambda done, total: seen.append(done))
    assert result == tmp_path / "dest"
    # config.json, the weights, and the optional files the directory has (save_pretrained writes
    # generation_config.json)
    assert sorted(p.name for p in result.iterdir()) == sorted(checkpoints["whole"])
    assert (result / "model.safetensors").read_bytes() == checkpoints["whole"]["model.safetensors"]
    assert seen[-1] == sum(len(body) for body in checkpoints["whole"].values())


def test_same_url_is_blocked_without_the_allowlist(server, checkpoints, tmp_path):
    url = server.add_dir("/noallow", checkpoints["whole"])
    error = fetch_error(url, tmp_path, FetchLimits())
    assert error.code == "url_address_blocked"
    assert server.requested("/noallow") == []


@pytest.mark.parametrize("allow", [("localhost",), ("127.0.0.0/8",)])
def test_allowlist_accepts_names_and_cidrs(server, checkpoints, tmp_path, allow):
    url = server.add_dir("/allow", checkpoints["whole"]).replace("127.0.0.1", "localhost")
    fetch_source(url, tmp_path, FetchLimits(allow_hosts=allow))
    assert (tmp_path / "model.safetensors").is_file()


def test_allowlist_is_not_a_wildcard(server, checkpoints, tmp_path):
    # Allowing 127.0.0.1 must not open up ::1 or the private ranges.
    error = fetch_error(f"http://[::1]:{server.port}/whole/", tmp_path)
    assert error.code == "url_address_blocked"


def test_fetches_a_sharded_checkpoint(server, checkpoints, tmp_path):
    url = server.add_dir("/sharded", checkpoints["sharded"])
    fetch_source(url, tmp_path, LOCAL)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) == 4
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert "/sharded/model.safetensors" in server.requested("/sharded")  # tried first, 404


@pytest.mark.parametrize("shard", ["../../etc/passwd.safetensors", "sub/model.safetensors",
                                   ".hidden.safetensors", "weights.bin", "%2e%2e%2fx.safetensors"])
def test_index_with_unsafe_shard_name_is_refused(server, checkpoints, tmp_path, shard):
    prefix = f"/badindex{abs(hash(shard))}"
    index = json.dumps({"weight_map": {"transformer.wte.weight": shard}}).encode()
    url = server.add_dir(prefix, {**config_only(checkpoints), "model.safetensors.index.json": index})
    error = fetch_error(url, tmp_path)
    assert error.code == "safetensors_invalid" and "unsafe shard" in error.message
    assert not any(p.endswith(".safetensors") and not p.endswith("/model.safetensors") for p in server.requested(prefix))


def test_index_naming_a_missing_shard(server, checkpoints, tmp_path):
    files = dict(checkpoints["sharded"])
    del files["model-00002-of-00004.safetensors"]
    error = fetch_error(server.add_dir("/missingshard", files), tmp_path)
    assert error.code == "source_missing_file" and "model-00002-of-00004" in error.message


def test_directory_without_weights(server, checkpoints, tmp_path):
    error = fetch_error(server.add_dir("/noweights", config_only(checkpoints)), tmp_path)
    assert error.code == "source_missing_file"


def test_directory_without_config_is_not_found(server, checkpoints, tmp_path):
    files = {"model.safetensors": checkpoints["whole"]["model.safetensors"]}
    error = fetch_error(server.add_dir("/noconfig", files), tmp_path)
    assert error.code == "source_not_found" and "config.json" in error.message


@pytest.mark.parametrize("body, why", [(b"[1, 2]", "JSON object"), (b"{not json", "not valid JSON"),
                                       (b"\xff\xfe{}", "not valid JSON")])
def test_invalid_config_json(server, tmp_path, body, why):
    prefix = f"/badconfig{abs(hash(body))}"
    error = fetch_error(server.add_dir(prefix, {"config.json": body}), tmp_path)
    assert error.code == "config_invalid" and why in error.message
    assert server.requested(prefix) == [f"{prefix}/config.json"]  # weights never requested


def test_oversized_config_json_is_refused(server, tmp_path):
    body = b'{"pad": "' + b"x" * (9 * 2**20) + b'"}'
    error = fetch_error(server.add_dir("/bigconfig", {"config.json": body}), tmp_path)
    assert error.code == "config_invalid" and "larger than" in error.message


# --- pickle ---------------------------------------------------------------------------

def test_pickle_only_checkpoint_is_refused_and_payload_never_runs(server, checkpoints, tmp_path):
    marker = tmp_path / "payload-ran"
    files = {**config_only(checkpoints), "pytorch_model.bin": pickle_with_payload(marker)}
    error = fetch_error(server.add_dir("/pickle", files), tmp_path / "dest")
    assert error.code == "pickle_not_allowed"
    assert not marker.exists()


def test_pickle_is_downloaded_but_not_loaded_when_allowed(server, checkpoints, tmp_path):
    marker = tmp_path / "payload-ran"
    payload = pickle_with_payload(marker)
    files = {**config_only(checkpoints), "pytorch_model.bin": payload}
    limits = FetchLimits(allow_hosts=("127.0.0.1",), allow_pickle=True)
    dest = fetch_source(server.add_dir("/pickleok", files), tmp_path / "dest", limits)
    assert (dest / "pytorch_model.bin").read_bytes() == payload
    assert not marker.exists()  # loading is the library's job, with weights_only=True


# --- HTTP statuses, connection failures, timeouts -------------------------------------

def test_missing_archive_is_source_not_found(server, tmp_path):
    assert fetch_error(server.url("/nope/model.tar.gz"), tmp_path).code == "source_not_found"


def test_server_error_is_source_http_error(server, tmp_path):
    server.routes["/boom/config.json"] = lambda h: send(h, 503, b"down")
    error = fetch_error(server.url("/boom/"), tmp_path)
    assert error.code == "source_http_error" and "503" in error.message


def test_refused_connection_is_source_unreachable(tmp_path):
    with socket.socket() as s:  # bind then close: a loopback port with no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert fetch_error(f"http://127.0.0.1:{port}/m/", tmp_path).code == "source_unreachable"


@pytest.mark.parametrize("after_headers", [False, True], ids=["before-headers", "mid-body"])
def test_slow_server_hits_the_read_timeout(server, tmp_path, after_headers):
    path = f"/slow{int(after_headers)}/config.json"
    server.routes[path] = stall(5, server.stop, after_headers)
    limits = FetchLimits(allow_hosts=("127.0.0.1",), read_timeout=0.3)
    started = time.monotonic()
    error = fetch_error(server.url(path.rsplit("/", 1)[0] + "/"), tmp_path, limits)
    assert error.code == "download_timeout"
    assert time.monotonic() - started < 3


def drip(stop, interval):
    """A server that sends one byte per `interval` (below the read timeout) for ever."""
    def route(h):
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        h.close_connection = True
        try:
            while not stop.is_set():
                h.wfile.write(b"1\r\n \r\n")
                h.wfile.flush()
                stop.wait(interval)
        except OSError:
            pass
    return route


def test_slow_drip_server_hits_the_whole_download_deadline(server, tmp_path):
    server.routes["/drip/config.json"] = drip(server.stop, 0.1)
    limits = FetchLimits(allow_hosts=("127.0.0.1",), read_timeout=0.5, deadline_seconds=1.5)
    started = time.monotonic()
    error = fetch_error(server.url("/drip/"), tmp_path, limits)
    assert error.code == "download_timeout" and "deadline of 1.5 s" in error.message
    assert 1.5 <= time.monotonic() - started < 4


def test_default_deadline_follows_the_size_limit(make_settings):
    settings = make_settings(max_download_bytes=10 * 2**20, fetch_min_bytes_per_second=2**20)
    assert settings.fetch_limits().deadline_seconds == 70.0
    assert make_settings(fetch_deadline_seconds=5).fetch_limits().deadline_seconds == 5


def test_content_encoding_is_refused(server, tmp_path):
    server.routes["/gz/config.json"] = serve_bytes(b"\x1f\x8b...", **{"Content-Encoding": "gzip"})
    assert fetch_error(server.url("/gz/"), tmp_path).code == "source_http_error"


# --- redirects ------------------------------------------------------------------------

@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_to_an_allowed_host_is_followed(server, checkpoints, tmp_path, status):
    url = server.add_dir(f"/target{status}", checkpoints["whole"])
    server.routes[f"/r{status}/config.json"] = redirect(status, url + "config.json")
    server.routes[f"/r{status}/model.safetensors"] = redirect(status, f"/target{status}/model.safetensors")
    fetch_source(server.url(f"/r{status}/"), tmp_path, LOCAL)
    assert (tmp_path / "model.safetensors").read_bytes() == checkpoints["whole"]["model.safetensors"]


@pytest.mark.parametrize("location, code", [
    ("http://169.254.169.254/latest/meta-data/iam/", "url_address_blocked"),
    ("http://[::ffff:169.254.169.254]/", "url_address_blocked"),
    ("http://[::1]/config.json", "url_address_blocked"),
    ("http://10.0.0.1/config.json", "url_address_blocked"),
    ("http://meta.test/", "url_address_blocked"),
    ("http://2852039166/", "url_address_blocked"),             # 169.254.169.254 in decimal
    ("file:///etc/passwd", "url_scheme_not_allowed"),
    ("gopher://127.0.0.1:6379/_INFO", "url_scheme_not_allowed"),
    ("s3://bucket/key", "url_scheme_not_allowed"),
    ("http://user@127.0.0.1/", "url_invalid"),
])
def test_redirect_target_is_checked_before_connecting(server, net, tmp_path, location, code):
    net.loopback_ok = True
    path = f"/redir{abs(hash(location))}/"
    server.routes[path + "config.json"] = redirect(302, location)
    error = fetch_error(server.url(path), tmp_path)
    assert error.code == code, str(error)
    assert set(net.connects) == {"127.0.0.1"}  # only the test server, never the redirect target


def test_redirect_loop_stops(server, tmp_path):
    server.routes["/loop/config.json"] = redirect(302, "/loop/config.json")
    error = fetch_error(server.url("/loop/"), tmp_path)
    assert error.code == "too_many_redirects"
    assert server.requested("/loop/").count("/loop/config.json") == LOCAL.max_redirects + 1


@pytest.mark.parametrize("hops, ok", [(3, True), (4, False)])
def test_redirect_limit(server, checkpoints, tmp_path, hops, ok):
    target = server.add_dir(f"/chain{hops}end", checkpoints["whole"])
    for i in range(hops):
        nxt = f"/chain{hops}/{i + 1}/config.json" if i + 1 < hops else target + "config.json"
        server.routes[f"/chain{hops}/{i}/config.json"] = redirect(302, nxt)
    server.routes[f"/chain{hops}/0/model.safetensors"] = serve_bytes(checkpoints["whole"]["model.safetensors"])
    url = server.url(f"/chain{hops}/0/")
    if ok:
        fetch_source(url, tmp_path, LOCAL)
        assert (tmp_path / "config.json").read_bytes() == checkpoints["whole"]["config.json"]
    else:
        assert fetch_error(url, tmp_path).code == "too_many_redirects"


# --- size caps ------------------------------------------------------------------------

@pytest.mark.parametrize("chunked", [False, True], ids=["no-content-length", "chunked"])
def test_endless_body_stops_at_the_size_cap(server, tmp_path, chunked):
    path = f"/endless{int(chunked)}/model.tar.gz"
    server.routes[path] = endless(chunked, server.stop)
    limits = FetchLimits(allow_hosts=("127.0.0.1",), max_download_bytes=2 * 2**20)
    error = fetch_error(server.url(path), tmp_path, limits)
    assert error.code == "download_too_large"


def test_declared_size_over_the_cap_fails_before_the_body(server, tmp_path):
    def huge(h):
        h.send_response(200)
        h.send_header("Content-Length", str(50 * 2**30))
        h.end_headers()
        try:
            for _ in range(100):
                h.wfile.write(b"\0" * 65536)
        except OSError:
            pass
    server.routes["/huge/model.tar"] = huge
    limits = FetchLimits(allow_hosts=("127.0.0.1",), max_download_bytes=2**30)
    error = fetch_error(server.url("/huge/model.tar"), tmp_path, limits)
    assert error.code == "download_too_large" and str(50 * 2**30) in error.message


def test_size_cap_counts_all_files_together(server, checkpoints, tmp_path):
    url = server.add_dir("/sum", checkpoints["whole"])
    config = len(checkpoints["whole"]["config.json"])
    weights = len(checkpoints["whole"]["model.safetensors"])
    # Each file fits on its own; the two together do not.
    limits = FetchLimits(allow_hosts=("127.0.0.1",), max_download_bytes=config + weights - 1)
    assert weights < limits.max_download_bytes
    assert fetch_error(url, tmp_path, limits).code == "download_too_large"


def test_understated_content_length_is_not_trusted(server, checkpoints, tmp_path):
    # The body is cut at the declared length, so the short file fails validation
    # instead of being accepted because the size looked harmless.
    weights = checkpoints["whole"]["model.safetensors"]
    server.add_dir("/liar", config_only(checkpoints))
    server.routes["/liar/model.safetensors"] = lambda h: send(h, 200, weights, {"Content-Length": "100"})
    error = fetch_error(server.url("/liar/"), tmp_path)
    assert error.code == "safetensors_invalid"


def test_corrupt_safetensors_from_http_is_refused(server, checkpoints, tmp_path):
    weights = bytearray(checkpoints["whole"]["model.safetensors"])
    weights[:8] = struct.pack("<Q", len(weights) * 2)
    url = server.add_dir("/corrupt", {**config_only(checkpoints), "model.safetensors": bytes(weights)})
    error = fetch_error(url, tmp_path)
    assert error.code == "safetensors_invalid" and "truncated" in error.message


# --- DNS rebinding and connection pinning ---------------------------------------------

def test_rebinding_name_is_pinned_to_the_checked_address(net, tmp_path):
    answers = iter([["93.184.216.34"], ["127.0.0.1"], ["127.0.0.1"]])
    net.dns["rebind.test"] = lambda: next(answers)
    error = fetch_error("http://rebind.test:8000/model/", tmp_path, FetchLimits())
    assert error.code == "source_unreachable"  # the guard refuses the (checked) public address
    assert net.lookups == ["rebind.test"]
    assert net.connects == ["93.184.216.34"]


def test_pinned_connection_keeps_host_header_and_resolves_once(server, checkpoints, net, tmp_path):
    net.loopback_ok = True
    answers = iter([["127.0.0.1"], ["10.9.9.9"], ["10.9.9.9"], ["10.9.9.9"]])
    net.dns["rebind.test"] = lambda: next(answers)
    server.add_dir("/pinned", checkpoints["sharded"])
    fetch_source(server.url("/pinned/", host="rebind.test"), tmp_path, LOCAL)
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 4
    assert net.lookups == ["rebind.test"]
    assert set(net.connects) == {"127.0.0.1"}
    hosts = {host for path, host in server.log if path.startswith("/pinned/")}
    assert hosts == {f"rebind.test:{server.port}"}


def test_https_sends_the_host_name_as_sni_to_the_pinned_address(net, tmp_path):
    net.loopback_ok = True
    net.dns["sni.test"] = ["127.0.0.1"]
    hello = []
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept_one():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(2)
            hello.append(conn.recv(4096))  # the TLS ClientHello; then hang up
    thread = threading.Thread(target=accept_one, daemon=True)
    thread.start()
    try:
        error = fetch_error(f"https://sni.test:{port}/m/", tmp_path, LOCAL)
    finally:
        thread.join(3)
        listener.close()
    assert error.code == "source_unreachable"
    assert hello and hello[0][:1] == b"\x16"  # a TLS handshake record
    assert b"sni.test" in hello[0]
    assert net.connects == ["127.0.0.1"]


# --- destination directory hygiene ----------------------------------------------------

def test_leftovers_in_dest_are_replaced(server, checkpoints, tmp_path):
    (tmp_path / ".incoming-stale").mkdir()
    (tmp_path / "stale.bin").write_bytes(b"old")
    fetch_source(server.add_dir("/fresh", checkpoints["whole"]), tmp_path, LOCAL)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(checkpoints["whole"])


def test_exception_from_progress_cleans_up_and_propagates(server, checkpoints, tmp_path):
    class Cancelled(Exception):
        pass

    def cancel(done, total):
        raise Cancelled()
    with pytest.raises(Cancelled):
        fetch_source(server.add_dir("/cancel", checkpoints["whole"]), tmp_path, LOCAL, progress=cancel)
    assert list(tmp_path.iterdir()) == []


def test_fetch_error_survives_pickling():
    error = pickle.loads(pickle.dumps(FetchError("download_timeout", "slow")))
    assert (error.code, error.message, str(error)) == ("download_timeout", "slow", "[download_timeout] slow")


# --- S3 (moto server on loopback) -----------------------------------------------------

@pytest.fixture(scope="module")
def s3(checkpoints):
    import boto3
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Every owner may read the test buckets; "artifacts" is the service's own bucket.
    rules = SourceRules(owner="alice", scopes=tuple(parse_scopes("*=models, *=no-such-bucket")),
                        artifacts_bucket="artifacts")
    limits = FetchLimits(s3_endpoint_url=endpoint, s3_access_key="test", s3_secret_key="test",
                         connect_timeout=2, read_timeout=5, s3_source_rules=rules)
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    client.create_bucket(Bucket="models")
    client.create_bucket(Bucket="artifacts")
    for name, body in checkpoints["sharded"].items():
        client.put_object(Bucket="models", Key=f"gpt2/sharded/{name}", Body=body)
        client.put_object(Bucket="artifacts", Key=f"jobs/job-of-bob/{name}", Body=body)
    yield client, limits
    moto.stop()


def _tar_gz(files, top="model"):
    import tarfile
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


def test_s3_directory(s3, checkpoints, tmp_path):
    _, limits = s3
    fetch_source("s3://models/gpt2/sharded", tmp_path, limits)
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 4
    assert (tmp_path / "config.json").read_bytes() == checkpoints["sharded"]["config.json"]


def test_s3_archive(s3, checkpoints, tmp_path):
    client, limits = s3
    client.put_object(Bucket="models", Key="gpt2/whole.tar.gz", Body=_tar_gz(checkpoints["whole"]))
    fetch_source("s3://models/gpt2/whole.tar.gz", tmp_path, limits)
    assert (tmp_path / "model.safetensors").read_bytes() == checkpoints["whole"]["model.safetensors"]


@pytest.mark.parametrize("url", ["s3://models/nothing-here/", "s3://models/missing.tar.gz",
                                 "s3://no-such-bucket/gpt2/"])
def test_s3_missing_is_source_not_found(s3, tmp_path, url):
    assert fetch_error(url, tmp_path, s3[1]).code == "source_not_found"


def test_s3_respects_the_size_cap(s3, checkpoints, tmp_path):
    _, limits = s3
    small = dataclasses.replace(limits, max_download_bytes=10_000)
    assert fetch_error("s3://models/gpt2/sharded/", tmp_path, small).code == "download_too_large"


def _scoped(limits, scopes, owner="alice"):
    rules = SourceRules(owner=owner, scopes=tuple(parse_scopes(scopes)), artifacts_bucket="artifacts")
    return dataclasses.replace(limits, s3_source_rules=rules)


@pytest.mark.parametrize("url, scopes", [
    ("s3://artifacts/jobs/job-of-bob/", "*=artifacts, alice=artifacts/jobs"),  # never, whatever the scopes
    ("s3://models/gpt2/sharded/", "bob=models"),                               # someone else's scope
    ("s3://models/gpt2/sharded/", "alice=models/gpt"),                          # whole segments only
    ("s3://models/gpt2/sharded/", "alice=models/gpt2/sharded-old"),
    ("s3://models/gpt2/other/../sharded/", "alice=models/gpt2/other"),          # no climbing out
    ("s3://models/gpt2/sharded/", ""),                                          # no scopes: nothing
])
def test_s3_outside_the_owners_scopes_is_refused_before_any_request(s3, tmp_path, monkeypatch, url, scopes):
    import boto3

    _, limits = s3
    made = []
    monkeypatch.setattr(boto3, "client", lambda *a, **k: made.append(a) or pytest.fail("an S3 client was made"))
    error = fetch_error(url, tmp_path, _scoped(limits, scopes))
    assert error.code == "source_forbidden", str(error)
    assert made == []


def test_s3_without_source_rules_reads_nothing(s3, tmp_path):
    _, limits = s3
    error = fetch_error("s3://models/gpt2/sharded/", tmp_path, dataclasses.replace(limits, s3_source_rules=None))
    assert error.code == "source_forbidden"


def test_s3_inside_the_owners_own_scope_is_read(s3, checkpoints, tmp_path):
    _, limits = s3
    fetch_source("s3://models/gpt2/sharded/", tmp_path, _scoped(limits, "bob=models, alice=models/gpt2"))
    assert (tmp_path / "config.json").read_bytes() == checkpoints["sharded"]["config.json"]

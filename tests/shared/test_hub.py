"""hf:// sources against a local imitation of a model hub: its resolve URLs, a redirect of the
weights to a storage host, and 401 for a gated repository without the right token. The token
reaches the hub's host only, never the storage host it redirects to."""
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shared.fetch import FetchError, FetchLimits, fetch_source, parse_url
from shared.hub import parse_hub_url

TOKEN = "hf_test_token_0123456789"


class _Hub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.server.seen.append((self.headers.get("Host"), self.path, self.headers.get("Authorization")))
        files, storage = self.server.files, self.server.storage
        if self.path.startswith("/blobs/"):  # the storage host: no token needed, none must come
            return self._send(200, files[self.path.rsplit("/", 1)[-1]])
        parts = self.path.split("/")  # /ORG/REPO/resolve/REV/FILE
        if len(parts) != 6 or parts[3] != "resolve" or parts[4] not in ("main", "0123abcd"):
            return self._send(404, b"")
        if parts[2] == "gated" and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._send(401, b"")
        name = parts[5]
        if name not in files:
            return self._send(404, b"")
        if name.endswith(".safetensors"):  # large files live on the storage host
            return self._send(302, b"", {"Location": f"http://{storage}/blobs/{name}"})
        return self._send(200, files[name])

    def _send(self, status, body, headers=()):
        self.send_response(status)
        for key, value in dict(headers).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    saved = tmp_path_factory.mktemp("hubmodel")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(saved)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    httpd.files = {p.name: p.read_bytes() for p in saved.iterdir()}
    httpd.seen = []
    port = httpd.server_address[1]
    httpd.storage = f"localhost:{port}"  # another host name for the same server: another origin
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def limits(hub, token=None):
    return FetchLimits(allow_hosts=("127.0.0.1", "localhost"), hub_endpoint=f"http://127.0.0.1:{hub.server_address[1]}",
                       hub_token=token)


@pytest.mark.parametrize("url, repo, revision", [
    ("hf://org/model", "org/model", "main"), ("hf://org/model@0123abcd", "org/model", "0123abcd"),
    ("hf://Org-1/m.v2@refs/pr/1", "Org-1/m.v2", "refs/pr/1")])
def test_parse(url, repo, revision):
    source = parse_hub_url(url)
    assert (source.repo_id, source.revision) == (repo, revision)
    assert parse_url(url).scheme == "hf"


@pytest.mark.parametrize("url", ["hf://org", "hf://org/../x", "hf://org/m/extra", "hf://org/m@../x", "hf://o rg/m",
                                 "hf://org/m@"])
def test_bad_hub_urls(url):
    with pytest.raises(FetchError) as caught:
        parse_url(url)
    assert caught.value.code == "url_invalid"


def test_public_repository_through_a_storage_redirect(hub, tmp_path):
    hub.seen.clear()
    fetch_source("hf://org/public", tmp_path / "a", limits(hub, TOKEN))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == hub.files["model.safetensors"]
    to_storage = [s for s in hub.seen if s[1].startswith("/blobs/")]
    assert to_storage and all(auth is None for _, _, auth in to_storage)  # never after the redirect
    assert any(auth == f"Bearer {TOKEN}" for host, path, auth in hub.seen if path.startswith("/org/public/"))


def test_gated_repository_needs_the_token(hub, tmp_path):
    with pytest.raises(FetchError) as caught:
        fetch_source("hf://org/gated@0123abcd", tmp_path / "b", limits(hub))
    assert caught.value.code == "source_unauthorized"
    with pytest.raises(FetchError) as caught:
        fetch_source("hf://org/gated", tmp_path / "c", limits(hub, "hf_wrong"))
    assert caught.value.code == "source_unauthorized" and "hf_wrong" not in caught.value.message
    fetch_source("hf://org/gated@0123abcd", tmp_path / "d", limits(hub, TOKEN))
    assert (tmp_path / "d" / "config.json").is_file()


def test_token_is_not_in_the_limits_repr(hub):
    assert TOKEN not in repr(limits(hub, TOKEN))

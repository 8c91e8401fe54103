"""A local imitation of a model hub, for tests/shared/test_hub.py and the end-to-end tests.

Like the Hugging Face hub: files at /ORG/REPO/resolve/REV/FILE; the weights (*.safetensors)
redirected to a storage host (another host name for the same server: another origin); 401
for the "gated" repository without the right token; and a HEAD of a weights file answered
with ``X-Linked-Etag: "<sha256>"`` on the redirect (``linked_etags=False``: a hub that
declares nothing). ``seen`` keeps every GET as (host, path, authorization), ``heads`` every
HEAD's path.
"""
from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

TOKEN = "hf_test_token_0123456789"
REVISIONS = ("main", "0123abcd")


class _Hub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.server.seen.append((self.headers.get("Host"), self.path, self.headers.get("Authorization")))
        self._answer(head=False)

    def do_HEAD(self):
        self.server.heads.append(self.path)
        self._answer(head=True)

    def _answer(self, head: bool):
        files, storage = self.server.files, self.server.storage
        if self.path.startswith("/blobs/"):  # the storage host: no token needed, none must come
            return self._send(200, files[self.path.rsplit("/", 1)[-1]], head=head)
        parts = self.path.split("/")  # /ORG/REPO/resolve/REV/FILE
        if len(parts) != 6 or parts[3] != "resolve" or parts[4] not in REVISIONS:
            return self._send(404, b"", head=head)
        if parts[2] == "gated" and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._send(401, b"", head=head)
        name = parts[5]
        if name not in files:
            return self._send(404, b"", head=head)
        if name.endswith(".safetensors"):  # large files live on the storage host
            headers = {"Location": f"http://{storage}/blobs/{name}"}
            if self.server.linked_etags:
                headers["X-Linked-Etag"] = f'"{hashlib.sha256(files[name]).hexdigest()}"'
            return self._send(302, b"", headers, head=head)
        return self._send(200, files[name], head=head)

    def _send(self, status, body, headers=(), head=False):
        self.send_response(status)
        for key, value in dict(headers).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextmanager
def serve_hub(model_dir: Path, linked_etags: bool = True) -> Iterator[ThreadingHTTPServer]:
    """Serve every repository's files from ``model_dir``; ``endpoint`` is the hub's URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    httpd.files = {p.name: p.read_bytes() for p in Path(model_dir).iterdir() if p.is_file()}
    httpd.seen, httpd.heads, httpd.linked_etags = [], [], linked_etags
    port = httpd.server_address[1]
    httpd.storage = f"localhost:{port}"
    httpd.endpoint = f"http://127.0.0.1:{port}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()

"""A webhook receiver on loopback for the tests: it verifies every request's Standard Webhooks
signature with the ``standardwebhooks`` package (Svix's reference code, independent of how
the service signs) and answers with the statuses it is given, then 200.

    with Receiver(secret, statuses=[500]) as rx:   # first request 500, the rest 200
        ... rx.url ...
        rx.wait_for(lambda reqs: len(reqs) >= 2)
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    payload: Optional[Any]  # the parsed body when the signature verified
    answered: int


class Receiver:
    def __init__(self, secret: Optional[str], statuses: tuple[int, ...] | list[int] = (),
                 location: Optional[str] = None, delay: float = 0.0):
        self.secret, self.statuses, self.location, self.delay = secret, list(statuses), location, delay
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver._handle(self, body)

            def do_GET(self):  # a followed redirect would arrive here
                receiver._handle(self, b"")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def _handle(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        verified, payload = False, None
        if self.secret is not None:
            try:
                payload = Webhook(self.secret).verify(body, headers)
                verified = True
            except WebhookVerificationError:
                pass
        time.sleep(self.delay)  # a slow receiver
        with self._lock:
            status = self.statuses.pop(0) if self.statuses else 200
            self.requests.append(Received(handler.path, headers, body, verified, payload, status))
        handler.send_response(status)
        if self.location and 300 <= status < 400:
            handler.send_header("Location", self.location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def wait_for(self, done: Callable[[list[Received]], bool], timeout: float = 30) -> list[Received]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                seen = list(self.requests)
            if done(seen):
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"the receiver saw {[r.body[:300] for r in seen]}")
            time.sleep(0.05)

    def __enter__(self) -> "Receiver":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

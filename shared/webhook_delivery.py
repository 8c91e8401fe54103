"""Sending signed webhook events: one background thread per process, retries with backoff.

A conversion never waits for a receiver: events are handed to the process's dispatcher
thread (``dispatcher().submit``), which POSTs them through the SSRF-guarded client of
shared.fetch (every address checked, connections pinned to the checked address, redirects
not followed), signs each attempt afresh (Standard Webhooks: the id stays, the timestamp is
the attempt's), and records every attempt through the delivery's ``record`` callback (the
job record, see shared.webhook_notify).

A non-2xx answer or a network error is retried after base, 2 x base, 4 x base ... seconds
(+ up to 20 % jitter, at most a minute a wait), for at most ``attempts`` tries and no retry
later than ``total_seconds`` after the first. What is pending when the process ends is lost:
deliveries are at most once per attempt and best effort, never a reason to hold a job.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Optional

from shared.webhook_records import WebhookAttempt, WebhookEvent
from shared.webhook_signing import signed_headers

log = logging.getLogger(__name__)

MAX_RETRY_WAIT = 60.0  # seconds: the longest wait between two attempts
# Deliveries waiting in one process beyond which new progress events are dropped (a
# receiver that is down while many jobs run); started and completed events are always kept.
MAX_PENDING = 1000
# FetchError codes of shared.fetch, as webhook attempts report them.
_ERROR_CODES = {
    "url_address_blocked": "webhook_address_blocked",
    "url_invalid": "webhook_url_invalid",
    "url_scheme_not_allowed": "webhook_url_invalid",
    "download_timeout": "webhook_timeout",
    "source_unreachable": "webhook_unreachable",
}
WEBHOOK_SCHEMES = ("http", "https")


class WebhookTargetError(ValueError):
    """A webhook_url refused before anything is sent (code: webhook_url_invalid or
    webhook_address_blocked)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def check_target(url: str, allow_hosts: tuple[str, ...] | list[str]) -> None:
    """Refuse a webhook_url that is not http(s), or whose host is a literal address in a
    blocked range (names are resolved and checked at every delivery instead: their
    addresses may change)."""
    from shared.fetch import AddressPolicy, FetchError, parse_url

    try:
        parsed = parse_url(url)
        if parsed.scheme not in WEBHOOK_SCHEMES:
            raise FetchError("url_scheme_not_allowed", "webhook_url must be an http:// or https:// URL")
        if parsed.ip is not None:
            AddressPolicy(tuple(allow_hosts)).check(parsed.host, [parsed.ip])
    except FetchError as exc:
        raise WebhookTargetError(_ERROR_CODES.get(exc.code, "webhook_url_invalid"), exc.message) from None


@dataclass(frozen=True)
class DeliveryPolicy:
    attempts: int = 6
    base_delay: float = 1.0
    total_seconds: float = 300.0
    timeout: float = 10.0  # connect and read, each
    allow_hosts: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings) -> "DeliveryPolicy":
        return cls(attempts=settings.webhook_attempts, base_delay=settings.webhook_retry_base_delay,
                   total_seconds=settings.webhook_retry_max_seconds, timeout=settings.webhook_timeout_seconds,
                   allow_hosts=tuple(settings.fetch_allow_hosts))

    def wait_after(self, attempt: int) -> float:
        """Seconds before the retry that follows failed attempt number ``attempt``."""
        return min(self.base_delay * 2 ** (attempt - 1), MAX_RETRY_WAIT) * (1 + 0.2 * random.random())


@dataclass
class Delivery:
    """One event for one receiver, through all its attempts."""

    job_id: str
    event: WebhookEvent
    url: str
    secret: str = field(repr=False)
    body: str
    message_id: str
    policy: DeliveryPolicy
    record: Callable[[WebhookAttempt], None]
    attempt: int = 0
    first_at: float = 0.0  # time.monotonic() of the first attempt


def send_once(delivery: Delivery) -> WebhookAttempt:
    """One signed POST; the attempt as it went (status and/or error code)."""
    from shared.fetch import FetchError, FetchLimits, post_checked

    limits = FetchLimits(connect_timeout=delivery.policy.timeout, read_timeout=delivery.policy.timeout,
                         allow_hosts=delivery.policy.allow_hosts)
    headers = signed_headers(delivery.secret, delivery.message_id, int(time.time()), delivery.body)
    status, error = None, None
    try:
        status = post_checked(
            delivery.url, delivery.body.encode(),
            [(b"Content-Type", b"application/json")] + [(k.encode(), v.encode()) for k, v in headers.items()],
            limits,
        )
        if not 200 <= status < 300:
            error = "webhook_http_error"
    except FetchError as exc:
        error = _ERROR_CODES.get(exc.code, "webhook_unreachable")
        log.info("webhook %s for job %s: %s", delivery.event.value, delivery.job_id, exc.message)
    return WebhookAttempt(event=delivery.event, message_id=delivery.message_id, attempt=delivery.attempt,
                          status=status, error=error, at=datetime.now(timezone.utc))


class Dispatcher:
    """A heap of deliveries by due time, worked off by one daemon thread."""

    def __init__(self, send: Callable[[Delivery], WebhookAttempt] = send_once):
        self._send = send
        self._heap: list[tuple[float, int, Delivery]] = []
        self._order = itertools.count()  # ties (same due time) go in submission order
        self._cond = threading.Condition()
        self._busy = 0  # deliveries taken off the heap and not yet done
        self._thread: Optional[threading.Thread] = None

    def submit(self, delivery: Delivery) -> bool:
        """Queue a delivery to go now; False when a progress event was dropped (too many pending)."""
        with self._cond:
            if delivery.event == WebhookEvent.progress and len(self._heap) >= MAX_PENDING:
                log.warning("webhook progress event for job %s dropped: %d deliveries pending",
                            delivery.job_id, len(self._heap))
                return False
            self._push(time.monotonic(), delivery)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="webhook-dispatcher", daemon=True)
                self._thread.start()
            return True

    def idle(self, timeout: float) -> bool:
        """Wait until nothing is pending or in flight; False on timeout (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._heap or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
            return True

    def _push(self, due: float, delivery: Delivery) -> None:
        heapq.heappush(self._heap, (due, next(self._order), delivery))
        self._cond.notify_all()

    def _next(self) -> Delivery:
        with self._cond:
            while True:
                wait = self._heap[0][0] - time.monotonic() if self._heap else None
                if wait is not None and wait <= 0:
                    self._busy += 1
                    return heapq.heappop(self._heap)[2]
                self._cond.wait(wait)

    def _run(self) -> None:
        while True:
            delivery = self._next()
            try:
                self._attempt(delivery)
            except Exception:  # a bug here must not end the thread: later events still go
                log.exception("webhook delivery for job %s failed unexpectedly", delivery.job_id)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def _attempt(self, delivery: Delivery) -> None:
        delivery.attempt += 1
        if delivery.attempt == 1:
            delivery.first_at = time.monotonic()
        result = self._send(delivery)
        try:
            delivery.record(result)
        except Exception as exc:  # the job store away: the delivery itself still counts
            log.warning("webhook attempt for job %s not recorded: %s", delivery.job_id, exc)
        if result.error is None:
            return
        policy = delivery.policy
        wait = policy.wait_after(delivery.attempt)
        due = time.monotonic() + wait
        if delivery.attempt >= policy.attempts or due - delivery.first_at > policy.total_seconds:
            log.warning("webhook %s for job %s: giving up after %d attempts (last: %s)", delivery.event.value,
                        delivery.job_id, delivery.attempt, result.status or result.error)
            return
        with self._cond:
            self._push(due, delivery)


_dispatcher: Optional[tuple[int, Dispatcher]] = None
_dispatcher_lock = threading.Lock()


def dispatcher() -> Dispatcher:
    """This process's dispatcher. Per process id: a forked pool child does not inherit the
    parent's thread, so it gets a dispatcher of its own."""
    global _dispatcher
    with _dispatcher_lock:
        if _dispatcher is None or _dispatcher[0] != os.getpid():
            _dispatcher = (os.getpid(), Dispatcher())
        return _dispatcher[1]

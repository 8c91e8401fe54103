"""What a job rides out: the job store (Redis) away for a while, S3 failing an upload, a cancel
noticed between the conversion's own checks, a newer delivery of the same job."""
from __future__ import annotations

import logging
import random
import time
from typing import Callable, Optional, TypeVar

import redis

from shared.settings import Settings
from shared.storage import StorageError

log = logging.getLogger(__name__)

# A Redis that is restarting, unreachable or still loading its data (BusyLoadingError is a
# ConnectionError): worth waiting for. Other Redis errors are bugs and fail the job.
STORE_ERRORS = (redis.ConnectionError, redis.TimeoutError)
MAX_STORAGE_WAIT = 60.0  # seconds: the longest wait between two upload attempts

T = TypeVar("T")


class JobCancelled(Exception):
    """A cancel was noticed between the conversion's own checks (download, upload)."""


class StoreUnavailable(Exception):
    """The job store stayed unreachable for settings.store_retry_seconds."""


class Superseded(Exception):
    """The job was claimed again by a newer delivery of its message: this run stops and
    leaves the job, its artifacts and its work folder to the newer one."""


def call_store(fn: Callable[[], T], settings: Settings, what: str) -> T:
    """``fn()``, retried with backoff while the job store is unreachable, for at most
    ``settings.store_retry_seconds``; then StoreUnavailable."""
    deadline = time.monotonic() + settings.store_retry_seconds
    delay = 0.25
    while True:
        try:
            return fn()
        except STORE_ERRORS as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreUnavailable(f"the job store is unreachable ({what}): {exc}") from None
            wait = min(delay, left)
            log.warning("job store unreachable while %s (%s); retrying in %.2fs", what, exc, wait)
            time.sleep(wait)
            delay = min(delay * 2, 5.0)


def with_storage_retries(fn: Callable[[], T], settings: Settings, what: str, job_id: str = "-",
                         cancelled: Optional[Callable[[], bool]] = None) -> T:
    """``fn()``, tried ``settings.storage_attempts`` times in all while it raises
    StorageError, waiting storage_retry_base_delay, twice that, ... in between (with up to
    20 % jitter, capped at a minute). A cancel is honoured between attempts."""
    attempts = settings.storage_attempts
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except StorageError as exc:
            if attempt == attempts:
                raise StorageError(f"{exc.message} (gave up after {attempts} attempts)") from None
            wait = min(settings.storage_retry_base_delay * 2 ** (attempt - 1), MAX_STORAGE_WAIT)
            wait *= 1 + 0.2 * random.random()
            log.warning("job %s: S3: %s failed (attempt %d of %d): %s; retrying in %.2fs",
                        job_id, what, attempt, attempts, exc.message, wait)
            if cancelled is not None and cancelled():
                raise JobCancelled() from None
            time.sleep(wait)
    raise AssertionError("unreachable")

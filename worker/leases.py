"""Leases: a running job holds a key in Redis that its worker renews every few seconds. When a
worker dies (SIGKILL, OOM, lost machine) its leases expire, and any other worker's sweeper
sends the job to the queue again: within a lease period, not after the broker's visibility
timeout (which stays as the last resort). Attempt fencing in the job store keeps the two
deliveries apart if the first one was not dead after all.

    with Lease(redis, prefix, job_id, attempt, seconds):   # in the task, around the work
        ...
    Sweeper(...).start()                                   # in each worker's parent process
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from datetime import timedelta
from typing import Callable, Optional

import redis

from shared.jobs import JobState, JobStore, utcnow
from shared.metrics import Metrics
from worker.orphans import find_orphans, requeue_orphans

log = logging.getLogger(__name__)
RUNNING = (JobState.downloading, JobState.converting, JobState.checking, JobState.uploading)


def lease_key(prefix: str, job_id: str) -> str:
    return f"{prefix}:lease:{job_id}"


class Lease:
    """Holds `job_id`'s lease while the block runs; renewed every seconds / 4 by a thread."""

    def __init__(self, client: redis.Redis, prefix: str, job_id: str, attempt: int, seconds: float):
        self.redis, self.key, self.seconds = client, lease_key(prefix, job_id), seconds
        self.value = f"{socket.gethostname()}:{attempt}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{job_id}", daemon=True)

    def _write(self) -> None:
        try:
            self.redis.set(self.key, self.value, px=int(self.seconds * 1000))
        except redis.RedisError as exc:  # Redis away: the job store's own retries decide what happens
            log.warning("lease %s not renewed: %s", self.key, exc)

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            self._write()

    def __enter__(self) -> "Lease":
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            if self.redis.get(self.key) in (self.value, self.value.encode()):
                self.redis.delete(self.key)
        except redis.RedisError:
            pass  # it expires by itself


def requeue_expired(store: JobStore, prefix: str, seconds: float, send: Callable[[str], None]) -> list[str]:
    """Send again every running job whose lease has expired; returns their ids. A lock per
    (job, attempt) makes one sweeper of many do it, once."""
    client, sent = store.redis, []
    for state in RUNNING:
        for raw in client.zrange(f"{prefix}:jobs:{state.value}", 0, -1):
            member = raw if isinstance(raw, str) else raw.decode()
            job_id = member.rpartition(":")[2]  # members are "<seq>:<job id>"
            if client.exists(lease_key(prefix, job_id)):
                continue
            job = store.get(job_id)
            if job is None or job.state not in RUNNING or utcnow() - job.updated_at < timedelta(seconds=seconds):
                continue  # finished meanwhile, or claimed just now and its lease not yet written
            if not client.set(f"{prefix}:requeue:{job_id}:{job.attempts}", 1, nx=True, ex=int(4 * seconds) + 1):
                continue
            log.warning("job %s: lease expired (attempt %d, %s); sending it to the queue again",
                        job_id, job.attempts, job.state.value)
            send(job_id)
            sent.append(job_id)
    return sent


class Sweeper(threading.Thread):
    """In a worker's parent process: the worker's heartbeat and the lease sweep, every few
    seconds; with ``queue``, also the scan for queued jobs whose message is gone
    (worker/orphans.py), once a lease period (it reads the whole queue)."""

    def __init__(self, store: JobStore, prefix: str, seconds: float, send: Callable[[str], None],
                 queue: Optional[str] = None):
        super().__init__(name="lease-sweeper", daemon=True)
        self.store, self.prefix, self.seconds, self.send, self.queue = store, prefix, seconds, send, queue
        self.metrics = Metrics(store.redis, prefix)
        self.stopped = threading.Event()

    def run(self) -> None:
        suspects: set[str] = set()
        next_scan = time.monotonic() + self.seconds
        while not self.stopped.wait(max(1.0, self.seconds / 4)):
            try:
                self.metrics.heartbeat()
                requeue_expired(self.store, self.prefix, self.seconds, self.send)
                if self.queue is not None and time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + self.seconds
                    found = find_orphans(self.store, self.prefix, self.queue, self.seconds)
                    requeue_orphans(self.store, self.prefix, self.seconds, self.send, found, suspects)
                    suspects = found
            except redis.RedisError as exc:
                log.warning("lease sweep skipped: %s", exc)

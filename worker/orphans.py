"""Queued jobs whose message is gone: sent to the queue again.

kombu's Redis transport takes a message off the queue's list (BRPOP) and only then records it
among the unacknowledged ones (the ``unacked`` hash); a worker killed between the two loses
the message (celery/celery#7950). Its job stays ``queued`` for good: the lease sweep
(worker/leases.py) sees running jobs only. bench/chaos.py met it: one job in 100 under ten
SIGKILLs.

A queued job untouched for a lease period whose id is in neither the list nor ``unacked``, at
two scans in a row, is sent again (once, by one sweeper of many). A duplicate message is
harmless: a claim of a finished job does nothing.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
from datetime import timedelta
from typing import Callable, Iterable, Optional

from shared.jobs import JobState, JobStore, utcnow

log = logging.getLogger(__name__)
# kombu's Redis transport: the hash of delivered, unacknowledged messages (its default
# ``unacked_key``, which worker/app.py leaves as it is).
UNACKED_KEY = "unacked"


def _job_id(payload: object) -> Optional[str]:
    """The job id of a convert_job message (its only argument), or None for anything else."""
    try:
        body = json.loads(base64.b64decode(payload["body"]))  # type: ignore[index]
        return str(body[0][0])
    except (KeyError, TypeError, IndexError, ValueError, binascii.Error):
        return None


def jobs_with_a_message(client, queue: str) -> set[str]:
    """Ids of the jobs with a message waiting in ``queue`` or delivered and not yet acknowledged."""
    ids = set()
    entries: Iterable = client.lrange(queue, 0, -1)
    for raw in entries:
        try:
            ids.add(_job_id(json.loads(raw)))
        except ValueError:
            continue
    for raw in client.hvals(UNACKED_KEY):
        try:
            ids.add(_job_id(json.loads(raw)[0]))  # [message, exchange, routing key]
        except (ValueError, IndexError, TypeError):
            continue
    ids.discard(None)
    return ids


def find_orphans(store: JobStore, prefix: str, queue: str, seconds: float) -> set[str]:
    """Queued jobs untouched for ``seconds`` that have no message."""
    client = store.redis
    queued = [(m if isinstance(m, str) else m.decode()).rpartition(":")[2]
              for m in client.zrange(f"{prefix}:jobs:{JobState.queued.value}", 0, -1)]
    if not queued:
        return set()
    with_message = jobs_with_a_message(client, queue)
    orphans = set()
    for job_id in queued:
        if job_id in with_message:
            continue
        job = store.get(job_id)
        if job is not None and job.state == JobState.queued and utcnow() - job.updated_at >= timedelta(seconds=seconds):
            orphans.add(job_id)
    return orphans


def requeue_orphans(store: JobStore, prefix: str, seconds: float, send: Callable[[str], None],
                    found: set[str], suspects: set[str]) -> list[str]:
    """Send again the jobs found orphaned now and at the scan before (``suspects``); a lock per
    job makes one sweeper of many do it, and not again for a few lease periods."""
    sent = []
    for job_id in sorted(found & suspects):
        if not store.redis.set(f"{prefix}:requeue:{job_id}:queued", 1, nx=True, ex=int(4 * seconds) + 1):
            continue
        log.warning("job %s: queued without a message (lost by a worker that died taking it); "
                    "sending it to the queue again", job_id)
        send(job_id)
        sent.append(job_id)
    return sent

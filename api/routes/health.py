"""Liveness and readiness probes (compose healthchecks, Kubernetes probes)."""
from __future__ import annotations

import logging
import threading
import time

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import ProbeStorageDep, StoreDep
from api.schemas import Health

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

# S3 counts as reachable for this long after a probe that reached it, without asking again:
# under load (many probes, S3 slow) one HEAD request every few seconds, not one per probe,
# each of which could time out and flip the service to not-ready and back. An outage shows
# within this time; Redis is asked on every probe (it answers fast, and jobs need it first).
S3_PROBE_FRESH_SECONDS = 10.0


class _S3Readiness:
    def __init__(self):
        self._lock = threading.Lock()
        self._reached_at: dict[int, float] = {}  # id(probe storage) -> monotonic time

    def ok(self, storage) -> bool:
        with self._lock:  # one probe at a time; those waiting read its outcome
            reached = self._reached_at.get(id(storage))
            if reached is not None and time.monotonic() - reached < S3_PROBE_FRESH_SECONDS:
                return True
            if not storage.ping():
                return False
            self._reached_at[id(storage)] = time.monotonic()
            return True


_s3 = _S3Readiness()


@router.get("/healthz", response_model=Health, summary="The process is alive")
def healthz():
    return Health(status="ok")


@router.get(
    "/readyz", response_model=Health,
    responses={503: {"model": Health, "description": "Redis or S3 is unreachable"}},
    summary="Redis and S3 are reachable",
)
def readyz(store: StoreDep, storage: ProbeStorageDep):
    checks = {}
    try:
        checks["redis"] = "ok" if store.ping() else "unreachable"
    except redis.RedisError as exc:
        log.warning("readyz: redis: %s", exc)
        checks["redis"] = "unreachable"
    checks["s3"] = "ok" if _s3.ok(storage) else "unreachable"
    ready = all(v == "ok" for v in checks.values())
    body = Health(status="ready" if ready else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

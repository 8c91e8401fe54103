"""Liveness and readiness probes (compose healthchecks, Kubernetes probes)."""
from __future__ import annotations

import logging

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import ProbeStorageDep, StoreDep
from api.schemas import Health

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


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
    checks["s3"] = "ok" if storage.ping() else "unreachable"
    ready = all(v == "ok" for v in checks.values())
    body = Health(status="ready" if ready else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

"""FastAPI dependencies, as ``Annotated`` aliases that routes take as parameters.

Clients (Redis, boto3, Celery) are made once per settings object and reused across
requests; tests swap any of them with ``app.dependency_overrides``. The cheap ones are
``async def``: FastAPI runs a plain ``def`` dependency on its thread pool, a hop that
costs more than a dictionary lookup (bench/load.py).
"""
from __future__ import annotations

import logging
from typing import Annotated, Callable, Protocol, TypeVar

from fastapi import Depends

from api.limits import RateLimiter

from shared.jobs import JobStore, redis_client
from shared.settings import Settings, get_settings
from shared.storage import Storage

log = logging.getLogger(__name__)

T = TypeVar("T")
_clients: dict[tuple[str, int], tuple[Settings, object]] = {}


def _per_settings(kind: str, settings: Settings, make: Callable[[Settings], T]) -> T:
    """One client of each kind per settings object (the settings are kept alive with it,
    so the id cannot be reused by another object)."""
    key = (kind, id(settings))
    hit = _clients.get(key)
    if hit is None or hit[0] is not settings:
        hit = (settings, make(settings))
        _clients[key] = hit
    return hit[1]  # type: ignore[return-value]


class JobQueue(Protocol):
    def enqueue(self, job_id: str) -> None: ...


class CeleryJobQueue:
    """Sends the convert task to the GPU queue; the job id doubles as the task id."""

    def __init__(self, settings: Settings):
        from worker.app import make_celery  # celery and kombu only; no torch

        self._app = make_celery(settings)
        self._queue = settings.gpu_queue

    def enqueue(self, job_id: str) -> None:
        from worker.app import CONVERT_TASK

        self._app.send_task(CONVERT_TASK, args=[job_id], task_id=job_id, queue=self._queue)


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_store(settings: SettingsDep) -> JobStore:
    return _per_settings(
        "store", settings,
        lambda s: JobStore(redis_client(s.redis_url), s.redis_key_prefix, s.job_ttl_seconds),
    )


def get_storage(settings: SettingsDep) -> Storage:
    return _per_settings("storage", settings, Storage)


def get_probe_storage(settings: SettingsDep) -> Storage:
    """A client that gives up fast, for /readyz."""
    return _per_settings("probe-storage", settings, lambda s: Storage(s, quick=True))


def get_queue(settings: SettingsDep) -> JobQueue:
    return _per_settings("queue", settings, CeleryJobQueue)


StoreDep = Annotated[JobStore, Depends(get_store)]
StorageDep = Annotated[Storage, Depends(get_storage)]
ProbeStorageDep = Annotated[Storage, Depends(get_probe_storage)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]


async def get_rate_limiter(settings: SettingsDep, store: StoreDep) -> RateLimiter:
    return _per_settings(
        "rate-limiter", settings,
        lambda s: RateLimiter(store.redis, s.redis_key_prefix, s.rate_limit_jobs, s.rate_limit_window_seconds),
    )


RateLimiterDep = Annotated[RateLimiter, Depends(get_rate_limiter)]

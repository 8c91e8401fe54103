"""FastAPI dependencies, as ``Annotated`` aliases that routes take as parameters.

Clients (Redis, boto3, Celery) are made once per settings object and reused across
requests; tests swap any of them with ``app.dependency_overrides``. Every one is
``async def``: FastAPI runs a plain ``def`` dependency on its thread pool, a hop that
costs more than the dictionary lookup they do after the first call (bench/load.py).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Callable, Optional, Protocol, TypeVar

from fastapi import Depends, FastAPI, Request

from api.limits import RateLimiter

from shared.jobs import AsyncJobReader, JobStore, async_redis_client, redis_client
from shared.settings import Settings, get_settings
from shared.storage import Storage

log = logging.getLogger(__name__)

T = TypeVar("T")
_clients: dict[tuple[str, int], tuple[Settings, object, object]] = {}


def _per_settings(kind: str, settings: Settings, make: Callable[[Settings], T], loop: Optional[object] = None) -> T:
    """One client of each kind per settings object (the settings are kept alive with it,
    so the id cannot be reused by another object). ``loop``: an asyncio client's event loop,
    which its connections belong to; a client made on another loop is replaced (the server
    has one loop per process; the test client may start one per request)."""
    key = (kind, id(settings))
    hit = _clients.get(key)
    if hit is None or hit[0] is not settings or hit[1] is not loop:
        hit = (settings, loop, make(settings))
        _clients[key] = hit
    return hit[2]  # type: ignore[return-value]


class JobQueue(Protocol):
    def enqueue(self, job_id: str) -> None: ...


class CeleryJobQueue:
    """Sends the convert task to the GPU queue; the job id doubles as the task id."""

    def __init__(self, settings: Settings):
        from worker.app import make_celery  # celery and kombu only; no torch

        self._app = make_celery(settings)
        self._queue = settings.gpu_queue
        # What the first send_task would set up otherwise, under the first burst of submissions
        # (imports of the transport and the result backend, the producer pool, the router: 36 ms
        # alone, ~100 ms with 8 threads at once): done when the API starts. Nothing connects yet.
        self._app.backend, self._app.producer_pool, self._app.amqp.router

    def enqueue(self, job_id: str) -> None:
        from worker.app import CONVERT_TASK

        self._app.send_task(CONVERT_TASK, args=[job_id], task_id=job_id, queue=self._queue)


def app_settings(app: FastAPI) -> Settings:
    """get_settings, or what a test put in its place: for the routes and for what the app
    sets up outside them (lifespan, middleware), so that tests' overrides apply to both."""
    return app.dependency_overrides.get(get_settings, get_settings)()


async def current_settings(request: Request) -> Settings:
    """app_settings without the thread-pool hop FastAPI makes for get_settings itself (a
    plain ``def``)."""
    return app_settings(request.app)


SettingsDep = Annotated[Settings, Depends(current_settings)]


async def get_store(settings: SettingsDep) -> JobStore:
    return _per_settings(
        "store", settings,
        lambda s: JobStore(redis_client(s.redis_url), s.redis_key_prefix, s.job_ttl_seconds),
    )


async def get_job_reader(settings: SettingsDep) -> AsyncJobReader:
    return _per_settings(
        "job-reader", settings, lambda s: AsyncJobReader(async_redis_client(s.redis_url), s.redis_key_prefix),
        loop=asyncio.get_running_loop(),
    )


async def get_storage(settings: SettingsDep) -> Storage:
    return _per_settings("storage", settings, Storage)


async def get_probe_storage(settings: SettingsDep) -> Storage:
    """A client that gives up fast, for /readyz."""
    return _per_settings("probe-storage", settings, lambda s: Storage(s, quick=True))


def make_queue(settings: Settings) -> JobQueue:
    return _per_settings("queue", settings, CeleryJobQueue)


async def get_queue(settings: SettingsDep) -> JobQueue:
    return make_queue(settings)


StoreDep = Annotated[JobStore, Depends(get_store)]
JobReaderDep = Annotated[AsyncJobReader, Depends(get_job_reader)]
StorageDep = Annotated[Storage, Depends(get_storage)]
ProbeStorageDep = Annotated[Storage, Depends(get_probe_storage)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]


async def get_rate_limiter(settings: SettingsDep, store: StoreDep) -> RateLimiter:
    return _per_settings(
        "rate-limiter", settings,
        lambda s: RateLimiter(store.redis, s.redis_key_prefix, s.rate_limit_jobs, s.rate_limit_window_seconds),
    )


RateLimiterDep = Annotated[RateLimiter, Depends(get_rate_limiter)]

"""The HTTP API: ``uvicorn api.main:app``. OpenAPI at /docs and /openapi.json."""
from __future__ import annotations

import functools
import gc
import os
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from api import errors
from api.deps import app_settings, get_queue, make_queue
from api.limits import BodySizeLimit
from api.openapi_docs import document_errors
from api.routes import api_router, health, metrics, pages
from shared import logs
from shared.settings import get_settings

DESCRIPTION = """
Converts transformer checkpoints (GPT-2, LLaMA and friends, as Hugging Face directories)
into attention-only transformers that compute the same function, checks them layer by
layer against the source, and hands back the converted checkpoint.

Submit a job with `POST /v1/jobs`, poll `GET /v1/jobs/{id}`, then download the
artifacts from `GET /v1/jobs/{id}/artifacts/{name}`.

Every `/v1/jobs` request needs an API key: `Authorization: Bearer <key>`. A job is
visible only to the key (owner) that created it. Job creation is rate limited per owner
(429 with `Retry-After`), and request bodies are capped in size (413).
"""


# libuv (under uvloop, uvicorn's loop) then accepts one connection per wakeup instead of
# every pending one: without it the first of uvicorn's worker processes to wake took a whole
# burst of new connections (all 50 of bench/load.py's) and the others sat idle. Read when the
# process first listens, which uvicorn does after importing the app; a value set outside wins.
os.environ.setdefault("UV_TCP_SINGLE_ACCEPT", "1")


# At import, in each process uvicorn starts (after uvicorn set up its own loggers).
logs.configure(get_settings().log_format)


def _operation_id(route: APIRoute) -> str:
    # Short, stable names for generated clients: "jobs-create_job".
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


@functools.cache  # once per process: a test process starts the app many times
def _freeze_startup_heap() -> None:
    """What start-up made (about 90,000 objects: FastAPI, pydantic, Celery) lives as long as
    the process: out of the collector's sight, a full collection no longer walks it. It took
    35 ms each time, stalls that tripled bench/load.py's status p99 (115 ms, 32 ms without)."""
    gc.collect()  # garbage frozen would never be freed
    gc.freeze()


@asynccontextmanager
async def _lifespan(app: FastAPI):
    settings = app_settings(app)
    to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
    # The queue's client (Celery's imports and app) made before the first submission, on the
    # thread pool: made on first use, inside the async dependency, it held every request of the
    # process for 0.1 s and more (bench/load.py's submissions p99).
    if get_queue not in app.dependency_overrides:
        await run_in_threadpool(make_queue, settings)
    _freeze_startup_heap()
    yield


app = FastAPI(
    lifespan=_lifespan,
    title="attnonly conversion service",
    version="1.0.0",
    description=DESCRIPTION,
    generate_unique_id_function=_operation_id,
)
app.include_router(api_router, prefix="/v1")
app.include_router(health.router)
app.include_router(metrics.router)
app.include_router(pages.router)
errors.install(app)
document_errors(app)


def _max_request_bytes() -> int:
    return app_settings(app).max_request_bytes


app.add_middleware(BodySizeLimit, limit=_max_request_bytes)

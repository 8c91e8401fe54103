"""GET /v1/jobs/{id}/events: Server-Sent Events of a job's state and progress until it ends.

Each event is the job as GET /v1/jobs/{id} shows it, sent when its state or progress changed.
Event ids grow with the record's last update, so a client that reconnects with
Last-Event-ID gets the job's current state (if it changed since) and what follows, never a
replay of what it already saw. A stream also ends after settings.events_stream_seconds
(the client reconnects), so that a job waiting long in the queue holds no connection open."""
from __future__ import annotations

import asyncio
from typing import Annotated, Optional

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse

from api.auth import PrincipalDep
from api.deps import JobReaderDep, SettingsDep
from api.routes.jobs import NOT_FOUND, JobId, _own_or_404
from api.schemas import job_out

router = APIRouter(prefix="/jobs", tags=["jobs"])
POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0


def _event_id(job) -> int:
    return int(job.updated_at.timestamp() * 1000)


@router.get(
    "/{job_id}/events", responses={**NOT_FOUND, 200: {"content": {"text/event-stream": {}},
                                                      "description": "events until the job ends, or for "
                                                                     "events_stream_seconds (then reconnect "
                                                                     "with Last-Event-ID)"}},
    response_class=StreamingResponse, summary="Server-Sent Events of the job's state and progress",
)
async def job_events(job_id: JobId, request: Request, principal: PrincipalDep, reader: JobReaderDep,
                     settings: SettingsDep, last_event_id: Annotated[Optional[str], Header()] = None):
    # Reads on redis.asyncio, like GET /v1/jobs/{id}: a stream polls twice a second, and
    # hundreds of streams would otherwise queue on the thread pool the submissions use.
    job = _own_or_404(await reader.get(job_id), job_id, principal)
    try:
        seen = int(last_event_id) if last_event_id else -1
    except ValueError:
        seen = -1

    deadline = asyncio.get_running_loop().time() + settings.events_stream_seconds

    async def stream():
        nonlocal job, seen
        quiet = 0.0
        while True:
            if job is not None and _event_id(job) > seen:
                seen = _event_id(job)
                body = job_out(request, job).model_dump_json()
                yield f"id: {seen}\nevent: {'end' if job.state.finished else 'job'}\ndata: {body}\n\n"
                quiet = 0.0
            if job is None or job.state.finished or await request.is_disconnected():
                return
            if asyncio.get_running_loop().time() >= deadline:
                return  # not ended: the client reconnects with Last-Event-ID
            await asyncio.sleep(POLL_SECONDS)
            quiet += POLL_SECONDS
            if quiet >= KEEPALIVE_SECONDS:
                yield ": keep-alive\n\n"
                quiet = 0.0
            job = await reader.get(job_id)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})




"""/v1/jobs: submit, inspect, list, cancel, download.

Every route needs an API key (api.auth). A job belongs to the key's owner that created it;
for anyone else it does not exist (404, never 403: ids of other owners' jobs are not
confirmed either)."""
from __future__ import annotations

import logging
from typing import Annotated, Optional

from fastapi import APIRouter, Body, Path, Query, Request, Response
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from api.auth import Principal, PrincipalDep
from api.deps import JobReaderDep, QueueDep, RateLimiterDep, SettingsDep, StorageDep, StoreDep
from api.errors import NOT_CONFIGURED, ApiError
from api.routes.webhooks import check_webhooks
from api.schemas import (
    MAX_BATCH, MAX_PAGE, BatchCreated, ErrorResponse, JobCreate, JobCreated, JobOut, JobPage, Links,
    job_created, job_out,
)
from shared.jobs import CURSOR_PATTERN, Job, JobError, JobState, JobStore
from shared.logs import job_fields
from shared.safefiles import FetchError
from shared.settings import Settings
from shared.credentials import seal
from shared.s3_endpoint import BLOCKED as S3_ENDPOINT_BLOCKED, check_endpoint
from shared.source_scopes import check_source_url
from shared.storage import HTML_CONTENT_TYPE

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/jobs", tags=["jobs"],
    responses={401: {"model": ErrorResponse, "description": "no API key, or not a valid one"}},
)

REPORT_HTML = "report.html"  # written by shared.conversion next to report.json
JobId = Annotated[str, Path(min_length=1, max_length=64, description="the id POST /v1/jobs returned")]
NOT_FOUND = {404: {"model": ErrorResponse, "description": "no such job of yours (or it expired)"}}
NOT_FINISHED = {409: {"model": ErrorResponse, "description": "job_not_finished: the job is still queued or running; "
                                                             "its artifacts appear when it succeeds. "
                                                             "job_not_succeeded: it failed or was cancelled "
                                                             "without this artifact"}}
UNAVAILABLE = {503: {"model": ErrorResponse, "description": "Redis or the queue is unavailable"}}
CREATE_ERRORS = {
    **UNAVAILABLE,
    403: {"model": ErrorResponse, "description": "source_forbidden: an s3:// source outside your S3 source scopes; "
                                                 "webhook_address_blocked: a webhook_url whose host is a private, "
                                                 "loopback or otherwise blocked address; s3_endpoint_blocked: the "
                                                 "same for source_credentials.s3_endpoint_url; webhooks_not_configured / "
                                                 "credentials_not_accepted: a webhook_url / source_credentials, and "
                                                 "this service has no key for them configured"},
    413: {"model": ErrorResponse, "description": "the request body is over the size limit"},
    429: {"model": ErrorResponse, "description": "rate_limited: too many jobs created lately (see Retry-After); "
                                                 "quota_exceeded: too many of your jobs queued or running at once"},
}


def _check_sources(bodies: list[JobCreate], principal: Principal, settings: Settings, batch: bool) -> None:
    """403 source_forbidden for an s3:// source outside the owner's scopes: checked for
    every job before any is created (a batch is refused whole), and before the rate limit."""
    for i, body in enumerate(bodies):
        try:
            own_s3 = body.source_credentials is not None and body.source_credentials.has_s3()
            check_source_url(body.source_url, principal.owner, settings, own_credentials=own_s3)
        except FetchError as exc:
            raise ApiError(403, exc.code, f"[{i}].source_url: {exc.message}" if batch else exc.message) from None


def _check_quota(store: JobStore, principal: Principal, settings: Settings, new_jobs: int) -> None:
    """429 quota_exceeded when the owner's queued and running jobs would exceed the cap."""
    cap = settings.max_active_jobs_per_owner
    active = store.active_count(principal.owner) if cap else 0
    if cap and active + new_jobs > cap:
        raise ApiError(429, "quota_exceeded", f"you have {active} jobs queued or running; "
                                              f"at most {cap} at once: wait for some to finish",
                       headers={"Retry-After": "30"})


def _check_credentials(bodies: list[JobCreate], settings: Settings, batch: bool) -> None:
    """403 credentials_not_accepted for source_credentials when no key seals them, 403
    s3_endpoint_blocked for an s3_endpoint_url that is a literal blocked address (names are
    checked by the worker): checked for every job before any is created (a batch is refused whole)."""
    if settings.credentials_key is None and any(b.source_credentials is not None for b in bodies):
        raise ApiError(NOT_CONFIGURED, "credentials_not_accepted",
                       "this service takes no source credentials (no ATTNONLY_CREDENTIALS_KEY is configured)")
    for i, body in enumerate(bodies):
        endpoint = body.source_credentials.s3_endpoint_url if body.source_credentials else None
        if endpoint is None:
            continue
        try:
            check_endpoint(endpoint, settings.fetch_allow_hosts, resolve_names=False)
        except FetchError as exc:
            # s3_endpoint_invalid cannot follow an endpoint that matches its pattern (api.url_patterns).
            status = 403 if exc.code == S3_ENDPOINT_BLOCKED else 422
            raise ApiError(status, exc.code, f"[{i}].source_credentials: {exc.message}" if batch else exc.message) from None


def _seal(body: JobCreate, settings: Settings) -> Optional[str]:
    # Without a key, a body with credentials never gets here (_check_credentials refused it).
    if body.source_credentials is None or settings.credentials_key is None:
        return None
    return seal(body.source_credentials, settings.credentials_key)


def _submit(body: JobCreate, principal: Principal, store: JobStore, queue, settings: Settings) -> tuple[Job, bool]:
    job, created = store.create(body.source_url, body.options, body.idempotency_key, owner=principal.owner,
                                sealed_credentials=_seal(body, settings), force=body.force, webhook_url=body.webhook_url,
                                webhook_events=body.webhook_events)
    if created:
        try:
            queue.enqueue(job.id)
        except Exception as exc:
            # The record exists but no worker will ever see it: finish it so that it does
            # not sit in "queued" forever, free its idempotency key so that the same
            # submission can be made again, and tell the client to retry.
            log.error("job %s: enqueue failed: %s", job.id, exc, extra=job_fields(job.id, job.owner))
            store.finish(job.id, JobState.failed, error=JobError(
                code="queue_unavailable", message="the job could not be queued; submit it again"))
            store.release_idempotency_key(job)
            raise ApiError(503, "queue_unavailable", "the job queue is unavailable; retry shortly") from None
    return job, created


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, "job_not_found", f"no job {job_id} (unknown, or expired after it finished)")


def _own_or_404(job: Optional[Job], job_id: str, principal: Principal) -> Job:
    if job is None or job.owner != principal.owner:
        raise _not_found(job_id)
    return job


def _get_own_or_404(store: JobStore, job_id: str, principal: Principal) -> Job:
    return _own_or_404(store.get(job_id), job_id, principal)


def _create_all(bodies: list[JobCreate], principal: Principal, store: JobStore, queue, limiter,
                settings: Settings, batch: bool) -> list[tuple[Job, bool]]:
    """Every check, then every job created and queued: blocking (Redis, the broker), so run on
    the thread pool, in one hop."""
    _check_sources(bodies, principal, settings, batch=batch)
    check_webhooks(bodies, settings, batch=batch)
    _check_credentials(bodies, settings, batch=batch)
    _check_quota(store, principal, settings, len(bodies))
    limiter.take(principal.owner, len(bodies))
    return [_submit(b, principal, store, queue, settings) for b in bodies]


# The submitting routes are async and hop to the thread pool once (_create_all): as plain
# ``def`` routes they hopped twice, FastAPI validating a sync route's response on the pool too.
@router.post(
    "", status_code=202, response_model=JobCreated, responses=CREATE_ERRORS,
    summary="Submit a conversion job",
)
async def create_job(
    body: JobCreate, request: Request, response: Response, principal: PrincipalDep,
    store: StoreDep, queue: QueueDep, limiter: RateLimiterDep, settings: SettingsDep,
):
    [(job, created)] = await run_in_threadpool(_create_all, [body], principal, store, queue, limiter, settings, False)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_created(request, job)


@router.post(
    "/batch", status_code=202, response_model=BatchCreated, responses=CREATE_ERRORS,
    summary="Submit several jobs: one job per body, in order (each counts against the rate limit)",
)
async def create_jobs(
    bodies: Annotated[list[JobCreate], Body(min_length=1, max_length=MAX_BATCH)],
    request: Request, principal: PrincipalDep, store: StoreDep, queue: QueueDep, limiter: RateLimiterDep,
    settings: SettingsDep,
):
    created = await run_in_threadpool(_create_all, bodies, principal, store, queue, limiter, settings, True)
    links = Links(request)
    return BatchCreated(jobs=[job_created(request, job, links) for job, _ in created])


@router.get("", response_model=JobPage, summary="List your jobs, newest first")
def list_jobs(
    request: Request,
    principal: PrincipalDep,
    store: StoreDep,
    state: Optional[JobState] = None,
    cursor: Annotated[Optional[str], Query(pattern=CURSOR_PATTERN, description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
):
    jobs, next_cursor = store.list(state=state, cursor=cursor, limit=limit, owner=principal.owner)
    links = Links(request)
    return JobPage(jobs=[job_out(request, j, links) for j in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=NOT_FOUND, summary="A job's state and progress")
async def get_job(job_id: JobId, request: Request, principal: PrincipalDep, reader: JobReaderDep):
    # async, on redis.asyncio: the route clients poll, so no hop to the thread pool.
    return job_out(request, _own_or_404(await reader.get(job_id), job_id, principal))


@router.post(
    "/{job_id}/cancel", status_code=202, response_model=JobOut,
    responses={**NOT_FOUND, 409: {"model": ErrorResponse, "description": "the job already finished"}},
    summary="Cancel a job: at once if queued, within one layer if running",
)
def cancel_job(job_id: JobId, request: Request, principal: PrincipalDep, store: StoreDep):
    _get_own_or_404(store, job_id, principal)  # the owner never changes: checking first is enough
    job = store.request_cancel(job_id)
    if job is None:
        raise _not_found(job_id)
    if job.state in (JobState.succeeded, JobState.failed):
        raise ApiError(409, "job_finished", f"job {job_id} already {job.state.value}; nothing to cancel")
    return job_out(request, job)


def _artifact_redirect(job: Job, name: str, storage, **presign) -> RedirectResponse:
    """307 to a fresh presigned URL of the job's artifact ``name``. A job without it: 409
    job_not_finished while it is queued or running (ask again later), 409 job_not_succeeded
    once it failed or was cancelled (its state is the reason), 404 artifact_not_found when
    it succeeded (no artifact has that name)."""
    artifact = next((a for a in job.artifacts if a.name == name), None)
    have = ", ".join(a.name for a in job.artifacts) or "none"
    if artifact is None and not job.state.finished:
        raise ApiError(409, "job_not_finished", f"job {job.id} is {job.state.value}; its artifacts appear "
                                                "when it succeeds")
    if artifact is None and job.state != JobState.succeeded:
        raise ApiError(409, "job_not_succeeded", f"job {job.id} {job.state.value}: it has no artifact {name!r}; "
                                                 f"it has: {have}")
    if artifact is None:
        raise ApiError(404, "artifact_not_found", f"job {job.id} has no artifact {name!r}; it has: {have}")
    # A fresh short-lived URL on every request; nothing on the way may keep it.
    return RedirectResponse(
        storage.presigned_get(artifact.key, **presign), status_code=307,
        headers={"Cache-Control": "no-store"},
    )


@router.get(
    "/{job_id}/artifacts/{name}", status_code=307, response_class=RedirectResponse,
    responses={**NOT_FOUND, **NOT_FINISHED, 307: {"description": "redirect to a short-lived presigned download URL"}},
    summary="Download an artifact (config.json, model.safetensors, report.json, report.html)",
)
def get_artifact(
    job_id: JobId, name: Annotated[str, Path(max_length=100)], principal: PrincipalDep,
    store: StoreDep, storage: StorageDep,
):
    job = _get_own_or_404(store, job_id, principal)
    return _artifact_redirect(job, name, storage, filename=name)


@router.get(
    "/{job_id}/report", status_code=307, response_class=RedirectResponse,
    responses={
        307: {"description": "redirect to a short-lived presigned URL of report.html, served as text/html "
                             "to be read in a browser (self-contained: it fetches nothing)"},
        404: {"model": ErrorResponse, "description": "job_not_found: no such job of yours (or it expired); "
                                                     "artifact_not_found: the job succeeded without "
                                                     "report.html (converted before reports were rendered)"},
        **NOT_FINISHED,
    },
    summary="Read the job's equivalence report as a web page",
)
def get_report(job_id: JobId, principal: PrincipalDep, store: StoreDep, storage: StorageDep):
    job = _get_own_or_404(store, job_id, principal)
    return _artifact_redirect(job, REPORT_HTML, storage, content_type=HTML_CONTENT_TYPE)

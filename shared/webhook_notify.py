"""The webhook events of the jobs a worker runs: when they go out and what they say.

worker.tasks calls ``job_started`` after it claims a job, ``job_progress`` after each
progress write and ``job_finished`` after the outcome is recorded; each hands a signed
delivery to the process's dispatcher (shared.webhook_delivery) and returns at once. Jobs
without a webhook_url, and events the job did not ask for, cost nothing.

A payload says what happened to the job and nothing secret: no source URL (a presigned
URL carries credentials in its query), no credentials, no download URLs (those are
short-lived and fetched from the API); links are paths under the API's base URL.
"""
from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from datetime import datetime
from typing import Optional

from pydantic import BaseModel, Field

from shared.jobs import Job, JobState, JobStore, utcnow
from shared.webhook_delivery import Delivery, DeliveryPolicy, dispatcher
from shared.webhook_records import MAX_RECORDED_ATTEMPTS, WebhookAttempt, WebhookEvent
from shared.webhook_signing import owner_secret

log = logging.getLogger(__name__)


class ProgressData(BaseModel):
    stage: Optional[str]
    done: Optional[int] = Field(description="units of the stage done: bytes downloading, layers converting")
    total: Optional[int]
    percent: float


class ArtifactData(BaseModel):
    name: str
    size: int
    sha256: Optional[str]
    path: str = Field(description="GET it from the API (with your key) for a download URL")


class OutcomeData(BaseModel):
    error_code: Optional[str]
    error_message: Optional[str]
    artifacts: list[ArtifactData]


class EventData(BaseModel):
    job_id: str
    state: JobState
    attempt: int = Field(description="the worker's delivery of the job: above 1 after a redelivery")
    progress: Optional[ProgressData] = None
    outcome: Optional[OutcomeData] = None
    links: dict[str, str]


class EventPayload(BaseModel):
    """The body of every webhook: the Standard Webhooks shape (type, timestamp, data)."""

    type: str  # job.started, job.progress, job.completed
    timestamp: datetime
    data: EventData


def payload(event: WebhookEvent, job: Job, done: Optional[int] = None, total: Optional[int] = None) -> str:
    """The event's JSON text, exactly as it is signed and sent."""
    job_path = f"/v1/jobs/{job.id}"
    data = EventData(job_id=job.id, state=job.state, attempt=job.attempts, links={"self": job_path})
    if event == WebhookEvent.completed:
        data.outcome = OutcomeData(
            error_code=job.error.code if job.error else None,
            error_message=job.error.message if job.error else None,
            artifacts=[ArtifactData(name=a.name, size=a.size, sha256=a.sha256,
                                    path=f"{job_path}/artifacts/{a.name}") for a in job.artifacts],
        )
    else:
        data.progress = ProgressData(stage=job.progress.stage, done=done, total=total, percent=job.progress.percent)
    body = EventPayload(type=f"job.{event.value}", timestamp=utcnow(), data=data)
    return json.dumps(body.model_dump(mode="json"), separators=(",", ":"))


class JobWebhooks:
    """One job's receiver, secret and progress rate limit."""

    def __init__(self, job: Job, settings, store: JobStore):
        self.job_id, self.url, self.events = job.id, job.webhook_url, set(job.webhook_events)
        self.secret = owner_secret(settings.webhook_signing_key, job.owner)
        self.policy = DeliveryPolicy.from_settings(settings)
        self.progress_interval = settings.webhook_progress_interval_seconds
        self.store = store
        self._last_stage: Optional[str] = None
        self._last_progress = float("-inf")

    @classmethod
    def for_job(cls, job: Job, settings, store: JobStore) -> Optional["JobWebhooks"]:
        if job.webhook_url is None:
            return None
        if settings.webhook_signing_key is None:
            # The API refuses such jobs; a worker configured apart from its API lands here.
            log.error("job %s has a webhook_url but this worker has no ATTNONLY_WEBHOOK_SIGNING_KEY; "
                      "no events are sent", job.id)
            return None
        return cls(job, settings, store)

    def send(self, event: WebhookEvent, job: Job, done: Optional[int] = None, total: Optional[int] = None) -> None:
        if event not in self.events:
            return
        dispatcher().submit(Delivery(
            job_id=self.job_id, event=event, url=self.url, secret=self.secret,
            body=payload(event, job, done, total), message_id=f"msg_{uuid.uuid4().hex}",
            policy=self.policy, record=self._record,
        ))

    def progress(self, job: Job, done: int, total: int) -> None:
        """At most one event per progress_interval, and one at each change of stage."""
        now = time.monotonic()
        if job.progress.stage == self._last_stage and now - self._last_progress < self.progress_interval:
            return
        self._last_stage, self._last_progress = job.progress.stage, now
        self.send(WebhookEvent.progress, job, done, total)

    def _record(self, attempt: WebhookAttempt) -> None:
        def mutate(job: Job) -> Job:
            job.webhook_deliveries = (job.webhook_deliveries + [attempt])[-MAX_RECORDED_ATTEMPTS:]
            return job

        self.store.update(self.job_id, mutate)


# The jobs this process runs that have a webhook, by id (a worker runs one at a time).
_running: dict[str, JobWebhooks] = {}


def _never_raises(fn):
    """Webhooks must never fail a conversion: a bug or a bad record here is logged, not raised."""

    @functools.wraps(fn)
    def wrapper(job: Job, *args) -> None:
        try:
            fn(job, *args)
        except Exception:
            log.exception("job %s: webhook event not sent", job.id)

    return wrapper


@_never_raises
def job_started(job: Job, settings, store: JobStore) -> None:
    hooks = JobWebhooks.for_job(job, settings, store)
    if hooks is not None:
        _running[job.id] = hooks
        hooks.send(WebhookEvent.started, job)


@_never_raises
def job_progress(job: Job, done: int, total: int) -> None:
    hooks = _running.get(job.id)
    if hooks is not None:
        hooks.progress(job, done, total)


@_never_raises
def job_finished(job: Job, settings, store: JobStore) -> None:
    hooks = _running.pop(job.id, None) or JobWebhooks.for_job(job, settings, store)
    if hooks is not None:
        hooks.send(WebhookEvent.completed, job)


@_never_raises
def job_finished_unstarted(job: Job, settings, store: JobStore) -> None:
    """A job the API finished before any worker took it (cancelled while queued): its queue
    message still reaches a worker, which sends the completed event once."""
    sent = any(d.event == WebhookEvent.completed for d in job.webhook_deliveries)
    if job.attempts == 0 and not sent:
        job_finished(job, settings, store)

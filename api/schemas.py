"""Request and response bodies of the HTTP API.

Kept apart from the stored record (shared.jobs.Job): the API shows what a user needs
(links, download URLs) and hides what is internal (S3 keys, the owner).
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Optional
from urllib.parse import urlsplit

from fastapi import Request
from starlette.datastructures import URLPath
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.url_patterns import S3_ENDPOINT_PATTERN, SOURCE_URL_PATTERN, WEBHOOK_URL_PATTERN
from shared.credentials import SourceCredentials

from shared.job_options import JobOptions
from shared.jobs import Job, JobState, Progress
from shared.webhook_records import ALL_EVENTS, WebhookAttempt, WebhookEvent

SOURCE_SCHEMES = ("http", "https", "s3", "hf")
MAX_BATCH = 100
MAX_PAGE = 100


class SourceCredentialsIn(SourceCredentials):
    """SourceCredentials as submitted: the endpoint with its documented shape (shared/ does not
    depend on api/, where the URL patterns live)."""

    s3_endpoint_url: Optional[str] = Field(
        None, min_length=1, max_length=2048, pattern=S3_ENDPOINT_PATTERN, repr=False,
        description="http(s)://host[:port][/path] (no user@, query or fragment) of the S3-compatible service "
        "holding your bucket (your MinIO, R2, Wasabi...): your S3 keys are sent there and only there. Used with "
        "s3_access_key and s3_secret_key only, ignored without them. A literal private, loopback or otherwise "
        "blocked address is refused (403 s3_endpoint_blocked); a name is resolved and checked by the worker "
        "(the job fails with s3_endpoint_blocked). Unset: the service's own S3 source endpoint.",
    )


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{
                "source_url": "https://example.org/models/gpt2-tiny/",
                "options": {"dtype": "float32", "calibration": {"tokens": 256, "seq_len": 64}},
                "idempotency_key": "gpt2-tiny-2024-06-01",
            }],
        },
    )

    source_url: str = Field(
        min_length=1, max_length=2048, pattern=SOURCE_URL_PATTERN,
        description="A Hugging Face model directory given as a base URL (its files are fetched by "
        "name), a .tar / .tar.gz archive of one, hf://ORG/REPO[@REVISION] on the model hub, or an "
        "s3://bucket/prefix inside the S3 source scopes an operator granted the key's owner (else 403 "
        "source_forbidden) or readable with the job's own source_credentials.",
    )
    options: JobOptions = Field(default_factory=JobOptions)
    source_credentials: Optional[SourceCredentialsIn] = Field(
        None, description="for a gated or private source: a hub token (hf:// sources) or S3 keys for your own "
        "bucket. Sealed in the job record, used for the download alone, dropped when the job ends, never returned.",
    )
    idempotency_key: Optional[str] = Field(
        None, min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$",
        description="Submitting the same key again returns the first job instead of a new one.",
    )
    force: bool = Field(
        False, strict=True, description="convert even when an earlier job of yours converted the same source weights with the "
        "same options and converter version (by default such a job succeeds at once with copies of that job's "
        "artifacts, and names it in reused_from)",
    )
    webhook_url: Optional[str] = Field(
        None, min_length=1, max_length=2048, pattern=WEBHOOK_URL_PATTERN,
        description="http(s) URL that receives the job's events as signed POSTs (Standard Webhooks headers, "
        "secret from GET /v1/webhooks/secret). The host is a DNS name, a dotted-decimal IPv4 address or an "
        "[IPv6] literal; a literal private or loopback address is refused (403 webhook_address_blocked), and "
        "every address a name resolves to is checked at each delivery. Redirects are not followed.",
    )
    webhook_events: list[WebhookEvent] = Field(
        default_factory=lambda: list(ALL_EVENTS), min_length=1, max_length=len(ALL_EVENTS),
        description="which events go to webhook_url: started, progress (rate-limited), completed; default all "
        "(kept, and unused, on a job without a webhook_url)",
    )

    # Accepted without a webhook_url rather than refused: a rule tying the two fields together
    # (JSON Schema's dependentSchemas) is one schema-driven clients and fuzzers apply unevenly.
    @field_validator("webhook_events")
    @classmethod
    def _once_each(cls, value: list[WebhookEvent]) -> list[WebhookEvent]:
        return list(dict.fromkeys(value))

    @field_validator("source_url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme.lower() not in SOURCE_SCHEMES or not parts.netloc:
            raise ValueError("source_url must be an http://, https://, s3:// or hf:// URL")
        if parts.scheme.lower() in ("s3", "hf"):
            # Parsed as the worker will parse it: the scope check needs its bucket and key.
            from shared.fetch import FetchError, parse_url

            try:
                parse_url(value)
            except FetchError as exc:
                raise ValueError(exc.message) from None
        return value


class JobLinks(BaseModel):
    self: str
    cancel: str


class JobCreated(BaseModel):
    id: str
    state: JobState
    links: JobLinks


class BatchCreated(BaseModel):
    jobs: list[JobCreated]


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: Optional[str] = Field(None, description="hex SHA-256 of the file; null for jobs that finished "
                                  "before the service recorded it")
    url: str = Field(description="GET it to be redirected to a short-lived download URL")


class ErrorOut(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    id: str
    state: JobState
    source_url: str
    options: JobOptions
    idempotency_key: Optional[str]
    progress: Progress
    created_at: datetime
    updated_at: datetime
    started_at: Optional[datetime]
    finished_at: Optional[datetime]
    attempts: int
    cancel_requested: bool
    error: Optional[ErrorOut]
    summary: Optional[dict[str, Any]]
    artifacts: list[ArtifactOut]
    force: bool = False
    reused_from: Optional[str] = Field(None, description="the earlier job of yours whose artifacts this job "
                                       "copied instead of converting again; null when it converted")
    webhook_url: Optional[str]
    webhook_events: list[WebhookEvent]
    webhook_deliveries: list[WebhookAttempt] = Field(description="every attempt to deliver an event, newest last")
    links: JobLinks


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: Optional[str] = Field(description="pass as ?cursor= for the next page; null on the last")


class FieldError(BaseModel):
    location: str  # body, query, path
    path: str  # e.g. "options.calibration.tokens" or "[2].source_url"
    message: str


class ErrorBody(BaseModel):
    code: str
    message: str
    fields: Optional[list[FieldError]] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


# --- record -> response ------------------------------------------------------------------

# The record's fields a JobOut shows as they are.
_SHOWN = (
    "id", "state", "source_url", "options", "idempotency_key", "progress", "created_at", "updated_at",
    "started_at", "finished_at", "attempts", "cancel_requested", "error", "summary", "force", "reused_from",
    "webhook_url", "webhook_events", "webhook_deliveries",
)


_templates: dict[tuple[int, str, tuple[str, ...]], tuple[object, str]] = {}


def _path_template(provider, name: str, params: tuple[str, ...]) -> str:
    """A route's path with ``{param}`` in place of each parameter. url_path_for tries every
    route in turn (an exception for each one that is not it): once per route, not per link.
    Keyed by the router's id (routers are not hashable), kept alive with it so that the id
    cannot be reused by another object."""
    key = (id(provider), name, params)
    hit = _templates.get(key)
    if hit is None or hit[0] is not provider:
        hit = (provider, provider.url_path_for(name, **{p: "{" + p + "}" for p in params}))
        _templates[key] = hit
    return hit[1]


class Links:
    """request.url_for for one request's links: the same absolute URLs, made from each
    route's path template and the request's base URL (scheme, host, root path) found once."""

    def __init__(self, request: Request):
        self.provider = request.scope.get("router") or request.scope.get("app")
        # What make_absolute_url puts before a path: base_url's path without its last "/".
        self.base = str(URLPath("/").make_absolute_url(request.base_url))[:-1]

    def url(self, route: str, /, **params: str) -> str:
        return self.base + _path_template(self.provider, route, tuple(params)).format(**params)

    def job(self, job_id: str) -> JobLinks:
        return JobLinks(self=self.url("get_job", job_id=job_id), cancel=self.url("cancel_job", job_id=job_id))


def job_created(request: Request, job: Job, links: Optional[Links] = None) -> JobCreated:
    """``links``: one Links for every job of a batch."""
    return JobCreated(id=job.id, state=job.state, links=(links or Links(request)).job(job.id))


def job_out(request: Request, job: Job, links: Optional[Links] = None) -> JobOut:
    """``links``: one Links for every job of a page."""
    links = links or Links(request)
    # The record's values as they are (nested models are not dumped and validated again);
    # from_attributes turns the JobError into an ErrorOut.
    return JobOut.model_validate({
        **{name: getattr(job, name) for name in _SHOWN},
        "artifacts": [
            ArtifactOut(name=a.name, size=a.size, sha256=a.sha256,
                        url=links.url("get_artifact", job_id=job.id, name=a.name))
            for a in job.artifacts
        ],
        "links": links.job(job.id),
    }, from_attributes=True)


class Architectures(BaseModel):
    """GET /v1/architectures."""

    patterns: list[dict[str, str]] = Field(description="FFN shapes: kind (plain, gated, experts) and attribute names")
    model_types: dict[str, Any] = Field(description="model types a sweep saw convert and pass, with its date and transformers version")

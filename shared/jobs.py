"""The job record and its store in Redis.

Layout of the keys (all under the settings' ``redis_key_prefix``, ``p`` below):

    p:job:{id}            the record, JSON; expires job_ttl_seconds after the job finishes
    p:jobs                every job, newest last (a sorted set ordered by member, see below)
    p:jobs:{state}        the jobs in one state, same ordering
    p:own:{o}:jobs        one owner's jobs (o: a hash of the owner), same ordering
    p:own:{o}:jobs:{state}  one owner's jobs in one state
    p:idem:{digest}       idempotency key -> job id (SET NX); expires with the job
    p:cancel:{id}         set while a cancel is asked of a running job; the worker polls it
    p:seq                 a counter that orders jobs by creation

Index members are ``{seq:015d}:{id}`` with score 0, where seq comes from INCR on
``p:seq``: lexicographic order is then exactly creation order (timestamps tie within a
millisecond), and a cursor is simply the last member a page showed.
Expired records leave members behind; they are pruned when a page meets them and, from
the oldest end, on every create and finish.

Every write of a record goes through one WATCH/MULTI transaction together with the index
moves it implies, so a reader never sees a record whose indexes disagree with its state,
and two writers (the API cancelling, the worker advancing) never lose each other's update.

A worker's writes carry the attempt number its claim returned (``attempt=``): when the
job was claimed again since (a redelivered message), the older run's writes change
nothing, so two deliveries of one job can never mix their outcomes.
"""
from __future__ import annotations

import hashlib
import re
import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Callable, Optional

import redis
import redis.asyncio
from pydantic import BaseModel, Field

from shared.job_options import JobOptions
from shared.webhook_records import ALL_EVENTS, WebhookAttempt, WebhookEvent

WATCH_RETRIES = 50
_PRUNE_BATCH = 20
# Pruning in one round trip (in every create's transaction, and after every finish): for each
# index in KEYS, its oldest ARGV[2] members, and those whose record ARGV[1]..id is gone are removed.
_PRUNE_EXPIRED = """
local removed = 0
for _, index in ipairs(KEYS) do
  for _, member in ipairs(redis.call('ZRANGEBYLEX', index, '-', '+', 'LIMIT', 0, tonumber(ARGV[2]))) do
    if redis.call('EXISTS', ARGV[1] .. string.match(member, '^[^:]*:(.*)$')) == 0 then
      redis.call('ZREM', index, member)
      removed = removed + 1
    end
  end
end
return removed
"""
_MEMBER_RE = re.compile(r"^[0-9]{15}:[0-9a-f-]{36}$")  # [0-9]: \d also matches non-ASCII digits


class _AnyOwner:
    def __repr__(self) -> str:
        return "ANY_OWNER"


# list(owner=ANY_OWNER): every job, whoever owns it (operators; the API always passes one).
ANY_OWNER: Any = _AnyOwner()


class JobState(str, Enum):
    queued = "queued"
    downloading = "downloading"
    converting = "converting"
    checking = "checking"
    uploading = "uploading"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATES


FINISHED_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})
RUNNING_STATES = frozenset({JobState.downloading, JobState.converting, JobState.checking, JobState.uploading})


class JobError(BaseModel):
    code: str  # stable, machine-readable (e.g. "unsupported_architecture")
    message: str  # for people; never a stack trace


class Artifact(BaseModel):
    name: str  # file name, e.g. "model.safetensors"
    size: int  # bytes
    key: str  # S3 object key
    sha256: Optional[str] = None  # hex digest of the uploaded file; None in records from before it was kept


class Progress(BaseModel):
    percent: float = Field(0.0, ge=0, le=100)
    stage: Optional[str] = None  # the conversion's stage, or "downloading" / "uploading"
    layers_done: Optional[int] = None
    layers_total: Optional[int] = None


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Job(BaseModel):
    id: str
    state: JobState = JobState.queued
    source_url: str
    options: JobOptions = Field(default_factory=JobOptions)
    idempotency_key: Optional[str] = None
    owner: Optional[str] = None  # the API key's name that created the job; None: anonymous
    progress: Progress = Field(default_factory=Progress)
    created_at: datetime = Field(default_factory=utcnow)
    # Per-job source credentials, sealed (shared/credentials.py); dropped when the job ends.
    sealed_credentials: Optional[str] = Field(None, repr=False)
    updated_at: datetime = Field(default_factory=utcnow)
    started_at: Optional[datetime] = None
    finished_at: Optional[datetime] = None
    seq: int = 0  # creation order (see the index members above)
    attempts: int = 0  # deliveries to a worker; above 1 after a crash and redelivery
    cancel_requested: bool = False
    error: Optional[JobError] = None
    summary: Optional[dict[str, Any]] = None  # the conversion report's summary
    artifacts: list[Artifact] = Field(default_factory=list)
    force: bool = False  # convert even when an earlier job of the owner converted the same (shared/reuse.py)
    reused_from: Optional[str] = None  # the earlier job whose artifacts this one copied
    # Where the worker POSTs signed events of this job (shared/webhook_notify.py), which
    # ones, and every delivery attempt so far (the newest MAX_RECORDED_ATTEMPTS).
    webhook_url: Optional[str] = None
    webhook_events: list[WebhookEvent] = Field(default_factory=lambda: list(ALL_EVENTS))
    webhook_deliveries: list[WebhookAttempt] = Field(default_factory=list)

    @property
    def index_member(self) -> str:
        return f"{self.seq:015d}:{self.id}"


class InvalidCursor(ValueError):
    pass


# The cursor is the member itself, in the open: its shape is the API's documented pattern
# (CURSOR_PATTERN), and any string of that shape is a valid position to list from.
CURSOR_PATTERN = _MEMBER_RE.pattern


def encode_cursor(member: str) -> str:
    return member


def decode_cursor(cursor: str) -> str:
    if not _MEMBER_RE.fullmatch(cursor):
        raise InvalidCursor("cursor is not one this API returned")
    return cursor


# Short timeouts, so that a dead Redis fails a request instead of hanging it.
_CLIENT_OPTIONS = dict(decode_responses=True, socket_connect_timeout=3, socket_timeout=10, health_check_interval=30)


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, **_CLIENT_OPTIONS)


def async_redis_client(url: str) -> redis.asyncio.Redis:
    """redis_client's twin on asyncio: for reads an async route makes without a hop to a
    thread. Its connections belong to the event loop that opened them."""
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    # a pooled connection that Redis closed (a restart) fails once and is reopened, not a 503
    return redis.asyncio.Redis.from_url(
        url, **_CLIENT_OPTIONS,
        retry=Retry(ExponentialBackoff(cap=1.0), 3),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )


def job_key(prefix: str, job_id: str) -> str:
    return f"{prefix}:job:{job_id}"


class AsyncJobReader:
    """JobStore.get on asyncio: the API's status route, its busiest, reads one record and
    writes nothing, so it needs none of the store's transactions."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str = "attnonly"):
        self.redis, self.prefix = client, prefix

    async def get(self, job_id: str) -> Optional[Job]:
        data = await self.redis.get(job_key(self.prefix, job_id))
        return Job.model_validate_json(data) if data is not None else None


Mutation = Callable[[Job], Optional[Job]]
ExtraOps = Callable[[Any, Job, Job], None]


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "attnonly", ttl_seconds: int = 7 * 24 * 3600):
        self.redis = client
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self._prune_script = client.register_script(_PRUNE_EXPIRED)

    # --- keys -----------------------------------------------------------------------------
    def _job_key(self, job_id: str) -> str:
        return job_key(self.prefix, job_id)

    @property
    def _all_index(self) -> str:
        return f"{self.prefix}:jobs"

    def _state_index(self, state: JobState) -> str:
        return f"{self.prefix}:jobs:{JobState(state).value}"

    def _owner_index(self, owner: Optional[str], state: Optional[JobState] = None) -> str:
        # Hashed: owner names never become part of key syntax. None (anonymous) has its own.
        tag = "anonymous" if owner is None else hashlib.sha256(owner.encode()).hexdigest()[:24]
        base = f"{self.prefix}:own:{tag}:jobs"
        return base if state is None else f"{base}:{JobState(state).value}"

    def _idem_key(self, owner: Optional[str], key: str) -> str:
        # Hashed: the key is the client's free text; the owner scopes it (one client's key
        # never returns another client's job).
        digest = hashlib.sha256(f"{owner or ''}\0{key}".encode()).hexdigest()
        return f"{self.prefix}:idem:{digest}"

    def _cancel_key(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    # --- reads ----------------------------------------------------------------------------
    def get(self, job_id: str) -> Optional[Job]:
        data = self.redis.get(self._job_key(job_id))
        return Job.model_validate_json(data) if data is not None else None

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self._cancel_key(job_id)))

    def list(
        self, state: Optional[JobState] = None, cursor: Optional[str] = None, limit: int = 20,
        owner: Optional[str] = ANY_OWNER,
    ) -> tuple[list[Job], Optional[str]]:
        """Newest first. Returns (jobs, next cursor or None when this was the last page).
        ``owner``: only that owner's jobs (None: the anonymous ones); default every job."""
        if owner is ANY_OWNER:
            index = self._state_index(state) if state is not None else self._all_index
        else:
            index = self._owner_index(owner, state)
        upper = "+" if cursor is None else "(" + decode_cursor(cursor)
        jobs: list[Job] = []
        last_member = None
        while len(jobs) < limit:
            wanted = limit - len(jobs)
            members = self.redis.zrevrangebylex(index, upper, "-", start=0, num=wanted)
            if not members:
                break
            raw = self.redis.mget([self._job_key(m.split(":", 1)[1]) for m in members])
            expired = [m for m, data in zip(members, raw) if data is None]
            if expired:
                self.redis.zrem(index, *expired)
            for member, data in zip(members, raw):
                if data is not None:
                    jobs.append(Job.model_validate_json(data))
                    last_member = member
            if len(members) < wanted:
                break
            upper = "(" + members[-1]
        more = last_member is not None and bool(
            self.redis.zrevrangebylex(index, "(" + last_member, "-", start=0, num=1)
        )
        return jobs, (encode_cursor(last_member) if more and len(jobs) == limit else None)

    # --- writes ---------------------------------------------------------------------------
    def create(
        self,
        source_url: str,
        options: Optional[JobOptions] = None,
        idempotency_key: Optional[str] = None,
        owner: Optional[str] = None,
        sealed_credentials: Optional[str] = None,
        force: bool = False,
        webhook_url: Optional[str] = None,
        webhook_events: Optional[list[WebhookEvent]] = None,
    ) -> tuple[Job, bool]:
        """Store a new queued job. Returns (job, created); created is False when the
        idempotency key was seen before and its job is returned instead."""
        job = Job(
            id=str(uuid.uuid4()), source_url=source_url, options=options or JobOptions(),
            idempotency_key=idempotency_key, owner=owner, seq=self.redis.incr(f"{self.prefix}:seq"), force=force,
            sealed_credentials=sealed_credentials, webhook_url=webhook_url,
            webhook_events=list(ALL_EVENTS) if webhook_events is None else webhook_events,
        )
        idem_key = self._idem_key(owner, idempotency_key) if idempotency_key is not None else None
        for _ in range(WATCH_RETRIES):
            with self.redis.pipeline() as pipe:
                try:
                    if idem_key is not None:
                        pipe.watch(idem_key)
                        existing_id = pipe.get(idem_key)
                        if existing_id is not None:
                            existing = self.get(existing_id)
                            if existing is not None:
                                return existing, False
                    pipe.multi()
                    if idem_key is not None:
                        pipe.set(idem_key, job.id)
                    self._write(pipe, job, previous=None)
                    # The pruning in the same round trip (EVAL: a pipeline's EVALSHA costs
                    # one more, to check that the script is loaded).
                    pipe.eval(_PRUNE_EXPIRED, 2, self._all_index, self._owner_index(owner), self._job_key(""),
                              _PRUNE_BATCH)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        else:
            raise RuntimeError("job store: too much contention on one idempotency key")
        return job, True

    def release_idempotency_key(self, job: Job) -> None:
        """Forget the job's idempotency key (if it still names this job), so that the same
        key submitted again makes a new job: used when the job never reached the queue."""
        if job.idempotency_key is None:
            return
        idem_key = self._idem_key(job.owner, job.idempotency_key)
        for _ in range(WATCH_RETRIES):
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(idem_key)
                    if pipe.get(idem_key) != job.id:
                        return
                    pipe.multi()
                    pipe.delete(idem_key)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def update(self, job_id: str, mutate: Mutation, extra: Optional[ExtraOps] = None) -> Optional[Job]:
        """Apply ``mutate`` to a copy of the record atomically. ``mutate`` returns the new
        record, or None to leave it as it is. Returns the record as stored afterwards, or
        None when there is no such job."""
        key = self._job_key(job_id)
        for _ in range(WATCH_RETRIES):
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    data = pipe.get(key)
                    if data is None:
                        return None
                    current = Job.model_validate_json(data)
                    new = mutate(current.model_copy(deep=True))
                    if new is None:
                        return current
                    new.updated_at = utcnow()
                    pipe.multi()
                    self._write(pipe, new, previous=current)
                    if extra is not None:
                        extra(pipe, current, new)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        else:
            raise RuntimeError(f"job store: too much contention on job {job_id}")
        if new.state.finished and not current.state.finished:
            self._prune_oldest(self._state_index(new.state), self._owner_index(new.owner, new.state))
        return new

    def _write(self, pipe, job: Job, previous: Optional[Job]) -> None:
        if job.state.finished and job.sealed_credentials is not None:
            job.sealed_credentials = None  # a finished job's credentials are gone for good
        member = job.index_member
        pipe.set(self._job_key(job.id), job.model_dump_json())
        if previous is None:
            pipe.zadd(self._all_index, {member: 0})
            pipe.zadd(self._owner_index(job.owner), {member: 0})
        if previous is None or previous.state != job.state:
            if previous is not None:
                pipe.zrem(self._state_index(previous.state), member)
                pipe.zrem(self._owner_index(job.owner, previous.state), member)
            pipe.zadd(self._state_index(job.state), {member: 0})
            pipe.zadd(self._owner_index(job.owner, job.state), {member: 0})
        if job.state.finished:
            # Finished records, their idempotency key and any cancel flag go together.
            pipe.expire(self._job_key(job.id), self.ttl_seconds)
            pipe.delete(self._cancel_key(job.id))
            if job.idempotency_key is not None:
                pipe.expire(self._idem_key(job.owner, job.idempotency_key), self.ttl_seconds)

    def _prune_oldest(self, *indexes: str) -> None:
        """Drop index members whose record has expired, from the oldest end of each index."""
        self._prune_script(keys=list(indexes), args=[self._job_key(""), _PRUNE_BATCH])

    # --- transitions ----------------------------------------------------------------------
    def claim(self, job_id: str) -> Optional[Job]:
        """The worker takes the job: to downloading, one more attempt. None when the job is
        gone or already finished (a redelivered message for a finished job does nothing)."""

        def mutate(job: Job) -> Optional[Job]:
            if job.state.finished:
                return None
            job.state = JobState.downloading
            job.attempts += 1
            job.started_at = job.started_at or utcnow()
            job.progress = Progress(percent=0.0, stage="downloading")
            job.error, job.summary, job.artifacts, job.reused_from = None, None, [], None
            return job

        job = self.update(job_id, mutate)
        if job is None or job.state != JobState.downloading:
            return None
        return job

    def advance(
        self, job_id: str, state: JobState, progress: Progress, attempt: Optional[int] = None
    ) -> Optional[Job]:
        """Move a running job on; a finished job (e.g. cancelled meanwhile) is left alone,
        and so is a job claimed again since ``attempt`` (see the module's docstring)."""

        def mutate(job: Job) -> Optional[Job]:
            if job.state.finished or (attempt is not None and job.attempts != attempt):
                return None
            job.state = state
            job.progress = progress
            return job

        return self.update(job_id, mutate)

    def finish(
        self,
        job_id: str,
        state: JobState,
        *,
        error: Optional[JobError] = None,
        summary: Optional[dict[str, Any]] = None,
        artifacts: Optional[list[Artifact]] = None,
        attempt: Optional[int] = None,
        reused_from: Optional[str] = None,
    ) -> Optional[Job]:
        """Record the outcome, once: a finished job stays as it is, and so does a job
        claimed again since ``attempt``. Returns the record as stored afterwards."""
        if not state.finished:
            raise ValueError(f"{state.value} is not a finished state")

        def mutate(job: Job) -> Optional[Job]:
            if job.state.finished or (attempt is not None and job.attempts != attempt):
                return None
            job.state = state
            job.finished_at = utcnow()
            job.error = error
            job.summary = summary
            job.artifacts = artifacts or []
            job.reused_from = reused_from
            if state == JobState.succeeded:
                job.progress = job.progress.model_copy(update={"percent": 100.0})
            return job

        return self.update(job_id, mutate)

    def request_cancel(self, job_id: str) -> Optional[Job]:
        """A queued job is cancelled at once; a running one gets the flag the worker polls
        (it stops within one layer); a finished one is left as it is."""

        def mutate(job: Job) -> Optional[Job]:
            if job.state == JobState.queued:
                job.state = JobState.cancelled
                job.finished_at = utcnow()
                job.cancel_requested = True
                job.error = JobError(code="cancelled", message="cancelled before a worker started it")
                return job
            if job.state in RUNNING_STATES and not job.cancel_requested:
                job.cancel_requested = True
                return job
            return None

        def set_flag(pipe, old: Job, new: Job) -> None:
            if new.state in RUNNING_STATES:
                pipe.set(self._cancel_key(job_id), "1", ex=self.ttl_seconds)

        return self.update(job_id, mutate, extra=set_flag)

    def active_count(self, owner: Optional[str]) -> int:
        """The owner's jobs that are queued or running."""
        pipe = self.redis.pipeline()
        for state in JobState:
            if not state.finished:
                pipe.zcard(self._owner_index(owner, state))
        return sum(pipe.execute())

    def ping(self) -> bool:
        return bool(self.redis.ping())

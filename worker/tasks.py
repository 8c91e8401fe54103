"""The job task: download -> convert and check -> upload -> record the outcome.

The task is idempotent, because late acknowledgement means a message can arrive twice
(a worker crash, a lost connection): a job that already finished is not redone, and a job
caught half-way starts again from a clean folder. Progress goes to the job store as it
happens (worker/progress.py); the cancel flag is polled between layers.

Faults it rides out (worker/faults.py):

* The job store (Redis) unreachable: reads and the final write are retried for
  ``store_retry_seconds``; progress writes and cancel checks are skipped meanwhile. If
  the store stays away, the message goes back to the queue (``Reject(requeue=True)``)
  instead of being acknowledged, so the job is not lost.
* S3 unreachable: every upload is retried ``storage_attempts`` times with exponential
  backoff, then the job fails with ``storage_unavailable``.
* The same job delivered twice at once (a message redelivered while the first run still
  lives): each run writes with the attempt number its claim returned; the older run's
  writes change nothing (see shared.jobs), it leaves the artifacts alone and stops.
"""
from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Optional

from celery.exceptions import Reject, SoftTimeLimitExceeded

from shared import logs, webhook_notify
from shared.jobs import Artifact, Job, JobError, JobState, JobStore, redis_client
from shared.metrics import Metrics
from shared.settings import Settings, get_settings
from shared.storage import Storage, StorageError, file_sha256, job_prefix
from worker.app import CONVERT_TASK, celery_app
from worker.faults import (
    STORE_ERRORS, JobCancelled, StoreUnavailable, Superseded, call_store, with_storage_retries,
)
from worker.leases import Lease
from worker.progress import ProgressReporter
from worker.reuse import Reusable, ReuseCheck

log = logging.getLogger(__name__)

# What every converted checkpoint has; weight shards, their index and the source's tokenizer
# files come with them where present. Every file of the output directory is uploaded.
ARTIFACT_NAMES = ("config.json", "model.safetensors", "report.json")


def artifact_names(out: Path) -> list[str]:
    """The output directory's files: config.json first, report.json last (a client that sees the
    report knows the rest is there)."""
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    rank = {"config.json": 0, "report.json": 2}
    return sorted(names, key=lambda n: (rank.get(n, 1), n))


# Preflight estimates of this process by (config.json's sha256, the job's options): they
# depend on nothing else. Bounded: cleared when full.
_ESTIMATES: dict = {}
MAX_ESTIMATES = 256


@lru_cache
def _services() -> tuple[Settings, JobStore, Storage]:
    settings = get_settings()
    store = JobStore(redis_client(settings.redis_url), settings.redis_key_prefix, settings.job_ttl_seconds)
    return settings, store, Storage(settings)


@celery_app.task(name=CONVERT_TASK)
@logs.about_job
def convert_job(job_id: str) -> Optional[str]:
    settings, store, storage = _services()
    try:
        # No device set: the conversion picks (device.resolve: CUDA when torch sees one).
        state = run_job(job_id, settings=settings, store=store, storage=storage, device=settings.device or None)
    except StoreUnavailable as exc:
        # Not acknowledged: the message goes back to the queue (or, if the broker is down
        # too, stays unacknowledged and comes back after the visibility timeout).
        log.error("job %s: %s; the job goes back to the queue", job_id, exc)
        raise Reject(str(exc), requeue=True) from None
    return state.value if state is not None else None


@logs.about_job  # every line logged while the job runs carries its job_id and owner
def run_job(
    job_id: str,
    *,
    settings: Settings,
    store: JobStore,
    storage: Storage,
    device: Optional[str] = None,
    fetch: Optional[Callable] = None,
    convert: Optional[Callable] = None,
) -> Optional[JobState]:
    """Run one job to a finished state; returns that state (None: no such job).

    ``fetch`` and ``convert`` default to shared.fetch.fetch_source and
    shared.conversion.convert; tests pass stand-ins."""
    job = call_store(lambda: store.get(job_id), settings, "reading the job")
    if job is None:
        log.warning("job %s: no record (expired or never created); message dropped", job_id)
        return None
    logs.set_owner(job.owner)
    if job.state.finished:
        log.info("job %s: already %s; not redone", job_id, job.state.value)
        webhook_notify.job_finished_unstarted(job, settings, store)
        return job.state
    if job.cancel_requested:
        # Cancelled while an earlier delivery ran it, and that worker died before it
        # stopped: finish the cancel instead of starting again.
        return _record_outcome(job, JobCancelled(), store, storage, settings, attempt=job.attempts)
    if job.attempts >= settings.max_attempts:
        # Each earlier delivery ended without recording an outcome: the worker died
        # (crash, OOM kill, hard time limit). Stop the loop of redeliveries here.
        stored = call_store(lambda: store.finish(job_id, JobState.failed, error=JobError(
            code="too_many_attempts",
            message=f"the worker stopped {job.attempts} times while running this job; it is not retried again",
        )), settings, "recording the outcome")
        if stored is not None:
            webhook_notify.job_finished(stored, settings, store)
        return JobState.failed
    job = call_store(lambda: store.claim(job_id), settings, "claiming the job")
    if job is None:
        current = call_store(lambda: store.get(job_id), settings, "reading the job")
        return current.state if current else None

    attempt = job.attempts
    webhook_notify.job_started(job, settings, store)  # queued for the dispatcher thread; never waits
    job_dir = Path(settings.work_dir) / job_id
    workdir = job_dir / f"attempt-{attempt}"
    log.info("job %s: attempt %d, source %s, device %s", job_id, attempt, job.source_url, device or "auto")
    try:
        # A redelivered job may find an earlier attempt's half-written files: start clean.
        _reset_dir(job_dir)
        workdir.mkdir()
        with Lease(store.redis, settings.redis_key_prefix, job_id, attempt, settings.lease_seconds):
            return _pipeline(job, workdir, settings, store, storage, device, fetch, convert)
    except StoreUnavailable:
        raise
    except Superseded:
        log.warning("job %s: attempt %d was superseded by a newer delivery; stopping it", job_id, attempt)
        return None
    except Exception as exc:  # every failure becomes a finished job with a clear code
        _remove_workdir(workdir, job_dir)  # first: a job shown finished has left nothing behind
        return _record_outcome(job, exc, store, storage, settings, attempt)
    finally:
        _remove_workdir(workdir, job_dir)


def _remove_workdir(workdir: Path, job_dir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    try:
        job_dir.rmdir()  # unless a newer attempt works there now
    except OSError:
        pass


class SourceCredentialsUnavailable(Exception):
    code = "credentials_unavailable"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _bytes_in(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _record(metrics, write) -> None:
    """Metrics are not worth failing a job for."""
    try:
        write()
    except (*STORE_ERRORS, AttributeError, TypeError) as exc:
        log.warning("metrics not recorded: %s", exc)


def _pipeline(job, workdir: Path, settings: Settings, store: JobStore, storage: Storage,
              device: Optional[str], fetch: Optional[Callable], convert: Optional[Callable]) -> JobState:
    if fetch is None:
        from shared.fetch import fetch_source as fetch
    if convert is None:
        from shared.conversion import convert
    from shared.conversion.options import ConversionOptions

    attempt = job.attempts

    def cancelled() -> bool:
        try:
            return store.cancel_requested(job.id)
        except STORE_ERRORS as exc:
            log.warning("job %s: cannot check for a cancel, the job store is unreachable: %s", job.id, exc)
            return False

    reporter = ProgressReporter(store, job.id, cancelled, attempt=attempt)
    source, out = workdir / "source", workdir / "out"
    source.mkdir(parents=True)

    options = ConversionOptions(
        **job.options.to_conversion_kwargs(), device=device, allow_pickle=settings.allow_pickle,
        explicit_max_params=settings.explicit_max_params,
    )

    def preflight(directory: Path) -> None:
        """From config.json alone, before the weights: refuse what cannot convert or cannot fit."""
        from shared.conversion.preflight import preflight as estimate

        # Building the empty model takes a good part of a second: a repeated job (one that
        # worker/reuse.py will likely serve from an earlier job's artifacts) reuses the estimate.
        key = (file_sha256(directory / "config.json"), job.options.model_dump_json())
        found = estimate(directory, options, settings.memory_budget(), settings.disk_budget(workdir),
                         found=_ESTIMATES.get(key))
        if len(_ESTIMATES) >= MAX_ESTIMATES:
            _ESTIMATES.clear()
        _ESTIMATES[key] = found

    metrics = Metrics(store.redis, settings.redis_key_prefix)
    started = time.monotonic()
    reporter.download(0, None)  # the first write: it also notices a cancel asked meanwhile
    credentials = None
    if job.sealed_credentials is not None:
        from shared.credentials import unseal

        if settings.credentials_key is None:
            raise SourceCredentialsUnavailable("the job carries sealed credentials but this worker has no credentials key")
        try:
            credentials = unseal(job.sealed_credentials, settings.credentials_key)
        except ValueError as exc:
            raise SourceCredentialsUnavailable(str(exc)) from None
    reuse = ReuseCheck(job, store, storage, settings)
    try:
        fetch(job.source_url, source, settings.fetch_limits(owner=job.owner, credentials=credentials),
              progress=reporter.download, on_config=preflight, on_weights=reuse.weights_declared)
        if cancelled():
            raise JobCancelled()
        reuse.downloaded(source)
    except Reusable as found:
        return _reuse(job, found.prior, reuse, reporter, settings, store, storage, cancelled)

    _record(metrics, lambda: (metrics.observe_stage("downloading", time.monotonic() - started),
                              metrics.add_bytes("downloaded", _bytes_in(source))))
    report = convert(source, out, options, progress=reporter.stage, should_cancel=cancelled)
    _record(metrics, lambda: [metrics.observe_stage(stage, report.timings[key]) for stage, key in
                              (("calibrating", "calibrate_s"), ("writing", "write_s"), ("checking", "check_s"))
                              if key in report.timings])
    started = time.monotonic()
    if cancelled():
        raise JobCancelled()

    names = artifact_names(out)
    reporter.stage("uploading", 0, len(names))
    # Here, not at start-up: an S3 outage then fails this job clearly.
    with_storage_retries(storage.ensure_bucket, settings, "checking the bucket", job.id, cancelled)
    artifacts: list[Artifact] = []
    for i, name in enumerate(names):
        artifacts += with_storage_retries(
            lambda: storage.upload_job_files(job.id, out, [name]), settings, f"uploading {name}", job.id, cancelled)
        reporter.stage("uploading", i + 1, len(names))
        if cancelled():
            raise JobCancelled()

    _record(metrics, lambda: (metrics.observe_stage("uploading", time.monotonic() - started),
                              metrics.add_bytes("uploaded", sum(a.size for a in artifacts))))
    summary = report.summary
    if report.passed:
        _finish(store, settings, job.id, attempt, JobState.succeeded, summary=summary, artifacts=artifacts)
        reuse.remember()
        log.info("job %s: succeeded", job.id)
        return JobState.succeeded
    # The checkpoint exists but does not match its source within the tolerance: keep the
    # artifacts (report.json says where it diverges) and say so in the error.
    _finish(store, settings, job.id, attempt, JobState.failed, summary=summary, artifacts=artifacts,
            error=JobError(
                code="check_failed",
                message="the converted model does not match the source within the tolerance; see report.json",
            ))
    log.warning("job %s: equivalence checks failed", job.id)
    return JobState.failed


def _reuse(job: Job, prior: Job, reuse: ReuseCheck, reporter: ProgressReporter, settings: Settings, store: JobStore,
           storage: Storage, cancelled: Callable[[], bool]) -> JobState:
    """Succeed with server-side copies of ``prior``'s artifacts: this job's own objects, which
    outlive the earlier job's."""
    total = len(prior.artifacts)
    reporter.stage("reused", 0, total)
    # All at once: each copy is a round trip to S3, and a reused job should end within a second.
    with ThreadPoolExecutor(max_workers=min(8, total)) as pool:
        copies = [pool.submit(with_storage_retries, partial(storage.copy_artifact, artifact, job.id), settings,
                              f"copying {artifact.name}", job.id, cancelled) for artifact in prior.artifacts]
        for done, copy in enumerate(as_completed(copies), 1):
            copy.result()
            reporter.stage("reused", done, total)
    artifacts = [copy.result() for copy in copies]
    _finish(store, settings, job.id, job.attempts, JobState.succeeded, summary=prior.summary, artifacts=artifacts,
            reused_from=prior.id)
    reuse.remember()
    log.info("job %s: succeeded with copies of job %s's artifacts", job.id, prior.id)
    return JobState.succeeded


def _finish(store: JobStore, settings: Settings, job_id: str, attempt: int, state: JobState, **outcome) -> Job:
    stored = call_store(lambda: store.finish(job_id, state, attempt=attempt, **outcome), settings,
                        "recording the outcome")
    if stored is not None and stored.attempts != attempt:
        raise Superseded()
    if stored is not None:
        webhook_notify.job_finished(stored, settings, store)
    return stored


def _record_outcome(job: Job, exc: Exception, store: JobStore, storage: Storage, settings: Settings,
                    attempt: int) -> Optional[JobState]:
    """Finish a job that stopped with ``exc`` (failed or cancelled), removing what it
    uploaded; a run that a newer delivery superseded touches nothing."""
    job_id = job.id
    state, error = classify(exc, job_id)
    current = call_store(lambda: store.get(job_id), settings, "reading the job")
    if current is None or current.attempts != attempt:
        log.warning("job %s: attempt %d stopped (%s) after a newer delivery took the job over",
                    job_id, attempt, error.code)
        return None
    if state == JobState.failed and error.code == "internal_error":
        log.error("job %s: internal error", job_id, exc_info=exc)
    else:
        log.info("job %s: %s (%s)", job_id, state.value, error.code)
    try:
        # No half-uploaded checkpoint stays behind a cancelled or failed job.
        removed = storage.delete_prefix(job_prefix(job_id))
        if removed:
            log.info("job %s: removed %d partial artifact(s)", job_id, removed)
    except StorageError:
        log.warning("job %s: could not remove partial artifacts", job_id)
    try:
        _finish(store, settings, job_id, attempt, state, error=error)
    except Superseded:
        return None
    return state


def classify(exc: Exception, job_id: str) -> tuple[JobState, JobError]:
    """The finished state and user-facing error for an exception: stable codes, no traces."""
    if isinstance(exc, JobCancelled):
        return JobState.cancelled, JobError(code="cancelled", message="cancelled while running")
    if isinstance(exc, SoftTimeLimitExceeded):
        return JobState.failed, JobError(
            code="time_limit_exceeded", message="the job ran past the worker's time limit")
    known = _known_errors()
    if isinstance(exc, known):
        code = getattr(exc, "code", "conversion_failed")
        message = getattr(exc, "message", None) or str(exc)
        if code == "cancelled":
            return JobState.cancelled, JobError(code="cancelled", message="cancelled while running")
        return JobState.failed, JobError(code=code, message=message)
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        return JobState.failed, JobError(
            code="out_of_memory", message="the model does not fit in the worker's GPU memory")
    return JobState.failed, JobError(
        code="internal_error",
        message=f"an internal error stopped the job; the worker's log has the details (job {job_id})",
    )


def _known_errors() -> tuple[type, ...]:
    known: list[type] = [StorageError, SourceCredentialsUnavailable]
    try:
        from shared.fetch import FetchError

        known.append(FetchError)
    except ImportError:
        log.exception("shared.fetch cannot be imported")
    try:
        from shared.conversion.errors import ConversionError

        known.append(ConversionError)
    except ImportError:
        log.exception("shared.conversion cannot be imported")
    return tuple(known)


def _reset_dir(path: Path) -> None:
    # A redelivered job may find the previous attempt's half-written files.
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)

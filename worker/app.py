"""The Celery app: Redis broker, one GPU queue, settings for long GPU tasks.

Run a worker with::

    celery -A worker.app worker -Q gpu --concurrency 1

This module and worker.tasks import neither torch nor the conversion library: the
prefork parent must not initialise CUDA (a forked child cannot use a CUDA context its
parent created). Only the pool's children import them, as they start (see ``_warm_up``).

Crash recovery: a job is acknowledged only when its task returns. If the pool child dies
(OOM kill, SIGKILL) the parent gives the message back at once; if the whole worker dies,
the message stays unacknowledged in Redis and another worker restores it once
``visibility_timeout`` has passed since its delivery.
"""
from __future__ import annotations

import logging

from celery import Celery
from celery.signals import setup_logging, worker_process_init, worker_ready
from kombu import Queue

from shared import logs
from shared.settings import Settings, get_settings

CONVERT_TASK = "worker.tasks.convert_job"
# Seconds a new pool child may take to start, warm-up imports included (Celery's own
# default of 4 s is too short for importing torch on a busy machine).
PROC_ALIVE_TIMEOUT = 120.0

log = logging.getLogger(__name__)


def soft_time_limit(hard: int) -> int:
    """The soft limit, a little before the hard one: a minute, or a tenth of short limits."""
    return hard - max(1, min(60, hard // 10))


def restore_interval(visibility_timeout: int) -> int:
    """How often (s) a worker looks for unacknowledged messages of dead workers: often
    enough that a job waits little longer than the visibility timeout, at most every 10 s.
    (kombu's default sweeps every 100 s.)"""
    return max(1, min(10, visibility_timeout // 10))


def make_celery(settings: Settings) -> Celery:
    app = Celery("attnonly", broker=settings.redis_url, include=["worker.tasks"])
    app.conf.update(
        # A job is acknowledged only when it ends, and given back if the child dies (OOM,
        # SIGKILL): a crash redelivers the job instead of losing it. The task is idempotent
        # (see worker.tasks.run_job), so running it again is safe.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One conversion at a time per process, and no job parked behind a running one.
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        task_time_limit=settings.task_time_limit,
        # The soft limit lets the task record a clear failure before the hard kill.
        task_soft_time_limit=soft_time_limit(settings.task_time_limit),
        # Unacknowledged messages come back after this; it must exceed the time limit or a
        # long job runs twice (Settings checks that).
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": restore_interval(settings.visibility_timeout),
            "unacked_restore_throttle": 1,
            # The sweep takes a lock in Redis; a worker killed while holding it would
            # block every sweep for kombu's default of 300 s.
            "unacked_mutex_expire": min(300, max(10, settings.visibility_timeout)),
        },
        # Redis restarting: keep reconnecting (with backoff) for as long as it takes,
        # instead of giving up after 100 tries.
        broker_connection_max_retries=None,
        worker_proc_alive_timeout=PROC_ALIVE_TIMEOUT,
        task_queues=(Queue(settings.gpu_queue),),
        task_default_queue=settings.gpu_queue,
        task_routes={CONVERT_TASK: {"queue": settings.gpu_queue}},
        # The job store in Redis is the source of truth; Celery's results are not used.
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        # With late acks a lost broker connection redelivers running tasks; stop ours so
        # that they do not run twice.
        worker_cancel_long_running_tasks_on_connection_loss=True,
    )
    return app


@setup_logging.connect
def _setup_logging(loglevel=None, **_) -> None:
    """Celery leaves logging to this receiver: the service's format (settings.log_format),
    at the level of the command line's --loglevel."""
    logs.configure(get_settings().log_format, loglevel or logging.INFO)


@worker_process_init.connect
def _warm_up(**_) -> None:
    """In each pool child as it starts (never in the parent): import torch and the
    conversion library now, so that the first job does not spend its time limit on it."""
    try:
        import shared.conversion  # noqa: F401
        import shared.fetch  # noqa: F401
    except Exception:  # the task reports a broken install clearly; do not kill the child here
        log.exception("warm-up imports failed")


@worker_ready.connect
def _start_sweeper(sender=None, **_) -> None:
    """In the worker's parent: the heartbeat and the sweep that re-queues jobs of dead workers."""
    from shared.jobs import JobStore, redis_client
    from worker.leases import Sweeper

    settings = get_settings()
    store = JobStore(redis_client(settings.redis_url), settings.redis_key_prefix, settings.job_ttl_seconds)

    def send(job_id: str) -> None:
        celery_app.send_task(CONVERT_TASK, args=[job_id], queue=settings.gpu_queue)

    Sweeper(store, settings.redis_key_prefix, settings.lease_seconds, send, queue=settings.gpu_queue).start()


celery_app = make_celery(get_settings())

"""The Celery app: Redis broker, one GPU queue, settings for long GPU tasks.

Run a worker with::

    celery -A worker.app worker -Q gpu --concurrency 1

This module and worker.tasks import neither torch nor the conversion library: the
prefork parent must not initialise CUDA (a forked child cannot use a CUDA context its
parent created). Only the child imports them, on its first task.
"""
from __future__ import annotations

from celery import Celery
from kombu import Queue

from shared.settings import Settings, get_settings

CONVERT_TASK = "worker.tasks.convert_job"


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
        task_soft_time_limit=max(1, settings.task_time_limit - 60),
        # Unacknowledged messages come back after this; it must exceed the time limit or a
        # long job runs twice (Settings checks that).
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
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


celery_app = make_celery(get_settings())

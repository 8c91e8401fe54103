"""The Celery configuration that long GPU tasks need."""
from shared.settings import Settings
from worker.app import CONVERT_TASK, make_celery


def test_settings_for_long_gpu_tasks():
    settings = Settings(redis_url="redis://127.0.0.1:1/3", task_time_limit=600, visibility_timeout=900,
                        gpu_queue="gpu-a100")
    conf = make_celery(settings).conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_concurrency == 1
    assert conf.task_time_limit == 600
    assert 0 < conf.task_soft_time_limit < conf.task_time_limit
    assert conf.broker_transport_options["visibility_timeout"] == 900 > conf.task_time_limit
    assert conf.broker_url == "redis://127.0.0.1:1/3"
    assert conf.task_routes[CONVERT_TASK] == {"queue": "gpu-a100"}
    assert [q.name for q in conf.task_queues] == ["gpu-a100"]
    assert conf.accept_content == ["json"]


def test_task_is_registered_under_its_route_name():
    import worker.tasks  # noqa: F401 - registers the task
    from worker.app import celery_app

    assert CONVERT_TASK in celery_app.tasks


def test_crash_recovery_settings_follow_the_visibility_timeout():
    from worker.app import PROC_ALIVE_TIMEOUT, restore_interval, soft_time_limit

    short = make_celery(Settings(redis_url="redis://127.0.0.1:1/3", task_time_limit=14, visibility_timeout=15)).conf
    options = short.broker_transport_options
    assert options["visibility_timeout"] == 15
    # A dead worker's job is looked for every second here (kombu's default: every 100 s).
    assert options["unacked_restore_interval"] == 1 and options["unacked_restore_throttle"] == 1
    assert options["unacked_mutex_expire"] == 15
    assert 0 < short.task_soft_time_limit < short.task_time_limit == 14
    assert short.broker_connection_max_retries is None  # Redis away: keep reconnecting
    assert short.worker_proc_alive_timeout == PROC_ALIVE_TIMEOUT >= 60
    assert restore_interval(18000) == 10 and soft_time_limit(14400) == 14340

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

"""Queued jobs whose message is gone (worker/orphans.py): found only when their message is in
neither the queue nor kombu's unacked hash, and sent again once, after two scans."""
import json
import time

from shared.jobs import JobState
from worker.app import CONVERT_TASK, make_celery
from worker.orphans import UNACKED_KEY, find_orphans, jobs_with_a_message, requeue_orphans


def test_a_queued_job_without_a_message_is_found_and_sent_again_once(store, settings):
    app = make_celery(settings)
    kept, _ = store.create("https://example.org/kept/")
    taken, _ = store.create("https://example.org/taken/")
    lost, _ = store.create("https://example.org/lost/")
    for job in (kept, taken, lost):  # as the API sends them: the job id is the task id
        app.send_task(CONVERT_TASK, args=[job.id], task_id=job.id, queue=settings.gpu_queue)
    client, queue = store.redis, settings.gpu_queue
    # "taken": delivered to a worker, not yet acknowledged (kombu moved it to unacked).
    # "lost": popped by a worker that died before recording it anywhere.
    messages = {json.loads(raw)["headers"]["id"]: raw for raw in client.lrange(queue, 0, -1)}
    client.lrem(queue, 1, messages[taken.id])
    client.lrem(queue, 1, messages[lost.id])
    tag = f"test-{taken.id}"
    client.hset(UNACKED_KEY, tag, json.dumps([json.loads(messages[taken.id]), "", queue]))
    try:
        assert jobs_with_a_message(client, queue) >= {kept.id, taken.id}
        assert lost.id not in jobs_with_a_message(client, queue)
        assert find_orphans(store, settings.redis_key_prefix, queue, seconds=30) == set()  # queued just now
        time.sleep(0.4)
        found = find_orphans(store, settings.redis_key_prefix, queue, seconds=0.3)
        assert found == {lost.id}
        sent = []
        # Sent only when a scan before found it too, and by one sweeper only.
        assert requeue_orphans(store, settings.redis_key_prefix, 0.3, sent.append, found, set()) == []
        assert requeue_orphans(store, settings.redis_key_prefix, 0.3, sent.append, found, found) == [lost.id]
        assert requeue_orphans(store, settings.redis_key_prefix, 0.3, sent.append, found, found) == []
        assert sent == [lost.id]
    finally:
        client.hdel(UNACKED_KEY, tag)
        client.delete(queue)


def test_jobs_that_left_the_queued_state_are_no_orphans(store, settings):
    job, _ = store.create("https://example.org/m/")
    store.claim(job.id)  # running: the lease sweep's business
    other, _ = store.create("https://example.org/n/")
    store.request_cancel(other.id)  # cancelled while queued: finished
    time.sleep(0.3)
    assert store.get(other.id).state == JobState.cancelled
    assert find_orphans(store, settings.redis_key_prefix, settings.gpu_queue, seconds=0.2) == set()

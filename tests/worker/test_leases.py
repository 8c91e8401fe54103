"""Leases and the sweep: a running job without a live lease is sent to the queue again, once,
by one sweeper of many; a job whose lease is renewed is left alone."""
import time

from shared.jobs import JobState
from shared.metrics import Metrics
from worker.leases import Lease, lease_key, requeue_expired


def running_job(store):
    job, _ = store.create("https://example.org/m/", None)
    return store.claim(job.id)  # downloading: a running state


def test_a_held_lease_keeps_the_job(store, settings):
    job = running_job(store)
    sent = []
    with Lease(store.redis, settings.redis_key_prefix, job.id, job.attempts, seconds=0.4):
        time.sleep(1.0)  # longer than the lease: only the renewals keep it
        assert store.redis.exists(lease_key(settings.redis_key_prefix, job.id))
        assert requeue_expired(store, settings.redis_key_prefix, 0.4, sent.append) == []
    assert not store.redis.exists(lease_key(settings.redis_key_prefix, job.id))


def test_an_expired_lease_requeues_once(store, settings):
    job = running_job(store)
    Lease(store.redis, settings.redis_key_prefix, job.id, job.attempts, seconds=0.3)._write()  # then the worker dies
    sent = []
    assert requeue_expired(store, settings.redis_key_prefix, 0.3, sent.append) == []  # updated just now
    time.sleep(0.6)
    assert requeue_expired(store, settings.redis_key_prefix, 0.3, sent.append) == [job.id]
    assert requeue_expired(store, settings.redis_key_prefix, 0.3, sent.append) == []  # another sweeper: no
    assert sent == [job.id]


def test_finished_jobs_are_never_requeued(store, settings):
    job = running_job(store)
    store.finish(job.id, JobState.succeeded)
    time.sleep(0.4)
    assert requeue_expired(store, settings.redis_key_prefix, 0.3, lambda _: None) == []


def test_metrics_render(store, settings):
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    metrics = Metrics(store.redis, settings.redis_key_prefix)
    metrics.observe_stage("calibrating", 3.0)
    metrics.observe_stage("calibrating", 100.0)
    metrics.add_bytes("downloaded", 1234)
    metrics.heartbeat("w1")
    running_job(store)

    class Collector:
        def collect(self):
            yield from metrics.collect(settings.gpu_queue)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("attnonly_stage_seconds_count", (("stage", "calibrating"),))] == 2
    assert samples[("attnonly_stage_seconds_bucket", (("le", "5.0"), ("stage", "calibrating")))] == 1
    assert samples[("attnonly_bytes_total", (("direction", "downloaded"),))] == 1234
    assert samples[("attnonly_live_workers", ())] >= 1
    assert sum(v for (n, l), v in samples.items() if n == "attnonly_jobs") >= 1

"""Service metrics kept in Redis, so that every API process reports the same numbers and the
workers (other processes, other machines) can add to them. GET /metrics renders them in
Prometheus' text format through a collector that reads Redis at scrape time.

    jobs by state        the job store's state indexes (ZCARD)
    queue depth          the Celery queue's Redis list (LLEN)
    live workers         heartbeat keys the workers renew (expiring)
    stage durations      histograms the worker records per finished stage
    bytes                counters of bytes downloaded and uploaded
"""
from __future__ import annotations

import socket

import redis

from shared.jobs import JobState

STAGE_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
HEARTBEAT_SECONDS = 30


class Metrics:
    def __init__(self, client: redis.Redis, prefix: str):
        self.redis, self.prefix = client, prefix

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, "metrics") + parts)

    # --- what the workers record --------------------------------------------------------
    def observe_stage(self, stage: str, seconds: float) -> None:
        bucket = next((b for b in STAGE_BUCKETS if seconds <= b), "+Inf")
        pipe = self.redis.pipeline()
        pipe.hincrby(self._key("stage", stage), f"le:{bucket}", 1)
        pipe.hincrbyfloat(self._key("stage", stage), "sum", seconds)
        pipe.sadd(self._key("stages"), stage)
        pipe.execute()

    def add_bytes(self, direction: str, n: int) -> None:
        assert direction in ("downloaded", "uploaded")
        self.redis.incrby(self._key("bytes", direction), int(n))

    def heartbeat(self, worker: str | None = None) -> None:
        self.redis.set(self._key("worker", worker or socket.gethostname()), 1, ex=HEARTBEAT_SECONDS)

    # --- what GET /metrics reports -------------------------------------------------------
    def collect(self, queue: str):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        jobs = GaugeMetricFamily("attnonly_jobs", "Jobs by state", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], self.redis.zcard(f"{self.prefix}:jobs:{state.value}"))
        yield jobs
        yield GaugeMetricFamily("attnonly_queue_depth", "Jobs waiting in the worker queue", value=self.redis.llen(queue))
        workers = sum(1 for _ in self.redis.scan_iter(self._key("worker", "*"), count=1000))
        yield GaugeMetricFamily("attnonly_live_workers", "Workers whose heartbeat is fresh", value=workers)
        stages = HistogramMetricFamily("attnonly_stage_seconds", "Duration of job stages", labels=["stage"])
        for stage in sorted(_text(s) for s in self.redis.smembers(self._key("stages"))):
            raw = {_text(k): _text(v) for k, v in self.redis.hgetall(self._key("stage", stage)).items()}
            cumulative, buckets = 0, []
            for bound in (*STAGE_BUCKETS, "+Inf"):
                cumulative += int(raw.get(f"le:{bound}", 0))
                buckets.append((str(bound), cumulative))
            stages.add_metric([stage], buckets, float(raw.get("sum", 0.0)))
        yield stages
        moved = CounterMetricFamily("attnonly_bytes", "Bytes downloaded from sources and uploaded to storage",
                                    labels=["direction"])
        for direction in ("downloaded", "uploaded"):
            moved.add_metric([direction], int(self.redis.get(self._key("bytes", direction)) or 0))
        yield moved


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value

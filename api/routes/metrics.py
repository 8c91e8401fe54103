"""GET /metrics: Prometheus' text format, read from Redis at scrape time (shared/metrics.py)."""
from __future__ import annotations

import redis
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from api.deps import SettingsDep, StoreDep
from shared.metrics import Metrics

router = APIRouter(tags=["metrics"])


class _Collector:
    def __init__(self, metrics: Metrics, queue: str):
        self.metrics, self.queue = metrics, queue

    def collect(self):
        yield from self.metrics.collect(self.queue)


@router.get("/metrics", summary="Service metrics in Prometheus' text format",
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, 503: {"description": "Redis is unreachable"}})
def metrics(settings: SettingsDep, store: StoreDep) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(Metrics(store.redis, settings.redis_key_prefix), settings.gpu_queue))
    try:
        body = generate_latest(registry)
    except redis.RedisError:
        return Response("redis unreachable\n", status_code=503, media_type="text/plain")
    return Response(body, media_type=CONTENT_TYPE_LATEST)

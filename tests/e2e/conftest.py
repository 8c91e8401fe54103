"""Real processes over loopback, started once per session: uvicorn serving the API, a
Celery worker, a private redis-server and an S3 server over HTTP (tests/conftest.py),
and a static HTTP server with tiny checkpoints to convert."""
from __future__ import annotations

import uuid
from contextlib import ExitStack
from types import SimpleNamespace

import pytest

from deploy.demo import make_tiny_checkpoint, make_unsupported_checkpoint, serve_directory
from deploy.local import (
    api_argv, free_port, prepare_bucket, service_env, settings_for, start_process, wait_ready, worker_argv,
)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    make_tiny_checkpoint(root / "gpt2", "gpt2", seed=1)
    make_tiny_checkpoint(root / "llama", "llama", seed=2)
    make_unsupported_checkpoint(root / "foo")
    with serve_directory(root) as base:
        yield SimpleNamespace(root=root, base=base)


@pytest.fixture(scope="session")
def service(redis_url, s3_endpoint, tmp_path_factory):
    tag = uuid.uuid4().hex[:8]
    env = service_env(redis_url, {
        "ATTNONLY_S3_ENDPOINT_URL": s3_endpoint,
        "ATTNONLY_S3_ACCESS_KEY": "e2e-key",
        "ATTNONLY_S3_SECRET_KEY": "e2e-secret",
        "ATTNONLY_S3_BUCKET": f"e2e-{tag}",
        "ATTNONLY_REDIS_KEY_PREFIX": f"e2e-{tag}",
        "ATTNONLY_GPU_QUEUE": f"e2e-{tag}",
        "ATTNONLY_WORK_DIR": str(tmp_path_factory.mktemp("work")),
        "HF_HUB_OFFLINE": "1",
    })
    prepare_bucket(env)
    log_dir = tmp_path_factory.mktemp("logs")
    port = free_port()
    with ExitStack() as stack:
        procs = {
            "worker": start_process("worker", worker_argv("e2e"), env, stack, log_dir, stop_timeout=10),
            "api": start_process("api", api_argv("127.0.0.1", port), env, stack, log_dir),
        }
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, procs, timeout=60, log_dir=log_dir)

        def logs(name="worker", tail=4000):
            return (log_dir / f"{name}.log").read_text(errors="replace")[-tail:]

        yield SimpleNamespace(url=url, procs=procs, logs=logs, settings=settings_for(env))

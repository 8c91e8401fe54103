"""Real processes over loopback, started once per session: uvicorn serving the API, a
Celery worker, a private redis-server and an S3 server over HTTP (tests/conftest.py),
and a static HTTP server with tiny checkpoints to convert.

The fault tests need processes of their own (workers they kill, a Redis they restart,
an S3 endpoint that is down): ``Stack`` starts an API and workers for one configuration,
with its own Redis key prefix, queue and bucket, so that nothing reaches the session's
service."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from contextlib import ExitStack
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import httpx
import pytest

from deploy.demo import make_tiny_checkpoint, make_unsupported_checkpoint, serve_directory
from deploy.local import (
    api_argv, free_port, prepare_bucket, service_env, settings_for, start_process, stop_process, wait_ready,
    worker_argv,
)

FINISHED = ("succeeded", "failed", "cancelled")
# The deep checkpoint's layer count: conversions of it report many layer steps, which is
# what the kill and cancel tests need to catch a conversion half-way.
DEEP_LAYERS = 12


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    make_tiny_checkpoint(root / "gpt2", "gpt2", seed=1)
    make_tiny_checkpoint(root / "llama", "llama", seed=2)
    make_tiny_checkpoint(root / "gpt2-deep", "gpt2", seed=3, layers=DEEP_LAYERS)
    make_unsupported_checkpoint(root / "foo")
    with serve_directory(root) as base:
        yield SimpleNamespace(root=root, base=base, deep_layers=DEEP_LAYERS)


def stack_env(redis_url: str, s3_endpoint: str, work_dir: Path, keys, **settings) -> dict:
    """The environment of one stack's processes: its own prefix, queue and bucket."""
    tag = uuid.uuid4().hex[:8]
    env = service_env(redis_url, {
        "ATTNONLY_S3_ENDPOINT_URL": s3_endpoint,
        "ATTNONLY_S3_ACCESS_KEY": "e2e-key",
        "ATTNONLY_S3_SECRET_KEY": "e2e-secret",
        "ATTNONLY_S3_BUCKET": f"e2e-{tag}",
        "ATTNONLY_REDIS_KEY_PREFIX": f"e2e-{tag}",
        "ATTNONLY_GPU_QUEUE": f"e2e-{tag}",
        "ATTNONLY_WORK_DIR": str(work_dir),
        "ATTNONLY_API_KEYS": keys.entries(),
        "HF_HUB_OFFLINE": "1",
        # One torch thread: these models are tiny, and on a busy machine (2 cores shared
        # with the test process and other workers) OpenMP's spinning threads make a
        # conversion ten times slower, not faster.
        "OMP_NUM_THREADS": "1",
    })
    env.update({f"ATTNONLY_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class Stack:
    """An API and any number of workers sharing one configuration (``env``)."""

    def __init__(self, name: str, env: dict, keys, stack: ExitStack, log_dir: Path):
        self.name, self.env, self.keys, self.stack, self.log_dir = name, env, keys, stack, log_dir
        self.url: Optional[str] = None
        self.api: Optional[subprocess.Popen] = None
        self.workers: dict[str, subprocess.Popen] = {}

    @cached_property
    def settings(self):
        return settings_for(self.env)

    @cached_property
    def store(self):
        from shared.jobs import JobStore, redis_client

        s = self.settings
        return JobStore(redis_client(s.redis_url), s.redis_key_prefix, s.job_ttl_seconds)

    @cached_property
    def storage(self):
        from shared.storage import Storage

        return Storage(self.settings)

    def start_api(self, wait: bool = True) -> str:
        prepare_bucket(self.env)
        port = free_port()
        self.api = start_process(f"{self.name}-api", api_argv("127.0.0.1", port), self.env, self.stack, self.log_dir)
        self.url = f"http://127.0.0.1:{port}"
        if wait:
            wait_ready(self.url, {"api": self.api}, timeout=60, log_dir=self.log_dir)
        return self.url

    def start_worker(self, **settings) -> subprocess.Popen:
        """A Celery worker (prefork, one child) with ``settings`` on top of the stack's."""
        label = f"{self.name}-worker{len(self.workers) + 1}"
        env = {**self.env, **{f"ATTNONLY_{k.upper()}": str(v) for k, v in settings.items()}}
        proc = start_process(label, worker_argv(label), env, self.stack, self.log_dir, stop_timeout=10)
        self.workers[label] = proc
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL the worker's whole process group: the parent and its pool child, at
        once, as when a machine or container dies. Nothing gets to acknowledge anything."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop(self, proc: subprocess.Popen) -> None:
        stop_process(proc, timeout=10)

    def logs(self, label: Optional[str] = None, tail: int = 6000) -> str:
        names = [label] if label else [f"{self.name}-api", *self.workers]
        return "\n".join(
            f"--- {n} ---\n" + (self.log_dir / f"{n}.log").read_text(errors="replace")[-tail:]
            for n in names if (self.log_dir / f"{n}.log").exists()
        )

    def client(self, who: Optional[str] = "alice") -> httpx.Client:
        headers = self.keys.headers(who) if who else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        self.stack.callback(client.close)
        return client

    def wait_for(self, client: httpx.Client, job_id: str, timeout: float = 240) -> dict:
        """Poll a job until it finishes; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
            if job["state"] in FINISHED:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['state']} after {timeout:.0f}s\n{self.logs()}")
            time.sleep(0.1)


@pytest.fixture(scope="session")
def make_stack(redis_url, s3_endpoint, keys, tmp_path_factory):
    """make_stack(name, redis_url=None, **settings) -> a Stack whose processes end with
    the session (or earlier: tests stop their workers themselves)."""
    with ExitStack() as stack:

        def make(name: str, redis: Optional[str] = None, **settings) -> Stack:
            env = stack_env(redis or redis_url, s3_endpoint, tmp_path_factory.mktemp(f"{name}-work"), keys,
                            **settings)
            return Stack(name, env, keys, stack, tmp_path_factory.mktemp(f"{name}-logs"))

        yield make


@pytest.fixture(scope="session")
def service(make_stack):
    """The session's service: one API and one worker, alice's and bob's keys accepted."""
    svc = make_stack("e2e")
    svc.start_worker()
    svc.start_api()
    svc.procs = {"worker": next(iter(svc.workers.values())), "api": svc.api}
    return svc


_FAULT_REPORT: list[str] = []


@pytest.fixture(scope="session")
def fault_report() -> list[str]:
    """Lines the fault tests report (kill and loss counts, ...): printed at the end of the
    run, in a section of pytest's summary, even with -q."""
    return _FAULT_REPORT


def pytest_terminal_summary(terminalreporter):
    if _FAULT_REPORT:
        terminalreporter.section("fault tests")
        for line in _FAULT_REPORT:
            terminalreporter.write_line(line)

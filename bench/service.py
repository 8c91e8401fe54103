"""The service as real processes over loopback, for bench/load.py and bench/chaos.py (and
their smaller runs in tests/bench): a private redis-server (append-only file on), an S3
server (moto) in a process of its own, the API under uvicorn with N worker processes, and
Celery workers that can be SIGKILLed and started again.

Built on deploy/local.py's process helpers (the ones tests/e2e uses too); what is added
here is what a load or chaos run needs beyond them: S3 as a process that can be stopped
and started on the same port, several API processes, and workers addressed by name.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, is_dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import httpx

from deploy.local import (
    RedisServer, api_argv, free_port, prepare_bucket, service_env, start_process, stop_process, wait_ready,
    worker_argv,
)

ROOT = Path(__file__).resolve().parents[1]


class S3Server:
    """moto's S3 server in a process of its own, on a fixed port: ``stop`` makes S3
    unreachable (connections refused), ``start`` serves again on the same port. moto keeps
    its state in memory, so a restart starts with no buckets and no objects; the worker
    creates the bucket again before its uploads (Storage.ensure_bucket)."""

    def __init__(self, stack: ExitStack, log_dir: Path):
        self.stack, self.log_dir = stack, log_dir
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        self.starts += 1
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = start_process(f"s3-{self.starts}", argv, dict(os.environ), self.stack, self.log_dir)
        deadline = time.monotonic() + timeout
        while True:
            try:
                httpx.get(self.url, timeout=1)
                return
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start on port {self.port}; see {self.log_dir}")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=5)
            self.proc = None


def group_cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) used so far by the live processes of a process group: far
    less sensitive than wall time to other processes competing for the same cores."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid:  # fields from the state on: pgrp is the 3rd, utime and stime the 12th, 13th
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def make_api_key(owner: str) -> tuple[str, str]:
    """(key, its ATTNONLY_API_KEYS entry): a fresh key for one run."""
    key = "ak_bench_" + secrets.token_urlsafe(24)
    return key, f"{owner}:{hashlib.sha256(key.encode()).hexdigest()}"


PREFIX = "bench"  # the run's Redis key prefix, queue and bucket


class ServiceStack:
    """Redis, S3, the API and named workers of one run, all stopped when ``stack`` closes.

    ``settings``: ATTNONLY_* values for every process (``rate_limit_jobs=0`` sets
    ATTNONLY_RATE_LIMIT_JOBS=0)."""

    def __init__(self, stack: ExitStack, work_dir: Path, owners: tuple[str, ...] = ("bench",), **settings):
        self.stack, self.work_dir = stack, work_dir
        self.log_dir = work_dir / "logs"
        self.redis = RedisServer(free_port(), stack, self.log_dir, data_dir=work_dir / "redis")
        self.redis.start()
        self.s3 = S3Server(stack, self.log_dir)
        self.s3.start()
        self.keys: dict[str, str] = {}
        entries = []
        for owner in owners:
            self.keys[owner], entry = make_api_key(owner)
            entries.append(entry)
        self.env = service_env(self.redis.url, {
            "ATTNONLY_S3_ENDPOINT_URL": self.s3.url,
            # moto takes any credentials; these are not secrets.
            "ATTNONLY_S3_ACCESS_KEY": "bench", "ATTNONLY_S3_SECRET_KEY": "bench",
            "ATTNONLY_S3_BUCKET": PREFIX, "ATTNONLY_REDIS_KEY_PREFIX": PREFIX, "ATTNONLY_GPU_QUEUE": PREFIX,
            "ATTNONLY_WORK_DIR": str(work_dir / "work"), "ATTNONLY_API_KEYS": ",".join(entries),
            "HF_HUB_OFFLINE": "1",
            # Tiny models: one torch thread each (OpenMP's spinning threads only slow a busy machine).
            "OMP_NUM_THREADS": "1",
        })
        self.env.update({f"ATTNONLY_{k.upper()}": str(v) for k, v in settings.items()})
        self.api: Optional[subprocess.Popen] = None
        self.url: Optional[str] = None
        self.workers: dict[str, subprocess.Popen] = {}
        self._worker_starts = 0

    @cached_property
    def store(self):
        """The run's job store, read directly in Redis (it reconnects after a restart)."""
        from shared.jobs import JobStore, redis_client

        return JobStore(redis_client(self.redis.url), PREFIX)

    def headers(self, owner: str = "bench") -> dict:
        return {"Authorization": f"Bearer {self.keys[owner]}"}

    def start_api(self, workers: int = 1) -> str:
        prepare_bucket(self.env)
        port = free_port()
        self.api = start_process("api", api_argv("127.0.0.1", port, workers=workers), self.env, self.stack,
                                 self.log_dir)
        self.url = f"http://127.0.0.1:{port}"
        wait_ready(self.url, {"api": self.api}, timeout=120, log_dir=self.log_dir)
        return self.url

    def start_worker(self, name: str) -> subprocess.Popen:
        """(Re)start the worker ``name``: a Celery worker in a process group of its own."""
        self._worker_starts += 1
        proc = start_process(f"{name}-{self._worker_starts}", worker_argv(name), self.env, self.stack,
                             self.log_dir, stop_timeout=10)
        self.workers[name] = proc
        return proc

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker's whole process group (parent and pool child at once)."""
        proc = self.workers[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)

    def logs_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-chars:]}"
                         for p in sorted(self.log_dir.glob("*.log")))


def run_and_record(name: str, run, json_path: Path | None):
    """run() with SIGTERM ending it like Ctrl-C (every process it started is stopped on the way
    out); its result, a dataclass or a dict, written as JSON to json_path or
    bench/out/<name>-<time>.json. Returns the result."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run()
    out = json_path or ROOT / "bench" / "out" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(result) if is_dataclass(result) else result, indent=2))
    return result, out


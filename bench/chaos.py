"""Chaos on the real service over loopback: tiny conversions through two Celery workers while
workers are SIGKILLed, Redis is restarted and S3 is away for a while.

    .venv/bin/python bench/chaos.py                              # 100 jobs, 10 kills, 1 Redis restart, S3 down 30 s
    .venv/bin/python bench/chaos.py --jobs 6 --kills 2 --s3-outage 0   # the test's size

It starts its own processes (bench/service.py): a private redis-server with its
append-only file on (appendfsync always), moto's S3 server in a process of its own, the API
and two workers, and serves a tiny random GPT-2 (deploy/demo.py) from a local HTTP server.
Every job converts it (one layer) with the smallest options (64 calibration tokens, the
local check, no greedy check) and a seed of its own, so that no job can reuse another's result.

The chaos is scheduled by progress, so it lands while jobs run whatever the machine's speed:
with J jobs, kill k (of K) comes when k*J/(K+1) jobs have finished, the Redis restart when
half have, and the S3 outage when two thirds have. A kill SIGKILLs a random worker's whole
process group (parent and pool child, as when a machine dies) and starts it again, as a
supervisor would. Redis is stopped with SIGTERM (it writes its append-only file) and started
on the same port. S3 is stopped and started again on the same port after --s3-outage
seconds: moto keeps nothing across a restart, so the bucket and any artifacts uploaded
before are gone; the worker creates the bucket again before its uploads (ensure_bucket, with
the same retries as the uploads), and the run checks only what the outage is about: that
jobs caught by it retry and finish.

Report: jobs lost (record gone), stuck (not finished by --timeout), succeeded, failed (by
error code), the worst extra delay a kill caused (the run time, first claim to finish, of
a job that was running at a kill and was delivered again, less the median of all jobs;
jobs whose run overlapped the Redis restart or the S3 outage are left out, as their delay
is not the kill's alone), the total time. Exit status 0 when
every job succeeded. Writes the figures to bench/out/chaos-<time>.json (--json: elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import redis  # noqa: E402

from bench.service import ServiceStack, run_and_record  # noqa: E402
from deploy.demo import make_tiny_checkpoint, serve_directory  # noqa: E402
from shared.jobs import RUNNING_STATES, JobState  # noqa: E402

WORKERS = ("w1", "w2")
OPTIONS = {"calibration": {"tokens": 64, "seq_len": 16}, "checks": ["local"], "greedy_tokens": 0}
# The service's settings for the run: a dead worker's job goes back to the queue once its
# lease (LEASE s) has expired, long before the broker's visibility timeout; a job may be
# delivered many times; an upload waits out an S3 outage of half a minute and more (waits
# of 1, 2, 4, ... s between 10 attempts: 4 minutes in all), and the job store a Redis
# restart (store_retry_seconds).
LEASE = 6
SETTINGS = dict(lease_seconds=LEASE, task_time_limit=300, visibility_timeout=360, max_attempts=20, device="cpu",
                storage_attempts=10, storage_retry_base_delay=1, store_retry_seconds=60,
                rate_limit_jobs=0, max_active_jobs_per_owner=0)


@dataclass
class Event:
    at: float  # seconds since the first submission
    wall: float  # time.time() then
    what: str
    running: list[str] = field(default_factory=list)  # ids of the jobs running then (kills)


@dataclass
class ChaosResult:
    jobs: int
    kills: int
    kills_mid_job: int  # kills with at least one job running somewhere at that moment
    redis_restarts: int
    s3_outage_seconds: float
    lost: int
    stuck: int
    succeeded: int
    failed: dict[str, int]  # error code -> count (cancelled jobs count as "cancelled")
    median_run_seconds: float
    # Over the jobs running at a kill, and delivered again, whose run overlapped neither the
    # S3 outage nor the Redis restart (those delays are not the kill's); None: no such job.
    worst_kill_extra_seconds: Optional[float]
    worst_kill_job: Optional[str]
    kill_hit_jobs_excluded: int  # jobs running at a kill, left out for overlapping an outage
    worst_extra_seconds: float  # any job, whatever the cause
    max_attempts_seen: int
    total_seconds: float
    loadavg_before: list[float]
    loadavg_after: list[float]
    events: list[Event]


def schedule(jobs: int, kills: int, redis_restarts: int, s3_outage: float) -> list[tuple[int, str]]:
    """(jobs finished, action) pairs, in the order they are due."""
    plan = [(max(1, round(k * jobs / (kills + 1))), "kill") for k in range(1, kills + 1)]
    plan += [(max(1, jobs // 2), "redis")] * redis_restarts
    if s3_outage > 0:
        plan.append((max(1, 2 * jobs // 3), "s3"))
    return sorted(plan, key=lambda p: p[0])


class Chaos:
    def __init__(self, svc: ServiceStack, ids: list[str], s3_outage: float, seed: int):
        self.svc, self.ids, self.s3_outage = svc, ids, s3_outage
        self.rng = random.Random(seed)
        self.events: list[Event] = []
        self.outages: list[tuple[float, float]] = []  # (start, end) of the Redis restart and the S3 outage
        self.started = time.monotonic()
        self._redis = redis.Redis.from_url(svc.redis.url, decode_responses=True, socket_timeout=5)

    def log(self, what: str, running: Optional[list[str]] = None) -> None:
        event = Event(round(time.monotonic() - self.started, 1), time.time(), what, running or [])
        self.events.append(event)
        print(f"  [{event.at:7.1f}s] {what}" + (f" (running: {len(event.running)})" if running is not None else ""),
              flush=True)

    def states(self) -> dict[str, Optional[JobState]]:
        """Each job's state; raises redis.RedisError while Redis is away."""
        store = self.svc.store
        raw = self._redis.mget([store._job_key(i) for i in self.ids])
        return {i: (JobState(json.loads(r)["state"]) if r else None) for i, r in zip(self.ids, raw)}

    def kill(self) -> None:
        name = self.rng.choice(WORKERS)
        try:
            running = [i for i, s in self.states().items() if s in RUNNING_STATES]
        except redis.RedisError:
            running = []
        self.svc.kill_worker(name)
        self.svc.start_worker(name)
        self.log(f"SIGKILLed worker {name} (process group) and started it again", running)

    def restart_redis(self) -> None:
        began = time.time()
        self.svc.redis.stop()
        self.svc.redis.start()
        self.log("restarted redis-server (SIGTERM, append-only file kept, same port)")
        self.outages.append((began, time.time()))

    def s3_outage_start(self) -> None:
        self.svc.s3.stop()
        self.log(f"S3 stopped for {self.s3_outage:.0f}s")
        self.outages.append((time.time(), float("inf")))

    def s3_outage_end(self) -> None:
        self.svc.s3.start()
        self.log("S3 started again on the same port (empty: moto keeps no state)")
        self.outages[-1] = (self.outages[-1][0], time.time())

    def overlaps_outage(self, began: float, ended: float) -> bool:
        return any(start < ended and end > began for start, end in self.outages)


def run(args) -> ChaosResult:
    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="attnonly-chaos-")))
        make_tiny_checkpoint(work / "src" / "gpt2", "gpt2", seed=1, layers=1)
        base = stack.enter_context(serve_directory(work / "src"))
        svc = ServiceStack(stack, work, **SETTINGS)
        url = svc.start_api()
        for name in WORKERS:
            svc.start_worker(name)
        print(f"API {url}; workers {', '.join(WORKERS)}; redis {svc.redis.url} (appendonly yes); S3 {svc.s3.url}",
              flush=True)
        bodies = [{"source_url": base + "gpt2/", "options": {**OPTIONS, "seed": i}} for i in range(args.jobs)]
        ids: list[str] = []
        with httpx.Client(base_url=url, headers=svc.headers(), timeout=60) as client:
            for start in range(0, len(bodies), 100):  # the batch endpoint takes up to 100
                created = client.post("/v1/jobs/batch", json=bodies[start:start + 100]).raise_for_status()
                ids += [j["id"] for j in created.json()["jobs"]]
        chaos = Chaos(svc, ids, args.s3_outage, args.seed)
        chaos.log(f"submitted {len(ids)} jobs")
        plan = schedule(args.jobs, args.kills, args.redis_restarts, args.s3_outage)
        deadline = chaos.started + args.timeout
        s3_back_at: Optional[float] = None
        kills = redis_restarts = 0
        kills_mid_job = 0
        states: dict = {}
        while time.monotonic() < deadline:
            try:
                states = chaos.states()
            except redis.RedisError:
                time.sleep(0.2)
                continue
            finished = sum(1 for s in states.values() if s is not None and s.finished)
            if s3_back_at is not None and time.monotonic() >= s3_back_at:
                chaos.s3_outage_end()
                s3_back_at = None
            while plan and finished >= plan[0][0]:
                _, action = plan.pop(0)
                if action == "kill":
                    chaos.kill()
                    kills += 1
                    kills_mid_job += bool(chaos.events[-1].running)
                elif action == "redis":
                    chaos.restart_redis()
                    redis_restarts += 1
                elif action == "s3":
                    chaos.s3_outage_start()
                    s3_back_at = time.monotonic() + args.s3_outage
            if finished == len(ids) and not plan and s3_back_at is None:
                break
            time.sleep(0.2)
        if s3_back_at is not None:  # the deadline came during the outage
            chaos.s3_outage_end()
        total = time.monotonic() - chaos.started
        chaos.log("done" if all(s is not None and s.finished for s in states.values()) else "deadline reached")
        jobs = {i: svc.store.get(i) for i in ids}
        if args.logs:
            print(svc.logs_tail())
    lost = [i for i, j in jobs.items() if j is None]
    stuck = [i for i, j in jobs.items() if j is not None and not j.state.finished]
    done = [j for j in jobs.values() if j is not None and j.state.finished]
    failed: dict[str, int] = {}
    for j in done:
        if j.state != JobState.succeeded:
            code = j.error.code if j.error else j.state.value
            failed[code] = failed.get(code, 0) + 1
    timed = [j for j in done if j.started_at and j.finished_at]
    runs = {j.id: (j.finished_at - j.started_at).total_seconds() for j in timed}
    median_run = statistics.median(runs.values()) if runs else 0.0
    redelivered = {j.id for j in timed if j.attempts > 1}
    hit = {i for e in chaos.events for i in e.running} & redelivered
    clean = {j.id for j in timed
             if not chaos.overlaps_outage(j.started_at.timestamp(), j.finished_at.timestamp())}
    worst = max(((runs[i] - median_run, i) for i in hit & clean), default=None)
    return ChaosResult(
        jobs=len(ids), kills=kills, kills_mid_job=kills_mid_job, redis_restarts=redis_restarts,
        s3_outage_seconds=args.s3_outage, lost=len(lost), stuck=len(stuck),
        succeeded=sum(1 for j in done if j.state == JobState.succeeded), failed=failed,
        median_run_seconds=round(median_run, 2),
        worst_kill_extra_seconds=None if worst is None else round(worst[0], 2),
        worst_kill_job=None if worst is None else worst[1],
        kill_hit_jobs_excluded=len(hit & set(runs) - clean),
        worst_extra_seconds=round(max(runs.values(), default=median_run) - median_run, 2),
        max_attempts_seen=max((j.attempts for j in done), default=0), total_seconds=round(total, 1),
        loadavg_before=loadavg_before, loadavg_after=[round(x, 2) for x in os.getloadavg()],
        events=chaos.events,
    )


def report(r: ChaosResult) -> str:
    worst = "n/a (no job that a kill sent round again ran clear of the outages)" \
        if r.worst_kill_extra_seconds is None else \
        f"{r.worst_kill_extra_seconds:.1f} s (job {r.worst_kill_job[:8]})"
    worst += f", {r.kill_hit_jobs_excluded} hit job(s) left out for overlapping an outage"
    return "\n".join([
        f"== chaos: {r.jobs} jobs, 2 workers, {r.kills} kills ({r.kills_mid_job} with jobs running), "
        f"{r.redis_restarts} Redis restart(s), S3 down {r.s3_outage_seconds:.0f} s ==",
        f"lost {r.lost} | stuck {r.stuck} | succeeded {r.succeeded} | failed {sum(r.failed.values())}"
        + (f" {r.failed}" if r.failed else ""),
        f"median run (first claim to finish) {r.median_run_seconds:.1f} s | worst extra delay from a kill {worst}"
        f" | most deliveries of one job {r.max_attempts_seen}",
        f"worst extra delay of any job (any cause: kills, the Redis restart, the S3 outage) "
        f"{r.worst_extra_seconds:.1f} s",
        f"total {r.total_seconds:.1f} s | load avg before {r.loadavg_before}, after {r.loadavg_after}",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Chaos on the real service: kills, a Redis restart, S3 away")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--kills", type=int, default=10, help="worker process groups SIGKILLed (and restarted)")
    parser.add_argument("--redis-restarts", type=int, default=1, choices=(0, 1))
    parser.add_argument("--s3-outage", type=float, default=30.0, help="seconds S3 is away (0: none)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="bound on the whole run, in seconds")
    parser.add_argument("--seed", type=int, default=0, help="which worker each kill picks")
    parser.add_argument("--logs", action="store_true", help="print the tail of every process's log at the end")
    parser.add_argument("--json", type=Path, default=None, help="default: bench/out/chaos-<time>.json")
    args = parser.parse_args(argv)
    result, out = run_and_record("chaos", lambda: run(args), args.json)
    print(report(result), flush=True)
    print(f"written: {out}")
    return 0 if result.succeeded == result.jobs else 1


if __name__ == "__main__":
    sys.exit(main())

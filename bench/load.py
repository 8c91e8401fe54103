"""Load on the real service over loopback: submissions, then status reads, from concurrent
clients; prints requests/s, p50 and p99 per kind and the errors by status.

    .venv/bin/python bench/load.py                          # 1,000 submissions + 10,000 reads, 50 clients
    .venv/bin/python bench/load.py --submissions 100 --reads 500 --clients 10   # the test's size
    .venv/bin/python bench/load.py --service-limits         # the default rate limit: intended 429s
    .venv/bin/python bench/load.py --cold                   # no warm-up request before the clock

It starts its own processes (bench/service.py): a private redis-server, moto's S3 server and
the API under uvicorn with --api-workers processes. No Celery worker runs: the jobs stay
queued, which is what a status read of a busy service sees. The rate limit and the
per-owner quota are set high for the run (ATTNONLY_RATE_LIMIT_JOBS and
ATTNONLY_MAX_ACTIVE_JOBS_PER_OWNER = 1,000,000) so that the figures measure the API, not the
limits (--service-limits keeps the defaults); a 429 counts as intended only with code
rate_limited or quota_exceeded.

Each client is a coroutine with its own keep-alive connection (aiohttp: on the same cores as
the API, a client that costs less CPU per request leaves more to the API than httpx, which
cost about 2.8 ms per status read against the API's 1.8); the clients are spread over
--client-procs processes, because one Python process cannot drive the API's processes at
full speed. Each reports its CPU per request next to the API's and redis-server's. Writes
the figures to bench/out/load-<time>.json (--json: elsewhere).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import httpx  # noqa: E402

from bench.service import ServiceStack, group_cpu_seconds, run_and_record  # noqa: E402

INTENDED_429 = ("rate_limited", "quota_exceeded")
HIGH_LIMIT = 1_000_000
# Nothing listens there and nothing fetches it: no worker runs.
SOURCE_URL = "http://127.0.0.1:9/bench/gpt2-tiny/"


@dataclass
class Sample:
    status: int
    code: Optional[str]  # the error body's code, for statuses >= 400
    seconds: float
    job_id: Optional[str] = None


@dataclass
class KindFigures:
    kind: str
    requests: int
    seconds: float  # first request sent to last answer received
    per_second: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int] = field(default_factory=dict)  # "status code" -> count, 2xx excluded
    intended_429: int = 0
    # CPU time the API's processes and redis-server spent per request: what a request
    # costs, whatever else runs on the machine.
    api_cpu_ms: float = 0.0
    redis_cpu_ms: float = 0.0
    # The load clients' own CPU per request: they run on the same cores as the API.
    client_cpu_ms: float = 0.0


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    index = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[index]


async def _one(client: aiohttp.ClientSession, method: str, path: str, body: Optional[dict]) -> Sample:
    started = time.perf_counter()
    try:
        async with client.request(method, path, json=body) as response:
            data = await response.read()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return Sample(0, type(exc).__name__, time.perf_counter() - started)
    seconds = time.perf_counter() - started
    if response.status >= 400:
        try:
            code = json.loads(data)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        return Sample(response.status, code, seconds)
    job_id = json.loads(data).get("id") if method == "POST" else None
    return Sample(response.status, None, seconds, job_id)


async def _clients(url: str, headers: dict, plans: list[list[tuple[str, str, Optional[dict]]]], ready,
                   cold: bool) -> tuple:
    """Run each plan (a list of requests) on a client of its own, all at once. Every client
    first connects and makes its plan's first request once untimed, as a polling client holds
    a warm connection and a running service has warm pools; then ``ready`` (a barrier shared
    by the client processes) lets them all go together and the clock starts. Without it the
    first 30 ms of each phase (50 connections opened at once, each API process opening its
    Redis and broker connections) made the p99: submissions 389 ms, status reads 106 ms.
    ``cold``: no untimed request; connections open and pools fill under the clock."""
    async def run(plan, warm: asyncio.Event, go: asyncio.Event):
        # One keep-alive connection per client, as a polling client holds.
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(url, headers=headers, connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=60)) as client:
            if not cold:
                await _one(client, *plan[0])  # untimed
            warm.set()
            await go.wait()
            return [await _one(client, *request) for request in plan]

    warm = [asyncio.Event() for _ in plans]
    go = asyncio.Event()
    tasks = [asyncio.create_task(run(p, w, go)) for p, w in zip(plans, warm)]
    for event in warm:
        await event.wait()
    await asyncio.to_thread(ready.wait)
    first = time.time()
    go.set()
    results = await asyncio.gather(*tasks)
    return first, time.time(), [s for r in results for s in r]


_ready = None  # the phase's barrier, inherited by the forked client processes


def _client_process(args) -> tuple[float, float, list[Sample], float]:
    url, headers, plans, cold = args
    gc.freeze()  # what the fork inherited: a client's full collections stall its 25 clients
    cpu = time.process_time()
    first, last, samples = asyncio.run(_clients(url, headers, plans, _ready, cold))
    return first, last, samples, time.process_time() - cpu


def run_phase(url: str, headers: dict, plans: list, procs: int, cold: bool) -> tuple[float, list[Sample], float]:
    """Spread the clients' plans over ``procs`` processes; (wall seconds, samples, the
    client processes' CPU seconds)."""
    global _ready
    groups = [g for g in (plans[i::procs] for i in range(procs)) if g]
    context = multiprocessing.get_context("fork")
    _ready = context.Barrier(len(groups), timeout=60)
    with context.Pool(len(groups)) as pool:
        results = pool.map(_client_process, [(url, headers, g, cold) for g in groups])
        # Let the idle workers exit before the pool's exit terminates them: a worker killed
        # while holding the task queue's lock left another waiting on it for ever (seen once).
        pool.close()
        pool.join()
    first = min(r[0] for r in results)
    last = max(r[1] for r in results)
    return last - first, [s for r in results for s in r[2]], sum(r[3] for r in results)


def figures(kind: str, seconds: float, samples: list[Sample], cpu: tuple[float, float, float]) -> KindFigures:
    times = sorted(s.seconds for s in samples)
    errors: dict[str, int] = {}
    intended = 0
    for s in samples:
        if 200 <= s.status < 300:
            continue
        errors[f"{s.status} {s.code}"] = errors.get(f"{s.status} {s.code}", 0) + 1
        intended += s.status == 429 and s.code in INTENDED_429
    return KindFigures(kind, len(samples), round(seconds, 3), round(len(samples) / seconds, 1),
                       round(percentile(times, 50) * 1e3, 1), round(percentile(times, 99) * 1e3, 1),
                       round(times[-1] * 1e3, 1), errors, intended,
                       *(round(c / len(samples) * 1e3, 3) for c in cpu))


def split(total: int, clients: int) -> list[int]:
    return [total // clients + (i < total % clients) for i in range(clients)]


def machine() -> dict:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in load]}


def run(args) -> dict:
    started = time.monotonic()
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="attnonly-load-")))
        limits = {} if args.service_limits else dict(rate_limit_jobs=HIGH_LIMIT, max_active_jobs_per_owner=HIGH_LIMIT)
        svc = ServiceStack(stack, work, **limits)
        url = svc.start_api(workers=args.api_workers)
        headers = svc.headers()
        print(f"API {url} with {args.api_workers} uvicorn worker process(es); redis {svc.redis.url}; "
              f"S3 {svc.s3.url}; rate limit and quota " + ("the service's defaults" if args.service_limits else
                                                             f"{HIGH_LIMIT:,} (set high for the run)"), flush=True)
        # Warm every API process (imports, clients made once) before measuring.
        with httpx.Client(base_url=url, headers=headers) as warm:
            for _ in range(4 * args.api_workers):
                warm.get("/v1/jobs?limit=1")
        load_before = machine()

        def cpu() -> tuple[float, float]:
            return group_cpu_seconds(svc.api.pid), group_cpu_seconds(svc.redis.proc.pid)

        body = {"source_url": SOURCE_URL}
        plans = [[("POST", "/v1/jobs", body)] * n for n in split(args.submissions, args.clients)]
        cpu0 = cpu()
        submit_seconds, submitted, submit_client_cpu = run_phase(url, headers, plans, args.client_procs, args.cold)
        cpu1 = cpu()
        ids = [s.job_id for s in submitted if s.job_id]
        rng = random.Random(0)
        plans = [[("GET", f"/v1/jobs/{rng.choice(ids)}", None) for _ in range(n)]
                 for n in split(args.reads, args.clients)] if ids else []
        read_seconds, reads, read_client_cpu = \
            run_phase(url, headers, plans, args.client_procs, args.cold) if plans else (1.0, [], 0.0)
        cpu2 = cpu()
        load_after = machine()
    result = {
        "what": "bench/load.py", "submissions": args.submissions, "reads": args.reads, "clients": args.clients,
        "client_procs": args.client_procs, "api_workers": args.api_workers, "cold": args.cold,
        "rate_limit_and_quota": "defaults" if args.service_limits else HIGH_LIMIT,
        "machine_before": load_before, "machine_after": load_after,
        "kinds": [asdict(figures("submit", submit_seconds, submitted,
                                 (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1], submit_client_cpu)))]
        + ([asdict(figures("status", read_seconds, reads, (cpu2[0] - cpu1[0], cpu2[1] - cpu1[1], read_client_cpu)))]
           if reads else []),
        "total_seconds": round(time.monotonic() - started, 1),
    }
    return result


def report(result: dict) -> str:
    lines = [f"== load: {result['submissions']} submissions, {result['reads']} status reads, "
             f"{result['clients']} clients in {result['client_procs']} processes, "
             f"{result['api_workers']} API processes{', cold' if result.get('cold') else ''} ==",
             f"machine: {result['machine_before']['cpus']} CPUs, load avg before "
             f"{result['machine_before']['loadavg']}, after {result['machine_after']['loadavg']}"]
    for k in result["kinds"]:
        errors = ", ".join(f"{n}x {s}" for s, n in k["errors"].items()) or "none"
        lines.append(f"{k['kind']:<7} {k['requests']:>6} req in {k['seconds']:7.2f} s = {k['per_second']:7.1f} req/s"
                     f" | p50 {k['p50_ms']:7.1f} ms | p99 {k['p99_ms']:7.1f} ms | max {k['max_ms']:7.1f} ms"
                     f" | CPU/request: API {k['api_cpu_ms']:.2f} ms, redis {k['redis_cpu_ms']:.2f} ms,"
                     f" clients {k['client_cpu_ms']:.2f} ms"
                     f" | errors: {errors} (intended 429s: {k['intended_429']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Load on the real service: submissions and status reads")
    parser.add_argument("--submissions", type=int, default=1000)
    parser.add_argument("--reads", type=int, default=10000)
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients, one connection each")
    parser.add_argument("--client-procs", type=int, default=2, help="processes the clients are spread over")
    parser.add_argument("--api-workers", type=int, default=2, help="uvicorn worker processes of the API")
    parser.add_argument("--service-limits", action="store_true",
                        help="keep the service's rate limit and per-owner quota: most submissions get an "
                             "intended 429 (default: both set high, to measure the API)")
    parser.add_argument("--cold", action="store_true",
                        help="no untimed first request per client: connections open and the API's pools "
                             "fill under the clock")
    parser.add_argument("--json", type=Path, default=None, help="default: bench/out/load-<time>.json")
    args = parser.parse_args(argv)
    result, out = run_and_record("load", lambda: run(args), args.json)
    print(report(result), flush=True)
    print(f"written: {out}")
    unintended = sum(n for k in result["kinds"] for n in k["errors"].values()) - \
        sum(k["intended_429"] for k in result["kinds"])
    return 1 if unintended else 0


if __name__ == "__main__":
    sys.exit(main())

"""Faults, with real processes over loopback: workers SIGKILLed mid-conversion, Redis
restarted, S3 down at upload, a cancel while running, one idempotency key sent twice.

Each test that breaks something breaks a stack of its own (tests/e2e/conftest.py): its
workers, its Redis or its S3 endpoint; nothing the session's service uses.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from deploy.local import RedisServer, free_port, redis_answers
from shared.jobs import JobState

FAST = {"calibration": {"tokens": 64, "seq_len": 16}, "greedy_tokens": 4}
# The deep (12-layer) checkpoint with short checks: a few seconds a conversion, with a
# progress step per layer to catch it half-way.
DEEP = {"calibration": {"tokens": 512, "seq_len": 32}, "checks": ["local"], "greedy_tokens": 0}
# A longer calibration per layer: enough time between two layers for a cancel to land.
DEEP_SLOW = {"calibration": {"tokens": 8192, "seq_len": 32}, "checks": ["local", "propagated"], "greedy_tokens": 0}
MID_CONVERSION = (JobState.converting, JobState.checking)
LAYER_STAGE_ORDER = ("calibrating", "writing", "checking")
# Short enough that a job whose worker died is delivered again within seconds; the time
# limit must stay below it (Settings checks), and a deep conversion takes a few seconds.
VISIBILITY, TIME_LIMIT = 15, 14


@pytest.fixture(scope="module")
def faults(make_stack):
    """An API whose queue is served by workers each test starts (and kills) itself."""
    stack = make_stack("faults", visibility_timeout=VISIBILITY, task_time_limit=TIME_LIMIT, max_attempts=6,
                       device="cpu", rate_limit_jobs=0)
    stack.start_api()
    return stack


def layer_step(progress) -> int:
    """How far a conversion is, in layer steps: calibrating 1..L, writing L+1..2L,
    checking 2L+1..3L (0 before the first layer)."""
    if progress.stage not in LAYER_STAGE_ORDER or not progress.layers_done:
        return 0
    return LAYER_STAGE_ORDER.index(progress.stage) * progress.layers_total + progress.layers_done


def wait_mid_conversion(store, ids, killed_at, at_least, deadline, stack):
    """The first job that a live worker is converting now (claimed since it was last
    killed, ``at_least`` layer steps done), or None once every job has finished."""
    while time.monotonic() < deadline:
        jobs = [store.get(i) for i in ids]
        for job in jobs:
            if (job.state in MID_CONVERSION and job.attempts > killed_at.get(job.id, 0)
                    and layer_step(job.progress) >= at_least):
                return job
        if all(j.state.finished for j in jobs):
            return None
        time.sleep(0.02)
    raise AssertionError("no job reached the middle of a conversion in time\n" + stack.logs())


def test_worker_sigkill_mid_conversion_loses_no_job(faults, checkpoints, fault_report):
    client, store, layers = faults.client(), faults.store, checkpoints.deep_layers
    # Where the three kills land: after the first calibrated layer, after calibration (the
    # worker plans and writes the heads), and in the checks against transformers.
    targets = [1, layers, 2 * layers + 1]
    # force: identical jobs, each converted (not reused, worker/reuse.py): each can be killed half-way.
    body = {"source_url": checkpoints.base + "gpt2-deep/", "options": DEEP, "force": True}
    ids = [j["id"] for j in client.post("/v1/jobs/batch", json=[body] * 3).raise_for_status().json()["jobs"]]
    killed_at: dict[str, int] = {}  # job id -> its attempts when its worker was killed
    kills = []
    started = time.monotonic()
    deadline = started + 240
    worker = faults.start_worker()
    try:
        while len(kills) < 3:
            job = wait_mid_conversion(store, ids, killed_at, targets[len(kills)], deadline, faults)
            if job is None:  # every job finished before a kill landed: one more job
                ids.append(client.post("/v1/jobs", json=body).raise_for_status().json()["id"])
                continue
            faults.kill(worker)  # parent and pool child at once: nobody acknowledges or rejects
            after = store.get(job.id)
            if not after.state.finished:  # it was really stopped half-way
                killed_at[job.id] = after.attempts
                kills.append(f"{job.id[:8]} attempt {after.attempts} at {after.progress.stage} "
                             f"{after.progress.layers_done}/{after.progress.layers_total}")
            worker = faults.start_worker()  # a fresh worker, as a supervisor would start
        final = {i: faults.wait_for(client, i, timeout=240) for i in ids}
    finally:
        faults.stop(worker)
    elapsed = time.monotonic() - started

    lost = [i for i, job in final.items() if job["state"] != "succeeded"]
    fault_report.append(f"worker SIGKILLed mid-conversion {len(kills)} times over {len(ids)} jobs: "
                        f"{len(lost)} lost, {len(ids) - len(lost)} succeeded ({elapsed:.0f}s)")
    fault_report.extend(f"  killed: {k}" for k in kills)
    print(f"\nworker kills: {len(kills)}; jobs: {len(ids)}; lost: {len(lost)}")
    assert len(kills) == 3
    assert lost == [], {i: (final[i]["state"], final[i]["error"]) for i in lost}
    for job_id, attempts in killed_at.items():
        job = final[job_id]
        assert job["attempts"] > attempts  # delivered again after the kill, and completed
        assert {a["name"] for a in job["artifacts"]} >= {"config.json", "model.safetensors", "report.json"}
        assert job["progress"]["percent"] == 100 and job["summary"]["passed"] is True
    # Nothing half-done was left behind in the work folder.
    assert not any(Path(faults.settings.work_dir).iterdir())


def test_pool_child_killed_mid_conversion_is_requeued_at_once(faults, checkpoints, fault_report):
    """The OOM killer's way: only the pool child that runs the task dies. Its parent
    rejects the message back onto the queue at once (no visibility timeout to wait for)."""
    client, store = faults.client(), faults.store
    worker = faults.start_worker()
    try:
        job_id = client.post("/v1/jobs", json={"source_url": checkpoints.base + "gpt2-deep/", "options": DEEP,
                                               "force": True}).raise_for_status().json()["id"]
        job = wait_mid_conversion(store, [job_id], {}, 1, time.monotonic() + 120, faults)
        assert job is not None, "the job finished before the kill"
        children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()
        assert len(children) == 1  # --concurrency 1: one pool child, the one running the job
        delivered = store.get(job_id).started_at.timestamp()  # the first claim
        killed = time.time()
        os.kill(int(children[0]), signal.SIGKILL)
        while store.get(job_id).attempts < 2:
            assert time.time() - killed < 120, faults.logs()
            time.sleep(0.05)
        reclaimed = time.time()
        final = faults.wait_for(client, job_id, timeout=120)
        assert worker.poll() is None  # the worker itself lived on, with a new child
    finally:
        faults.stop(worker)
    assert final["state"] == "succeeded", (final, faults.logs())
    assert final["attempts"] == 2
    # A message restored after the visibility timeout could not be claimed this early.
    assert reclaimed - delivered < VISIBILITY, faults.logs()
    fault_report.append(f"pool child SIGKILLed mid-conversion: job taken again {reclaimed - killed:.1f}s after "
                        "the kill (no visibility timeout), succeeded on attempt 2")


LEASE = 10


def test_dead_workers_job_restarts_on_another_worker_within_the_lease(make_stack, checkpoints, fault_report):
    """The whole worker dies (SIGKILL of its process group): its lease expires and the other
    worker's sweep sends the job again, long before the broker's visibility timeout."""
    stack = make_stack("lease", visibility_timeout=900, task_time_limit=880, lease_seconds=LEASE, max_attempts=6,
                       device="cpu", rate_limit_jobs=0)
    stack.start_api()
    client, store = stack.client(), stack.store
    first = stack.start_worker()
    second = None
    try:
        job_id = client.post("/v1/jobs", json={"source_url": checkpoints.base + "gpt2-deep/", "options": DEEP_SLOW}) \
            .raise_for_status().json()["id"]
        job = wait_mid_conversion(store, [job_id], {}, 1, time.monotonic() + 180, stack)
        assert job is not None, "the job finished before the kill"
        second = stack.start_worker()
        time.sleep(3)  # the second worker is up and sweeping
        stack.kill(first)
        killed = time.monotonic()
        while store.get(job_id).attempts < 2:
            assert time.monotonic() - killed < LEASE + 30, stack.logs()
            time.sleep(0.1)
        restarted = time.monotonic() - killed
        final = stack.wait_for(client, job_id, timeout=300)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                stack.stop(proc)
    assert final["state"] == "succeeded" and final["attempts"] == 2, (final, stack.logs())
    assert restarted < LEASE + 10, f"restarted {restarted:.1f}s after the kill"
    fault_report.append(f"whole worker SIGKILLed mid-conversion: its job restarted on the other worker "
                        f"{restarted:.1f}s after the kill (lease {LEASE}s, visibility timeout 900s), succeeded")


def test_s3_down_at_upload_retries_with_backoff_then_fails(faults, checkpoints):
    client = faults.client()
    dead_s3 = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    worker = faults.start_worker(s3_endpoint_url=dead_s3, storage_attempts=3, storage_retry_base_delay=0.5)
    label = next(k for k, v in faults.workers.items() if v is worker)
    try:
        job_id = client.post("/v1/jobs", json={"source_url": checkpoints.base + "gpt2/", "options": FAST}) \
            .raise_for_status().json()["id"]
        job = faults.wait_for(client, job_id, timeout=180)
    finally:
        faults.stop(worker)
    log = faults.logs(label, tail=200_000)
    assert job["state"] == "failed", (job, log[-4000:])
    assert job["error"]["code"] == "storage_unavailable"
    assert "gave up after 3 attempts" in job["error"]["message"]
    assert job["artifacts"] == [] and job["progress"]["stage"] == "uploading"
    # Three attempts, with waits of 0.5 s and then 1 s (each up to 20 % longer) between them.
    retries = [line for line in log.splitlines() if job_id in line and "retrying in" in line]
    assert len(retries) == 2, log[-4000:]
    stamps = [_log_time(line) for line in retries]
    failed_at = _log_time(next(line for line in log.splitlines() if job_id in line and "storage_unavailable" in line))
    assert stamps[1] - stamps[0] >= 0.5 and failed_at - stamps[1] >= 1.0
    assert not (Path(faults.settings.work_dir) / job_id).exists()


def _log_time(line: str) -> float:
    # "2024-06-01 12:00:00,123 LEVEL logger: ..." (shared/logs.py's text format; Celery's own
    # lines are "[2024-06-01 12:00:00,123: LEVEL/Process] ...").
    stamp = re.match(r"\[?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line).group(1)
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


# --- Redis restarted --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_stack(make_stack, tmp_path_factory):
    """An API on a Redis of its own, which the tests stop and start again on the same
    port. It keeps an append-only file, as compose's Redis does."""
    with ExitStack() as stack:
        base = tmp_path_factory.mktemp("restartable-redis")
        server = RedisServer(free_port(), stack, base / "logs", data_dir=base / "data")
        server.start()
        svc = make_stack("redis", redis=server.url, visibility_timeout=VISIBILITY, task_time_limit=TIME_LIMIT,
                         device="cpu")
        svc.redis_server = server
        svc.start_api()
        yield svc
        if svc.api is not None:
            svc.stop(svc.api)


@pytest.fixture
def redis_up(redis_stack):
    if not redis_answers(redis_stack.redis_server.url):
        redis_stack.redis_server.start()
    return redis_stack


def readyz(url: str) -> httpx.Response:
    return httpx.get(f"{url}/readyz", timeout=10)


def wait_ready_again(url: str, timeout: float = 30) -> float:
    started = time.monotonic()
    while readyz(url).status_code != 200:
        assert time.monotonic() - started < timeout, f"/readyz still not ready after {timeout}s"
        time.sleep(0.1)
    return time.monotonic() - started


def test_redis_restart_readyz_503_meanwhile_then_recovers_by_itself(redis_up, checkpoints, fault_report):
    svc = redis_up
    client = svc.client()
    body = {"source_url": checkpoints.base + "gpt2/", "options": FAST}
    worker = svc.start_worker()
    try:
        before = client.post("/v1/jobs", json=body).raise_for_status().json()["id"]
        assert svc.wait_for(client, before, timeout=180)["state"] == "succeeded"
        # A job in the middle of its conversion when Redis goes away.
        running = client.post("/v1/jobs", json={"source_url": checkpoints.base + "gpt2-deep/",
                                                "options": DEEP_SLOW}).raise_for_status().json()["id"]
        deadline = time.monotonic() + 120
        while not (svc.store.get(running).state in MID_CONVERSION):
            assert time.monotonic() < deadline, svc.logs()
            time.sleep(0.02)

        svc.redis_server.stop()
        down = readyz(svc.url)
        assert down.status_code == 503
        assert down.json() == {"status": "not_ready", "checks": {"redis": "unreachable", "s3": "ok"}}
        refused = client.post("/v1/jobs", json=body)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
        assert client.get(f"/v1/jobs/{before}").status_code == 503
        assert httpx.get(f"{svc.url}/healthz").status_code == 200  # alive all along
        time.sleep(2)  # long enough for the worker to notice its broker connection is gone

        svc.redis_server.start()
        recovered_in = wait_ready_again(svc.url)
        # Same API and worker processes: their connection pools reconnected by themselves.
        after = client.post("/v1/jobs", json=body)
        assert after.status_code == 202, after.text
        job = svc.wait_for(client, after.json()["id"], timeout=180)
        assert job["state"] == "succeeded", (job, svc.logs())
        # The job that was running: stopped when the worker lost Redis, delivered again
        # once its visibility timeout passed, and completed.
        interrupted = svc.wait_for(client, running, timeout=180)
        assert interrupted["state"] == "succeeded", (interrupted, svc.logs())
        assert worker.poll() is None and svc.api.poll() is None
        # With the append-only file the records made before the restart are still there.
        assert client.get(f"/v1/jobs/{before}").json()["state"] == "succeeded"
    finally:
        svc.stop(worker)
    fault_report.append(
        f"Redis restarted: /readyz 503 while down, ready {recovered_in:.1f}s after it was back; a job "
        f"submitted afterwards succeeded on the same worker; the job running during the restart "
        f"succeeded on attempt {interrupted['attempts']}"
    )


def test_worker_starting_while_redis_is_down_runs_the_queued_job(redis_up, checkpoints):
    svc = redis_up
    client = svc.client()
    job_id = client.post("/v1/jobs", json={"source_url": checkpoints.base + "llama/", "options": FAST}) \
        .raise_for_status().json()["id"]  # queued; no worker yet
    svc.redis_server.stop()
    worker = svc.start_worker()  # starts during the outage
    try:
        time.sleep(3)
        assert worker.poll() is None, svc.logs()  # still there, trying to connect
        assert readyz(svc.url).status_code == 503
        svc.redis_server.start()
        wait_ready_again(svc.url)
        job = svc.wait_for(client, job_id, timeout=180)
    finally:
        svc.stop(worker)
    assert job["state"] == "succeeded", (job, svc.logs())
    assert job["attempts"] == 1


# --- cancel and idempotency, on the session's service ------------------------------------------


def _ordinal(progress: dict, layers: int) -> int:
    return LAYER_STAGE_ORDER.index(progress["stage"]) * layers + progress["layers_done"]


def test_cancel_while_running_stops_within_a_layer_and_removes_artifacts(service, checkpoints, fault_report):
    client, store = service.client(), service.store
    body = {"source_url": checkpoints.base + "gpt2-deep/", "options": DEEP_SLOW, "force": True}  # never reused
    for _ in range(4):  # a cancel that lands after the last layer is no test of anything: again
        job_id = client.post("/v1/jobs", json=body).raise_for_status().json()["id"]
        # What an earlier attempt of this job could have uploaded before its worker died.
        partial = f"jobs/{job_id}/model.safetensors"
        service.storage.client.put_object(Bucket=service.settings.s3_bucket, Key=partial, Body=b"partial")
        deadline = time.monotonic() + 180
        while True:
            job = store.get(job_id)
            p = job.progress
            if job.state.finished or (job.state in MID_CONVERSION and p.stage in LAYER_STAGE_ORDER
                                      and 1 <= (p.layers_done or 0) < (p.layers_total or 0)):
                break
            assert time.monotonic() < deadline, service.logs()
            time.sleep(0.02)
        if job.state.finished:
            continue
        asked = time.monotonic()
        r = client.post(f"/v1/jobs/{job_id}/cancel")
        if r.status_code == 409:
            continue
        assert r.status_code == 202 and r.json()["cancel_requested"] is True
        at_cancel = r.json()["progress"]  # the progress as the flag was set, atomically
        final = service.wait_for(client, job_id, timeout=120)
        stopped_in = time.monotonic() - asked
        if final["state"] == "succeeded" or at_cancel["stage"] not in LAYER_STAGE_ORDER:
            continue
        break
    else:
        pytest.fail("no cancel landed in the middle of a conversion in 4 tries\n" + service.logs())

    layers = at_cancel["layers_total"]
    assert final["state"] == "cancelled", final
    assert final["error"]["code"] == "cancelled"
    # Within one layer: the worker polls the flag between layers, so its last progress is
    # the layer it was on when the cancel landed, or the next one at most.
    moved = _ordinal(final["progress"], layers) - _ordinal(at_cancel, layers)
    assert 0 <= moved <= 1, (at_cancel, final["progress"])
    assert final["artifacts"] == []
    assert service.storage.list_keys(f"jobs/{job_id}/") == []  # the partial upload is gone
    assert not (Path(service.settings.work_dir) / job_id).exists()
    assert stopped_in < 60
    fault_report.append(
        f"cancel at {at_cancel['stage']} {at_cancel['layers_done']}/{layers}: cancelled at "
        f"{final['progress']['stage']} {final['progress']['layers_done']}/{layers} "
        f"({moved} layer(s) later, {stopped_in:.2f}s); partial S3 objects and work folder removed"
    )


def test_the_same_idempotency_key_gives_the_first_job(service, checkpoints):
    alice, bob = service.client("alice"), service.client("bob")
    # A source that fails at once: this test is about the submissions, not the conversion.
    body = {"source_url": checkpoints.base + "no-such-model/", "options": FAST,
            "idempotency_key": f"upload-{uuid.uuid4().hex[:8]}"}
    first = alice.post("/v1/jobs", json=body)
    again = alice.post("/v1/jobs", json=body)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers

    # Eight clients at once, one key: one job, seven replays of it.
    race = {**body, "idempotency_key": f"race-{uuid.uuid4().hex[:8]}"}
    barrier, answers = threading.Barrier(8), []

    def submit():
        with httpx.Client(base_url=service.url, headers=service.keys.headers("alice"), timeout=30) as c:
            barrier.wait()
            answers.append(c.post("/v1/jobs", json=race))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [202] * 8
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1
    assert sum("idempotent-replayed" not in a.headers for a in answers) == 1
    race_id = ids.pop()
    listed = [j for j in alice.get("/v1/jobs", params={"limit": 100}).json()["jobs"]
              if j["idempotency_key"] == race["idempotency_key"]]
    assert [j["id"] for j in listed] == [race_id]

    # The key is alice's: bob's identical key is a job of his own.
    theirs = bob.post("/v1/jobs", json=race)
    assert theirs.status_code == 202 and theirs.json()["id"] != race_id
    # Each job ran once.
    for job_id in (first.json()["id"], race_id):
        job = service.wait_for(alice, job_id, timeout=120)
        assert job["state"] == "failed" and job["error"]["code"] == "source_not_found"
        assert job["attempts"] == 1

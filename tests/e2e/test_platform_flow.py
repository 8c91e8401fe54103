"""A platform team's pipeline with real processes (an API, a Celery worker, Redis, S3 over
HTTP, the hub imitation): a gated hf:// repository fails without its token and converts with
it, an SSE client follows that job from queued to succeeded, and /metrics parses with
prometheus_client's own parser and counts both jobs."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hub_imitation import TOKEN, serve_hub  # tests/ is on sys.path (pytest's rootdir-based import)

FAST = {"calibration": {"tokens": 64, "seq_len": 16}, "greedy_tokens": 4}
STATE_ORDER = ["queued", "downloading", "converting", "checking", "uploading", "succeeded"]


@pytest.fixture(scope="module")
def hub(checkpoints):
    with serve_hub(checkpoints.root / "gpt2") as httpd:
        yield httpd


@pytest.fixture(scope="module")
def platform_stack(make_stack, hub):
    from shared.credentials import new_key

    stack = make_stack("platform", hub_endpoint=hub.endpoint, device="cpu", rate_limit_jobs=0,
                       credentials_key=new_key())
    stack.start_api()  # the worker starts in the test, once the event stream is open
    return stack


def follow_events(client: httpx.Client, job_id: str, events: list, timeout: float = 240) -> None:
    """Every job event of the stream into ``events``, reconnecting with Last-Event-ID when a
    stream ends before the job does (events_stream_seconds)."""
    last_id = None
    while not events or events[-1]["state"] not in ("succeeded", "failed", "cancelled"):
        headers = {"Last-Event-ID": last_id} if last_id else {}
        with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("id: "):
                    last_id = line[4:]
                elif line.startswith("data: "):
                    events.append(json.loads(line[6:]))


def test_gated_hub_source_sse_and_metrics(platform_stack):
    client = platform_stack.client("alice")
    gated = {"source_url": "hf://org/gated", "options": FAST}

    job_id = client.post("/v1/jobs", json={**gated, "source_credentials": {"hub_token": TOKEN}}
                         ).raise_for_status().json()["id"]
    events: list[dict] = []
    follower = threading.Thread(target=follow_events, args=(platform_stack.client("alice"), job_id, events))
    follower.start()
    deadline = time.monotonic() + 30
    while not events and time.monotonic() < deadline:
        time.sleep(0.05)
    platform_stack.start_worker()  # the stream is open and has seen the job waiting
    follower.join(300)
    assert not follower.is_alive(), "the event stream never ended"
    states = [e["state"] for e in events]
    assert states[0] == "queued" and states[-1] == "succeeded", (states, platform_stack.logs())
    ranks = [STATE_ORDER.index(s) for s in states]
    assert ranks == sorted(ranks), f"states went backwards: {states}"
    assert len(set(states)) >= 3  # it saw the job move, not only its end
    assert TOKEN not in json.dumps(events)

    refused = platform_stack.wait_for(client, client.post("/v1/jobs", json=gated).raise_for_status().json()["id"])
    assert refused["state"] == "failed" and refused["error"]["code"] == "source_unauthorized", refused

    text = httpx.get(f"{platform_stack.url}/metrics", timeout=30).raise_for_status().text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    jobs = {s.labels["state"]: s.value for s in families["attnonly_jobs"].samples}
    assert jobs["succeeded"] >= 1 and jobs["failed"] >= 1, jobs
    assert "attnonly_stage_seconds" in families and "attnonly_queue_depth" in families
    print(f"\nSSE states: {' -> '.join(dict.fromkeys(states))} ({len(events)} events); metrics jobs {jobs}")

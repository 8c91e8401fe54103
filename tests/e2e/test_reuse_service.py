"""Reuse of finished conversions with real processes (an API, a Celery worker, Redis, S3 over
HTTP) and the hub imitation: the same job again succeeds at once with copies of the first
job's artifacts, an hf:// source without its weights being downloaded again, and ``force``
converts for real."""
from __future__ import annotations

import hashlib
import time

import httpx
import pytest

from hub_imitation import serve_hub  # tests/ is on sys.path (pytest's rootdir-based import)

FAST = {"calibration": {"tokens": 64, "seq_len": 16}, "greedy_tokens": 4}
FINISHED = ("succeeded", "failed", "cancelled")
REUSE_WITHIN_S = 1.0


@pytest.fixture(scope="module")
def hub(checkpoints):
    with serve_hub(checkpoints.root / "gpt2") as httpd:
        yield httpd


@pytest.fixture(scope="module")
def reuse_stack(make_stack, hub):
    stack = make_stack("reuse", hub_endpoint=hub.endpoint, device="cpu", rate_limit_jobs=0)
    stack.start_worker()
    stack.start_api()
    return stack


def submit_and_wait(client: httpx.Client, body: dict, timeout: float = 240) -> tuple[dict, float]:
    """The job once finished, and the seconds from its POST to the first answer that shows it
    finished (polled every 20 ms)."""
    started = time.monotonic()
    job_id = client.post("/v1/jobs", json=body).raise_for_status().json()["id"]
    while True:
        job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if job["state"] in FINISHED:
            return job, time.monotonic() - started
        assert time.monotonic() - started < timeout, f"job {job_id} still {job['state']}"
        time.sleep(0.02)


def download_hashes(client: httpx.Client, job: dict) -> dict[str, str]:
    hashes = {}
    for artifact in job["artifacts"]:
        redirect = client.get(artifact["url"])
        assert redirect.status_code == 307
        data = httpx.get(redirect.headers["location"], timeout=30).raise_for_status().content
        assert len(data) == artifact["size"]
        hashes[artifact["name"]] = hashlib.sha256(data).hexdigest()
    return hashes


def test_the_same_job_again_is_reused_within_a_second_and_force_converts(reuse_stack, checkpoints):
    client = reuse_stack.client("alice")
    body = {"source_url": checkpoints.base + "gpt2/", "options": FAST}
    first, converted_in = submit_and_wait(client, body)
    assert first["state"] == "succeeded", (first, reuse_stack.logs())
    assert first["reused_from"] is None and first["progress"]["layers_total"] == 2

    again, reused_in = submit_and_wait(client, body)
    assert again["state"] == "succeeded", (again, reuse_stack.logs())
    assert again["reused_from"] == first["id"] and again["progress"]["stage"] == "reused"
    assert reused_in < REUSE_WITHIN_S, f"reused in {reused_in:.2f}s"
    expected = {a["name"]: a["sha256"] for a in first["artifacts"]}
    assert {a["name"]: a["sha256"] for a in again["artifacts"]} == expected
    assert download_hashes(client, again) == expected  # its own objects, the same bytes

    forced, forced_in = submit_and_wait(client, {**body, "force": True})
    assert forced["state"] == "succeeded", (forced, reuse_stack.logs())
    assert forced["reused_from"] is None and forced["force"] is True
    assert forced["progress"]["layers_total"] == 2  # a conversion ran: it reported its layers
    print(f"\nconverted in {converted_in:.2f}s, reused in {reused_in:.3f}s (POST to succeeded), "
          f"forced conversion in {forced_in:.2f}s")


def test_a_hub_source_is_reused_without_downloading_its_weights_again(reuse_stack, hub):
    client = reuse_stack.client("alice")
    # Another seed: the hub serves the same files as the directory above, which the other test
    # converted with FAST (the key is the files', wherever they come from).
    body = {"source_url": "hf://org/tiny-gpt2", "options": {**FAST, "seed": 5}}

    def weight_gets() -> int:
        return sum(1 for _, path, _ in hub.seen if path.endswith(".safetensors"))

    first, _ = submit_and_wait(client, body)
    assert first["state"] == "succeeded", (first, reuse_stack.logs())
    assert first["reused_from"] is None
    downloaded = weight_gets()
    assert downloaded == 2  # the resolve URL's redirect, then the storage host's blob

    heads = len(hub.heads)
    again, reused_in = submit_and_wait(client, body)
    assert again["state"] == "succeeded", (again, reuse_stack.logs())
    assert again["reused_from"] == first["id"]
    assert weight_gets() == downloaded  # the hub's hashes decided: no weights requested
    assert len(hub.heads) > heads
    assert [a["sha256"] for a in again["artifacts"]] == [a["sha256"] for a in first["artifacts"]]
    print(f"\nhub source reused in {reused_in:.3f}s, weights fetched once")

"""The service end to end: submit over HTTP, convert on a real Celery worker, download
through presigned S3 URLs, and compare the converted model with transformers."""
import time

import httpx
import pytest
import torch

from deploy.local import wait_for_job

# Short calibration and checks: the point here is the plumbing, not the precision study.
FAST = {"calibration": {"tokens": 64, "seq_len": 16}, "greedy_tokens": 4}


@pytest.fixture(scope="module")
def client(service, keys):
    with httpx.Client(base_url=service.url, timeout=30, headers=keys.headers("alice")) as c:
        yield c


def finish(client, service, job_id, timeout=240):
    job = wait_for_job(client, service.url, job_id, timeout=timeout)
    assert service.procs["worker"].poll() is None, service.logs()
    return job


def test_bad_sources_fail_with_clear_codes(client, service, checkpoints):
    missing = client.post("/v1/jobs", json={"source_url": checkpoints.base + "no-such-model/", "options": FAST})
    foreign = client.post("/v1/jobs", json={"source_url": checkpoints.base + "foo/", "options": FAST})
    assert missing.status_code == foreign.status_code == 202

    job = finish(client, service, missing.json()["id"])
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "source_not_found"
    assert "Traceback" not in job["error"]["message"] and job["error"]["message"]
    assert job["artifacts"] == []

    job = finish(client, service, foreign.json()["id"])
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "unsupported_architecture"
    assert "FooForCausalLM" in job["error"]["message"]  # names what it found


def test_gpt2_and_llama_convert_end_to_end(client, service, checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    from shared.conversion import load_converted

    started = time.monotonic()
    # force: other tests of the session converted these files with these options already, and a
    # repeat would be served from their artifacts (reuse) instead of converting
    bodies = [{"source_url": checkpoints.base + name + "/", "options": FAST, "force": True} for name in ("gpt2", "llama")]
    created = client.post("/v1/jobs/batch", json=bodies)
    assert created.status_code == 202
    ids = [j["id"] for j in created.json()["jobs"]]

    for name, job_id in zip(("gpt2", "llama"), ids):
        job = finish(client, service, job_id)
        assert job["state"] == "succeeded", (job, service.logs())
        assert job["progress"]["percent"] == 100
        assert job["progress"]["layers_total"] == 2
        assert job["error"] is None and job["summary"]
        assert {a["name"] for a in job["artifacts"]} >= {"config.json", "model.safetensors", "report.json"}

        # Download every artifact the way a user would: the API redirects to S3.
        out = tmp_path / name
        out.mkdir()
        for artifact in job["artifacts"]:
            redirect = client.get(artifact["url"])
            assert redirect.status_code == 307
            assert redirect.headers["location"].startswith(service.settings.s3_endpoint_url)
            data = httpx.get(redirect.headers["location"], timeout=30).raise_for_status().content
            assert len(data) == artifact["size"]
            (out / artifact["name"]).write_bytes(data)

        converted = load_converted(out, device="cpu")
        source = AutoModelForCausalLM.from_pretrained(checkpoints.root / name).eval()
        ids_in = torch.randint(0, source.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = source(ids_in).logits.float()
            got = converted(ids_in)
            got = (got.logits if hasattr(got, "logits") else got).float()
        assert got.shape == expected.shape
        scale = expected.abs().max().item()
        diff = (got - expected).abs().max().item()
        assert diff <= 1e-4 * scale, f"{name}: max |diff| {diff:.3g} vs max |logit| {scale:.3g}"

    listed = client.get("/v1/jobs", params={"state": "succeeded"}).json()["jobs"]
    assert set(ids) <= {j["id"] for j in listed}
    print(f"\ntwo conversions end to end in {time.monotonic() - started:.1f}s")

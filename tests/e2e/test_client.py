"""The `attnonly` command (the console script pip installs) against the real service:
submit a tiny GPT-2, wait, download, then status, list and inspect; a failing source and an
unreachable API give the documented exit statuses."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deploy.local import free_port

ATTNONLY = Path(sys.executable).with_name("attnonly")
FAST = ["--option", "calibration.tokens=64", "--option", "calibration.seq_len=16", "--option", "greedy_tokens=4"]


@pytest.fixture(scope="module")
def cli(service, keys):
    if not ATTNONLY.exists():
        pytest.fail(f"{ATTNONLY} is missing: install the project (pip install -e '.[service,dev]', deploy/bootstrap.sh)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNONLY_")}
    env.update(ATTNONLY_API_URL=service.url, ATTNONLY_API_KEY=keys.plain["alice"])

    def start(*args) -> subprocess.Popen:
        return subprocess.Popen([str(ATTNONLY), *map(str, args)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def run(*args, timeout=180) -> subprocess.CompletedProcess:
        proc = start(*args)
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    run.start = start
    return run


def finish(proc: subprocess.Popen, timeout=180) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_submit_wait_download_status_list_inspect(cli, service, checkpoints, keys, tmp_path):
    started = time.monotonic()
    out = tmp_path / "gpt2-ao"
    # Both at once: the worker converts one after the other while the commands poll.
    good = cli.start("submit", checkpoints.base + "gpt2/", *FAST, "--wait", "--download", out)
    bad = cli.start("submit", checkpoints.base + "foo/", *FAST, "--wait")
    done, failed = finish(good), finish(bad)

    assert done.returncode == 0, (done.stdout, done.stderr, service.logs())
    job_id = done.stdout.splitlines()[0].strip()
    assert "succeeded" in done.stderr and "%" in done.stderr  # the progress bar and the outcome
    with httpx.Client(base_url=service.url, headers=keys.headers("alice"), timeout=30) as api:
        job = api.get(f"/v1/jobs/{job_id}").raise_for_status().json()
    assert job["state"] == "succeeded"
    names = {a["name"] for a in job["artifacts"]}
    assert {"config.json", "model.safetensors", "report.json"} <= names
    assert {p.name for p in out.iterdir()} == names  # every artifact, no temporary file left
    for artifact in job["artifacts"]:
        data = (out / artifact["name"]).read_bytes()
        assert len(data) == artifact["size"]
        if artifact.get("sha256"):
            assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
        assert str(out / artifact["name"]) in done.stdout

    assert failed.returncode == 1, (failed.stdout, failed.stderr)
    assert "error [unsupported_architecture]" in failed.stderr and "Traceback" not in failed.stderr

    status = cli("status", job_id)
    assert status.returncode == 0, status.stderr
    assert "succeeded" in status.stdout and "model.safetensors" in status.stdout
    as_json = cli("status", job_id, "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["artifacts"][0]["size"] > 0

    listed = cli("list", "--limit", "0")
    assert listed.returncode == 0, listed.stderr
    assert job_id in listed.stdout and "succeeded" in listed.stdout

    inspected = cli("inspect", out)
    assert inspected.returncode == 0, inspected.stderr
    assert "transformer.h.0.mlp" in inspected.stdout and "transformer.h.1.mlp" in inspected.stdout
    assert "activation" in inspected.stdout and "PASSED" in inspected.stdout

    missing = cli("status", "no-such-job")
    assert missing.returncode == 2 and "error [job_not_found]" in missing.stderr
    assert time.monotonic() - started < 120, "the command line round trip got slow"


def test_unreachable_api_exits_3(cli):
    dead = f"http://127.0.0.1:{free_port()}"
    for args in (("list", "--api-url", dead), ("--api-url", dead, "status", "x"), ("watch", "x", "--api-url", dead)):
        result = cli(*args)
        assert result.returncode == 3, (result.stdout, result.stderr)
        assert "error [unreachable]" in result.stderr and "Traceback" not in result.stderr

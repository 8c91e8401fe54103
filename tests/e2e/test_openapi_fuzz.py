"""The OpenAPI document tells the truth: Schemathesis, run as a user would run it (its command
line, against the API served by uvicorn over HTTP), with every check and every phase
(examples, coverage, fuzzing, stateful), finds nothing.

Bounded to stay short on a busy machine: a fixed seed (the same cases every run), a few
examples per operation, two workers (much of a run waits on the service) and event streams
of 0.2 s. The service is configured with every feature on (source credentials and webhooks
accepted; without their keys a job using them is a documented 403, which the fuzzer accepts
too), no rate limit or quota (so that the stateful phase's jobs reach the routes behind
POST /v1/jobs instead of 429s). No worker: jobs stay queued, which the document says what to
expect of (409 job_not_finished for their artifacts).
"""
import secrets
import subprocess
import sys
import time

import httpx

from shared.credentials import new_key

SEED = 20261202
MAX_EXAMPLES = 8
WORKERS = 2
TIMEOUT = 300


def test_schemathesis_finds_nothing(make_stack, keys, tmp_path):
    svc = make_stack("fuzz", rate_limit_jobs=0, max_active_jobs_per_owner=0, events_stream_seconds=0.2,
                     credentials_key=new_key(), webhook_signing_key=secrets.token_urlsafe(32))
    url = svc.start_api()
    argv = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json",
        "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful",
        "--seed", str(SEED), "--max-examples", str(MAX_EXAMPLES), "--workers", str(WORKERS), "--generation-database", "none",
        "--header", f"Authorization: Bearer {keys.plain['alice']}",
        "--request-timeout", "30", "--no-color", "--report", "junit", "--report-dir", str(tmp_path),
    ]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    took = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"schemathesis found problems ({took:.0f} s):\n{output[-12000:]}\n{svc.logs()}"
    # It ran: every operation of the document, each phase.
    spec = httpx.get(f"{url}/openapi.json").json()
    operations = sum(len(item) for item in spec["paths"].values())
    assert f"{operations} selected / {operations} total" in output, output[-3000:]
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅  {phase}" in output, output[-3000:]

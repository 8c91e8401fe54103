"""Smaller runs of bench/load.py and bench/chaos.py, each in its own process with processes
of its own (uvicorn, redis-server, moto's S3 server, Celery workers) over loopback.

The figures of a loaded two-core machine mean little; what is checked is what must hold on
any machine: no request fails, and under kills and a Redis restart no job is lost, stuck
or failed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(name: str, args: list[str], out: Path, timeout: float) -> tuple[subprocess.CompletedProcess, dict, float]:
    started = time.monotonic()
    argv = [sys.executable, str(ROOT / "bench" / name), *args, "--json", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the script then stops the processes it started (each in a session
        # of its own, out of reach of a SIGKILL of the script).
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        raise AssertionError(f"{name} ran past {timeout:.0f}s\n{stdout[-4000:]}{stderr[-4000:]}") from None
    done = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done, json.loads(out.read_text()), time.monotonic() - started


def test_load_small_no_errors(tmp_path):
    done, result, _ = run_script("load.py", ["--submissions", "100", "--reads", "500", "--clients", "10",
                                             "--api-workers", "2"], tmp_path / "load.json", timeout=240)
    kinds = {k["kind"]: k for k in result["kinds"]}
    assert kinds["submit"]["requests"] == 100 and kinds["status"]["requests"] == 500
    for k in kinds.values():
        assert k["errors"] == {}, k
        assert 0 < k["p50_ms"] <= k["p99_ms"] <= k["max_ms"] and k["per_second"] > 0
        assert k["api_cpu_ms"] > 0  # the API's processes were measured, not the client's
    assert result["api_workers"] == 2
    assert "status " in done.stdout and "req/s" in done.stdout


def test_chaos_small_loses_nothing(tmp_path):
    done, result, seconds = run_script(
        "chaos.py", ["--jobs", "4", "--kills", "2", "--redis-restarts", "1", "--s3-outage", "0", "--timeout", "420"],
        tmp_path / "chaos.json", timeout=600)
    assert result["jobs"] == 4 and result["kills"] == 2 and result["redis_restarts"] == 1
    assert (result["lost"], result["stuck"], result["failed"]) == (0, 0, {}), done.stdout[-3000:]
    assert result["succeeded"] == 4
    kills = [e for e in result["events"] if e["what"].startswith("SIGKILLed worker")]
    assert len(kills) == 2
    assert any("restarted redis-server" in e["what"] for e in result["events"])
    print(f"\nchaos (small), {seconds:.0f} s:\n" + done.stdout[done.stdout.index("== chaos"):])

"""`python -m deploy.local --exit-after-demo`, as the README's first command runs it: with
no Redis answering and no S3 configured it starts both, runs the demo and cleans up."""
import os
import subprocess
import sys
from pathlib import Path

from deploy.local import free_port, redis_answers

REPO = Path(__file__).resolve().parents[2]


def test_local_runner_runs_the_demo_and_cleans_up(tmp_path):
    redis_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing answers there yet
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNONLY_")}
    env.update(ATTNONLY_REDIS_URL=redis_url, ATTNONLY_WORK_DIR=str(tmp_path / "work"), HF_HUB_OFFLINE="1")
    log_dir = tmp_path / "logs"
    out = subprocess.run(
        [sys.executable, "-m", "deploy.local", "--exit-after-demo", "--port", str(free_port()),
         "--log-dir", str(log_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in log_dir.glob("*.log"))
    assert out.returncode == 0, out.stdout + out.stderr + logs
    assert f"Redis:  {redis_url} (started here)" in out.stdout
    assert "(embedded" in out.stdout
    assert "Demo job succeeded" in out.stdout
    for name in ("config.json", "model.safetensors", "report.json"):
        assert name in out.stdout
    assert "download: http://127.0.0.1:" in out.stdout and "X-Amz-Signature=" in out.stdout
    assert not redis_answers(redis_url)  # the Redis it started is gone again

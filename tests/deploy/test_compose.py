"""docker-compose.yml validates with Debian's docker-compose and says what the issue asks."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
needs_compose = pytest.mark.skipif(shutil.which("docker-compose") is None,
                                   reason="docker-compose is not installed (.ci/run installs it)")


def compose_config(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "ATTNONLY_"))}
    out = subprocess.run(["docker-compose", "-f", "docker-compose.yml", *args, "config"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


@needs_compose
def test_compose_validates_and_wires_the_services():
    config = compose_config()
    services = config["services"]
    assert {"redis", "minio", "minio-init", "api", "worker"} <= set(services)
    assert services["minio"]["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    assert "mc mb" in services["minio-init"]["command"][0]
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["minio"]["condition"] == "service_healthy"
        assert deps["minio-init"]["condition"] == "service_completed_successfully"
        env = services[name]["environment"]
        assert env["ATTNONLY_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["ATTNONLY_S3_PUBLIC_ENDPOINT_URL"] == "http://localhost:9000"
        assert int(env["ATTNONLY_VISIBILITY_TIMEOUT"]) > int(env["ATTNONLY_TASK_TIME_LIMIT"])
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["api"]["build"]["dockerfile"] == "deploy/Dockerfile.api"
    assert services["worker"]["build"]["dockerfile"] == "deploy/Dockerfile.worker"


@needs_compose
def test_cpu_variant_has_no_device_reservation():
    services = compose_config("--profile", "cpu")["services"]
    cpu = services["worker-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu
    assert cpu["build"]["args"]["BASE_IMAGE"].startswith("python:3.11")
    assert cpu["environment"]["ATTNONLY_DEVICE"] == "cpu"
    assert cpu["depends_on"] == services["worker"]["depends_on"]


def test_dockerfiles_run_the_real_entry_points():
    api = (REPO / "deploy" / "Dockerfile.api").read_text()
    worker = (REPO / "deploy" / "Dockerfile.worker").read_text()
    assert '"api.main:app"' in api and "USER app" in api
    # the GPU image runs the torch the tests pin, on a CUDA runtime base matching its build
    assert '"worker.app"' in worker and "nvidia/cuda:13.0" in worker
    pinned = re.search(r'"torch==([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f"ARG TORCH_VERSION={pinned}" in worker
    assert (REPO / "api" / "main.py").exists() and (REPO / "worker" / "app.py").exists()


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = ".venv/bin/python -m pytest -q tests"
    assert command in readme and command in ci
    assert "bash deploy/local.sh" in readme
    assert os.access(REPO / ".ci" / "run", os.X_OK)

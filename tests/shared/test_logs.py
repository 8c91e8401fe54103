"""JSON log lines (shared/logs.py): one object per line, job_id and owner as fields on the
lines about a job, in the worker and in the API; no secret in any line."""
import json
import logging

import pytest
from fastapi.testclient import TestClient

from api.deps import get_queue
from api.main import app
from shared import logs
from shared.credentials import SourceCredentials, new_key, seal
from shared.settings import get_settings
from worker.tasks import run_job

HUB_TOKEN = "hf_logtest_" + "q" * 24


@pytest.fixture
def json_lines(capsys):
    """The lines the service logs meanwhile, in its JSON format, each parsed."""
    handler = logs.configure("json")
    capsys.readouterr()
    parsed: list[dict] = []

    def read() -> tuple[list[dict], str]:
        text = capsys.readouterr().err
        parsed.extend(json.loads(line) for line in text.splitlines() if line.strip())
        return parsed, text

    yield read
    logging.getLogger().removeHandler(handler)


def _broken_fetch(url, dest, limits, progress=None, on_config=None, on_weights=None, **_):
    from shared.fetch import FetchError

    raise FetchError("http_error", "the source answered 404")


def test_worker_lines_about_a_job_carry_its_id_and_owner(store, storage, make_settings, json_lines):
    key = new_key()
    settings = make_settings(credentials_key=key)
    sealed = seal(SourceCredentials(hub_token=HUB_TOKEN), settings.credentials_key)
    job, _ = store.create("hf://org/model", None, owner="alice", sealed_credentials=sealed)

    run_job(job.id, settings=settings, store=store, storage=storage, device="cpu", fetch=_broken_fetch)
    logging.getLogger("attnonly.test").info("after the job")

    lines, text = json_lines()
    about = [line for line in lines if line.get("job_id") == job.id]
    assert about, text
    assert all(line["owner"] == "alice" for line in about)
    assert {"time", "level", "logger", "message"} <= set(about[0])
    assert any("http_error" in line["message"] for line in about)  # the outcome line
    # Lines after the job are about no job.
    assert "job_id" not in next(line for line in lines if line["message"] == "after the job")
    for secret in (HUB_TOKEN, key, settings.s3_secret_key.get_secret_value(), sealed):
        assert secret not in text


def test_api_lines_about_a_job_carry_its_id_and_owner(settings, storage, keys, json_lines):
    class DownQueue:
        def enqueue(self, job_id):
            raise ConnectionError("broker down")

    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides[get_queue] = DownQueue
    try:
        with TestClient(app, raise_server_exceptions=False, headers=keys.headers("bob")) as client:
            r = client.post("/v1/jobs", json={"source_url": "https://example.org/m/"})
    finally:
        app.dependency_overrides.clear()
    assert r.status_code == 503

    lines, text = json_lines()
    failed = [line for line in lines if "enqueue failed" in line["message"]]
    assert len(failed) == 1, text
    assert failed[0]["level"] == "ERROR" and failed[0]["owner"] == "bob"
    assert failed[0]["job_id"] and failed[0]["job_id"] in failed[0]["message"]
    assert keys.plain["bob"] not in text and settings.s3_secret_key.get_secret_value() not in text


def test_text_format_is_plain_lines(capsys):
    handler = logs.configure("text")
    try:
        capsys.readouterr()
        with logs.job_context("j1", "carol"):
            logging.getLogger("attnonly.test").warning("hello")
        err = capsys.readouterr().err
    finally:
        logging.getLogger().removeHandler(handler)
    assert "WARNING attnonly.test: hello" in err and not err.lstrip().startswith("{")

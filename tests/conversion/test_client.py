"""shared.conversion.client against httpx.MockTransport: the API's errors as ClientErrors,
downloads that never send the key to the storage host and keep no partial file, polling
through a brief outage. (tests/e2e/test_client.py runs the `attnonly` command against the
real service.)"""
import hashlib
import json
import time

import httpx
import pytest

from shared.conversion.cli import options_from, parse_option
from shared.conversion.cli_service import exit_code_for
from shared.conversion.client import Client, ClientError, Job

API = "http://api.test"
KEY = "ak_unit_test_key"
JOB_ID = "6f1c0000-0000-4000-8000-000000000001"


def job_body(state="succeeded", artifacts=(), **extra):
    return {
        "id": JOB_ID, "state": state, "source_url": "https://models.test/gpt2/", "options": {"dtype": "float32"},
        "idempotency_key": None,
        "progress": {"percent": 100.0 if state == "succeeded" else 40.0, "stage": "converting",
                     "layers_done": 1, "layers_total": 2},
        "created_at": "2025-01-02T03:04:05.123456Z", "updated_at": "2025-01-02T03:04:06Z",
        "started_at": None, "finished_at": None, "attempts": 1, "cancel_requested": False,
        "error": None, "summary": {"passed": True} if state == "succeeded" else None,
        "artifacts": [dict(a, url=f"{API}/v1/jobs/{JOB_ID}/artifacts/{a['name']}") for a in artifacts],
        "links": {"self": "x", "cancel": "y"}, **extra,
    }


def api_error(status, code, message, **headers):
    return httpx.Response(status, json={"error": {"code": code, "message": message}}, headers=headers)


def client_for(handler, key=KEY):
    return Client(API, key, transport=httpx.MockTransport(handler), poll_interval=0.01)


@pytest.mark.parametrize("response, code, status", [
    (api_error(404, "job_not_found", "no job x"), "job_not_found", 404),
    (api_error(401, "unauthorized", "an API key is needed"), "unauthorized", 401),
    (api_error(409, "job_finished", "already succeeded"), "job_finished", 409),
    (api_error(429, "rate_limited", "slow down", **{"Retry-After": "7"}), "rate_limited", 429),
    (api_error(503, "store_unavailable", "the job store is unavailable"), "store_unavailable", 503),
    (httpx.Response(502, text="<html>Bad Gateway</html>"), "http_502", 502),
    (httpx.Response(500), "http_500", 500),
])
def test_api_errors_become_client_errors(response, code, status):
    with client_for(lambda request: response) as api:
        with pytest.raises(ClientError) as caught:
            api.status(JOB_ID)
    err = caught.value
    assert (err.code, err.status) == (code, status)
    assert err.message and str(err).startswith(f"[{code}]")
    if code == "rate_limited":
        assert err.retry_after == 7 and err.transient
    if code.startswith("http_5"):
        assert f"HTTP {status}" in err.message


def test_validation_errors_name_the_fields():
    def handler(request):
        return httpx.Response(422, json={"error": {
            "code": "validation_error", "message": "invalid request: options.calibration.tokens",
            "fields": [{"location": "body", "path": "options.calibration.tokens", "message": "must be >= 1"}]}})

    with client_for(handler) as api, pytest.raises(ClientError) as caught:
        api.submit("https://models.test/gpt2/", {"calibration": {"tokens": 0}})
    assert caught.value.code == "validation_error" and caught.value.status == 422
    assert "options.calibration.tokens: must be >= 1" in caught.value.message
    assert caught.value.fields[0]["path"] == "options.calibration.tokens"
    assert exit_code_for(caught.value) == 2


def test_transport_failures_have_no_status():
    def refused(request):
        raise httpx.ConnectError("connection refused", request=request)

    def slow(request):
        raise httpx.ReadTimeout("read timed out", request=request)

    with client_for(refused) as api, pytest.raises(ClientError) as caught:
        api.list()
    assert (caught.value.code, caught.value.status) == ("unreachable", None) and caught.value.transient
    assert exit_code_for(caught.value) == 3
    with client_for(slow) as api, pytest.raises(ClientError) as caught:
        api.status(JOB_ID)
    assert caught.value.code == "timeout"
    with client_for(lambda r: httpx.Response(200, text="<html>not the API</html>")) as api, \
            pytest.raises(ClientError) as caught:
        api.status(JOB_ID)
    assert caught.value.code == "invalid_response"


def test_exit_codes_for_errors():
    assert exit_code_for(ClientError("job_not_found", "x", 404)) == 2
    assert exit_code_for(ClientError("unauthorized", "x", 401)) == 2
    assert exit_code_for(ClientError("rate_limited", "x", 429)) == 3
    assert exit_code_for(ClientError("internal_error", "x", 500)) == 3
    assert exit_code_for(ClientError("artifact_size_mismatch", "x")) == 3
    assert exit_code_for(ClientError("download_failed", "expired", 403)) == 3
    assert exit_code_for(ClientError("no_artifacts", "x")) == 2


def test_submit_sends_the_body_and_key_and_returns_a_job():
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(202, json={"id": JOB_ID, "state": "queued", "links": {}},
                              headers={"Idempotent-Replayed": "true"})

    with client_for(handler) as api:
        job = api.submit("https://models.test/gpt2/", {"tolerance": 1e-5}, idempotency_key="k1")
    assert isinstance(job, Job) and job.id == JOB_ID and job.state == "queued" and job.replayed
    (request,) = seen
    assert request.method == "POST" and request.url.path == "/v1/jobs"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(request.content) == {"source_url": "https://models.test/gpt2/",
                                           "options": {"tolerance": 1e-5}, "idempotency_key": "k1"}


def test_status_is_typed():
    artifacts = [{"name": "model.safetensors", "size": 10, "sha256": "ab" * 32}]
    with client_for(lambda r: httpx.Response(200, json=job_body(artifacts=artifacts))) as api:
        job = api.status(JOB_ID)
    assert job.finished and job.progress.layers_total == 2 and job.created_at.year == 2025
    assert job.artifacts[0].name == "model.safetensors" and job.artifacts[0].sha256 == "ab" * 32
    assert job.summary == {"passed": True} and job.error is None
    assert job.reused_from is None
    other = "0" * 8 + JOB_ID[8:]
    with client_for(lambda r: httpx.Response(200, json=job_body(reused_from=other))) as api:
        assert api.status(JOB_ID).reused_from == other  # a job that copied an earlier job's artifacts


def test_list_follows_cursors():
    pages = {None: (["a", "b"], "c1"), "c1": (["c"], None)}

    def handler(request):
        assert request.url.params.get("state") == "failed"
        ids, nxt = pages[request.url.params.get("cursor")]
        return httpx.Response(200, json={"jobs": [dict(job_body("failed"), id=i) for i in ids], "next_cursor": nxt})

    with client_for(handler) as api:
        assert [j.id for j in api.list(state="failed")] == ["a", "b", "c"]
        assert [j.id for j in api.list(state="failed", limit=2)] == ["a", "b"]


def test_wait_rides_out_a_brief_outage_and_reports_progress(monkeypatch):
    answers = iter([
        httpx.Response(200, json=job_body("converting")),
        api_error(503, "store_unavailable", "redis is away"),
        "refused",
        httpx.Response(200, json=job_body("converting")),
        httpx.Response(200, json=job_body("succeeded")),
    ])

    def handler(request):
        answer = next(answers)
        if answer == "refused":
            raise httpx.ConnectError("refused", request=request)
        return answer

    monkeypatch.setattr("shared.conversion.client.time.sleep", lambda s: None)  # no real waiting here
    seen = []
    with client_for(handler) as api:
        job = api.wait(JOB_ID, on_progress=seen.append)
    assert job.state == "succeeded"
    assert [j.state for j in seen] == ["converting", "succeeded"]  # unchanged views are not repeated


def test_wait_does_not_hide_a_real_error_or_a_service_never_reached():
    with client_for(lambda r: api_error(404, "job_not_found", "gone")) as api, pytest.raises(ClientError) as caught:
        api.wait(JOB_ID)
    assert caught.value.code == "job_not_found"

    def refused(request):
        raise httpx.ConnectError("refused", request=request)

    started = time.monotonic()
    with client_for(refused) as api, pytest.raises(ClientError) as caught:
        api.wait(JOB_ID)
    assert caught.value.code == "unreachable" and time.monotonic() - started < 5


def storage_handler(files, seen, corrupt=None):
    """The API redirects each artifact to a 'storage host' that serves ``files``."""

    def handler(request):
        seen.append(request)
        if request.url.host == "api.test":
            name = request.url.path.rsplit("/", 1)[-1]
            if request.url.path == f"/v1/jobs/{JOB_ID}":
                return httpx.Response(200, json=job_body(artifacts=[
                    {"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()]))
            return httpx.Response(307, headers={"Location": f"http://storage.test/bucket/{name}?X-Amz-Signature=s"})
        name = request.url.path.rsplit("/", 1)[-1]
        data = files[name] if name != corrupt else files[name][:-1] + b"!"
        return httpx.Response(200, content=data)

    return handler


def test_download_follows_the_redirect_without_the_key(tmp_path):
    files = {"config.json": b'{"a": 1}', "model.safetensors": b"x" * 3_000_000, "report.json": b"{}"}
    seen = []
    with client_for(storage_handler(files, seen)) as api:
        paths = api.download(JOB_ID, tmp_path / "out")
    assert sorted(p.name for p in paths) == sorted(files)
    for path in paths:
        assert path.read_bytes() == files[path.name]
    storage = [r for r in seen if r.url.host == "storage.test"]
    assert len(storage) == 3
    assert all("authorization" not in r.headers for r in storage)
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in seen if r.url.host == "api.test")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(files)  # no temporary files left


def test_download_refuses_a_corrupt_file_and_keeps_nothing_of_it(tmp_path):
    files = {"config.json": b'{"a": 1}', "model.safetensors": b"weights" * 100}
    with client_for(storage_handler(files, [], corrupt="model.safetensors")) as api, \
            pytest.raises(ClientError) as caught:
        api.download(JOB_ID, tmp_path)
    assert caught.value.code == "artifact_sha256_mismatch" and exit_code_for(caught.value) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_download_checks_sizes_without_sha256(tmp_path):
    job = Job.from_api(job_body(artifacts=[{"name": "model.safetensors", "size": 10}]))

    def handler(request):
        if request.url.host == "api.test":
            return httpx.Response(307, headers={"Location": "http://storage.test/m"})
        return httpx.Response(200, content=b"short")

    with client_for(handler) as api, pytest.raises(ClientError) as caught:
        api.download(JOB_ID, tmp_path, job=job)
    assert caught.value.code == "artifact_size_mismatch" and "5 bytes" in caught.value.message
    assert list(tmp_path.iterdir()) == []


def test_download_errors(tmp_path):
    with client_for(lambda r: httpx.Response(200, json=job_body("queued"))) as api, \
            pytest.raises(ClientError) as caught:
        api.download(JOB_ID, tmp_path)
    assert caught.value.code == "no_artifacts" and exit_code_for(caught.value) == 2

    evil = Job.from_api(job_body(artifacts=[{"name": "../escape", "size": 1}]))
    with client_for(lambda r: httpx.Response(307, headers={"Location": "http://storage.test/x"})) as api, \
            pytest.raises(ClientError) as caught:
        api.download(JOB_ID, tmp_path / "in", job=evil)
    assert caught.value.code == "invalid_response" and not (tmp_path / "escape").exists()

    def expired(request):
        if request.url.host == "api.test":
            return httpx.Response(307, headers={"Location": "http://storage.test/m"})
        return httpx.Response(403, text="<Error><Code>AccessDenied</Code></Error>")

    ok = Job.from_api(job_body(artifacts=[{"name": "m", "size": 1}]))
    with client_for(expired) as api, pytest.raises(ClientError) as caught:
        api.download(JOB_ID, tmp_path, job=ok)
    assert caught.value.code == "download_failed" and caught.value.status == 403
    assert exit_code_for(caught.value) == 3


def test_option_parsing():
    pairs = [parse_option(t) for t in ("tolerance=1e-5", "calibration.tokens=64", "calibration.seq_len=16",
                                       "checks=local,propagated", "dtype=float64", "greedy_tokens=0")]
    assert options_from(pairs) == {"tolerance": 1e-5, "calibration": {"tokens": 64, "seq_len": 16},
                                   "checks": ["local", "propagated"], "dtype": "float64", "greedy_tokens": 0}
    for bad in ("tolerance", "=3", "a..b=1"):
        with pytest.raises(Exception):
            parse_option(bad)
    with pytest.raises(ValueError):
        options_from([parse_option("calibration=1"), parse_option("calibration.tokens=2")])

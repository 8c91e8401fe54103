"""The job task, run in-process against real Redis and S3, with stand-ins for the
download and the conversion where a test needs to steer them."""
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from deploy.demo import serve_directory
from shared.conversion.errors import InvalidOptionsError, UnsupportedArchitectureError
from shared.fetch import FetchError
from shared.jobs import JobState
from shared.storage import job_prefix
from worker.progress import ProgressReporter
from worker.tasks import ARTIFACT_NAMES, run_job

STAGES = ("loading", "calibrating", "converting", "checking", "writing")


def fake_fetch(url, dest: Path, limits, progress=None, on_config=None, on_weights=None):
    assert limits.allow_pickle is False
    (dest / "config.json").write_text('{"model_type": "gpt2"}')
    if progress:
        progress(50, 100)
        progress(100, 100)
    return dest


class FakeConvert:
    """Behaves like shared.conversion.convert: reports stages, polls for cancel between
    layers, writes the three files; ``seen`` keeps what it was called with."""

    def __init__(self, passed=True, layers=3, raise_at=None, on_layer=None):
        self.passed, self.layers, self.raise_at, self.on_layer = passed, layers, raise_at, on_layer
        self.calls = []
        self.progress_seen = []

    def __call__(self, source_dir, out_dir, opts, progress=None, should_cancel=None):
        from shared.conversion.errors import ConversionCancelled

        self.calls.append(opts)
        assert (Path(source_dir) / "config.json").exists()
        for stage in STAGES:
            for layer in range(self.layers):
                if should_cancel and should_cancel():
                    raise ConversionCancelled("cancelled between layers")
                if self.on_layer:
                    self.on_layer(stage, layer)
                if self.raise_at == (stage, layer):
                    raise self.error
                progress(stage, layer + 1, self.layers)
        out = Path(out_dir)
        out.mkdir(parents=True)
        (out / "config.json").write_text('{"converted": true}')
        (out / "model.safetensors").write_bytes(b"\x01" * 64)
        (out / "report.json").write_text(json.dumps({"passed": self.passed}))
        return SimpleNamespace(passed=self.passed, summary={"passed": self.passed, "max_rel_error": 1e-7})


def run(store, storage, settings, job_id, **kw):
    kw.setdefault("fetch", fake_fetch)
    return run_job(job_id, settings=settings, store=store, storage=storage, device="cpu", **kw)


def test_success_uploads_artifacts_and_records_progress(store, storage, settings):
    job, _ = store.create("https://example.org/m/", None)
    states = []
    convert = FakeConvert(on_layer=lambda stage, layer: states.append(store.get(job.id).state))
    assert run(store, storage, settings, job.id, convert=convert) == JobState.succeeded

    done = store.get(job.id)
    assert done.state == JobState.succeeded
    assert done.progress.percent == 100
    assert done.progress.layers_total == 3
    assert done.summary == {"passed": True, "max_rel_error": 1e-7}
    assert [a.name for a in done.artifacts] == list(ARTIFACT_NAMES)
    assert sorted(storage.list_keys(job_prefix(job.id))) == sorted(f"jobs/{job.id}/{n}" for n in ARTIFACT_NAMES)
    assert {a.name: a.size for a in done.artifacts}["model.safetensors"] == 64
    # The conversion stages show as the job states users see.
    assert JobState.converting in states and JobState.checking in states
    # The options reach the conversion; the device is the worker's choice.
    opts = convert.calls[0]
    assert opts.device == "cpu" and opts.calibration_tokens == 256 and opts.allow_pickle is False
    assert not (Path(settings.work_dir) / job.id).exists()  # work folder removed


def test_redelivered_finished_job_is_not_redone(store, storage, settings):
    job, _ = store.create("https://example.org/m/", None)
    convert = FakeConvert()
    run(store, storage, settings, job.id, convert=convert)
    first = store.get(job.id)
    assert run(store, storage, settings, job.id, convert=convert) == JobState.succeeded
    assert len(convert.calls) == 1
    assert store.get(job.id).updated_at == first.updated_at


def test_job_caught_mid_run_starts_again_cleanly(store, storage, settings):
    job, _ = store.create("https://example.org/m/", None)
    store.claim(job.id)  # as if a worker died after taking it
    stale = Path(settings.work_dir) / job.id / "source" / "stale.bin"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a download")
    assert run(store, storage, settings, job.id, convert=FakeConvert()) == JobState.succeeded
    assert store.get(job.id).attempts == 2


def test_too_many_attempts_fails_instead_of_looping(store, storage, make_settings):
    settings = make_settings(max_attempts=2)
    job, _ = store.create("https://example.org/m/", None)
    store.claim(job.id)
    store.claim(job.id)
    convert = FakeConvert()
    assert run(store, storage, settings, job.id, convert=convert) == JobState.failed
    assert store.get(job.id).error.code == "too_many_attempts"
    assert convert.calls == []


@pytest.mark.parametrize("error, code", [
    (UnsupportedArchitectureError("model_type 'foo' is not supported"), "unsupported_architecture"),
    (InvalidOptionsError("tolerance must be in (0, 1)"), "invalid_options"),
])
def test_conversion_errors_keep_their_code(store, storage, settings, error, code):
    job, _ = store.create("https://example.org/m/", None)
    convert = FakeConvert(raise_at=("converting", 1))
    convert.error = error
    assert run(store, storage, settings, job.id, convert=convert) == JobState.failed
    failed = store.get(job.id)
    assert failed.error.code == code
    assert failed.error.message == error.message
    assert failed.artifacts == [] and storage.list_keys(job_prefix(job.id)) == []


def test_unexpected_errors_are_internal_without_a_trace(store, storage, settings, caplog):
    job, _ = store.create("https://example.org/m/", None)
    convert = FakeConvert(raise_at=("checking", 0))
    convert.error = ZeroDivisionError("secret detail in /srv/path.py")
    assert run(store, storage, settings, job.id, convert=convert) == JobState.failed
    err = store.get(job.id).error
    assert err.code == "internal_error"
    assert "secret" not in err.message and "Traceback" not in err.message and job.id in err.message
    assert "ZeroDivisionError" in caplog.text  # the operators get the details in the log


def test_failed_checks_fail_the_job_but_keep_the_report(store, storage, settings):
    job, _ = store.create("https://example.org/m/", None)
    assert run(store, storage, settings, job.id, convert=FakeConvert(passed=False)) == JobState.failed
    failed = store.get(job.id)
    assert failed.error.code == "check_failed"
    assert failed.summary == {"passed": False, "max_rel_error": 1e-7}
    assert "report.json" in [a.name for a in failed.artifacts]


def test_cancel_while_converting_stops_within_a_layer(store, storage, settings):
    job, _ = store.create("https://example.org/m/", None)
    layers_run = []

    def on_layer(stage, layer):
        layers_run.append((stage, layer))
        if (stage, layer) == ("converting", 0):
            store.request_cancel(job.id)

    convert = FakeConvert(on_layer=on_layer)
    assert run(store, storage, settings, job.id, convert=convert) == JobState.cancelled
    cancelled = store.get(job.id)
    assert cancelled.state == JobState.cancelled and cancelled.error.code == "cancelled"
    assert layers_run[-1] == ("converting", 0)  # the next layer never started
    assert storage.list_keys(job_prefix(job.id)) == []
    assert not store.cancel_requested(job.id)


def test_cancel_during_upload_removes_partial_artifacts(store, storage, settings, monkeypatch):
    job, _ = store.create("https://example.org/m/", None)
    real_upload = storage.upload_job_files

    def upload_then_cancel(job_id, folder, names):
        out = real_upload(job_id, folder, names)
        store.request_cancel(job_id)
        return out

    monkeypatch.setattr(storage, "upload_job_files", upload_then_cancel)
    assert run(store, storage, settings, job.id, convert=FakeConvert()) == JobState.cancelled
    assert storage.list_keys(job_prefix(job.id)) == []


def test_real_fetch_of_a_missing_source_fails_with_its_code(store, storage, settings, tmp_path):
    with serve_directory(tmp_path) as base:
        job, _ = store.create(base + "nothing-here/", None)
        convert = FakeConvert()
        assert run_job(job.id, settings=settings, store=store, storage=storage, device="cpu",
                       convert=convert) == JobState.failed
    failed = store.get(job.id)
    assert failed.error.code == "source_not_found"
    assert convert.calls == []


def test_real_fetch_refuses_an_s3_source_outside_the_owners_scopes(store, storage, make_settings):
    # A job that got past the API some other way (an older API, a hand-written record):
    # bob's job reads alice's artifacts. Even a scope naming the artifacts bucket is no help.
    settings = make_settings(s3_source_scopes=f"*={storage.bucket}, bob=bob-models")
    alice_job, _ = store.create("https://example.org/m/", None, owner="alice")
    mine = f"jobs/{alice_job.id}/config.json"
    storage.client.put_object(Bucket=settings.s3_bucket, Key=mine, Body=b'{"model_type": "gpt2"}')
    job, _ = store.create(f"s3://{settings.s3_bucket}/jobs/{alice_job.id}/", None, owner="bob")
    convert = FakeConvert()
    assert run_job(job.id, settings=settings, store=store, storage=storage, device="cpu",
                   convert=convert) == JobState.failed
    failed = store.get(job.id)
    assert failed.state == JobState.failed and failed.error.code == "source_forbidden"
    assert convert.calls == [] and failed.artifacts == []
    assert storage.list_keys(job_prefix(alice_job.id)) == [mine]  # alice's files are untouched


def test_the_fetch_gets_the_scopes_of_the_jobs_owner(store, storage, make_settings):
    settings = make_settings(s3_source_scopes="alice=models/a, bob=models/b, *=shared-models")
    seen = []

    def recording_fetch(url, dest, limits, progress=None, on_config=None, on_weights=None):
        seen.append(limits.s3_source_rules)
        return fake_fetch(url, dest, limits, progress)

    job, _ = store.create("s3://models/a/", None, owner="alice")
    assert run(store, storage, settings, job.id, fetch=recording_fetch, convert=FakeConvert()) == JobState.succeeded
    assert seen[0].owner == "alice" and seen[0].artifacts_bucket == settings.s3_bucket
    assert [str(s) for s in seen[0].scopes] == ["alice=models/a", "*=shared-models"]


def test_fetch_errors_keep_their_code(store, storage, settings):
    job, _ = store.create("https://example.org/m/", None)

    def refuse(url, dest, limits, progress=None, on_config=None, on_weights=None):
        raise FetchError("url_address_blocked", "the host resolves to a private address")

    assert run(store, storage, settings, job.id, fetch=refuse, convert=FakeConvert()) == JobState.failed
    assert store.get(job.id).error.code == "url_address_blocked"


def test_cancel_during_download(store, storage, settings, monkeypatch):
    monkeypatch.setattr(ProgressReporter, "MIN_INTERVAL", 0.0)  # no throttling: check at once
    job, _ = store.create("https://example.org/m/", None)

    def slow_fetch(url, dest, limits, progress=None, on_config=None, on_weights=None):
        store.request_cancel(job.id)
        progress(10, 100)  # fetch_source lets the callback's exception through
        raise AssertionError("the download should have been stopped")

    assert run(store, storage, settings, job.id, fetch=slow_fetch, convert=FakeConvert()) == JobState.cancelled


def test_unknown_job_is_dropped(store, storage, settings):
    assert run(store, storage, settings, "no-such-job", convert=FakeConvert()) is None


def test_progress_is_throttled_but_keeps_stage_changes(store):
    job, _ = store.create("https://example.org/m/", None)
    store.claim(job.id)
    writes = []
    original = store.advance
    store.advance = lambda *a, **k: writes.append(a) or original(*a, **k)
    reporter = ProgressReporter(store, job.id)
    for done in range(1000):
        reporter.download(done, 10_000)
    reporter.stage("loading", 0, 1)
    assert 1 <= len(writes) <= 3
    assert writes[-1][1] == JobState.converting
    assert store.get(job.id).progress.stage == "loading"


@pytest.mark.parametrize("order", [
    ("loading", "calibrating", "converting", "checking", "writing"),
    ("loading", "calibrating", "converting", "writing", "checking"),
])
def test_progress_never_goes_backwards(store, order):
    job, _ = store.create("https://example.org/m/", None)
    store.claim(job.id)
    reporter = ProgressReporter(store, job.id)
    seen = []
    for stage in order:
        for layer in range(2):
            reporter.stage(stage, layer + 1, 2)
            got = store.get(job.id)
            seen.append((got.progress.percent, ("downloading", "converting", "checking").index(got.state.value)))
    assert seen == sorted(seen)
    assert store.get(job.id).progress.layers_total == 2


def test_worker_parent_never_imports_torch():
    # CUDA must be touched only in the pool's children: the modules the prefork parent
    # imports (the app, and the tasks it includes) must not pull torch in.
    code = "import sys, worker.app, worker.tasks, api.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"


def test_storage_outage_fails_the_job_with_a_clear_code(store, make_settings):
    from deploy.local import free_port
    from shared.storage import Storage

    settings = make_settings(s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    job, _ = store.create("https://example.org/m/", None)
    assert run(store, Storage(settings, quick=True), settings, job.id, convert=FakeConvert()) == JobState.failed
    failed = store.get(job.id)
    assert failed.error.code == "storage_unavailable" and failed.artifacts == []
    assert not (Path(settings.work_dir) / job.id).exists()


# --- faults: the job store and S3 going away ------------------------------------------------


@pytest.fixture
def restartable_redis(tmp_path):
    """A dedicated redis-server that keeps its data on disk, so that it can be stopped
    and started again without losing the job the test created."""
    from contextlib import ExitStack

    from deploy.local import RedisServer, free_port

    with ExitStack() as stack:
        server = RedisServer(free_port(), stack, tmp_path / "redis-logs", data_dir=tmp_path / "redis-data")
        server.start()
        yield server


def test_task_starting_while_redis_is_down_waits_for_it(restartable_redis, make_settings, storage):
    import threading

    from shared.jobs import JobStore, redis_client

    settings = make_settings(redis_url=restartable_redis.url, store_retry_seconds=30)
    store = JobStore(redis_client(settings.redis_url), settings.redis_key_prefix)
    job, _ = store.create("https://example.org/m/")
    restartable_redis.stop()  # the message reached a worker, then Redis went away
    back = threading.Timer(1.5, restartable_redis.start)
    back.start()
    try:
        started = time.monotonic()
        assert run(store, storage, settings, job.id, convert=FakeConvert()) == JobState.succeeded
        waited = time.monotonic() - started
    finally:
        back.join()
    assert waited >= 1.4  # it really waited for Redis, then did the whole job
    done = store.get(job.id)
    assert done.state == JobState.succeeded and done.attempts == 1
    assert sorted(a.name for a in done.artifacts) == sorted(ARTIFACT_NAMES)


def test_task_gives_the_message_back_when_redis_stays_down(make_settings, storage, monkeypatch):
    from celery.exceptions import Reject

    import worker.tasks as tasks
    from deploy.local import free_port
    from shared.jobs import JobStore, redis_client

    settings = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", store_retry_seconds=0.5,
                             device="cpu")
    store = JobStore(redis_client(settings.redis_url), settings.redis_key_prefix)
    monkeypatch.setattr(tasks, "_services", lambda: (settings, store, storage))
    started = time.monotonic()
    with pytest.raises(Reject) as info:
        tasks.convert_job.run("3f0c2a9e-0000-4000-8000-000000000000")
    assert info.value.requeue is True  # back to the queue, not acknowledged and lost
    assert 0.4 <= time.monotonic() - started < 10


def test_progress_writes_failing_do_not_stop_the_job(store, storage, settings, monkeypatch):
    import redis

    job, _ = store.create("https://example.org/m/")
    real_advance, calls = store.advance, []

    def flaky_advance(*args, **kwargs):
        calls.append(args)
        if len(calls) % 2 == 0:
            raise redis.ConnectionError("Redis is restarting")
        return real_advance(*args, **kwargs)

    monkeypatch.setattr(store, "advance", flaky_advance)
    assert run(store, storage, settings, job.id, convert=FakeConvert()) == JobState.succeeded
    assert len(calls) > 4 and store.get(job.id).state == JobState.succeeded


def test_s3_outage_is_retried_with_backoff_then_fails(store, make_settings, caplog):
    import logging

    from deploy.local import free_port
    from shared.storage import Storage

    settings = make_settings(s3_endpoint_url=f"http://127.0.0.1:{free_port()}", storage_attempts=3,
                             storage_retry_base_delay=0.3)
    job, _ = store.create("https://example.org/m/", None)
    caplog.set_level(logging.WARNING, logger="worker.faults")  # with_storage_retries
    started = time.monotonic()
    assert run(store, Storage(settings, quick=True), settings, job.id, convert=FakeConvert()) == JobState.failed
    elapsed = time.monotonic() - started
    failed = store.get(job.id)
    assert failed.error.code == "storage_unavailable"
    assert "gave up after 3 attempts" in failed.error.message
    retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 2  # 3 attempts: 2 waits, of 0.3 s and then 0.6 s (plus jitter)
    assert elapsed >= 0.3 + 0.6


def test_s3_coming_back_within_the_retries_lets_the_job_succeed(store, storage, make_settings, monkeypatch):
    from shared.storage import StorageError

    settings = make_settings(storage_attempts=4, storage_retry_base_delay=0.01)
    job, _ = store.create("https://example.org/m/", None)
    real_upload, failures = storage.upload_job_files, []

    def flaky_upload(job_id, folder, names):
        if len(failures) < 3:
            failures.append(names)
            raise StorageError("upload of x failed: Could not connect to the endpoint URL")
        return real_upload(job_id, folder, names)

    monkeypatch.setattr(storage, "upload_job_files", flaky_upload)
    assert run(store, storage, settings, job.id, convert=FakeConvert()) == JobState.succeeded
    assert len(failures) == 3
    assert sorted(storage.list_keys(job_prefix(job.id))) == sorted(f"jobs/{job.id}/{n}" for n in ARTIFACT_NAMES)


def test_a_superseded_run_leaves_the_job_to_the_newer_one(store, storage, settings):
    job, _ = store.create("https://example.org/m/", None)
    newer_upload = f"jobs/{job.id}/config.json"

    def on_layer(stage, layer):
        if (stage, layer) == ("converting", 1):
            # The message was delivered again and another worker claimed the job.
            store.claim(job.id)
            storage.client.put_object(Bucket=settings.s3_bucket, Key=newer_upload, Body=b"{}")

    assert run(store, storage, settings, job.id, convert=FakeConvert(on_layer=on_layer)) is None
    current = store.get(job.id)
    assert current.attempts == 2 and current.state == JobState.downloading  # the newer run's
    assert storage.list_keys(job_prefix(job.id)) == [newer_upload]  # nothing of it removed


def test_redelivered_job_with_a_pending_cancel_ends_cancelled(store, storage, settings):
    job, _ = store.create("https://example.org/m/", None)
    store.claim(job.id)
    store.request_cancel(job.id)  # asked while running; then that worker died
    convert = FakeConvert()
    assert run(store, storage, settings, job.id, convert=convert) == JobState.cancelled
    assert convert.calls == [] and store.get(job.id).error.code == "cancelled"

"""Reuse of finished conversions in the job task, against real Redis and S3: a stand-in
download (whose files decide the key) and a stand-in conversion that counts its calls."""
import json
from pathlib import Path
from types import SimpleNamespace

from shared.job_options import JobOptions
from shared.jobs import JobState
from shared.storage import job_prefix
from worker.tasks import run_job

WEIGHTS = b"\x07" * 256


class Source:
    """A stand-in for shared.fetch.fetch_source: config.json and model.safetensors. With
    ``declare``, it gives the weights' hashes to on_weights first, as a hub that declares them,
    and notes whether it went on to download the weights."""

    def __init__(self, weights: bytes = WEIGHTS, declare: bool = False):
        self.weights, self.declare = weights, declare
        self.weights_downloaded = 0

    def __call__(self, url, dest: Path, limits, progress=None, on_config=None, on_weights=None):
        import hashlib

        (dest / "config.json").write_text('{"model_type": "gpt2"}')
        if self.declare and on_weights is not None:
            on_weights(dest, {"model.safetensors": hashlib.sha256(self.weights).hexdigest()})
        (dest / "model.safetensors").write_bytes(self.weights)
        self.weights_downloaded += 1
        return dest


class CountingConvert:
    def __init__(self):
        self.calls = 0

    def __call__(self, source_dir, out_dir, opts, progress=None, should_cancel=None):
        self.calls += 1
        out = Path(out_dir)
        out.mkdir(parents=True)
        (out / "config.json").write_text('{"converted": true}')
        (out / "model.safetensors").write_bytes((Path(source_dir) / "model.safetensors").read_bytes()[::-1])
        (out / "report.json").write_text(json.dumps({"passed": True, "call": self.calls}))
        progress("checking", 1, 1)
        return SimpleNamespace(passed=True, summary={"passed": True, "call": self.calls}, timings={})


def submit_and_run(store, storage, settings, convert, fetch=None, owner="alice", force=False, options=None):
    job, _ = store.create("https://example.org/m/", options, owner=owner, force=force)
    state = run_job(job.id, settings=settings, store=store, storage=storage, device="cpu",
                    fetch=fetch or Source(), convert=convert)
    return state, store.get(job.id)


def body(storage, key: str) -> bytes:
    return storage.client.get_object(Bucket=storage.bucket, Key=key)["Body"].read()


def test_the_same_job_again_copies_the_artifacts_of_the_first(store, storage, settings):
    convert = CountingConvert()
    state, first = submit_and_run(store, storage, settings, convert)
    assert state == JobState.succeeded and first.reused_from is None and convert.calls == 1

    state, second = submit_and_run(store, storage, settings, convert)
    assert state == JobState.succeeded and convert.calls == 1  # not converted again
    assert second.reused_from == first.id
    assert second.summary == first.summary and second.progress.stage == "reused" and second.progress.percent == 100
    # Its own objects, with the first job's sizes and hashes.
    assert [(a.name, a.size, a.sha256) for a in second.artifacts] == [(a.name, a.size, a.sha256) for a in first.artifacts]
    assert all(a.key == job_prefix(second.id) + a.name for a in second.artifacts)
    # The first job's objects going away (expiry, deletion) leaves the second's intact.
    storage.delete_prefix(job_prefix(first.id))
    for artifact in second.artifacts:
        assert len(body(storage, artifact.key)) == artifact.size

    # The second job is now the one to reuse (the first's artifacts are gone).
    state, third = submit_and_run(store, storage, settings, convert)
    assert third.reused_from == second.id and convert.calls == 1


def test_other_options_other_weights_or_another_owner_convert(store, storage, settings):
    convert = CountingConvert()
    _, first = submit_and_run(store, storage, settings, convert)
    _, other_options = submit_and_run(store, storage, settings, convert, options=JobOptions(seed=7))
    _, other_weights = submit_and_run(store, storage, settings, convert, fetch=Source(weights=b"\x08" * 256))
    _, bobs = submit_and_run(store, storage, settings, convert, owner="bob")
    _, anonymous = submit_and_run(store, storage, settings, convert, owner=None)
    assert convert.calls == 5
    assert all(j.state == JobState.succeeded and j.reused_from is None
               for j in (other_options, other_weights, bobs, anonymous))
    # Each owner reuses their own job only.
    _, bobs_again = submit_and_run(store, storage, settings, convert, owner="bob")
    assert bobs_again.reused_from == bobs.id and convert.calls == 5


def test_force_converts_again(store, storage, settings):
    convert = CountingConvert()
    _, first = submit_and_run(store, storage, settings, convert)
    state, forced = submit_and_run(store, storage, settings, convert, force=True)
    assert state == JobState.succeeded and forced.reused_from is None and forced.force is True
    assert convert.calls == 2
    assert json.loads(body(storage, job_prefix(forced.id) + "report.json"))["call"] == 2
    # A forced job's own output is what the next job reuses.
    _, after = submit_and_run(store, storage, settings, convert)
    assert after.reused_from == forced.id and convert.calls == 2


def test_artifacts_of_the_first_job_gone_means_a_conversion(store, storage, settings):
    convert = CountingConvert()
    _, first = submit_and_run(store, storage, settings, convert)
    storage.client.delete_object(Bucket=storage.bucket, Key=job_prefix(first.id) + "model.safetensors")
    state, second = submit_and_run(store, storage, settings, convert)
    assert state == JobState.succeeded and second.reused_from is None and convert.calls == 2
    assert {a.name for a in second.artifacts} == {"config.json", "model.safetensors", "report.json"}


def test_failed_jobs_are_never_reused(store, storage, settings):
    class Failing(CountingConvert):
        def __call__(self, *args, **kwargs):
            report = super().__call__(*args, **kwargs)
            return SimpleNamespace(passed=False, summary=report.summary, timings={})

    failing = Failing()
    state, first = submit_and_run(store, storage, settings, failing)
    assert state == JobState.failed
    convert = CountingConvert()
    state, second = submit_and_run(store, storage, settings, convert)
    assert state == JobState.succeeded and second.reused_from is None and convert.calls == 1


def test_declared_weight_hashes_reuse_without_downloading_the_weights(store, storage, settings):
    convert = CountingConvert()
    hub = Source(declare=True)
    _, first = submit_and_run(store, storage, settings, convert, fetch=hub)
    assert hub.weights_downloaded == 1 and first.reused_from is None
    state, second = submit_and_run(store, storage, settings, convert, fetch=hub)
    assert state == JobState.succeeded and second.reused_from == first.id
    assert hub.weights_downloaded == 1 and convert.calls == 1
    # The key from the hub's hashes is the one hashing the download gives: a plain download of
    # the same files reuses it too.
    _, plain = submit_and_run(store, storage, settings, convert, fetch=Source())
    assert plain.reused_from == second.id and convert.calls == 1


def test_the_preflight_estimate_is_made_once_per_config_and_options(store, storage, make_settings, monkeypatch):
    import shared.conversion.preflight as preflight
    import worker.tasks

    made = []

    def estimate(directory, options):
        made.append(options.seed)
        return preflight.Estimate(parameters=1, largest_module_bytes=1, peak_memory_bytes=2000, disk_bytes=1,
                                  ffn_sites=1)

    monkeypatch.setattr(preflight, "estimate", estimate)
    monkeypatch.setattr(worker.tasks, "_ESTIMATES", {})

    class Checked(Source):
        def __call__(self, url, dest, limits, progress=None, on_config=None, on_weights=None):
            (dest / "config.json").write_text('{"model_type": "gpt2"}')
            on_config(dest)
            return super().__call__(url, dest, limits, progress, None, on_weights)

    convert = CountingConvert()
    settings = make_settings(worker_memory_bytes=10_000)
    for options in (None, None, JobOptions(seed=3)):
        state, _ = submit_and_run(store, storage, settings, convert, fetch=Checked(), force=True, options=options)
        assert state == JobState.succeeded
    assert made == [0, 3]  # the second job's estimate came from the first's
    # The budgets are checked against a remembered estimate too.
    state, refused = submit_and_run(store, storage, make_settings(worker_memory_bytes=1000), convert, fetch=Checked())
    assert state == JobState.failed and refused.error.code == "too_large_for_worker" and made == [0, 3]

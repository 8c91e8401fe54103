"""The job store against a real Redis."""
import threading

import pytest

from shared.job_options import JobOptions
from shared.jobs import (
    Artifact, InvalidCursor, JobError, JobState, JobStore, Progress, decode_cursor, encode_cursor, redis_client,
)


def test_create_and_get_round_trip(store):
    opts = JobOptions.model_validate({"dtype": "float64", "calibration": {"token_ids": [[1, 2, 3]]}})
    job, created = store.create("https://example.org/m/", opts)
    assert created
    got = store.get(job.id)
    assert got is not None
    assert got.state == JobState.queued
    assert got.source_url == "https://example.org/m/"
    assert got.options == opts
    assert got.progress.percent == 0
    assert got.created_at.tzinfo is not None
    assert store.get("no-such-job") is None


def test_idempotency_key_returns_first_job(store):
    first, created1 = store.create("https://a/", idempotency_key="k1")
    second, created2 = store.create("https://b/", idempotency_key="k1")
    other, created3 = store.create("https://a/", idempotency_key="k2")
    assert created1 and not created2 and created3
    assert second.id == first.id and second.source_url == "https://a/"
    assert other.id != first.id
    # The key is scoped by owner: another owner's identical key makes a new job.
    theirs, created4 = store.create("https://a/", idempotency_key="k1", owner="someone-else")
    assert created4 and theirs.id != first.id


def test_idempotency_key_race_makes_one_job(store, settings):
    results = []

    def submit():
        s = JobStore(redis_client(settings.redis_url), settings.redis_key_prefix)
        results.append(s.create("https://a/", idempotency_key="race"))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1


def test_transitions_and_indexes(store):
    job, _ = store.create("https://a/")
    claimed = store.claim(job.id)
    assert claimed.state == JobState.downloading and claimed.attempts == 1 and claimed.started_at
    advanced = store.advance(job.id, JobState.converting, Progress(percent=40, stage="converting",
                                                                    layers_done=1, layers_total=2))
    assert advanced.state == JobState.converting and advanced.progress.layers_done == 1
    assert [j.id for j in store.list(state=JobState.converting)[0]] == [job.id]
    assert store.list(state=JobState.queued)[0] == []

    arts = [Artifact(name="config.json", size=10, key=f"jobs/{job.id}/config.json")]
    done = store.finish(job.id, JobState.succeeded, summary={"passed": True}, artifacts=arts)
    assert done.state == JobState.succeeded and done.progress.percent == 100 and done.finished_at
    assert done.artifacts == arts
    assert [j.id for j in store.list(state=JobState.succeeded)[0]] == [job.id]
    assert store.list(state=JobState.converting)[0] == []
    # A finished job stays finished: late progress and a second claim change nothing.
    assert store.advance(job.id, JobState.checking, Progress(percent=80)).state == JobState.succeeded
    assert store.claim(job.id) is None
    assert store.finish(job.id, JobState.failed, error=JobError(code="x", message="y")).state == JobState.succeeded
    with pytest.raises(ValueError):
        store.finish(job.id, JobState.converting)


def test_finished_jobs_expire_with_their_idempotency_key(make_settings):
    settings = make_settings()
    client = redis_client(settings.redis_url)
    store = JobStore(client, settings.redis_key_prefix, ttl_seconds=120)
    job, _ = store.create("https://a/", idempotency_key="ttl")
    assert client.ttl(f"{settings.redis_key_prefix}:job:{job.id}") == -1  # running jobs never expire
    store.finish(job.id, JobState.failed, error=JobError(code="boom", message="it broke"))
    assert 0 < client.ttl(f"{settings.redis_key_prefix}:job:{job.id}") <= 120
    idem_keys = list(client.scan_iter(f"{settings.redis_key_prefix}:idem:*"))
    assert len(idem_keys) == 1 and 0 < client.ttl(idem_keys[0]) <= 120
    # Once expired, the job disappears from listings and its index entries are pruned.
    client.delete(f"{settings.redis_key_prefix}:job:{job.id}")
    assert store.list()[0] == [] and store.list(state=JobState.failed)[0] == []
    assert client.zcard(f"{settings.redis_key_prefix}:jobs") == 0


def test_list_paginates_newest_first_without_gaps(store):
    ids = [store.create(f"https://a/{i}")[0].id for i in range(7)]
    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = store.list(cursor=cursor, limit=3)
        pages += 1
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(ids))


def test_list_filters_by_state(store):
    a, _ = store.create("https://a/")
    b, _ = store.create("https://b/")
    store.request_cancel(a.id)
    assert [j.id for j in store.list(state=JobState.cancelled)[0]] == [a.id]
    assert [j.id for j in store.list(state=JobState.queued)[0]] == [b.id]


def test_cursor_rejects_garbage():
    member = "000001700000000:123e4567-e89b-12d3-a456-426614174000"
    assert decode_cursor(encode_cursor(member)) == member
    for bad in ("!!!", encode_cursor("jobs:*"), encode_cursor("1:2")):
        with pytest.raises(InvalidCursor):
            decode_cursor(bad)


def test_cancel_queued_running_and_finished(store):
    queued, _ = store.create("https://a/")
    cancelled = store.request_cancel(queued.id)
    assert cancelled.state == JobState.cancelled and cancelled.error.code == "cancelled"
    assert store.claim(queued.id) is None  # a worker picking it up later does nothing

    running, _ = store.create("https://b/")
    store.claim(running.id)
    assert not store.cancel_requested(running.id)
    flagged = store.request_cancel(running.id)
    assert flagged.state == JobState.downloading and flagged.cancel_requested
    assert store.cancel_requested(running.id)
    store.finish(running.id, JobState.cancelled, error=JobError(code="cancelled", message="stopped"))
    assert not store.cancel_requested(running.id)  # the flag goes with the finished job

    done, _ = store.create("https://c/")
    store.claim(done.id)
    store.finish(done.id, JobState.succeeded)
    assert store.request_cancel(done.id).state == JobState.succeeded
    assert store.request_cancel("missing") is None


def test_concurrent_updates_lose_nothing(store, settings):
    job, _ = store.create("https://a/")
    store.claim(job.id)

    def bump():
        s = JobStore(redis_client(settings.redis_url), settings.redis_key_prefix)
        for _ in range(20):
            s.update(job.id, lambda j: j.model_copy(update={"attempts": j.attempts + 1}))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get(job.id).attempts == 1 + 80


def test_listing_by_owner(store):
    a1, _ = store.create("https://a/1", owner="alice")
    b1, _ = store.create("https://b/1", owner="bob")
    a2, _ = store.create("https://a/2", owner="alice")
    anon, _ = store.create("https://x/", owner=None)
    store.request_cancel(a1.id)
    assert [j.id for j in store.list(owner="alice")[0]] == [a2.id, a1.id]
    assert [j.id for j in store.list(owner="bob")[0]] == [b1.id]
    assert [j.id for j in store.list(owner=None)[0]] == [anon.id]
    assert [j.id for j in store.list(owner="alice", state=JobState.cancelled)[0]] == [a1.id]
    assert [j.id for j in store.list(owner="alice", state=JobState.queued)[0]] == [a2.id]
    assert store.list(owner="carol")[0] == []
    assert len(store.list()[0]) == 4  # without an owner: every job (operators)
    page, cursor = store.list(owner="alice", limit=1)
    assert [j.id for j in page] == [a2.id]
    assert [j.id for j in store.list(owner="alice", limit=1, cursor=cursor)[0]] == [a1.id]


def test_release_idempotency_key(store):
    job, _ = store.create("https://a/", idempotency_key="k", owner="alice")
    store.release_idempotency_key(job)
    fresh, created = store.create("https://a/", idempotency_key="k", owner="alice")
    assert created and fresh.id != job.id
    store.release_idempotency_key(job)  # names another job now: left alone
    assert store.create("https://a/", idempotency_key="k", owner="alice")[0].id == fresh.id


def test_writes_of_a_superseded_attempt_change_nothing(store):
    job, _ = store.create("https://a/")
    first = store.claim(job.id).attempts
    second = store.claim(job.id).attempts  # the message was delivered again
    assert (first, second) == (1, 2)
    stale = store.advance(job.id, JobState.checking, Progress(percent=80), attempt=first)
    assert stale.state == JobState.downloading and stale.attempts == 2
    assert store.finish(job.id, JobState.failed, error=JobError(code="x", message="y"), attempt=first).state \
        == JobState.downloading
    done = store.finish(job.id, JobState.succeeded, attempt=second)
    assert done.state == JobState.succeeded


def test_create_and_finish_prune_expired_members_of_their_indexes(store):
    """The pruning on every create and finish (one server-side script): index members of
    expired records go, live ones stay."""
    old, _ = store.create("https://a/old", owner="alice")
    store.finish(old.id, JobState.failed, error=JobError(code="boom", message="it broke"))
    store.redis.delete(store._job_key(old.id))  # as if its TTL had run out
    new, _ = store.create("https://a/new", owner="alice")
    assert store.redis.zrange(f"{store.prefix}:jobs", 0, -1) == [new.index_member]
    assert store.redis.zrange(store._owner_index("alice"), 0, -1) == [new.index_member]
    failed_index = store._state_index(JobState.failed)
    assert store.redis.zrange(failed_index, 0, -1) == [old.index_member]  # not pruned by a create
    store.finish(new.id, JobState.failed, error=JobError(code="boom", message="it broke"))
    assert store.redis.zrange(failed_index, 0, -1) == [new.index_member]
    assert store.redis.zrange(store._owner_index("alice", JobState.failed), 0, -1) == [new.index_member]

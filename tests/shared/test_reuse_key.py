"""The reuse key (source file hashes + effective options + converter identity) and its
per-owner index in Redis."""
import hashlib

import pytest

from shared.job_options import JobOptions
from shared.reuse import ReuseIndex, converter_identity, hash_files, reuse_key

FILES = {"config.json": "a" * 64, "model.safetensors": "b" * 64}


def test_the_key_follows_files_options_and_converter():
    base = reuse_key(FILES, JobOptions(), "conv 1")
    assert base == reuse_key(dict(reversed(FILES.items())), JobOptions(), "conv 1")  # order of files: no matter
    # Defaults written out or left out: the same effective options, the same key.
    assert base == reuse_key(FILES, JobOptions(dtype="float32", seed=0, checks=["local", "propagated", "greedy"]),
                             "conv 1")
    assert base == reuse_key(FILES, JobOptions(tolerance=1e-5), "conv 1")  # float32's default tolerance
    different = [
        reuse_key({**FILES, "model.safetensors": "c" * 64}, JobOptions(), "conv 1"),  # other weights
        reuse_key({**FILES, "tokenizer.json": "d" * 64}, JobOptions(), "conv 1"),  # one more file
        reuse_key(FILES, JobOptions(seed=1), "conv 1"),
        reuse_key(FILES, JobOptions(tolerance=1e-4), "conv 1"),
        reuse_key(FILES, JobOptions(dtype="float64"), "conv 1"),
        reuse_key(FILES, JobOptions(calibration={"tokens": 64, "seq_len": 16}), "conv 1"),
        reuse_key(FILES, JobOptions(calibration={"token_ids": [[1, 2, 3]]}), "conv 1"),
        reuse_key(FILES, JobOptions(), "conv 2"),  # another converter release
    ]
    assert len({base, *different}) == len(different) + 1


def test_the_converter_identity_names_the_converter_and_format_versions(monkeypatch):
    from importlib import import_module

    # By name: the package's `convert` attribute is the function, not the module.
    convert, fmt = import_module("shared.conversion.convert"), import_module("shared.conversion.format")

    before = converter_identity()
    assert f"converter {convert.CONVERTER_VERSION}" in before and f"format {fmt.FORMAT_VERSION}" in before
    converter_identity.cache_clear()
    try:
        monkeypatch.setattr(convert, "CONVERTER_VERSION", convert.CONVERTER_VERSION + ".1")
        bumped_converter = converter_identity()
        converter_identity.cache_clear()
        monkeypatch.setattr(fmt, "FORMAT_VERSION", fmt.FORMAT_VERSION + 1)
        bumped_format = converter_identity()
    finally:
        converter_identity.cache_clear()
    keys = {reuse_key(FILES, JobOptions(), identity) for identity in (before, bumped_converter, bumped_format)}
    assert len(keys) == 3
    # The default identity is the live one.
    monkeypatch.undo()
    assert reuse_key(FILES, JobOptions()) == reuse_key(FILES, JobOptions(), before)


def test_hash_files_hashes_every_file_by_relative_path(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "config.json").write_bytes(b"{}")
    (tmp_path / "sub" / "w.safetensors").write_bytes(b"\x00" * 10)
    assert hash_files(tmp_path) == {
        "config.json": hashlib.sha256(b"{}").hexdigest(),
        "sub/w.safetensors": hashlib.sha256(b"\x00" * 10).hexdigest(),
    }


@pytest.fixture
def index(settings):
    from shared.jobs import redis_client

    client = redis_client(settings.redis_url)
    yield ReuseIndex(client, settings.redis_key_prefix, ttl_seconds=120)
    keys = list(client.scan_iter(f"{settings.redis_key_prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_the_index_is_per_owner_and_expires(index):
    key = reuse_key(FILES, JobOptions(), "conv 1")
    index.remember("alice", key, "job-a")
    assert index.find("alice", key) == "job-a"
    assert index.find("bob", key) is None and index.find(None, key) is None
    index.remember(None, key, "job-anon")
    assert index.find(None, key) == "job-anon" and index.find("alice", key) == "job-a"
    index.remember("alice", key, "job-a2")  # the latest succeeded job wins
    assert index.find("alice", key) == "job-a2"
    ttl = index.redis.ttl(index._key("alice", key))
    assert 0 < ttl <= 120

"""Reuse of finished conversions: the same source, options and converter give the same
checkpoint, so a job whose key matches an earlier succeeded job of the same owner takes
copies of that job's artifacts instead of converting again.

The key is the SHA-256 of a canonical JSON document:

* ``files``: the SHA-256 of every file of the source as fetched (weights, config.json,
  the tokenizer's files: all of them change the checkpoint), by relative path. For
  hf:// sources the weights' hashes come from the hub's metadata, before any download.
* ``options``: the job's options with their defaults filled in (shared.job_options; the
  tolerance's default comes from the conversion library's, per dtype).
* ``converter``: the package version, the converter version and the format version;
  a release that changes any of them never reuses an older release's output.

Redis layout (under the settings' ``redis_key_prefix``, ``p``):

    p:reuse:{o}:{key}   the id of the owner's latest succeeded job with that key (o: a
                        hash of the owner); expires with that job's record

Keys are per owner on purpose: a user never learns, nor gets, another user's job.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Optional

import redis

from shared.job_options import JobOptions
from shared.storage import file_sha256


@lru_cache
def converter_identity() -> str:
    """Package, converter and format versions: a change to any of them changes every key."""
    from importlib.metadata import PackageNotFoundError, version

    # Imported here: shared.conversion pulls in torch, which only the worker needs.
    from shared.conversion.convert import CONVERTER_VERSION
    from shared.conversion.format import FORMAT_VERSION

    try:
        package = version("attnonly")
    except PackageNotFoundError:
        package = "0+unknown"
    return f"attnonly {package}; converter {CONVERTER_VERSION}; format {FORMAT_VERSION}"


def hash_files(directory: Path) -> dict[str, str]:
    """Relative POSIX path -> hex SHA-256 of every file under ``directory``."""
    return {p.relative_to(directory).as_posix(): file_sha256(p)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def reuse_key(files: Mapping[str, str], options: JobOptions, converter: Optional[str] = None) -> str:
    """The key of a conversion of ``files`` (path -> sha256) with ``options``."""
    from shared.conversion.options import DEFAULT_TOLERANCE

    # mode="json" with every default written out, the tolerance's too (it depends on the
    # dtype): an option left out and the same option given at its default make the same key.
    effective = options.model_dump(mode="json")
    if effective["tolerance"] is None:
        effective["tolerance"] = DEFAULT_TOLERANCE[options.dtype]
    document = {
        "files": dict(sorted(files.items())),
        "options": effective,
        "converter": converter if converter is not None else converter_identity(),
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ReuseIndex:
    """key -> job id, per owner, in Redis."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_seconds: int):
        self.redis, self.prefix, self.ttl_seconds = client, prefix, ttl_seconds

    def _key(self, owner: Optional[str], key: str) -> str:
        # Hashed like the job store's owner indexes: owner names never become key syntax.
        tag = "anonymous" if owner is None else hashlib.sha256(owner.encode()).hexdigest()[:24]
        return f"{self.prefix}:reuse:{tag}:{key}"

    def find(self, owner: Optional[str], key: str) -> Optional[str]:
        return self.redis.get(self._key(owner, key))

    def remember(self, owner: Optional[str], key: str, job_id: str) -> None:
        """The latest succeeded job wins: its artifacts are the ones that live longest."""
        self.redis.set(self._key(owner, key), job_id, ex=self.ttl_seconds)

"""The worker's side of reusing finished conversions (the key and its index: shared/reuse.py).

A job learns its key as soon as the hashes of its source are known: for hf:// sources whose
hub declares the weights' SHA-256, from fetch's ``on_weights`` hook, before any weights are
downloaded; otherwise by hashing the downloaded files. If an earlier succeeded job of the same
owner has that key and its artifacts are all still in S3, ``Reusable`` stops the pipeline
there (and the fetch with it) and the worker copies them (worker.tasks). ``force`` jobs skip
the look-up. Every succeeded job then records its key, so that the next one can reuse it.

The look-up is an optimisation: a Redis or S3 failure during it means "convert".
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import redis

from shared.jobs import Job, JobState, JobStore
from shared.reuse import ReuseIndex, hash_files, reuse_key
from shared.settings import Settings
from shared.storage import Storage, StorageError, job_prefix

log = logging.getLogger(__name__)


class Reusable(Exception):
    """An earlier job converted the same: raised out of the fetch to stop it."""

    def __init__(self, prior: Job):
        super().__init__(prior.id)
        self.prior = prior


class ReuseCheck:
    def __init__(self, job: Job, store: JobStore, storage: Storage, settings: Settings):
        self.job, self.store, self.storage = job, store, storage
        self.index = ReuseIndex(store.redis, settings.redis_key_prefix, settings.job_ttl_seconds)
        self.key: Optional[str] = None

    def weights_declared(self, directory: Path, weights: dict[str, str]) -> None:
        """fetch's on_weights: every file but the weights is in ``directory``; the hub gave the
        weights' hashes. The same key as hashing the whole download would give."""
        self._decide({**hash_files(directory), **weights})

    def downloaded(self, directory: Path) -> None:
        """After the download, unless the hub's hashes decided already."""
        if self.key is None:
            self._decide(hash_files(directory))

    def remember(self) -> None:
        """The job succeeded with its own conversion or copies: later jobs may reuse it."""
        if self.key is None:
            return
        try:
            self.index.remember(self.job.owner, self.key, self.job.id)
        except redis.RedisError as exc:
            log.warning("job %s: not recorded for reuse, the job store is unreachable: %s", self.job.id, exc)

    def _decide(self, files: dict[str, str]) -> None:
        self.key = reuse_key(files, self.job.options)
        if self.job.force:
            return
        prior = self._reusable()
        if prior is not None:
            raise Reusable(prior)

    def _reusable(self) -> Optional[Job]:
        try:
            prior_id = self.index.find(self.job.owner, self.key)
            prior = self.store.get(prior_id) if prior_id not in (None, self.job.id) else None
        except redis.RedisError as exc:
            log.warning("job %s: no reuse look-up, the job store is unreachable: %s", self.job.id, exc)
            return None
        # The index is per owner already; checked again because another owner's job must never leak.
        if prior is None or prior.state != JobState.succeeded or prior.owner != self.job.owner or not prior.artifacts:
            return None
        try:
            present = set(self.storage.list_keys(job_prefix(prior.id)))  # one request, whatever the count
            missing = [a.name for a in prior.artifacts if a.key not in present]
        except StorageError as exc:
            log.warning("job %s: cannot check job %s's artifacts (%s); converting", self.job.id, prior.id, exc.message)
            return None
        if missing:
            log.info("job %s: job %s converted the same but its %s are gone; converting",
                     self.job.id, prior.id, ", ".join(missing))
            return None
        return prior

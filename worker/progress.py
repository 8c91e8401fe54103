"""A job's progress as the worker records it: stage callbacks become job-store writes."""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from shared import webhook_notify
from shared.jobs import JobState, JobStore, Progress
from worker.faults import STORE_ERRORS, JobCancelled, Superseded

log = logging.getLogger(__name__)

# The part of the progress bar each stage fills, and the job state it shows as:
# stage -> (state, start %, end %). The conversion may write its weights before or after
# its checks; the reporter never moves the bar or the state backwards, so either order
# reads as steady progress.
PHASES: dict[str, tuple[JobState, float, float]] = {
    "downloading": (JobState.downloading, 0, 10),
    "loading": (JobState.converting, 10, 15),
    "calibrating": (JobState.converting, 15, 55),
    "writing": (JobState.converting, 55, 65),
    "checking": (JobState.checking, 65, 95),
    "uploading": (JobState.uploading, 95, 100),
    "reused": (JobState.uploading, 10, 100),  # copying an earlier job's artifacts (worker/reuse.py)
}
STATE_ORDER = (JobState.downloading, JobState.converting, JobState.checking, JobState.uploading)
LAYER_STAGES = ("calibrating", "writing", "checking")


class ProgressReporter:
    """Turns stage callbacks into job-store writes, at most a few a second."""

    MIN_INTERVAL = 0.5  # seconds between writes that only move the percentage

    def __init__(self, store: JobStore, job_id: str, cancelled: Optional[Callable[[], bool]] = None,
                 attempt: Optional[int] = None):
        self.store, self.job_id, self.cancelled, self.attempt = store, job_id, cancelled, attempt
        self._last: Optional[Progress] = None
        self._last_state: Optional[JobState] = None
        self._last_time = 0.0

    def stage(self, stage: str, done: int, total: int) -> bool:
        """Record progress; returns whether it was written (False: throttled)."""
        state, start, end = PHASES.get(stage, (JobState.converting, 30, 60))
        fraction = min(1.0, done / total) if total else 0.0
        percent = round(start + (end - start) * fraction, 1)
        if self._last is not None:
            state = max(state, self._last_state, key=STATE_ORDER.index)
            percent = max(percent, self._last.percent)
        layers_done, layers_total = (
            (done, total) if stage in LAYER_STAGES else
            (self._last.layers_done, self._last.layers_total) if self._last else (None, None)
        )
        progress = Progress(
            percent=percent, stage=stage,
            layers_done=layers_done, layers_total=layers_total,
        )
        now = time.monotonic()
        important = (
            self._last is None or state != self._last_state or stage != self._last.stage
            or (total and done == total) or progress.layers_done != self._last.layers_done
        )
        if not important and now - self._last_time < self.MIN_INTERVAL:
            return False
        try:
            stored = self.store.advance(self.job_id, state, progress, attempt=self.attempt)
        except STORE_ERRORS as exc:
            # Progress is not worth stopping a conversion for: the next write catches up.
            log.warning("job %s: progress not recorded, the job store is unreachable: %s", self.job_id, exc)
            return False
        if stored is not None and self.attempt is not None and stored.attempts != self.attempt:
            raise Superseded()
        self._last, self._last_state, self._last_time = progress, state, now
        if stored is not None and not stored.state.finished:
            webhook_notify.job_progress(stored, done, total)
        return True

    def download(self, done: int, total: Optional[int]) -> None:
        # Without a Content-Length the bar stays at the start of the download phase.
        wrote = self.stage("downloading", done if total else 0, total or 0)
        # fetch_source lets an exception from its progress callback through (after
        # cleaning up): that is how a cancel stops a long download. Checked only as
        # often as progress is written, to keep Redis round trips off the byte loop.
        if wrote and self.cancelled is not None and self.cancelled():
            raise JobCancelled()

"""Bytes downloaded over the whole fetch, counted against its budget and deadline as they
stream in; the not-found error remotes raise for optional files."""
from __future__ import annotations

import time
from pathlib import Path

from shared.safefiles import FetchError

from .limits import Progress

_PROGRESS_INTERVAL_S = 0.25


class Meter:
    """Bytes downloaded over the whole fetch: the size cap and the progress callback."""

    def __init__(self, limit: int, progress: Progress | None, deadline_seconds: float | None = None):
        self.limit, self.progress, self.deadline_seconds = limit, progress, deadline_seconds
        self.deadline = None if deadline_seconds is None else time.monotonic() + deadline_seconds
        self.done = 0
        self.total: int | None = None
        self._last_report = 0.0

    def expect(self, declared: int | None) -> None:
        # A declared size over the budget fails before any body byte is read;
        # the running count below still catches bodies that lie or declare nothing.
        if declared is not None and self.done + declared > self.limit:
            raise self._too_large(self.done + declared)

    def add(self, n: int) -> None:
        self.done += n
        if self.done > self.limit:
            raise self._too_large(self.done)
        self.check_deadline()
        self.report(force=False)

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise FetchError("download_timeout", f"the download did not finish within its deadline of "
                                                 f"{self.deadline_seconds:g} s ({self.done} bytes arrived)")

    def report(self, force: bool) -> None:
        now = time.monotonic()
        if self.progress and (force or now - self._last_report >= _PROGRESS_INTERVAL_S):
            self._last_report = now
            self.progress(self.done, self.total)

    def _too_large(self, size: int) -> FetchError:
        return FetchError("download_too_large",
                          f"the download exceeds the limit of {self.limit} bytes (reached {size})")


def write_stream(chunks, dest: Path, meter: Meter, cap: tuple[int, FetchError] | None) -> None:
    """Stream chunks to `dest`, counting every byte against the budget (and a per-file cap)."""
    written = 0
    with open(dest, "xb") as out:
        for chunk in chunks:
            written += len(chunk)
            if cap and written > cap[0]:
                raise cap[1]
            meter.add(len(chunk))
            out.write(chunk)
    meter.report(force=True)


class NotFound(FetchError):
    """404 / no such key: callers catch it for optional files; uncaught it is source_not_found."""


def not_found(what: str) -> NotFound:
    return NotFound("source_not_found", f"{what} does not exist (HTTP 404 / no such key)")


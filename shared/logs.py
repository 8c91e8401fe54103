"""Log lines of the API and the worker: one JSON object per line (``ATTNONLY_LOG_FORMAT=json``,
what the containers use) or plain text. A line about a job carries ``job_id`` and ``owner``
as fields: from ``job_context`` (the worker wraps each job in it) or from
``extra=job_fields(job_id, owner)`` on the call.

What goes into a line is what the code logs: secrets (API keys, source credentials, the
credentials and signing keys) are never passed to a logger; they live in SecretStr values,
whose text is "**********".
"""
from __future__ import annotations

import functools
import logging
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, TypeVar

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# uvicorn puts an ANSI-coloured copy of each message on its records.
_NOT_FIELDS = [*RESERVED_ATTRS, "color_message", "taskName"]
# The loggers uvicorn configures with handlers of its own: theirs go through ours instead.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")

F = TypeVar("F", bound=Callable)


@dataclass
class _JobFields:
    job_id: str
    owner: Optional[str] = None


_current: ContextVar[Optional[_JobFields]] = ContextVar("attnonly_job_log_fields", default=None)


def job_fields(job_id: str, owner: Optional[str]) -> dict[str, Optional[str]]:
    """For ``extra=``, on a line about a job logged outside a job_context."""
    return {"job_id": job_id, "owner": owner}


@contextmanager
def job_context(job_id: str, owner: Optional[str] = None) -> Iterator[None]:
    """Lines logged inside (in this thread or task) are about job ``job_id``."""
    token = _current.set(_JobFields(job_id, owner))
    try:
        yield
    finally:
        _current.reset(token)


def about_job(func: F) -> F:
    """Run ``func(job_id, ...)`` inside a job_context of its first argument."""

    @functools.wraps(func)
    def wrapper(job_id: str, *args, **kwargs):
        with job_context(job_id):
            return func(job_id, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def set_owner(owner: Optional[str]) -> None:
    """The owner of the current job_context's job, once its record has been read."""
    fields = _current.get()
    if fields is not None:
        fields.owner = owner


class JobFieldsFilter(logging.Filter):
    """Adds the current job's job_id and owner to each record that has none of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _current.get()
        if fields is not None and not hasattr(record, "job_id"):
            record.job_id, record.owner = fields.job_id, fields.owner
        return True


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(
            "{asctime}{levelname}{name}{message}", style="{", reserved_attrs=_NOT_FIELDS,
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    return logging.Formatter(TEXT_FORMAT)


class _Handler(logging.StreamHandler):
    """Ours, so that configuring again replaces it instead of adding a second one. Writes to
    whatever sys.stderr is at the time (as logging's last-resort handler does), so that a
    redirected stderr (a test capturing it) gets the lines."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def configure(log_format: str, level: int | str = logging.INFO) -> logging.Handler:
    """One handler on the root logger, to stderr, in ``log_format`` (returned); uvicorn's
    loggers propagate to it. Handlers others put on the root logger (pytest's) stay."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    handler = _Handler()
    handler.addFilter(JobFieldsFilter())
    handler.setFormatter(formatter(log_format))
    root.addHandler(handler)
    root.setLevel(level)
    for name in UVICORN_LOGGERS:
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    return handler

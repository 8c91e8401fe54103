"""A client of the conversion service's HTTP API (httpx; no torch needed by this module).

    from shared.conversion.client import Client

    with Client("http://localhost:8000", key) as api:
        job = api.submit("https://models.example.org/gpt2-small/", {"dtype": "float32"})
        job = api.wait(job.id, on_progress=lambda j: print(j.state, j.progress.percent))
        if job.state == "succeeded":
            files = api.download(job.id, "out/")

Every failure is a ``ClientError(code, message, status)``: ``code`` and ``message`` are the
API's ``{"error": {"code", "message"}}`` when it answered one, ``status`` its HTTP status;
``status`` is None for what happened on this side (``unreachable``, ``timeout``,
``invalid_response``, ``artifact_size_mismatch``, ``artifact_sha256_mismatch``, ...).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import quote

import httpx

FINISHED_STATES = ("succeeded", "failed", "cancelled")
DEFAULT_TIMEOUT = 30.0
PAGE_SIZE = 100  # the API's largest page
CHUNK = 1 << 20
# Answers worth waiting out while polling a long job: the service restarting, Redis away.
TRANSIENT_STATUSES = (408, 429, 502, 503, 504)
# Codes of ClientErrors raised on this side (status None).
LOCAL_TRANSPORT_CODES = ("unreachable", "timeout", "network_error", "invalid_response")


class ClientError(Exception):
    """A request that did not succeed. ``code`` is stable and meant for programs (the API's
    error code, or one of this module's), ``message`` is for people, ``status`` is the HTTP
    status (None when no HTTP answer was involved)."""

    def __init__(self, code: str, message: str, status: Optional[int] = None, *,
                 fields: Optional[list[dict]] = None, retry_after: Optional[float] = None):
        super().__init__(f"[{code}] {message}")
        self.code, self.message, self.status = code, message, status
        self.fields = fields or []
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        """Worth retrying later as it is: the service unreachable or briefly unavailable."""
        return (self.status is None and self.code in ("unreachable", "timeout", "network_error")) \
            or self.status in TRANSIENT_STATUSES


@dataclass(frozen=True)
class Artifact:
    name: str
    size: int
    url: Optional[str] = None  # the API's link; GET it to be redirected to a download URL
    sha256: Optional[str] = None  # present when the service records it


@dataclass(frozen=True)
class Progress:
    percent: float = 0.0
    stage: Optional[str] = None
    layers_done: Optional[int] = None
    layers_total: Optional[int] = None


@dataclass(frozen=True)
class JobError:
    code: str
    message: str


@dataclass(frozen=True)
class Job:
    id: str
    state: str  # queued, downloading, converting, checking, uploading, succeeded, failed, cancelled
    source_url: Optional[str] = None
    options: dict[str, Any] = field(default_factory=dict)
    idempotency_key: Optional[str] = None
    progress: Progress = field(default_factory=Progress)
    created_at: Optional[datetime] = None
    updated_at: Optional[datetime] = None
    started_at: Optional[datetime] = None
    finished_at: Optional[datetime] = None
    attempts: int = 0
    cancel_requested: bool = False
    error: Optional[JobError] = None
    summary: Optional[dict[str, Any]] = None  # the conversion report's summary
    artifacts: list[Artifact] = field(default_factory=list)
    reused_from: Optional[str] = None  # the earlier job whose artifacts this one copied instead of converting
    replayed: bool = False  # submit only: an earlier job with the same idempotency key

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @classmethod
    def from_api(cls, data: Any) -> "Job":
        """A job as GET /v1/jobs/{id} shows it."""
        try:
            progress = data.get("progress") or {}
            error = data.get("error")
            return cls(
                id=str(data["id"]),
                state=str(data["state"]),
                source_url=data.get("source_url"),
                options=dict(data.get("options") or {}),
                idempotency_key=data.get("idempotency_key"),
                progress=Progress(
                    percent=float(progress.get("percent") or 0.0), stage=progress.get("stage"),
                    layers_done=progress.get("layers_done"), layers_total=progress.get("layers_total"),
                ),
                created_at=_time(data.get("created_at")),
                updated_at=_time(data.get("updated_at")),
                started_at=_time(data.get("started_at")),
                finished_at=_time(data.get("finished_at")),
                attempts=int(data.get("attempts") or 0),
                cancel_requested=bool(data.get("cancel_requested")),
                error=JobError(code=str(error["code"]), message=str(error["message"])) if error else None,
                summary=data.get("summary"),
                reused_from=data.get("reused_from"),
                artifacts=[
                    Artifact(name=str(a["name"]), size=int(a["size"]), url=a.get("url"), sha256=a.get("sha256"))
                    for a in data.get("artifacts") or []
                ],
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ClientError("invalid_response", f"the service sent a job this client cannot read: {exc!r}") from None


def _time(value: Any) -> Optional[datetime]:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _error_from(response: httpx.Response) -> ClientError:
    """The API's ``{"error": {"code", "message"}}`` as a ClientError; anything else (a proxy's
    page, an empty body) as ``http_<status>``."""
    status = response.status_code
    retry_after = None
    if response.headers.get("retry-after", "").strip().isdigit():
        retry_after = float(response.headers["retry-after"])
    try:
        body = response.json()
        error = body["error"]
        code, message = str(error["code"]), str(error["message"])
        fields = [f for f in error.get("fields") or [] if isinstance(f, dict)]
    except (ValueError, KeyError, TypeError, AttributeError):
        text = " ".join(response.text.split())[:200] if response.content else ""
        return ClientError(f"http_{status}", f"HTTP {status} {response.reason_phrase}".rstrip()
                           + (f": {text}" if text else ""), status, retry_after=retry_after)
    if fields:
        details = "; ".join(f"{f.get('path') or f.get('location', '')}: {f.get('message', '')}" for f in fields[:10])
        message = f"{message} ({details})"
    return ClientError(code, message, status, fields=fields, retry_after=retry_after)


def _transport_error(exc: httpx.HTTPError, url: str) -> ClientError:
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return ClientError("unreachable", f"cannot reach {url}: {exc}")
    if isinstance(exc, httpx.TimeoutException):
        return ClientError("timeout", f"no answer from {url} in time: {exc}")
    return ClientError("network_error", f"{type(exc).__name__} talking to {url}: {exc}")


def _safe_name(name: str) -> str:
    """An artifact name as a plain file name: never a path out of the target folder."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise ClientError("invalid_response", f"the service named an artifact {name!r}, which is not a plain file name")
    return name


class Client:
    """The service's API at ``url`` (e.g. http://localhost:8000) with API key ``key``.

    ``transport`` (an httpx transport) serves both the API and the download hosts; tests
    pass an ``httpx.MockTransport``. The key goes to the API only, never to the hosts that
    artifacts are downloaded from (presigned URLs need nothing but themselves)."""

    def __init__(self, url: str, key: Optional[str] = None, *, timeout: float = DEFAULT_TIMEOUT,
                 transport: Optional[httpx.BaseTransport] = None, poll_interval: float = 0.5,
                 user_agent: Optional[str] = None):
        if not url:
            raise ClientError("no_api_url", "no API URL (pass one, or set ATTNONLY_API_URL)")
        self.url = url.rstrip("/")
        self.poll_interval = poll_interval
        headers = {"User-Agent": user_agent or f"attnonly-client/{_version()}"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._api = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport,
                                 follow_redirects=False)
        # Downloads: no Authorization, and a longer read timeout between chunks.
        self._storage = httpx.Client(headers={"User-Agent": headers["User-Agent"]}, transport=transport,
                                     timeout=httpx.Timeout(timeout, read=max(timeout, 120.0)),
                                     follow_redirects=False)

    # --- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        self._api.close()
        self._storage.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._api.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from None
        if response.status_code >= 400:
            raise _error_from(response)
        return response

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise ClientError("invalid_response", f"the service at {self.url} did not answer JSON "
                              f"(HTTP {response.status_code}); is this the attnonly API?", response.status_code) from None

    @staticmethod
    def _job_path(job_id: str, *rest: str) -> str:
        if not job_id:
            raise ClientError("invalid_job_id", "a job id is needed")
        return "/".join(["/v1/jobs", quote(job_id, safe=""), *(quote(r, safe="") for r in rest)])

    # --- the API ----------------------------------------------------------------------------

    def submit(self, source_url: str, options: Optional[dict[str, Any]] = None,
               idempotency_key: Optional[str] = None) -> Job:
        """POST /v1/jobs. The job as created (queued); ``replayed`` when the idempotency key
        returned an earlier job, whose state may be further along (see ``status``)."""
        body: dict[str, Any] = {"source_url": source_url}
        if options:
            body["options"] = options
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        response = self._request("POST", "/v1/jobs", json=body)
        data = self._json(response)
        try:
            return Job(id=str(data["id"]), state=str(data["state"]), source_url=source_url,
                       options=dict(options or {}), idempotency_key=idempotency_key,
                       replayed=response.headers.get("idempotent-replayed", "").lower() == "true")
        except (KeyError, TypeError) as exc:
            raise ClientError("invalid_response", f"the service's answer to a submission lacks {exc}") from None

    def status(self, job_id: str) -> Job:
        """GET /v1/jobs/{id}."""
        return Job.from_api(self._json(self._request("GET", self._job_path(job_id))))

    def list(self, state: Optional[str] = None, limit: Optional[int] = None) -> list[Job]:
        """GET /v1/jobs, newest first, following the pages; at most ``limit`` jobs (None: all)."""
        return list(self.iter_jobs(state=state, limit=limit))

    def iter_jobs(self, state: Optional[str] = None, limit: Optional[int] = None) -> Iterator[Job]:
        cursor, count = None, 0
        while limit is None or count < limit:
            params: dict[str, Any] = {"limit": PAGE_SIZE if limit is None else min(PAGE_SIZE, limit - count)}
            if state:
                params["state"] = state
            if cursor:
                params["cursor"] = cursor
            page = self._json(self._request("GET", "/v1/jobs", params=params))
            if not isinstance(page, dict) or not isinstance(page.get("jobs"), list):
                raise ClientError("invalid_response", "the service's job list has no 'jobs'")
            for item in page["jobs"]:
                yield Job.from_api(item)
                count += 1
            cursor = page.get("next_cursor")
            if not cursor or not page["jobs"]:
                return

    def cancel(self, job_id: str) -> Job:
        """POST /v1/jobs/{id}/cancel: the job, cancelled (queued) or with cancel_requested (running).
        A finished job answers ClientError job_finished (409)."""
        return Job.from_api(self._json(self._request("POST", self._job_path(job_id, "cancel"))))

    def wait(self, job_id: str, timeout: Optional[float] = None,
             on_progress: Optional[Callable[[Job], None]] = None, *, outage_tolerance: float = 120.0) -> Job:
        """Poll until the job finishes; returns it (whatever its state). ``on_progress(job)`` is
        called whenever the state or progress changes. Once the job has been seen, a service
        that is briefly unreachable or unavailable (restart, Redis away) is waited out for up
        to ``outage_tolerance`` seconds at a stretch. ``timeout`` (seconds, None: none): ClientError wait_timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last_view, outage_since, seen = None, None, False
        while True:
            try:
                job = self.status(job_id)
                outage_since, seen = None, True
            except ClientError as exc:
                if not exc.transient or not seen:  # a service never reached is an error at once
                    raise
                outage_since = outage_since or time.monotonic()
                if time.monotonic() - outage_since > outage_tolerance:
                    raise
                job = None
            if job is not None:
                view = (job.state, job.progress, job.cancel_requested)
                if on_progress is not None and view != last_view:
                    on_progress(job)
                last_view = view
                if job.finished:
                    return job
            if deadline is not None and time.monotonic() >= deadline:
                state = job.state if job else "unknown"
                raise ClientError("wait_timeout", f"job {job_id} still {state} after {timeout:g} s")
            time.sleep(self.poll_interval if job is not None else max(self.poll_interval, 2.0))

    def download(self, job_id: str, directory: str | os.PathLike, job: Optional[Job] = None) -> list[Path]:
        """Every artifact of the job into ``directory`` (created if need be); returns the paths.

        Each file is fetched through the API's 307 redirect (the API key is not sent to the
        storage host), written to a temporary file beside its target, checked against the
        size (and sha256, where the job records one) that the job lists, and only then
        renamed into place: a file that is there is whole. ``job``: the job as already
        fetched (saves a request)."""
        job = job if job is not None and job.artifacts else self.status(job_id)
        if not job.artifacts:
            raise ClientError("no_artifacts", f"job {job_id} has no artifacts (it is {job.state})")
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        return [self._download_one(job.id, artifact, target) for artifact in job.artifacts]

    def _download_one(self, job_id: str, artifact: Artifact, directory: Path) -> Path:
        name = _safe_name(artifact.name)
        api_path = self._job_path(job_id, "artifacts", name)
        try:
            first = self._api.send(self._api.build_request("GET", api_path), stream=True)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from None
        try:
            if first.status_code >= 400:
                first.read()
                raise _error_from(first)
            if first.is_redirect:
                location = first.headers.get("location")
                if not location:
                    raise ClientError("invalid_response", f"the redirect for {name} has no Location", first.status_code)
                url = first.url.join(location)
                first.close()
                return self._fetch_to(self._storage, url, artifact, directory / name)
            if first.status_code == 200:  # served by the API itself
                return self._write(first, artifact, directory / name)
            raise ClientError("invalid_response", f"unexpected HTTP {first.status_code} for artifact {name}",
                              first.status_code)
        finally:
            first.close()

    def _fetch_to(self, client: httpx.Client, url: httpx.URL, artifact: Artifact, path: Path) -> Path:
        where = f"{url.scheme}://{url.netloc.decode()}"
        try:
            with client.stream("GET", url) as response:
                if response.status_code >= 400:
                    response.read()
                    error = _error_from(response)
                    raise ClientError("download_failed", f"{artifact.name}: the storage host answered "
                                      f"{error.message}", response.status_code)
                if response.is_redirect:
                    raise ClientError("download_failed", f"{artifact.name}: the storage host redirected again",
                                      response.status_code)
                return self._write(response, artifact, path)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, where) from None

    @staticmethod
    def _write(response: httpx.Response, artifact: Artifact, path: Path) -> Path:
        digest, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in response.iter_bytes(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    if size > artifact.size:
                        break
                out.flush()
                os.fsync(out.fileno())
            if size != artifact.size:
                raise ClientError("artifact_size_mismatch", f"{artifact.name}: received {'more than ' if size > artifact.size else ''}"
                                  f"{size} bytes, the job lists {artifact.size}")
            if artifact.sha256 and digest.hexdigest() != artifact.sha256.lower():
                raise ClientError("artifact_sha256_mismatch", f"{artifact.name}: sha256 {digest.hexdigest()}, "
                                  f"the job lists {artifact.sha256}")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("attnonly")
    except Exception:
        return "0+unknown"

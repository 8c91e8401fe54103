"""One settings class for every process: the API, the worker and the local runner.

Every field reads the environment variable ``ATTNONLY_<FIELD NAME IN CAPITALS>``;
for example ``ATTNONLY_REDIS_URL`` or ``ATTNONLY_S3_ENDPOINT_URL``. The defaults
are the ones a developer machine needs; production overrides them in the
environment (see docker-compose.yml).
"""
from __future__ import annotations

import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Optional

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.source_scopes import SourceRules, SourceScope, parse_scopes

if TYPE_CHECKING:  # shared.fetch is imported lazily: the API never downloads anything
    from shared.fetch import FetchLimits

GiB = 1024**3
MiB = 1024**2

# Presigned download URLs live between these many seconds (a setting outside is clamped).
PRESIGN_TTL_MIN, PRESIGN_TTL_MAX = 10, 3600
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class ApiKey(BaseModel):
    """One accepted API key, as the SHA-256 of the key: the key itself is never stored.

    ``name`` is the owner of the jobs the key creates. Two entries with the same name are
    the same owner (rotate a key by adding the new one under the old name, then removing
    the old one). An entry without a name is named after its hash: ``key-<12 hex>``."""

    name: str
    sha256: str

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.sha256)


def parse_api_key(entry: str) -> ApiKey:
    """``NAME:SHA256HEX`` or ``SHA256HEX`` (see ``python -m api.auth``)."""
    name, sep, digest = entry.strip().rpartition(":")
    digest = digest.strip().lower()
    if not _SHA256_HEX.match(digest):
        raise ValueError(
            "api_keys entries are NAME:SHA256 with the hex SHA-256 of a key (64 hex digits), never "
            "the key itself; `python -m api.auth NAME` makes a key and its entry"
        )
    name = name.strip() if sep else f"key-{digest[:12]}"
    if not _KEY_NAME.match(name):
        raise ValueError(f"api key name {name!r}: use letters, digits and . _ @ - (at most 64)")
    return ApiKey(name=name, sha256=digest)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATTNONLY_", extra="ignore")

    # --- Redis: job records, the Celery broker, cancel flags -------------------------------
    redis_url: str = "redis://localhost:6379/0"
    # Every Redis key the job store writes starts with this, so that several deployments
    # (or test runs) can share one Redis without seeing each other's jobs.
    redis_key_prefix: str = "attnonly"
    # Finished jobs (succeeded, failed, cancelled) and their idempotency keys are
    # forgotten this long after they finish. Artifacts in S3 are not deleted by this.
    job_ttl_seconds: int = Field(7 * 24 * 3600, ge=60)

    # --- Logs (shared/logs.py) ----------------------------------------------------------
    # json: one JSON object per line, with job_id and owner fields on lines about a job (what
    # the containers use, for log collectors); text: plain lines for a terminal.
    log_format: Literal["json", "text"] = "text"

    # --- S3-compatible storage for the artifacts ------------------------------------------
    # None: not configured (the local runner then starts an embedded S3 server).
    s3_endpoint_url: Optional[str] = None
    # The endpoint that users reach; presigned URLs are signed for it. Inside compose the
    # worker talks to http://minio:9000 while a user's browser needs http://localhost:9000.
    # None: the same as s3_endpoint_url.
    s3_public_endpoint_url: Optional[str] = None
    s3_access_key: Optional[SecretStr] = None  # None: boto3's usual credential chain
    s3_secret_key: Optional[SecretStr] = None
    s3_region: str = "us-east-1"
    s3_bucket: str = "attnonly"
    # Files above this size are uploaded in parts of s3_multipart_chunk_bytes.
    s3_multipart_threshold_bytes: int = Field(64 * MiB, ge=5 * MiB)
    s3_multipart_chunk_bytes: int = Field(64 * MiB, ge=5 * MiB)
    # Presigned artifact URLs stay valid this long (short on purpose: the API hands out
    # a fresh one on every request of /v1/jobs/{id}/artifacts/{name}).
    # Values outside [PRESIGN_TTL_MIN, PRESIGN_TTL_MAX] are clamped into it.
    presign_ttl_seconds: int = 300
    # The worker retries a failed upload (and the bucket check before it) this many times in
    # all, waiting storage_retry_base_delay seconds, then twice that, ... (at most 60 s a
    # wait), before the job fails with "storage_unavailable".
    storage_attempts: int = Field(5, ge=1, le=20)
    storage_retry_base_delay: float = Field(2.0, ge=0)

    # --- S3 sources (s3:// source URLs; see shared/source_scopes.py) ----------------------
    # Where each owner may read s3:// sources: comma-separated OWNER=BUCKET or
    # OWNER=BUCKET/PREFIX entries, OWNER an api_keys name or * for every owner. A prefix
    # matches whole path segments. Empty: no s3:// source is accepted at all. The
    # artifacts bucket (s3_bucket) is never a source, whatever this says.
    s3_source_scopes: Annotated[list[SourceScope], NoDecode] = Field(default_factory=list)
    # Separate (ideally read-only) credentials and endpoint for reading sources. None: the
    # artifact ones above (s3_endpoint_url, s3_access_key, s3_secret_key). The two keys
    # are set together; a different endpoint needs keys of its own.
    s3_source_endpoint_url: Optional[str] = None
    s3_source_access_key: Optional[SecretStr] = None
    s3_source_secret_key: Optional[SecretStr] = None

    # --- Access: API keys, rate limit, request size --------------------------------------
    # Accepted API keys, comma-separated NAME:SHA256 entries (the hex SHA-256 of each key;
    # make one with `python -m api.auth NAME`). Clients send "Authorization: Bearer <key>".
    api_keys: Annotated[list[ApiKey], NoDecode] = Field(default_factory=list)
    # Accept requests without a key, as the owner "anonymous". Off: without any api_keys
    # every /v1/jobs request is refused. For a development machine only.
    allow_anonymous: bool = False
    # Each owner may create this many jobs per rate_limit_window_seconds (a sliding window;
    # a batch counts each of its jobs). 0: no limit.
    rate_limit_jobs: int = Field(60, ge=0)
    rate_limit_window_seconds: int = Field(60, ge=1, le=24 * 3600)
    # Largest request body, enforced while it streams in (chunked bodies included).
    max_request_bytes: int = Field(1 * MiB, ge=1024)
    # Threads per API process for its blocking work (a submission's Redis and broker round
    # trips). Few: 40 (the default of anyio, under FastAPI) queued for the GIL in turn after
    # every round trip, and a submission's p99 doubled (bench/load.py).
    api_threads: int = Field(8, ge=1, le=200)
    # GET /v1/jobs/{id}/events ends its stream after this long even if the job has not
    # ended: the client reconnects with Last-Event-ID (EventSource does so by itself), and
    # no connection is held open for hours by a job that waits in the queue.
    events_stream_seconds: float = Field(300.0, gt=0)

    # --- Celery worker --------------------------------------------------------------------
    gpu_queue: str = "gpu"
    # Seals per-job source credentials in job records (a Fernet key: `python -c "from
    # shared.credentials import new_key; print(new_key())"`). Unset: jobs carrying credentials
    # are refused with 403 credentials_not_accepted.
    credentials_key: Optional[SecretStr] = None
    # Jobs one owner may have queued or running at once; more are refused with 429
    # quota_exceeded at submission. 0: no cap.
    max_active_jobs_per_owner: int = Field(200, ge=0)
    # A running job holds a lease its worker renews every lease_seconds / 4; when it expires
    # (the worker died) another worker sends the job to the queue again.
    lease_seconds: float = Field(60.0, ge=2)
    worker_concurrency: int = Field(1, ge=1)  # one conversion per GPU
    task_time_limit: int = Field(4 * 3600, ge=5)  # seconds; the child is killed after this
    # Redis redelivers a message nobody acknowledged after this many seconds: this is how
    # long a job whose worker died (SIGKILL, lost machine) waits before another worker
    # takes it. With late acknowledgement a long task would run twice if this were below
    # the time limit.
    visibility_timeout: int = Field(5 * 3600, ge=6)
    # A job whose worker died this many times (crash, OOM kill, hard time limit) is failed
    # instead of being delivered again.
    max_attempts: int = Field(3, ge=1)
    # A worker that cannot reach the job store (Redis restarting) keeps trying this long
    # before it gives the job back to the queue; progress writes are skipped meanwhile.
    store_retry_seconds: float = Field(60.0, ge=0)
    # Where the worker downloads sources and writes converted checkpoints (one folder per
    # job, removed when the job ends).
    work_dir: Path = Path(tempfile.gettempdir()) / "attnonly-work"
    # Conversion device: None lets the conversion pick CUDA when present, else the CPU.
    device: Optional[str] = None
    # The explicit construction (literal Q/K/V/O heads) is refused above this many head
    # parameters, before any calibration.
    explicit_max_params: int = Field(50_000_000, ge=1)

    # --- Downloading sources (see shared/fetch/) ----------------------------------------
    max_download_bytes: int = Field(20 * GiB, ge=1)
    fetch_connect_timeout: float = Field(10.0, gt=0)
    fetch_read_timeout: float = Field(60.0, gt=0)
    fetch_max_redirects: int = Field(3, ge=0, le=10)
    # A whole download must finish within a deadline besides the read timeouts: by default
    # max_download_bytes at fetch_min_bytes_per_second, plus a minute; a number overrides it.
    fetch_min_bytes_per_second: int = Field(10 * MiB, ge=1)
    # hf://ORG/REPO[@REVISION] sources resolve against this hub (its /ORG/REPO/resolve/REV/FILE URLs).
    hub_endpoint: str = "https://huggingface.co"
    fetch_deadline_seconds: Optional[float] = Field(None, gt=0)
    # Hosts that may be fetched although they are loopback or private addresses.
    # Empty in production; the local runner and the tests set "127.0.0.1,localhost".
    fetch_allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_archive_files: int = Field(10_000, ge=1)
    max_unpacked_bytes: int = Field(40 * GiB, ge=1)
    # Pickle checkpoints (pytorch_model.bin) can run code when loaded; off unless asked for.
    allow_pickle: bool = False
    # What one conversion may use on a worker; a job whose estimate (from config.json, before
    # any weights are downloaded) exceeds either fails at once with too_large_for_worker.
    # None: 85 % of the machine's memory / the free space under work_dir when the job starts.
    worker_memory_bytes: Optional[int] = Field(None, ge=1)
    worker_disk_bytes: Optional[int] = Field(None, ge=1)

    # --- Webhooks (see shared/webhook_delivery.py) ----------------------------------------
    # Each owner's signing secret is derived from this key (shared/webhook_signing.py); the
    # API and the workers need the same one. Unset: jobs with a webhook_url are refused with
    # 403 webhooks_not_configured. Receivers are checked like sources (fetch_allow_hosts).
    webhook_signing_key: Optional[SecretStr] = None
    # An event is tried this many times in all while the receiver answers non-2xx or cannot
    # be reached, waiting base delay, twice that, ... (at most a minute), with no retry later
    # than webhook_retry_max_seconds after the first try.
    webhook_attempts: int = Field(6, ge=1, le=20)
    webhook_retry_base_delay: float = Field(2.0, ge=0)
    webhook_retry_max_seconds: float = Field(300.0, gt=0)
    webhook_timeout_seconds: float = Field(10.0, gt=0)  # connect, and each read
    # At most one progress event per job this often (and one at each change of stage).
    webhook_progress_interval_seconds: float = Field(5.0, ge=0)

    @field_validator("fetch_allow_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value):
        # "127.0.0.1, localhost" in the environment; a list when built in code.
        if isinstance(value, str):
            return [h.strip() for h in value.split(",") if h.strip()]
        return value

    @field_validator("s3_source_scopes", mode="before")
    @classmethod
    def _parse_scopes(cls, value):
        return parse_scopes(value)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value):
        if isinstance(value, str):
            value = [e for e in value.split(",") if e.strip()]
        return [parse_api_key(e) if isinstance(e, str) else e for e in value or []]

    @field_validator("api_keys")
    @classmethod
    def _one_owner_per_key(cls, value: list[ApiKey]) -> list[ApiKey]:
        seen: dict[str, str] = {}
        for key in value:
            if seen.setdefault(key.sha256, key.name) != key.name:
                raise ValueError(f"one key hash is listed under two names ({seen[key.sha256]}, {key.name})")
        return value

    @field_validator("presign_ttl_seconds")
    @classmethod
    def _clamp_presign_ttl(cls, value: int) -> int:
        return min(max(value, PRESIGN_TTL_MIN), PRESIGN_TTL_MAX)

    @model_validator(mode="after")
    def _visibility_above_time_limit(self):
        if self.visibility_timeout <= self.task_time_limit:
            raise ValueError(
                f"visibility_timeout ({self.visibility_timeout}s) must exceed task_time_limit "
                f"({self.task_time_limit}s), or Redis redelivers jobs that are still running"
            )
        return self

    @model_validator(mode="after")
    def _source_credentials(self):
        if (self.s3_source_access_key is None) != (self.s3_source_secret_key is None):
            raise ValueError("set s3_source_access_key and s3_source_secret_key together (or neither, "
                             "to read sources with the artifact credentials)")
        if (self.s3_source_endpoint_url is not None and self.s3_source_endpoint_url != self.s3_endpoint_url
                and self.s3_source_access_key is None):
            raise ValueError("s3_source_endpoint_url differs from s3_endpoint_url: set s3_source_access_key "
                             "and s3_source_secret_key too (the artifact credentials are not sent elsewhere)")
        return self

    @property
    def public_s3_endpoint(self) -> Optional[str]:
        return self.s3_public_endpoint_url or self.s3_endpoint_url

    def memory_budget(self) -> int:
        if self.worker_memory_bytes is not None:
            return self.worker_memory_bytes
        import os

        return int(0.85 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    def disk_budget(self, directory: Path) -> int:
        if self.worker_disk_bytes is not None:
            return self.worker_disk_bytes
        import shutil

        return shutil.disk_usage(directory).free

    def fetch_limits(self, owner: Optional[str] = None, credentials=None) -> "FetchLimits":
        """The limits of one download; s3:// sources are checked against ``owner``'s
        scopes (None: the anonymous owner, who gets the ``*`` scopes only)."""
        from shared.fetch import FetchLimits

        access_key, secret_key = self.s3_source_credentials()
        own_s3 = credentials is not None and credentials.has_s3()
        if own_s3:  # the job's own keys (shared/credentials.py) for its own bucket
            access_key, secret_key = (credentials.s3_access_key.get_secret_value(),
                                      credentials.s3_secret_key.get_secret_value())
        hub_token = credentials.hub_token.get_secret_value() if credentials and credentials.hub_token else None
        # The job's keys go to the job's endpoint where it names one (checked by the fetcher
        # before connecting), else to the service's source endpoint; the service's keys never
        # go to the job's endpoint.
        own_endpoint = credentials.s3_endpoint_url if own_s3 else None
        return FetchLimits(
            max_download_bytes=self.max_download_bytes,
            connect_timeout=self.fetch_connect_timeout,
            read_timeout=self.fetch_read_timeout,
            max_redirects=self.fetch_max_redirects,
            allow_hosts=tuple(self.fetch_allow_hosts),
            max_archive_files=self.max_archive_files,
            max_unpacked_bytes=self.max_unpacked_bytes,
            allow_pickle=self.allow_pickle,
            s3_endpoint_url=own_endpoint or self.s3_source_endpoint_url or self.s3_endpoint_url,
            s3_endpoint_checked=own_endpoint is not None,
            s3_access_key=access_key,
            s3_secret_key=secret_key,
            s3_region=self.s3_region,
            s3_source_rules=SourceRules.for_owner(self, owner, own_credentials=own_s3),
            deadline_seconds=self.fetch_deadline(),
            hub_endpoint=self.hub_endpoint,
            hub_token=hub_token,
        )

    def fetch_deadline(self) -> float:
        """Seconds a whole download may take (see fetch_deadline_seconds)."""
        if self.fetch_deadline_seconds is not None:
            return self.fetch_deadline_seconds
        return 60.0 + self.max_download_bytes / self.fetch_min_bytes_per_second

    def s3_credentials(self) -> tuple[Optional[str], Optional[str]]:
        """(access key, secret key) in clear, for the S3 clients; None where unset."""
        return tuple(s.get_secret_value() if s is not None else None for s in (self.s3_access_key, self.s3_secret_key))

    def s3_source_credentials(self) -> tuple[Optional[str], Optional[str]]:
        """The credentials sources are read with: the source ones where set, else the artifact ones."""
        if self.s3_source_access_key is None:
            return self.s3_credentials()
        return self.s3_source_access_key.get_secret_value(), self.s3_source_secret_key.get_secret_value()


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()

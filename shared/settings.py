"""One settings class for every process: the API, the worker and the local runner.

Every field reads the environment variable ``ATTNONLY_<FIELD NAME IN CAPITALS>``;
for example ``ATTNONLY_REDIS_URL`` or ``ATTNONLY_S3_ENDPOINT_URL``. The defaults
are the ones a developer machine needs; production overrides them in the
environment (see docker-compose.yml).
"""
from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:  # shared.fetch is imported lazily: the API never downloads anything
    from shared.fetch import FetchLimits

GiB = 1024**3
MiB = 1024**2


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
    presign_ttl_seconds: int = Field(15 * 60, ge=1, le=7 * 24 * 3600)

    # --- Celery worker --------------------------------------------------------------------
    gpu_queue: str = "gpu"
    worker_concurrency: int = Field(1, ge=1)  # one conversion per GPU
    task_time_limit: int = Field(4 * 3600, ge=10)  # seconds; the child is killed after this
    # Redis redelivers a message nobody acknowledged after this many seconds. With late
    # acknowledgement a long task would run twice if this were below the time limit.
    visibility_timeout: int = Field(5 * 3600, ge=10)
    # A job whose worker died this many times (crash, OOM kill, hard time limit) is failed
    # instead of being delivered again.
    max_attempts: int = Field(3, ge=1)
    # Where the worker downloads sources and writes converted checkpoints (one folder per
    # job, removed when the job ends).
    work_dir: Path = Path(tempfile.gettempdir()) / "attnonly-work"
    # Conversion device: None lets the conversion pick CUDA when present, else the CPU.
    device: Optional[str] = None

    # --- Downloading sources (see shared/fetch.py) ----------------------------------------
    max_download_bytes: int = Field(20 * GiB, ge=1)
    fetch_connect_timeout: float = Field(10.0, gt=0)
    fetch_read_timeout: float = Field(60.0, gt=0)
    fetch_max_redirects: int = Field(3, ge=0, le=10)
    # Hosts that may be fetched although they are loopback or private addresses.
    # Empty in production; the local runner and the tests set "127.0.0.1,localhost".
    fetch_allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_archive_files: int = Field(10_000, ge=1)
    max_unpacked_bytes: int = Field(40 * GiB, ge=1)
    # Pickle checkpoints (pytorch_model.bin) can run code when loaded; off unless asked for.
    allow_pickle: bool = False

    @field_validator("fetch_allow_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value):
        # "127.0.0.1, localhost" in the environment; a list when built in code.
        if isinstance(value, str):
            return [h.strip() for h in value.split(",") if h.strip()]
        return value

    @model_validator(mode="after")
    def _visibility_above_time_limit(self):
        if self.visibility_timeout <= self.task_time_limit:
            raise ValueError(
                f"visibility_timeout ({self.visibility_timeout}s) must exceed task_time_limit "
                f"({self.task_time_limit}s), or Redis redelivers jobs that are still running"
            )
        return self

    @property
    def public_s3_endpoint(self) -> Optional[str]:
        return self.s3_public_endpoint_url or self.s3_endpoint_url

    def fetch_limits(self) -> "FetchLimits":
        from shared.fetch import FetchLimits

        access_key, secret_key = self.s3_credentials()
        return FetchLimits(
            max_download_bytes=self.max_download_bytes,
            connect_timeout=self.fetch_connect_timeout,
            read_timeout=self.fetch_read_timeout,
            max_redirects=self.fetch_max_redirects,
            allow_hosts=tuple(self.fetch_allow_hosts),
            max_archive_files=self.max_archive_files,
            max_unpacked_bytes=self.max_unpacked_bytes,
            allow_pickle=self.allow_pickle,
            s3_endpoint_url=self.s3_endpoint_url,
            s3_access_key=access_key,
            s3_secret_key=secret_key,
            s3_region=self.s3_region,
        )

    def s3_credentials(self) -> tuple[Optional[str], Optional[str]]:
        """(access key, secret key) in clear, for the S3 clients; None where unset."""
        return tuple(s.get_secret_value() if s is not None else None for s in (self.s3_access_key, self.s3_secret_key))


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()

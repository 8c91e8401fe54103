"""Artifacts in S3-compatible storage (MinIO in compose, any S3 in production).

Keys live under ``jobs/{job_id}/``. Two clients: one for the endpoint this process
reaches (``s3_endpoint_url``: inside compose, ``http://minio:9000``), one only for
signing URLs against the endpoint users reach (``s3_public_endpoint_url``). Signing is
offline, and the host is part of the signature, so a URL signed for the inside name
would not work from outside even if the host were rewritten.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterable, Optional

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from shared.jobs import Artifact
from shared.settings import PRESIGN_TTL_MAX, PRESIGN_TTL_MIN, Settings

log = logging.getLogger(__name__)


class StorageError(Exception):
    """S3 failed after boto3's own retries (a few quick ones; the worker retries whole
    uploads with its own backoff). ``code`` goes into a failed job's error."""

    code = "storage_unavailable"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


class Storage:
    def __init__(self, settings: Settings, *, quick: bool = False):
        """``quick``: few retries and short timeouts, for readiness probes."""
        self.bucket = settings.s3_bucket
        self.presign_ttl = settings.presign_ttl_seconds
        access_key, secret_key = settings.s3_credentials()
        if quick:
            config = Config(connect_timeout=2, read_timeout=3, retries={"max_attempts": 1, "mode": "standard"})
        else:
            # "standard" retries back off exponentially on throttling and connection errors;
            # a longer outage is the worker's business (settings.storage_attempts).
            config = Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
        # Path-style addressing: MinIO and most self-hosted S3s do not serve bucket subdomains.
        config = config.merge(Config(signature_version="s3v4", s3={"addressing_style": "path"}))
        common = dict(
            region_name=settings.s3_region, aws_access_key_id=access_key,
            aws_secret_access_key=secret_key, config=config,
        )
        self.client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, **common)
        self._signer = boto3.client("s3", endpoint_url=settings.public_s3_endpoint, **common)
        self._transfer = TransferConfig(
            multipart_threshold=settings.s3_multipart_threshold_bytes,
            multipart_chunksize=settings.s3_multipart_chunk_bytes,
            max_concurrency=4,
        )

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (compose's minio-init does this too)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"cannot reach bucket {self.bucket!r}: {_short(exc)}") from None
        except BotoCoreError as exc:
            raise StorageError(f"S3 endpoint unreachable: {_short(exc)}") from None
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StorageError(f"cannot create bucket {self.bucket!r}: {_short(exc)}") from None

    def ping(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return True
        except (BotoCoreError, ClientError):
            return False

    def upload_file(self, path: Path, key: str, content_type: Optional[str] = None) -> int:
        """Upload one file (multipart above the threshold); returns its size in bytes."""
        extra = {"ContentType": content_type} if content_type else None
        try:
            self.client.upload_file(str(path), self.bucket, key, ExtraArgs=extra, Config=self._transfer)
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            raise StorageError(f"upload of {path.name} failed: {_short(exc)}") from None
        return path.stat().st_size

    def upload_job_files(self, job_id: str, folder: Path, names: Iterable[str]) -> list[Artifact]:
        """Upload each file under jobs/{job_id}/; its record carries the SHA-256 of what was
        read from disk (hashed before the upload, in chunks: the multipart upload reads parts
        concurrently and again on retries, so it cannot be hashed on the way)."""
        artifacts = []
        for name in names:
            key = job_prefix(job_id) + name
            digest = file_sha256(folder / name)
            size = self.upload_file(folder / name, key, _content_type(name))
            artifacts.append(Artifact(name=name, size=size, key=key, sha256=digest))
        return artifacts

    def copy_artifact(self, artifact: Artifact, job_id: str) -> Artifact:
        """Copy another job's artifact to jobs/{job_id}/, server-side (no byte passes through
        here), so that each job's files live and expire on their own: one CopyObject below the
        multipart threshold, parts copied concurrently above it (CopyObject stops at 5 GiB).
        The record keeps the first job's size and SHA-256: the bytes are the same."""
        key = job_prefix(job_id) + artifact.name
        source = {"Bucket": self.bucket, "Key": artifact.key}
        # The type is set again, not copied: a multipart copy would not carry it over.
        extra = {"ContentType": _content_type(artifact.name), "MetadataDirective": "REPLACE"}
        try:
            if artifact.size < self._transfer.multipart_threshold:
                self.client.copy_object(CopySource=source, Bucket=self.bucket, Key=key, **extra)
            else:
                self.client.copy(source, self.bucket, key, ExtraArgs=extra, Config=self._transfer)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"copy of {artifact.name} failed: {_short(exc)}") from None
        return artifact.model_copy(update={"key": key})

    def presigned_get(self, key: str, filename: Optional[str] = None, ttl: Optional[int] = None,
                      content_type: Optional[str] = None) -> str:
        """A GET URL valid for ``ttl`` seconds (default: the settings'), clamped to
        [PRESIGN_TTL_MIN, PRESIGN_TTL_MAX]: download links are short-lived by design.
        ``filename``: served as an attachment of that name; ``content_type``: served with
        that type, whatever the object was stored with (report.html, to be shown inline)."""
        params = {"Bucket": self.bucket, "Key": key}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        if content_type:
            params["ResponseContentType"] = content_type
        expires = min(max(ttl or self.presign_ttl, PRESIGN_TTL_MIN), PRESIGN_TTL_MAX)
        return self._signer.generate_presigned_url("get_object", Params=params, ExpiresIn=expires)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many were deleted."""
        deleted = 0
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if keys:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                    deleted += len(keys)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot delete {prefix}: {_short(exc)}") from None
        return deleted

    def list_keys(self, prefix: str) -> list[str]:
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            return [obj["Key"] for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix)
                    for obj in page.get("Contents", [])]
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot list {prefix}: {_short(exc)}") from None


HASH_CHUNK_BYTES = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (never whole: weights run to many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


HTML_CONTENT_TYPE = "text/html; charset=utf-8"
_CONTENT_TYPES = {".json": "application/json", ".html": HTML_CONTENT_TYPE}


def _content_type(name: str) -> str:
    """The type an object is stored with: report.html as HTML, so that a browser shows it
    (GET /v1/jobs/{id}/report presigns it without an attachment disposition)."""
    return _CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")


def _short(exc: Exception) -> str:
    # One line for a job's error message: botocore's messages can carry long request ids.
    return str(exc).splitlines()[0][:300]

"""s3:// sources through boto3, only inside the owner's scopes (checked on the very bucket and
key read), on the job's own endpoint only after its addresses are checked."""
from __future__ import annotations

from pathlib import Path

from shared.safefiles import FetchError
from shared.source_scopes import check_s3_source

from .limits import FetchLimits
from .meter import Meter, NotFound, not_found, write_stream
from .urls import ParsedUrl

_CHUNK = 1 << 16


class S3Remote:
    """Objects under s3://bucket/prefix (or the object itself), through boto3."""

    def __init__(self, base: ParsedUrl, limits: FetchLimits):
        # The owner's scopes, checked on the very bucket and key read below (the API checked
        # them at submission too; this holds for jobs that reach the worker any other way).
        check_s3_source(base.host, base.target, limits.s3_source_rules)
        import boto3
        from botocore.config import Config

        self.bucket, self.key = base.host, base.target
        self.base = base
        self.endpoint_checked = limits.s3_endpoint_checked
        if self.endpoint_checked:
            from shared.s3_endpoint import check_endpoint

            check_endpoint(limits.s3_endpoint_url, limits.allow_hosts, resolve_names=True)
        config = Config(
            connect_timeout=limits.connect_timeout, read_timeout=limits.read_timeout,
            retries={"max_attempts": 3, "mode": "standard"},
            # Path-style keeps the bucket name out of the host name on custom endpoints.
            s3={"addressing_style": "path"} if limits.s3_endpoint_url else {},
        )
        self.client = boto3.client(
            "s3", endpoint_url=limits.s3_endpoint_url, region_name=limits.s3_region,
            aws_access_key_id=limits.s3_access_key, aws_secret_access_key=limits.s3_secret_key,
            config=config,
        )

    def close(self) -> None:
        self.client.close()

    def _key_for(self, name: str | None) -> str:
        if name is None:
            return self.key
        prefix = self.key.rstrip("/")
        return f"{prefix}/{name}" if prefix else name

    def _call(self, what: str, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
                raise not_found(what) from None
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise FetchError("source_http_error", f"S3 error {code} (HTTP {status}) for {what}") from None
        except (ConnectTimeoutError, ReadTimeoutError) as exc:
            detail = type(exc).__name__ if self.endpoint_checked else exc  # botocore's names the endpoint
            raise FetchError("download_timeout", f"timed out reading {what}: {detail}") from None
        except BotoCoreError as exc:
            detail = type(exc).__name__ if self.endpoint_checked else exc
            raise FetchError("source_unreachable", f"cannot read {what}: {detail}") from None

    def exists(self, name: str) -> bool:
        key = self._key_for(name)
        try:
            self._call(f"s3://{self.bucket}/{key}", self.client.head_object, Bucket=self.bucket, Key=key)
        except NotFound:
            return False
        return True

    def download(self, name: str | None, dest: Path, meter: Meter, cap=None) -> None:
        key = self._key_for(name)
        what = f"s3://{self.bucket}/{key}"
        response = self._call(what, self.client.get_object, Bucket=self.bucket, Key=key)
        body = response["Body"]
        try:
            declared = response.get("ContentLength")
            if name is None:
                meter.total = declared
            if cap and declared is not None and declared > cap[0]:
                raise cap[1]
            meter.expect(declared)
            chunks = iter(lambda: self._call(what, body.read, amt=_CHUNK), b"")
            write_stream(chunks, dest, meter, cap)
        finally:
            body.close()


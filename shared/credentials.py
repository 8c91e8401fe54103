"""Per-job source credentials: a bearer token for a gated or private hub repository, or S3
keys for the user's own bucket. They reach the job record only sealed (Fernet: AES-128-CBC
with HMAC-SHA256) with the key in ATTNONLY_CREDENTIALS_KEY, are opened by the worker for the
download alone, are dropped from the record when the job ends, and are never returned by an
endpoint nor written to a log (SecretStr everywhere they are open)."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class SourceCredentials(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hub_token: Optional[SecretStr] = Field(None, min_length=1, max_length=4096,
                                           description="bearer token for hf:// sources, sent to the hub's host only")
    s3_access_key: Optional[SecretStr] = Field(None, min_length=1, max_length=256)
    s3_secret_key: Optional[SecretStr] = Field(None, min_length=1, max_length=256)
    # Where the S3 keys go (the user's MinIO, R2, Wasabi...); a str, not a SecretStr, so that
    # the API can publish its pattern (api.schemas.SourceCredentialsIn), but kept out of reprs
    # and, like the rest, only sealed in the record and never returned. Unused without both keys.
    s3_endpoint_url: Optional[str] = Field(
        None, min_length=1, max_length=2048, repr=False,
        description="http(s)://host[:port][/path] of the S3-compatible service holding your bucket; used with "
        "s3_access_key and s3_secret_key only (ignored without them). Unset: the service's own S3 endpoint")

    def has_s3(self) -> bool:
        return self.s3_access_key is not None and self.s3_secret_key is not None


class CredentialsError(ValueError):
    pass


def _fernet(key: SecretStr):
    from cryptography.fernet import Fernet

    return Fernet(key.get_secret_value().encode())


def seal(credentials: SourceCredentials, key: SecretStr) -> str:
    plain = {k: v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in credentials if v is not None}
    import json

    return _fernet(key).encrypt(json.dumps(plain).encode()).decode()


def unseal(token: str, key: SecretStr) -> SourceCredentials:
    import json

    from cryptography.fernet import InvalidToken

    try:
        return SourceCredentials(**json.loads(_fernet(key).decrypt(token.encode())))
    except (InvalidToken, ValueError) as exc:
        raise CredentialsError("the job's sealed credentials cannot be opened with this credentials key") from exc


def new_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()

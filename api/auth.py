"""API keys: ``Authorization: Bearer <key>`` on every /v1/jobs request.

The service stores no key, only its SHA-256 (``ATTNONLY_API_KEYS``, comma-separated
``NAME:SHA256`` entries). A presented key is hashed and compared with every configured
hash in constant time. The entry's name owns the jobs the key creates: other keys see
404 for them. Make a key and its entry with::

    python -m api.auth alice
    # or by hand:  KEY="ak_$(openssl rand -hex 24)";  printf %s "$KEY" | sha256sum

With no keys configured every request is refused, unless ``ATTNONLY_ALLOW_ANONYMOUS`` is
set (development only): requests without a key are then served as one anonymous owner.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import secrets
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Optional

from fastapi import Depends, Request, Security
from fastapi.security import HTTPBearer

from api.deps import SettingsDep
from api.errors import ApiError
from shared.settings import Settings, parse_api_key

log = logging.getLogger(__name__)

MAX_TOKEN_LENGTH = 512
KEY_PREFIX = "ak_"

# Registered for the OpenAPI document ("Authorize" in /docs); the header is parsed below,
# so that every failure gets this API's error shape.
bearer_scheme = HTTPBearer(
    auto_error=False, scheme_name="ApiKey",
    description="An API key as a bearer token: `Authorization: Bearer <key>`.",
)


@dataclass(frozen=True)
class Principal:
    """Who is calling. ``owner`` is stored in the jobs it creates; None: anonymous."""

    owner: Optional[str]

    @property
    def label(self) -> str:
        return self.owner if self.owner is not None else "anonymous"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@lru_cache(maxsize=1)
def _warn_no_keys() -> None:  # once per process, not once per request
    log.warning("no API keys are configured (ATTNONLY_API_KEYS); every /v1/jobs request is refused")


def _unauthorized(message: str, invalid_token: bool) -> ApiError:
    challenge = 'Bearer realm="attnonly"' + (', error="invalid_token"' if invalid_token else "")
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


def _bearer_token(request: Request) -> Optional[str]:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("the Authorization header must read: Bearer <API key>", invalid_token=True)
    if len(token) > MAX_TOKEN_LENGTH or not token.isascii() or not token.isprintable() or " " in token:
        raise _unauthorized("the API key is not valid", invalid_token=True)
    return token


def identify(token: Optional[str], settings: Settings) -> Principal:
    """The caller behind ``token`` (None: no Authorization header), or ApiError 401."""
    if token is None:
        if settings.allow_anonymous:
            return Principal(owner=None)
        if not settings.api_keys:
            _warn_no_keys()
        raise _unauthorized("an API key is required: send Authorization: Bearer <key>", invalid_token=False)
    presented = hashlib.sha256(token.encode()).digest()
    owner = None
    # Every entry is compared, and each comparison takes the same time whatever matches.
    for key in settings.api_keys:
        if hmac.compare_digest(presented, key.digest):
            owner = key.name
    if owner is None:
        raise _unauthorized("the API key is not valid", invalid_token=True)
    return Principal(owner=owner)


async def authenticate(request: Request, settings: SettingsDep, _scheme=Security(bearer_scheme)) -> Principal:
    # async: a hash and a few comparisons, cheaper than FastAPI's hop to its thread pool.
    return identify(_bearer_token(request), settings)


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m api.auth",
        description="Make a new API key and the ATTNONLY_API_KEYS entry that accepts it.",
    )
    parser.add_argument("name", help="owner of the jobs this key creates (letters, digits, . _ @ -)")
    parser.add_argument("--hash", metavar="KEY", help="print the entry for an existing key instead")
    args = parser.parse_args(argv)
    key = args.hash or new_key()
    entry = f"{args.name}:{hash_key(key)}"
    try:
        parse_api_key(entry)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.hash:
        print(f"API key (give it to the client; it is shown once and stored nowhere):\n  {key}")
    print(f"Entry for ATTNONLY_API_KEYS (comma-separate several):\n  {entry}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

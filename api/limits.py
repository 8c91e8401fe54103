"""Limits on what one client can ask of the API: request body size, job creation rate."""
from __future__ import annotations

import hashlib
import math
import uuid
from typing import Callable, Optional

import redis

from api.errors import ApiError, error_response

# --- request body size --------------------------------------------------------------------


class BodySizeLimit:
    """ASGI middleware: a request body above ``limit()`` bytes is answered 413
    (``request_too_large``) before the application sees any of it.

    A declared Content-Length above the limit is refused at once; otherwise the body is
    read as it streams in (chunked bodies have no Content-Length) and refused as soon as
    the bytes received pass the limit, so at most ``limit`` bytes are ever held in memory.
    """

    def __init__(self, app, limit: Callable[[], int]):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, limit)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away; there is nobody to answer
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await self._refuse(scope, receive, send, limit)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return whole
            return await receive()  # after the body: only http.disconnect can follow

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope, receive, send, limit: int) -> None:
        response = error_response(
            413, "request_too_large", f"the request body is larger than the limit of {limit} bytes",
            # The rest of the body is never read: the connection cannot carry another request.
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _content_length(scope) -> Optional[int]:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


# --- job creation rate ----------------------------------------------------------------------

# A sliding window log in one sorted set per owner: a member per job created, scored by the
# Redis server's clock in ms (one clock for every API process). Atomic: the check and the
# additions happen in one script, so concurrent requests cannot overshoot the limit.
_SLIDING_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count + n > limit then
  if n > limit then return {0, window} end
  local k = count + n - limit - 1
  local oldest = redis.call('ZRANGE', KEYS[1], k, k, 'WITHSCORES')
  return {0, tonumber(oldest[2]) + window - now}
end
for i = 1, n do redis.call('ZADD', KEYS[1], now, ARGV[4] .. ':' .. i) end
redis.call('PEXPIRE', KEYS[1], window)
return {1, 0}
"""


class RateLimiter:
    """At most ``limit`` jobs per owner in any ``window_seconds``; ``limit`` 0: no limit."""

    def __init__(self, client: redis.Redis, prefix: str, limit: int, window_seconds: int):
        self.limit, self.window_seconds = limit, window_seconds
        self.prefix = prefix
        self._script = client.register_script(_SLIDING_WINDOW)

    def _key(self, owner: Optional[str]) -> str:
        tag = "anonymous" if owner is None else hashlib.sha256(owner.encode()).hexdigest()[:24]
        return f"{self.prefix}:rate:{tag}"

    def take(self, owner: Optional[str], jobs: int = 1) -> None:
        """Count ``jobs`` new jobs for ``owner``, or raise ApiError 429 (counting none)."""
        if self.limit <= 0 or jobs <= 0:
            return
        allowed, wait_ms = self._script(
            keys=[self._key(owner)],
            args=[self.window_seconds * 1000, self.limit, jobs, uuid.uuid4().hex],
        )
        if allowed:
            return
        retry_after = max(1, math.ceil(int(wait_ms) / 1000))
        if jobs > self.limit:
            message = (f"a batch of {jobs} jobs exceeds the limit of {self.limit} jobs per "
                       f"{self.window_seconds} s; send smaller batches")
        else:
            message = (f"at most {self.limit} jobs per {self.window_seconds} s; "
                       f"retry in {retry_after} s")
        raise ApiError(429, "rate_limited", message, headers={"Retry-After": str(retry_after)})

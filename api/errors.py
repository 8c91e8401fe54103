"""One error shape for every failure: ``{"error": {"code", "message", "fields"?}}``.

Codes are stable and meant for programs; messages are for people. No handler ever
returns a stack trace: unexpected exceptions are logged and answered with a generic 500.
"""
from __future__ import annotations

import logging
from typing import Optional

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import iter_route_contexts
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api.schemas import ErrorBody, ErrorResponse, FieldError
from shared.job_options import CALIBRATION_TAGS

log = logging.getLogger(__name__)


# The status of a well-formed request for a feature this deployment has switched off
# (webhooks_not_configured, credentials_not_accepted): refused for good, so not 503 (which says
# "retry shortly" and reads as a server fault), and not 422 (the request matches the document).
NOT_CONFIGURED = 403


class ApiError(Exception):
    def __init__(self, status_code: int, code: str, message: str, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status_code, self.code, self.message = status_code, code, message
        self.headers = headers


def error_response(status_code: int, code: str, message: str, headers=None) -> JSONResponse:
    return _respond(status_code, ErrorBody(code=code, message=message), headers)


def _respond(status_code: int, body: ErrorBody, headers=None) -> JSONResponse:
    return JSONResponse(
        ErrorResponse(error=body).model_dump(exclude_none=True), status_code=status_code, headers=headers
    )


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def field_errors(exc: RequestValidationError) -> list[FieldError]:
    fields = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        location, rest = (loc[0], loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else ("body", loc)
        # A union (calibration) names the branch it tried; the user wrote no such field.
        rest = tuple(p for p in rest if p not in CALIBRATION_TAGS)
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        fields.append(FieldError(location=str(location), path=_path(rest), message=message))
    return fields


def allowed_methods(request: Request) -> str:
    """Every method of every route on the request's path. Starlette's 405 names those of the
    first route that matched the path alone (GET /v1/jobs and POST /v1/jobs are two routes).
    A path that is literally a route's (/v1/jobs/batch) is that route's, as in OpenAPI, not
    also a template's (/v1/jobs/{job_id})."""
    matched: list[tuple[str, set[str]]] = []
    # Each route as included (FastAPI keeps included routers as branches of app.routes).
    for route in iter_route_contexts(request.app.routes):
        match, _ = route.matches(request.scope)
        if match == Match.PARTIAL:  # the path matched, the method did not
            matched.append((getattr(route, "path", ""), set(getattr(route, "methods", None) or ())))
    literal = [methods for path, methods in matched if path == request.url.path]
    return ", ".join(sorted(set().union(*(literal or [methods for _, methods in matched]))))


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _respond(exc.status_code, ErrorBody(code=exc.code, message=exc.message), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        fields = field_errors(exc)
        names = ", ".join(f.path or f.location for f in fields[:5])
        return _respond(422, ErrorBody(
            code="validation_error", message=f"invalid request: {names}", fields=fields,
        ))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        # 400: FastAPI could not decode the body (not UTF-8, say); a body that decodes but is
        # not valid JSON is a 422 validation_error, like any other invalid body.
        code = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": allowed_methods(request)}
        return _respond(exc.status_code, ErrorBody(code=code, message=str(exc.detail)), headers)

    @app.exception_handler(redis.RedisError)
    async def _redis_down(request: Request, exc: redis.RedisError):
        log.warning("redis unavailable: %s", exc)
        return _respond(503, ErrorBody(code="store_unavailable", message="the job store is unavailable; retry shortly"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _respond(500, ErrorBody(code="internal_error", message="an internal error occurred"))

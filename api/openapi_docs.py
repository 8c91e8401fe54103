"""The error responses every route can give, added to each operation of the OpenAPI
document from what its route depends on, so that the document lists every status code the
API answers with (the schema-driven fuzzer, tests/e2e/test_openapi_fuzz.py, holds it to it).

An operation's own entry for a status, when it has one, is kept: it says more. FastAPI's
default 422 entry is replaced: its body (HTTPValidationError) is not this API's error shape.
"""
from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts

from api.auth import authenticate
from api.deps import get_job_reader, get_store

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
FASTAPI_422 = "#/components/schemas/HTTPValidationError"


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}


UNAUTHORIZED = _error("unauthorized: no API key, or not a valid one (see WWW-Authenticate)")
VALIDATION = _error("validation_error: a parameter or the body does not match this document; "
                    "`fields` names each one")
MALFORMED = _error("malformed_body: the body cannot be read as UTF-8 JSON")
TOO_LARGE = _error("request_too_large: the request body is over the size limit")
STORE_DOWN = _error("store_unavailable: Redis is unreachable; retry shortly")


def _calls(dependant: Dependant) -> set[Callable]:
    found = {dependant.call} if dependant.call is not None else set()
    for sub in dependant.dependencies:
        found |= _calls(sub)
    return found


def _has_parameters(dependant: Dependant) -> bool:
    return bool(dependant.path_params or dependant.query_params or dependant.header_params
                or dependant.cookie_params or dependant.body_params
                or any(_has_parameters(sub) for sub in dependant.dependencies))


def _common_errors(route) -> dict[str, dict[str, Any]]:
    calls = _calls(route.dependant)
    extra: dict[str, dict[str, Any]] = {}
    if authenticate in calls:
        extra["401"] = UNAUTHORIZED
    if _has_parameters(route.dependant):
        extra["422"] = VALIDATION
    if route.body_field is not None:
        extra["400"] = MALFORMED
        extra["413"] = TOO_LARGE
    if get_store in calls or get_job_reader in calls:
        extra["503"] = STORE_DOWN
    return extra


def _is_fastapi_422(response: dict[str, Any]) -> bool:
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    return schema.get("$ref") == FASTAPI_422


def document_errors(app: FastAPI) -> None:
    """Serve the OpenAPI document with the common error responses added; call once, after
    every router is included."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = generate()
        for route in iter_route_contexts(app.routes):
            if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
                continue
            item = spec["paths"].get(route.path_format, {})
            for method in route.methods:
                operation = item.get(method.lower())
                if operation is None:
                    continue
                responses = operation.setdefault("responses", {})
                for status, response in _common_errors(route).items():
                    if status not in responses or (status == "422" and _is_fastapi_422(responses[status])):
                        responses[status] = response
        schemas = spec.get("components", {}).get("schemas", {})
        if FASTAPI_422.rsplit("/", 1)[1] in schemas and FASTAPI_422 not in str(spec["paths"]):
            del schemas["HTTPValidationError"], schemas["ValidationError"]
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]

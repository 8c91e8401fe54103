"""The job page: ``GET /`` and ``GET /jobs/{id}`` serve one static HTML page (api/pages/)
with a little JavaScript that talks to /v1 with the API key the user pastes into it.

Served without a key (the page holds no data; every API call it makes carries the key),
under a strict Content-Security-Policy: nothing but this service's own script and style,
and connections only to this service and to the S3 endpoint its presigned URLs point at
(fetches of /report and /artifacts follow the 307 there)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path as FsPath
from typing import Optional
from urllib.parse import urlsplit

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse

from api.deps import SettingsDep
from api.routes.jobs import JobId

router = APIRouter(include_in_schema=False)

PAGES = FsPath(__file__).resolve().parent.parent / "pages"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
# boto3 signs for AWS when no endpoint is configured: presigned URLs then point at some
# s3[.region].amazonaws.com host.
AWS_S3 = "https://*.amazonaws.com"


@lru_cache(maxsize=None)
def _read(name: str) -> bytes:
    return (PAGES / name).read_bytes()


def _origin(url: Optional[str]) -> str:
    if not url:
        return AWS_S3
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else AWS_S3


def content_security_policy(s3_endpoint: Optional[str]) -> str:
    s3 = _origin(s3_endpoint)
    return "; ".join([
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        f"connect-src 'self' {s3}",
        f"frame-src {s3}",  # the report, shown from its presigned URL
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ])


def _page(settings) -> HTMLResponse:
    return HTMLResponse(_read("index.html"), headers={
        "Content-Security-Policy": content_security_policy(settings.public_s3_endpoint),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    })


@router.get("/")
def index_page(settings: SettingsDep):
    return _page(settings)


@router.get("/jobs/{job_id}")
def job_page(job_id: JobId, settings: SettingsDep):
    # The same page: its script reads the id from the path.
    return _page(settings)


@router.get("/pages/{name}")
def page_asset(name: str):
    if name not in ASSETS:
        return Response(status_code=404)
    return Response(_read(name), media_type=ASSETS[name],
                    headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

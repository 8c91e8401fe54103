"""The HTTP API: ``uvicorn api.main:app``. OpenAPI at /docs and /openapi.json."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.routing import APIRoute

from api import errors
from api.routes import api_router, health

DESCRIPTION = """
Converts transformer checkpoints (GPT-2, LLaMA and friends, as Hugging Face directories)
into attention-only transformers that compute the same function, checks them layer by
layer against the source, and hands back the converted checkpoint.

Submit a job with `POST /v1/jobs`, poll `GET /v1/jobs/{id}`, then download the
artifacts from `GET /v1/jobs/{id}/artifacts/{name}`.
"""


def _operation_id(route: APIRoute) -> str:
    # Short, stable names for generated clients: "jobs-create_job".
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


app = FastAPI(
    title="attnonly conversion service",
    version="1.0.0",
    description=DESCRIPTION,
    generate_unique_id_function=_operation_id,
)
app.include_router(api_router, prefix="/v1")
app.include_router(health.router)
errors.install(app)

"""The versioned API: every route under /v1."""
from fastapi import APIRouter

from api.routes import architectures, events, health, jobs, webhooks

api_router = APIRouter()
api_router.include_router(jobs.router)
api_router.include_router(events.router)
api_router.include_router(webhooks.router)
api_router.include_router(architectures.router)
# The probes are also served at the root (see api.main), where orchestrators expect them.
api_router.include_router(health.router, include_in_schema=False)

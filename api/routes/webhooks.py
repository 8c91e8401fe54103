"""/v1/webhooks: the owner's signing secret, and the checks of a job's webhook_url at submission.

Jobs carry a ``webhook_url`` (api.schemas.JobCreate); the worker POSTs their events there,
signed with the owner's secret (shared.webhook_signing). Receivers verify with it, e.g.
``standardwebhooks.Webhook(secret).verify(body, headers)`` (README.md, "Webhooks")."""
from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from api.auth import PrincipalDep
from api.deps import SettingsDep
from api.errors import NOT_CONFIGURED, ApiError
from api.schemas import ErrorResponse, JobCreate
from shared.settings import Settings
from shared.webhook_delivery import WebhookTargetError, check_target
from shared.webhook_signing import owner_secret

router = APIRouter(
    prefix="/webhooks", tags=["webhooks"],
    responses={401: {"model": ErrorResponse, "description": "no API key, or not a valid one"}},
)


class WebhookSecret(BaseModel):
    secret: str = Field(description="whsec_<base64>: the key of the HMAC-SHA256 in webhook-signature")


# The check's codes and their statuses: a blocked address is a refusal like source_forbidden;
# webhook_url_invalid cannot follow a webhook_url that matches its pattern (api.url_patterns).
_TARGET_STATUS = {"webhook_address_blocked": 403, "webhook_url_invalid": 422}


def _not_configured() -> ApiError:
    return ApiError(NOT_CONFIGURED, "webhooks_not_configured",
                    "this service sends no webhooks (no ATTNONLY_WEBHOOK_SIGNING_KEY is configured)")


def check_webhooks(bodies: list[JobCreate], settings: Settings, batch: bool) -> None:
    """403 for a webhook_url the service will not serve: no signing key (webhooks_not_configured)
    or a literal address in a blocked range (webhook_address_blocked); names are checked at each
    delivery. A batch is refused whole, before any job is created."""
    for i, body in enumerate(bodies):
        if body.webhook_url is None:
            continue
        if settings.webhook_signing_key is None:
            raise _not_configured()
        try:
            check_target(body.webhook_url, settings.fetch_allow_hosts)
        except WebhookTargetError as exc:
            message = f"[{i}].webhook_url: {exc.message}" if batch else exc.message
            raise ApiError(_TARGET_STATUS[exc.code], exc.code, message) from None


@router.get(
    "/secret", response_model=WebhookSecret,
    responses={NOT_CONFIGURED: {"model": ErrorResponse, "description": "webhooks_not_configured: this service "
                                                                        "sends no webhooks"}},
    summary="Your webhook signing secret (the same for all your jobs)",
)
def get_secret(principal: PrincipalDep, settings: SettingsDep, response: Response) -> WebhookSecret:
    if settings.webhook_signing_key is None:
        raise _not_configured()
    response.headers["Cache-Control"] = "no-store"  # a secret: no cache on the way keeps it
    return WebhookSecret(secret=owner_secret(settings.webhook_signing_key, principal.owner))

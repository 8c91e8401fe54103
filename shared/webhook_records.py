"""What a job record keeps about its webhook: the events asked for and each delivery attempt.

Apart from shared.webhook_delivery so that the job record (shared.jobs) imports no HTTP code.
"""
from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Optional

from pydantic import BaseModel, Field

# Attempts kept in a job record, newest last: a receiver that is down for a long conversion
# must not grow the record without bound.
MAX_RECORDED_ATTEMPTS = 100


class WebhookEvent(str, Enum):
    started = "started"      # a worker took the job (again, after a redelivery)
    progress = "progress"    # a stage moved on (rate-limited, see shared.webhook_notify)
    completed = "completed"  # the job finished: succeeded, failed or cancelled


ALL_EVENTS = tuple(WebhookEvent)


class WebhookAttempt(BaseModel):
    """One POST to the job's webhook_url."""

    event: WebhookEvent
    message_id: str = Field(description="the webhook-id header; the same for every attempt of one event")
    attempt: int = Field(ge=1, description="1 for the first try of this event, 2 for its first retry, ...")
    status: Optional[int] = Field(None, description="the receiver's HTTP status; null when none came back")
    error: Optional[str] = Field(None, description="why no 2xx: webhook_http_error, webhook_timeout, "
                                 "webhook_unreachable, webhook_address_blocked, webhook_url_invalid")
    at: datetime = Field(description="when the attempt ended")

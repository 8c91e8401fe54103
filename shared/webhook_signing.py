"""Standard Webhooks signatures (https://www.standardwebhooks.com), with one secret per owner.

Every owner's secret is derived from the one signing key in the settings
(``ATTNONLY_WEBHOOK_SIGNING_KEY``): ``whsec_`` + base64(HMAC-SHA256(key, label + owner)). No
secret is stored anywhere, the API and every worker derive the same one, and rotating the
signing key rotates every owner's secret at once. An owner reads theirs from
``GET /v1/webhooks/secret``.

Signing itself is Svix's reference implementation (the ``standardwebhooks`` package): the
``webhook-signature`` header is ``v1,<base64 HMAC-SHA256 over "{id}.{timestamp}.{body}">``.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime, timezone
from typing import Optional

from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook

SECRET_PREFIX = "whsec_"
# Domain separation: the signing key may never yield a value that means something elsewhere.
_LABEL = b"attnonly webhook secret v1\0"


def owner_secret(signing_key: SecretStr, owner: Optional[str]) -> str:
    """The owner's webhook secret, ``whsec_<base64 of 32 bytes>``. The anonymous owner (None)
    derives from the empty name, which no API key name can be (see shared.settings)."""
    digest = hmac.new(signing_key.get_secret_value().encode(), _LABEL + (owner or "").encode(),
                      hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(digest).decode()


def signed_headers(secret: str, message_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body`` (the exact text that is sent)."""
    signature = Webhook(secret).sign(message_id, datetime.fromtimestamp(timestamp, tz=timezone.utc), body)
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}

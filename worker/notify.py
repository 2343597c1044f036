"""A job's webhook: where to send its end (``notify``) and how the delivery went.

Plain models, imported by the job record (``worker.jobs``), the HTTP schemas and the
dispatcher (``worker.webhooks``). The secret is a ``SecretStr``: it prints as ``**********``
in reprs, logs and JSON, and only the job store asks for its value
(``model_dump(mode="json", context={"reveal_secrets": True})``) to keep it.
"""

from __future__ import annotations

import uuid
from enum import Enum
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializationInfo,
    field_serializer,
)

REVEAL_SECRETS = {"reveal_secrets": True}


class NotifyTarget(BaseModel):
    """Where the service POSTs the job's summary when the job ends (succeeded, failed or
    cancelled), signed with ``secret`` (see the README, "Webhooks")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(
        ...,
        min_length=1,
        max_length=2048,
        description="http(s) URL of the receiver; redirects are never followed.",
        examples=["https://ci.example.com/hooks/flow-compress"],
    )
    secret: SecretStr = Field(
        ...,
        min_length=16,
        max_length=256,
        description="Shared secret for the HMAC-SHA256 signature; never shown back.",
    )

    @field_serializer("secret", when_used="json")
    def _dump_secret(self, secret: SecretStr, info: SerializationInfo) -> str:
        if info.context and info.context.get("reveal_secrets"):
            return secret.get_secret_value()
        return str(secret)


class WebhookUrlError(ValueError):
    """A notify URL the service will not call; ``code`` is the API's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_target_url(url: str, allowed_hosts: list[str]) -> str:
    """The URL's host, or ``WebhookUrlError``: ``invalid_webhook_url`` unless it is an
    absolute http(s) URL with a host and no credentials in it; ``webhook_host_not_allowed``
    when ``allowed_hosts`` is set and names neither the host nor a ``*.`` parent of it."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise WebhookUrlError("invalid_webhook_url", f"notify.url is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookUrlError(
            "invalid_webhook_url", "notify.url must be an http:// or https:// URL"
        )
    host = (parts.hostname or "").lower()
    if not host:
        raise WebhookUrlError("invalid_webhook_url", "notify.url has no host")
    if parts.username is not None or parts.password is not None:
        # The URL is shown on the job; a password in it would be too.
        raise WebhookUrlError(
            "invalid_webhook_url", "notify.url must not carry credentials; use the secret"
        )
    if allowed_hosts and not host_allowed(host, allowed_hosts):
        raise WebhookUrlError(
            "webhook_host_not_allowed",
            f"notify.url's host {host} is not in this server's webhook allow-list",
        )
    return host


def host_allowed(host: str, allowed_hosts: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed_hosts:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*."):
            if host.endswith(entry[1:]):
                return True
        elif host == entry:
            return True
    return False


class DeliveryState(str, Enum):
    pending = "pending"  # waiting for its next attempt
    delivered = "delivered"  # a receiver answered 2xx
    failed = "failed"  # no 2xx within the retry bound (or the target is no longer allowed)


class WebhookDelivery(BaseModel):
    """The delivery of a job's end event, as shown on the job."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., description="Stable delivery id: the same on every attempt.")
    event: str = Field(..., description="job.succeeded, job.failed or job.cancelled")
    state: DeliveryState = DeliveryState.pending
    attempts: int = 0
    created_at: float = Field(..., description="When the job ended (Unix seconds).")
    next_attempt_at: float | None = None
    last_attempt_at: float | None = None
    last_status: int | None = Field(None, description="HTTP status of the last attempt.")
    last_error: str | None = None
    delivered_at: float | None = None

    @classmethod
    def pending_for(cls, state: str, now: float) -> WebhookDelivery:
        return cls(id=uuid.uuid4().hex, event=f"job.{state}", created_at=now, next_attempt_at=now)


__all__ = [
    "REVEAL_SECRETS",
    "DeliveryState",
    "NotifyTarget",
    "WebhookDelivery",
    "WebhookUrlError",
    "check_target_url",
    "host_allowed",
]

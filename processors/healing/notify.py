"""Escalation notifier: posts escalation decisions to a Slack incoming webhook or the PagerDuty Events API v2.

Formats (as documented by the vendors):

* **Slack incoming webhook** (https://api.slack.com/messaging/webhooks): ``POST <webhook url>`` with
  ``Content-Type: application/json`` and ``{"text": <fallback text>, "blocks": [<section block with
  mrkdwn text>, <context block>]}``; Slack answers ``200`` with body ``ok``.
* **PagerDuty Events API v2** (https://developer.pagerduty.com/docs/events-api-v2/trigger-events/):
  ``POST https://events.pagerduty.com/v2/enqueue`` with ``{"routing_key", "event_action": "trigger",
  "dedup_key", "payload": {"summary" (<= 1024 chars), "source", "severity" (critical, error, warning
  or info), "timestamp" (ISO 8601), "component", "group", "class", "custom_details"}}``; PagerDuty
  answers ``202`` with ``{"status": "success", "message": "Event processed", "dedup_key"}``.

Delivery is retried with exponential backoff and full jitter (tenacity ``wait_random_exponential``)
on a transport error, HTTP 429 or 5xx; any other status is final. The result is itself a decision:
``escalation_notified`` or, after the last attempt, ``escalation_notify_failed`` (with the reason), so a
webhook that is down is an event, never a crash or a loop. The dedup key is the escalation's id, so
a retried or replayed notification does not page twice on PagerDuty.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import httpx
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from processors.healing.decisions import Decision

__all__ = ["Notifier", "NotifierConfig", "NotifyError", "pagerduty_body", "slack_body"]

PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"
_SUMMARY_MAX = 1024


class NotifyError(Exception):
    """A webhook answered with a status that retrying will not fix, or kept failing."""

    def __init__(self, reason: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.status = status


@dataclass(frozen=True, slots=True)
class NotifierConfig:
    """Where escalations go.

    Attributes:
        kind: ``slack`` or ``pagerduty``.
        url: the Slack webhook URL, or the PagerDuty enqueue URL (default the public one).
        routing_key: the PagerDuty integration key (required for ``pagerduty``).
        source: the ``source`` PagerDuty shows (the emitting service).
        max_attempts: delivery attempts in all.
        backoff_max_seconds: cap of the full-jitter backoff between attempts.
        timeout_seconds: HTTP timeout of one attempt.
    """

    kind: Literal["slack", "pagerduty"]
    url: str = PAGERDUTY_URL
    routing_key: str | None = None
    source: str = "sophia-backbone-healer"
    max_attempts: int = 4
    backoff_max_seconds: float = 8.0
    timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.kind not in ("slack", "pagerduty"):
            raise ValueError(f"notifier kind is slack or pagerduty, not {self.kind!r}")
        if self.kind == "pagerduty" and not self.routing_key:
            raise ValueError("a pagerduty notifier needs its routing_key (the integration key)")
        if self.max_attempts < 1:
            raise ValueError("max_attempts is at least 1")


def _summary(decision: Decision) -> str:
    d = decision.details
    reason = d.get("reason") or (d.get("evidence") or {}).get("why") or d.get("action") or ""
    text = f"[healer] {decision.kind} on {decision.subject}" + (f": {reason}" if reason else "")
    return text[:_SUMMARY_MAX]


def _severity(decision: Decision) -> str:
    if decision.kind == "escalation":
        return "critical" if decision.subject.startswith("request:") else "error"
    return "warning"


def slack_body(decision: Decision) -> dict[str, Any]:
    """The Slack incoming-webhook JSON of a decision: ``{"text", "blocks"}``."""
    summary = _summary(decision)
    return {
        "text": summary,
        "blocks": [
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": f"*{decision.kind}* `{decision.subject}`\n{summary}"},
            },
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": f"id `{decision.id}` · {decision.event_time.isoformat()} · config v{decision.config_version}"
                        " · `backbone healing ack " + decision.id + " --by NAME --note TEXT`",
                    }
                ],
            },
        ],
    }


def pagerduty_body(decision: Decision, routing_key: str, source: str) -> dict[str, Any]:
    """The PagerDuty Events API v2 trigger event of a decision (dedup key = decision id)."""
    scope = decision.subject.split(":", 1)[0]
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": decision.id,
        "payload": {
            "summary": _summary(decision),
            "source": source,
            "severity": _severity(decision),
            "timestamp": decision.event_time.isoformat(),
            "component": decision.subject,
            "group": scope,
            "class": decision.kind,
            "custom_details": json.loads(json.dumps(decision.as_json(), default=str)),
        },
    }


class Notifier:
    """Posts escalations to one webhook.

    Args:
        config: where and how.
        client: an ``httpx.AsyncClient`` to use (default: one per call).
    """

    def __init__(self, config: NotifierConfig, client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self._client = client

    def body(self, decision: Decision) -> dict[str, Any]:
        """The JSON body this notifier posts for ``decision``."""
        if self.config.kind == "slack":
            return slack_body(decision)
        return pagerduty_body(decision, self.config.routing_key or "", self.config.source)

    async def _post_once(self, client: httpx.AsyncClient, body: dict[str, Any]) -> int:
        try:
            r = await client.post(self.config.url, json=body, timeout=self.config.timeout_seconds)
        except httpx.TransportError as exc:
            raise NotifyError(f"{type(exc).__name__}: {exc}", retryable=True) from exc
        if r.status_code == 429 or r.status_code >= 500:
            raise NotifyError(f"HTTP {r.status_code}: {r.text[:200]}", retryable=True, status=r.status_code)
        if r.status_code >= 300:
            raise NotifyError(f"HTTP {r.status_code}: {r.text[:200]}", retryable=False, status=r.status_code)
        return r.status_code

    async def notify(self, decision: Decision, *, at: datetime | None = None) -> Decision:
        """Deliver ``decision``; never raises for a delivery problem.

        Args:
            decision: the escalation (any decision is accepted).
            at: event time of the outcome decision (default: the escalation's own time).

        Returns:
            ``escalation_notified`` (details: ``channel``, ``attempts``, ``status``) or
            ``escalation_notify_failed`` (details: ``channel``, ``attempts``, ``reason``,
            ``retryable``), with the escalation's id as causation id.
        """
        body = self.body(decision)
        attempts = 0
        owns = self._client is None
        client = self._client or httpx.AsyncClient()
        base = {"escalation_id": decision.id, "channel": self.config.kind}
        try:
            retrying = AsyncRetrying(
                stop=stop_after_attempt(self.config.max_attempts),
                wait=wait_random_exponential(multiplier=0.25, max=self.config.backoff_max_seconds),
                retry=retry_if_exception(lambda e: isinstance(e, NotifyError) and e.retryable),
                reraise=False,
            )
            status = None
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    status = await self._post_once(client, body)
            kind, details = "escalation_notified", {**base, "attempts": attempts, "status": status}
        except RetryError as exc:
            err = exc.last_attempt.exception()
            kind, details = (
                "escalation_notify_failed",
                {**base, "attempts": attempts, "reason": str(err), "retryable": True},
            )
        except NotifyError as exc:
            kind, details = (
                "escalation_notify_failed",
                {**base, "attempts": attempts, "reason": exc.reason, "retryable": False},
            )
        finally:
            if owns:
                await client.aclose()
        return Decision(
            kind=kind,
            subject=decision.subject,
            event_time=at or decision.event_time,
            config_version=decision.config_version,
            causation_id=decision.id,
            details=details,
        )

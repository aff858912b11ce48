"""Mapping verified Slack and Linear webhook requests to :class:`~connectors.webhooks.ExternalEvent`, and
an external event to its Avro record (``sophia.external.ExternalEvent`` on ``external.events``).

The signature checks and the GitHub mapping are in :mod:`connectors.webhooks`; the HTTP routes that call
these are in :mod:`backbone.http.ingest`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from connectors.github_events import slack_message_refs
from connectors.webhooks import ExternalEvent, WebhookPayloadError, extract_github_refs
from streams.catalogue import CATALOGUE
from streams.envelope import parse_time

__all__ = [
    "EXTERNAL_EVENT_SCHEMA",
    "EXTERNAL_TOPICS",
    "external_event_to_avro",
    "map_linear_webhook",
    "map_slack_webhook",
]

EXTERNAL_EVENT_SCHEMA = "sophia.external.ExternalEvent"

EXTERNAL_TOPICS = [CATALOGUE["external.events"]]
"""Topics the webhooks produce to (for :data:`streams.catalogue.CATALOGUE`)."""

_EXCERPT_CHARS = 280


def _excerpt(text: str | None) -> str | None:
    if not text or not text.split():
        return None
    collapsed = " ".join(text.split())
    return collapsed if len(collapsed) <= _EXCERPT_CHARS else collapsed[: _EXCERPT_CHARS - 1].rstrip() + "…"


def external_event_to_avro(e: ExternalEvent) -> dict[str, Any]:
    """The ``sophia.external.ExternalEvent`` Avro datum of an :class:`ExternalEvent`."""
    return {
        "platform": e.platform,
        "kind": e.kind,
        "entity": e.entity,
        "actor": e.actor,
        "occurred_at": e.occurred_at,
        "url": e.url,
        "title": e.title,
        "body_excerpt": e.body_excerpt,
        "refs": list(e.refs),
        "source_id": e.source_id,
        "thread": e.thread,
    }


def _epoch_seconds(value: Any) -> datetime | None:
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def map_slack_webhook(
    body: bytes, content_type: str, received_at: datetime
) -> ExternalEvent | dict[str, Any]:
    """Map a verified Slack request to an :class:`ExternalEvent`.

    Handles the Events API (JSON: ``url_verification``, whose answer is returned as a dict, and
    ``event_callback``) and slash commands and interactions (form-encoded, api.slack.com "Slash
    commands" and "Handling user interaction").

    Raises:
        WebhookPayloadError: a body that is neither.
    """
    if "application/json" in content_type:
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WebhookPayloadError(f"slack body is not JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise WebhookPayloadError("slack body is not a JSON object")
        if payload.get("type") == "url_verification":
            return {"challenge": str(payload.get("challenge", ""))}
        if payload.get("type") != "event_callback" or not isinstance(payload.get("event"), dict):
            raise WebhookPayloadError(f"unsupported slack payload type {payload.get('type')!r}")
        ev = payload["event"]
        etype = str(ev.get("type") or "unknown") + (f".{ev['subtype']}" if ev.get("subtype") else "")
        team = str(payload.get("team_id") or "unknown")
        channel = ev.get("channel") if isinstance(ev.get("channel"), str) else None
        text = ev.get("text") if isinstance(ev.get("text"), str) else None
        # A message is its own entity (slack:<team>/<channel>/<ts>), as in the export importer, so the
        # correlator keeps every message of a channel, not only the first; its GitHub references are read.
        ts = ev.get("ts") if isinstance(ev.get("ts"), str) else None
        entity = f"slack:{team}/{channel}" if channel else f"slack:{team}"
        thread = None
        if channel and ts and ev.get("type") == "message":
            entity = f"{entity}/{ts}"
            # A reply carries its parent's ts as thread_ts (api.slack.com "Retrieving threads"); the parent,
            # posted before any reply, carries none, so a top-level message is its own thread.
            thread_ts = ev.get("thread_ts") if isinstance(ev.get("thread_ts"), str) else ts
            thread = f"slack:{team}/{channel}/{thread_ts}"
        return ExternalEvent(
            platform="slack",
            kind=f"slack.{etype}",
            entity=entity,
            actor=str(ev["user"]) if ev.get("user") else None,
            occurred_at=_epoch_seconds(ev.get("event_ts"))
            or _epoch_seconds(payload.get("event_time"))
            or received_at,
            url=None,
            title=None,
            body_excerpt=_excerpt(text),
            refs=slack_message_refs(text, ()),
            source_id=str(payload.get("event_id") or hashlib.sha256(body).hexdigest()),
            thread=thread,
        )
    try:
        form = {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
    except UnicodeDecodeError as exc:
        raise WebhookPayloadError("slack form body is not UTF-8") from exc
    if "payload" in form:
        try:
            inter = json.loads(form["payload"])
        except json.JSONDecodeError as exc:
            raise WebhookPayloadError(f"slack interaction payload is not JSON: {exc}") from exc
        if not isinstance(inter, dict):
            raise WebhookPayloadError("slack interaction payload is not a JSON object")
        team = (
            (inter.get("team") or {}).get("id", "unknown")
            if isinstance(inter.get("team"), dict)
            else "unknown"
        )
        user = inter.get("user") if isinstance(inter.get("user"), dict) else {}
        return ExternalEvent(
            platform="slack", kind=f"slack.interaction.{inter.get('type', 'unknown')}", entity=f"slack:{team}",
            actor=user.get("username") or user.get("id"), occurred_at=received_at, url=None, title=None,
            body_excerpt=None, refs=(), source_id=str(inter.get("trigger_id") or hashlib.sha256(body).hexdigest()),
        )  # fmt: skip
    if "command" not in form:
        raise WebhookPayloadError("slack form body has neither command nor payload")
    team = form.get("team_id") or "unknown"
    channel = form.get("channel_id")
    return ExternalEvent(
        platform="slack",
        kind=f"slack.command.{form['command'].lstrip('/')}",
        entity=f"slack:{team}/{channel}" if channel else f"slack:{team}",
        actor=form.get("user_name") or form.get("user_id"),
        occurred_at=received_at,
        url=None,
        title=None,
        body_excerpt=_excerpt(form.get("text")),
        refs=(),
        source_id=form.get("trigger_id") or hashlib.sha256(body).hexdigest(),
    )


def map_linear_webhook(payload: Mapping[str, Any], delivery_id: str) -> ExternalEvent:
    """Map a verified Linear webhook (``action``, ``type``, ``data``, ``url``, ``createdAt``) to an
    :class:`ExternalEvent` (linear.app developers, "Webhooks").

    Raises:
        WebhookPayloadError: ``action``, ``type`` or ``data`` is missing.
    """
    action, type_, data = payload.get("action"), payload.get("type"), payload.get("data")
    if not isinstance(action, str) or not isinstance(type_, str) or not isinstance(data, dict):
        raise WebhookPayloadError("linear webhook has no action, type or data object")
    issue = data.get("issue") if isinstance(data.get("issue"), dict) else {}
    ident = data.get("identifier") or issue.get("identifier") or data.get("id") or "unknown"
    occurred = None
    for v in (payload.get("createdAt"), data.get("updatedAt"), data.get("createdAt")):
        if isinstance(v, str):
            try:
                occurred = parse_time(v)
                break
            except ValueError:
                continue
    if occurred is None:
        ts = payload.get("webhookTimestamp")
        occurred = datetime.fromtimestamp(ts / 1000, UTC) if isinstance(ts, int) else datetime.now(UTC)
    actor = payload.get("actor") if isinstance(payload.get("actor"), dict) else {}
    text = data.get("body") or data.get("description")
    return ExternalEvent(
        platform="linear",
        kind=f"linear.{type_.lower()}.{action}",
        entity=f"linear:{ident}",
        actor=actor.get("name") or actor.get("id"),
        occurred_at=occurred.astimezone(UTC),
        url=payload.get("url") if isinstance(payload.get("url"), str) else data.get("url"),
        title=data.get("title") if isinstance(data.get("title"), str) else None,
        body_excerpt=_excerpt(text if isinstance(text, str) else None),
        refs=tuple(r for r in extract_github_refs(text, "unknown/unknown") if "unknown/unknown" not in r)
        if isinstance(text, str) else (),
        source_id=delivery_id,
    )  # fmt: skip

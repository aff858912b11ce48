"""Webhook source adapters: signature verification and mapping to :class:`ExternalEvent`.

Signatures (all HMAC-SHA256 over the *raw* request body, compared in constant time):

* GitHub: ``X-Hub-Signature-256: sha256=<hex>`` over the body
  (docs.github.com, "Validating webhook deliveries").
* Slack: ``X-Slack-Signature: v0=<hex>`` over ``v0:{X-Slack-Request-Timestamp}:{body}``; a request
  whose timestamp is more than 5 minutes from ``now`` is refused (api.slack.com, "Verifying requests
  from Slack").
* Linear: ``Linear-Signature: <hex>`` over the body, and the body's ``webhookTimestamp`` (epoch
  milliseconds) must lie within a window of ``now`` (linear.app developers, "Webhooks").

``now`` is always a parameter, never read from the clock here, so a verification is reproducible.

The mappers turn a GitHub event, either an Events API / GH Archive object (``{"id", "type":
"PullRequestEvent", "actor", "repo", "payload", "created_at"}``) or a webhook delivery
(``X-GitHub-Event`` header + body), into one frozen :class:`ExternalEvent`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from connectors.errors import ConnectorError

__all__ = [
    "LINEAR_TOLERANCE",
    "SLACK_TOLERANCE",
    "ExternalEvent",
    "StaleWebhookError",
    "WebhookPayloadError",
    "WebhookSignatureError",
    "extract_github_refs",
    "github_signature",
    "linear_signature",
    "map_github_event",
    "map_github_events",
    "map_github_webhook",
    "slack_signature",
    "verify_github_signature",
    "verify_linear_signature",
    "verify_slack_signature",
]

SLACK_TOLERANCE = timedelta(minutes=5)
"""Slack's documented replay window: a request older or newer than this is refused."""

LINEAR_TOLERANCE = timedelta(minutes=1)
"""Linear's recommended window for ``webhookTimestamp``."""

_EXCERPT_CHARS = 280


class WebhookSignatureError(ConnectorError, ValueError):
    """A webhook request whose signature is missing, malformed or does not match the body.

    Attributes:
        platform: ``"github"``, ``"slack"`` or ``"linear"``.
        reason: what is wrong, in one line (never the expected signature).
    """

    def __init__(self, platform: str, reason: str) -> None:
        self.platform = platform
        self.reason = reason
        super().__init__(f"{platform} webhook refused: {reason}")


class StaleWebhookError(WebhookSignatureError):
    """A signed webhook request whose timestamp lies outside the allowed window (a possible replay).

    Attributes:
        skew: ``now - request time``; positive for a request from the past.
    """

    def __init__(self, platform: str, reason: str, skew: timedelta) -> None:
        self.skew = skew
        super().__init__(platform, reason)


class WebhookPayloadError(ConnectorError, ValueError):
    """A webhook or event body that cannot be mapped (not JSON, or a field the mapping needs is missing)."""


# --------------------------------------------------------------------------------------------- signatures


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def _body(body: str | bytes) -> bytes:
    return body.encode() if isinstance(body, str) else body


def _hex_hmac(secret: str | bytes, message: bytes) -> str:
    return hmac.new(_key(secret), message, hashlib.sha256).hexdigest()


def github_signature(secret: str | bytes, body: str | bytes) -> str:
    """Return the ``X-Hub-Signature-256`` value GitHub sends for ``body``.

    Args:
        secret: the webhook secret (UTF-8 when ``str``).
        body: the raw request body (UTF-8 when ``str``).

    Returns:
        ``"sha256=" + hex(HMAC-SHA256(secret, body))``.
    """
    return "sha256=" + _hex_hmac(secret, _body(body))


def verify_github_signature(*, secret: str | bytes, body: bytes, signature_header: str | None) -> None:
    """Check a GitHub delivery's ``X-Hub-Signature-256`` header against the raw body.

    Args:
        secret: the webhook secret.
        body: the raw request body, exactly as received (before any JSON parsing).
        signature_header: the ``X-Hub-Signature-256`` header value, or ``None`` when absent.

    Raises:
        WebhookSignatureError: when the header is absent, not ``sha256=<64 hex>``, or does not match.
    """
    if not signature_header:
        raise WebhookSignatureError("github", "no X-Hub-Signature-256 header")
    if not re.fullmatch(r"sha256=[0-9a-fA-F]{64}", signature_header.strip()):
        raise WebhookSignatureError("github", "X-Hub-Signature-256 is not of the form sha256=<64 hex digits>")
    expected = github_signature(secret, body)
    if not hmac.compare_digest(expected.encode(), signature_header.strip().lower().encode()):
        raise WebhookSignatureError("github", "X-Hub-Signature-256 does not match the body")


def slack_signature(secret: str | bytes, timestamp: str | int, body: str | bytes) -> str:
    """Return the ``X-Slack-Signature`` value Slack sends (signing version ``v0``).

    Args:
        secret: the app's signing secret.
        timestamp: the ``X-Slack-Request-Timestamp`` header (epoch seconds).
        body: the raw request body.

    Returns:
        ``"v0=" + hex(HMAC-SHA256(secret, "v0:{timestamp}:{body}"))``.
    """
    base = b"v0:" + str(timestamp).encode() + b":" + _body(body)
    return "v0=" + _hex_hmac(secret, base)


def _check_window(platform: str, sent_at: datetime, now: datetime, tolerance: timedelta) -> None:
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    skew = now - sent_at
    if abs(skew) > tolerance:
        raise StaleWebhookError(
            platform,
            f"request time {sent_at.isoformat()} is {abs(skew).total_seconds():.0f} s from now "
            f"(allowed {tolerance.total_seconds():.0f} s)",
            skew,
        )


def verify_slack_signature(
    *,
    secret: str | bytes,
    body: bytes,
    signature_header: str | None,
    timestamp_header: str | None,
    now: datetime,
    tolerance: timedelta = SLACK_TOLERANCE,
) -> None:
    """Check a Slack request's ``X-Slack-Signature`` and ``X-Slack-Request-Timestamp``.

    Args:
        secret: the app's signing secret.
        body: the raw request body.
        signature_header: ``X-Slack-Signature`` (``v0=<hex>``), or ``None`` when absent.
        timestamp_header: ``X-Slack-Request-Timestamp`` (epoch seconds), or ``None`` when absent.
        now: the current time (aware); a parameter so that checks are reproducible.
        tolerance: largest allowed distance between the timestamp and ``now`` (Slack: 5 minutes).

    Raises:
        WebhookSignatureError: a header is absent or malformed, or the signature does not match.
        StaleWebhookError: the timestamp is further than ``tolerance`` from ``now``.
        ValueError: ``now`` is naive.
    """
    if not signature_header:
        raise WebhookSignatureError("slack", "no X-Slack-Signature header")
    if not timestamp_header or not timestamp_header.strip().isdigit():
        raise WebhookSignatureError("slack", "X-Slack-Request-Timestamp is absent or not epoch seconds")
    sent_at = datetime.fromtimestamp(int(timestamp_header.strip()), tz=UTC)
    _check_window("slack", sent_at, now, tolerance)
    expected = slack_signature(secret, timestamp_header.strip(), body)
    if not hmac.compare_digest(expected.encode(), signature_header.strip().encode()):
        raise WebhookSignatureError("slack", "X-Slack-Signature does not match the body and timestamp")


def linear_signature(secret: str | bytes, body: str | bytes) -> str:
    """Return the ``Linear-Signature`` value Linear sends: hex HMAC-SHA256 of the raw body.

    Args:
        secret: the webhook's signing secret.
        body: the raw request body.
    """
    return _hex_hmac(secret, _body(body))


def verify_linear_signature(
    *,
    secret: str | bytes,
    body: bytes,
    signature_header: str | None,
    now: datetime,
    tolerance: timedelta = LINEAR_TOLERANCE,
) -> dict[str, Any]:
    """Check a Linear delivery's ``Linear-Signature`` and its ``webhookTimestamp`` field.

    Args:
        secret: the webhook's signing secret.
        body: the raw request body (JSON).
        signature_header: the ``Linear-Signature`` header (hex), or ``None`` when absent.
        now: the current time (aware).
        tolerance: largest allowed distance between ``webhookTimestamp`` and ``now`` (Linear
            recommends one minute).

    Returns:
        The parsed JSON body, once verified.

    Raises:
        WebhookSignatureError: the header is absent or does not match, or the body has no integer
            ``webhookTimestamp`` (epoch milliseconds).
        StaleWebhookError: ``webhookTimestamp`` is further than ``tolerance`` from ``now``.
        WebhookPayloadError: the (correctly signed) body is not a JSON object.
    """
    if not signature_header:
        raise WebhookSignatureError("linear", "no Linear-Signature header")
    expected = linear_signature(secret, body)
    if not hmac.compare_digest(expected.encode(), signature_header.strip().lower().encode()):
        raise WebhookSignatureError("linear", "Linear-Signature does not match the body")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WebhookPayloadError(f"linear webhook body is not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise WebhookPayloadError("linear webhook body is not a JSON object")
    ts_ms = payload.get("webhookTimestamp")
    if not isinstance(ts_ms, int) or isinstance(ts_ms, bool):
        raise WebhookSignatureError("linear", "body has no integer webhookTimestamp (epoch milliseconds)")
    _check_window("linear", datetime.fromtimestamp(ts_ms / 1000, tz=UTC), now, tolerance)
    return payload


# --------------------------------------------------------------------------------------------- mapping


@dataclass(frozen=True, slots=True, kw_only=True)
class ExternalEvent:
    """One event from an external platform, in the backbone's terms.

    Attributes:
        platform: ``"github"``.
        kind: ``<platform>.<event>[.<action>]`` in the platform's webhook names, e.g.
            ``github.pull_request.opened``, ``github.issue_comment.created``, ``github.push``.
        entity: what the event is about, the Kafka key: ``github:duckdb/duckdb#1234`` for an issue or
            pull request, ``github:duckdb/duckdb:refs/heads/main`` for a push,
            ``github:duckdb/duckdb`` for a repository event (star, fork).
        actor: the login of who did it, or ``None``.
        occurred_at: when it happened (aware UTC).
        url: the web page of the most specific object (comment, review, pull request, commit).
        title: the issue or pull request title, or a push's head commit subject; ``None`` otherwise.
        body_excerpt: the first 280 characters of the text (comment, review, description, commit
            messages), whitespace collapsed, ``…`` when cut; ``None`` when there is no text.
        refs: issues/pull requests (``github:owner/repo#N``) and commits (``github:owner/repo@sha``)
            referenced in the text or pushed, in order of appearance, without duplicates or the entity.
        source_id: the platform's id of the event or delivery (de-duplication key).
        thread: the thread a Slack message belongs to (its parent message's entity; a top-level message's
            own entity), ``None`` for other events.
    """

    platform: str
    kind: str
    entity: str
    actor: str | None
    occurred_at: datetime
    url: str | None
    title: str | None
    body_excerpt: str | None
    refs: tuple[str, ...]
    source_id: str
    thread: str | None = None


_URL_REF = re.compile(
    r"https?://github\.com/(?P<repo>[\w.-]+/[\w.-]+)/(?:(?:issues|pull)/(?P<num>\d+)|commit/(?P<sha>[0-9a-f]{7,40}))",
    re.IGNORECASE,
)
_CROSS_REF = re.compile(r"(?<![\w/.-])(?P<repo>[\w.-]+/[\w.-]+)#(?P<num>\d+)\b")
_LOCAL_REF = re.compile(r"(?<![\w/&#-])(?:#|GH-)(?P<num>\d+)\b")
_SHA_REF = re.compile(r"(?<![\w/@#.-])(?P<sha>[0-9a-f]{7,40})(?![\w-])")


def extract_github_refs(text: str | None, repo: str) -> tuple[str, ...]:
    """Find the issues, pull requests and commits referenced in a GitHub text.

    Recognised: GitHub URLs (``/issues/N``, ``/pull/N``, ``/commit/SHA``), ``owner/repo#N``, ``#N`` and
    ``GH-N`` (resolved against ``repo``), and bare commit SHAs of 7 to 40 lower-case hex digits that
    contain both a digit and a letter (so neither a number such as ``1234567`` nor a word such as
    ``deadbeef`` is taken for a SHA).

    Args:
        text: Markdown text of a comment, description or commit message.
        repo: ``owner/name`` of the repository the text belongs to.

    Returns:
        ``github:owner/repo#N`` and ``github:owner/repo@sha`` references in order, without duplicates.
    """
    if not text:
        return ()
    found: list[tuple[int, str]] = []
    spans: list[tuple[int, int]] = []
    for m in _URL_REF.finditer(text):
        spans.append(m.span())
        if m.group("num"):
            found.append((m.start(), f"github:{m.group('repo')}#{int(m.group('num'))}"))
        else:
            found.append((m.start(), f"github:{m.group('repo')}@{m.group('sha').lower()}"))

    def outside(pos: int) -> bool:
        return all(not (a <= pos < b) for a, b in spans)

    for m in _CROSS_REF.finditer(text):
        if outside(m.start()):
            found.append((m.start(), f"github:{m.group('repo')}#{int(m.group('num'))}"))
    for m in _LOCAL_REF.finditer(text):
        if outside(m.start()):
            found.append((m.start(), f"github:{repo}#{int(m.group('num'))}"))
    for m in _SHA_REF.finditer(text):
        sha = m.group("sha")
        if outside(m.start()) and re.search(r"\d", sha) and re.search(r"[a-f]", sha):
            found.append((m.start(), f"github:{repo}@{sha}"))
    found.sort(key=lambda item: item[0])
    return tuple(dict.fromkeys(ref for _, ref in found))


def _excerpt(text: str | None) -> str | None:
    if not text:
        return None
    collapsed = " ".join(text.split())
    if not collapsed:
        return None
    if len(collapsed) <= _EXCERPT_CHARS:
        return collapsed
    return collapsed[: _EXCERPT_CHARS - 1].rstrip() + "…"


def _snake(type_name: str) -> str:
    base = type_name.removesuffix("Event")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", base).lower()


def _parse_time(value: Any, what: str) -> datetime:
    if not isinstance(value, str):
        raise WebhookPayloadError(f"{what} is not an ISO 8601 time: {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise WebhookPayloadError(f"{what} is not an ISO 8601 time: {value!r}") from exc
    if parsed.tzinfo is None:
        raise WebhookPayloadError(f"{what} has no UTC offset: {value!r}")
    return parsed.astimezone(UTC)


def _obj(payload: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = payload.get(key)
    return value if isinstance(value, Mapping) else None


def _login(user: Any) -> str | None:
    if isinstance(user, Mapping):
        login = user.get("login") or user.get("name")
        return str(login) if login else None
    return None


def _map(
    *,
    event_name: str,
    payload: Mapping[str, Any],
    repo: str,
    actor: str | None,
    occurred_at: datetime,
    source_id: str,
) -> ExternalEvent:
    action = payload.get("action")
    kind = f"github.{event_name}" + (f".{action}" if isinstance(action, str) and action else "")
    issue = _obj(payload, "pull_request") or _obj(payload, "issue")
    comment = _obj(payload, "comment")
    review = _obj(payload, "review")
    texts: list[str | None] = []
    refs: list[str] = []
    title: str | None = None
    url: str | None = None

    if issue is not None:
        number = issue.get("number", payload.get("number"))
        if not isinstance(number, int):
            raise WebhookPayloadError(f"{event_name} event {source_id} has no issue/pull request number")
        entity = f"github:{repo}#{number}"
        title = issue.get("title")
        url = issue.get("html_url")
        if comment is not None:
            texts.append(comment.get("body"))
            url = comment.get("html_url") or url
        elif review is not None:
            texts.append(review.get("body"))
            url = review.get("html_url") or url
        else:
            texts.append(issue.get("body"))
        merge_sha = issue.get("merge_commit_sha") if issue.get("merged") else None
        if merge_sha:
            refs.append(f"github:{repo}@{merge_sha}")
    elif event_name == "push":
        ref = payload.get("ref")
        if not isinstance(ref, str):
            raise WebhookPayloadError(f"push event {source_id} has no ref")
        entity = f"github:{repo}:{ref}"
        commits = [c for c in payload.get("commits") or [] if isinstance(c, Mapping)]
        head = payload.get("head") or payload.get("after")
        for commit in commits:
            sha = commit.get("sha") or commit.get("id")
            if isinstance(sha, str):
                refs.append(f"github:{repo}@{sha}")
            texts.append(commit.get("message"))
        if commits:
            message = commits[-1].get("message") or ""
            title = message.splitlines()[0] if message else None
        if isinstance(head, str) and head:
            url = f"https://github.com/{repo}/commit/{head}"
        url = payload.get("compare") if isinstance(payload.get("compare"), str) else url
    elif event_name == "fork":
        entity = f"github:{repo}"
        forkee = _obj(payload, "forkee") or {}
        url = forkee.get("html_url")
        title = forkee.get("full_name")
    else:
        entity = f"github:{repo}"
        url = f"https://github.com/{repo}"
        if comment is not None:
            texts.append(comment.get("body"))
            url = comment.get("html_url") or url

    text = "\n\n".join(t for t in texts if isinstance(t, str) and t)
    refs.extend(extract_github_refs(text, repo))
    unique = tuple(r for r in dict.fromkeys(refs) if r != entity)
    return ExternalEvent(
        platform="github",
        kind=kind,
        entity=entity,
        actor=actor,
        occurred_at=occurred_at,
        url=url if isinstance(url, str) else None,
        title=title if isinstance(title, str) else None,
        body_excerpt=_excerpt(text),
        refs=unique,
        source_id=source_id,
    )


def map_github_event(event: Mapping[str, Any]) -> ExternalEvent:
    """Map one GitHub Events API object (the GH Archive schema) to an :class:`ExternalEvent`.

    The input is what ``GET /repos/{owner}/{repo}/events`` and GH Archive return, e.g. the April 2023
    duckdb/duckdb events in ``../shared/data/github_events/``: ``type`` (``PullRequestEvent``),
    ``actor.login``, ``repo.name``, ``payload`` (with ``action``), ``created_at`` (ISO 8601, ``Z``).
    The Events API ``payload`` of a push lists ``commits`` with ``sha`` and ``message``; ``head`` is the
    new tip.

    Args:
        event: one decoded Events API object.

    Returns:
        The mapped event; ``kind`` uses the webhook event name (``PullRequestEvent`` → ``pull_request``).

    Raises:
        WebhookPayloadError: ``type``, ``repo.name``, ``payload``, ``created_at`` or ``id`` is missing or
            malformed, or an issue event has no number.
    """
    type_name = event.get("type")
    repo_obj = _obj(event, "repo")
    payload = _obj(event, "payload")
    if not isinstance(type_name, str) or not type_name.endswith("Event"):
        raise WebhookPayloadError(f"GitHub event has no type ending in 'Event': {type_name!r}")
    if repo_obj is None or not isinstance(repo_obj.get("name"), str):
        raise WebhookPayloadError(f"GitHub {type_name} {event.get('id')!r} has no repo.name")
    if payload is None:
        raise WebhookPayloadError(f"GitHub {type_name} {event.get('id')!r} has no payload object")
    if event.get("id") is None:
        raise WebhookPayloadError(f"GitHub {type_name} has no id")
    return _map(
        event_name=_snake(type_name),
        payload=payload,
        repo=repo_obj["name"],
        actor=_login(event.get("actor")),
        occurred_at=_parse_time(event.get("created_at"), f"GitHub event {event.get('id')} created_at"),
        source_id=str(event["id"]),
    )


def _webhook_time(event_name: str, payload: Mapping[str, Any], received_at: datetime) -> datetime:
    action = payload.get("action")
    candidates: list[Any] = []
    for key in ("comment", "review"):
        obj = _obj(payload, key)
        if obj is not None:
            candidates += [obj.get("submitted_at"), obj.get("updated_at"), obj.get("created_at")]
    issue = _obj(payload, "pull_request") or _obj(payload, "issue")
    if issue is not None:
        if action == "closed":
            candidates.append(issue.get("closed_at"))
        if action == "opened":
            candidates.append(issue.get("created_at"))
        candidates.append(issue.get("updated_at"))
    head_commit = _obj(payload, "head_commit")
    if event_name == "push" and head_commit is not None:
        candidates.append(head_commit.get("timestamp"))
    for value in candidates:
        if isinstance(value, str) and value:
            return _parse_time(value, f"GitHub {event_name} time")
    return received_at.astimezone(UTC)


def map_github_webhook(
    *,
    event_name: str,
    body: bytes | Mapping[str, Any],
    delivery_id: str,
    received_at: datetime,
) -> ExternalEvent:
    """Map one GitHub webhook delivery to an :class:`ExternalEvent`.

    Verify the signature first (:func:`verify_github_signature`); this function trusts its input.

    Args:
        event_name: the ``X-GitHub-Event`` header (``pull_request``, ``issues``, ``push``, ...).
        body: the raw body or the decoded JSON object (``action``, ``repository.full_name``,
            ``sender.login`` and the event's object).
        delivery_id: the ``X-GitHub-Delivery`` header (a GUID), used as ``source_id``.
        received_at: when the delivery arrived (aware); the event time when the payload carries none
            (``submitted_at``/``updated_at``/``created_at``/``closed_at`` of its object, or a push's
            ``head_commit.timestamp``, are preferred).

    Raises:
        WebhookPayloadError: the body is not a JSON object, or has no ``repository.full_name``.
    """
    if isinstance(body, bytes | bytearray):
        try:
            decoded = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WebhookPayloadError(
                f"GitHub {event_name} delivery {delivery_id} is not JSON: {exc}"
            ) from exc
    else:
        decoded = body
    if not isinstance(decoded, Mapping):
        raise WebhookPayloadError(f"GitHub {event_name} delivery {delivery_id} is not a JSON object")
    repository = _obj(decoded, "repository")
    if repository is None or not isinstance(repository.get("full_name"), str):
        raise WebhookPayloadError(f"GitHub {event_name} delivery {delivery_id} has no repository.full_name")
    if received_at.tzinfo is None:
        raise ValueError("received_at must be an aware datetime")
    return _map(
        event_name=event_name,
        payload=decoded,
        repo=repository["full_name"],
        actor=_login(decoded.get("sender")),
        occurred_at=_webhook_time(event_name, decoded, received_at),
        source_id=delivery_id,
    )


def map_github_events(events: Iterable[Mapping[str, Any]]) -> list[ExternalEvent]:
    """Map a list of Events API objects in order (see :func:`map_github_event`).

    Raises:
        WebhookPayloadError: on the first event that cannot be mapped (it names the event id).
    """
    return [map_github_event(e) for e in events]

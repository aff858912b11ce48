"""HTTP ingest: ``POST /events/{type}`` and the GitHub, Slack and Linear webhooks.

Every route reads the raw body under a size limit (413), validates everything before producing
anything (400 for a body that is not JSON, 422 naming the field and, in a batch, the index), and
answers 202 only once the broker has acknowledged every record (``acks=all``): a timeout or a
delivery failure is a 503 with ``Retry-After``, and nothing was acknowledged that was not stored.

Retries are safe: with an ``Idempotency-Key`` header (events) or the platform's delivery id (webhooks)
the first response is stored in Redis and replayed, and the event ids are derived from the key, so a
retry after a lost answer produces the same ids (consumers de-duplicate by id).

Tracing: a request's W3C ``traceparent`` header and ``X-Correlation-Id`` (read by the app's request
middleware, :mod:`backbone.http.app`) go on every event it produces, as the CloudEvents
``traceparent`` and ``correlationid`` attributes; with tracing on, each record's ``send`` span is a
child of the request's server span and its ``ce_traceparent`` is that span's context.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import redis
import structlog
from fastapi import APIRouter, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from backbone.http.auth import (
    BEARER_SECURITY,
    IdempotencyStore,
    IdempotentResult,
    Principal,
    authenticate,
    enforce_rate_limit,
    require_scope,
)
from connectors.github_events import commits_of_push
from connectors.mappers import (
    EXTERNAL_EVENT_SCHEMA,
    external_event_to_avro,
    map_linear_webhook,
    map_slack_webhook,
)
from connectors.webhooks import (
    ExternalEvent,
    WebhookPayloadError,
    WebhookSignatureError,
    map_github_webhook,
    verify_github_signature,
    verify_linear_signature,
    verify_slack_signature,
)
from streams.acking import TopicDirectory
from streams.catalogue import CATALOGUE
from streams.envelope import Event, deterministic_id
from streams.errors import (
    BrokerUnavailableError,
    DeliveryError,
    SchemaNotFoundError,
    SchemaValidationError,
    UnacknowledgedError,
)
from streams.serde import AvroSerde, coerce_json_datum, timestamp_fields

__all__ = ["default_key_field", "read_body", "router"]

_log = structlog.get_logger(__name__)


def _problem(
    code: int, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> HTTPException:
    return HTTPException(
        code, detail={"message": message, **extra}, headers=dict(headers) if headers else None
    )


def _unavailable(request: Request, message: str) -> HTTPException:
    return _problem(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        message,
        {"Retry-After": str(request.app.state.api_settings.retry_after_seconds)},
    )


async def read_body(request: Request, limit_bytes: int) -> bytes:
    """The raw body, refused with 413 as soon as it exceeds ``limit_bytes`` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit_bytes:
        raise _problem(413, f"body of {int(declared)} bytes exceeds {limit_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit_bytes:
                raise _problem(413, f"body exceeds {limit_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise _problem(
            status.HTTP_400_BAD_REQUEST, "the client went away before sending the whole body"
        ) from exc
    return b"".join(chunks)


def _fingerprint(request: Request, body: bytes) -> str:
    h = hashlib.sha256()
    h.update(f"{request.method} {request.url.path}?{request.url.query}\n".encode())
    h.update(body)
    return h.hexdigest()


async def _idempotent(
    request: Request, key: str | None, fingerprint: Callable[[], str], handler: Callable[[], Any]
) -> JSONResponse:
    """Run ``handler`` (an async function returning ``(status, body)``) at most once per ``key``;
    ``fingerprint`` (called only with a key) identifies the request."""
    if key is None:
        code, body = await handler()
        return JSONResponse(body, status_code=code)
    store: IdempotencyStore = request.app.state.idempotency
    fp = fingerprint()
    try:
        claim = await store.claim_async(key, fp)
    except redis.RedisError as exc:
        raise _unavailable(request, "the idempotency store (Redis) is unavailable") from exc
    if isinstance(claim, IdempotentResult):
        return JSONResponse(
            claim.body, status_code=claim.status_code, headers={"Idempotent-Replayed": "true"}
        )
    if claim == "pending":
        raise _problem(status.HTTP_409_CONFLICT, "a request with this idempotency key is still in progress")
    if claim == "mismatch":
        raise _problem(422, "this idempotency key was already used for a different request")
    try:
        code, body = await handler()
    except HTTPException as exc:
        if exc.status_code >= 500:
            await store.release_async(key)
        else:
            detail = {"detail": exc.detail}
            await store.complete_async(key, fp, IdempotentResult(status_code=exc.status_code, body=detail))
        raise
    except BaseException:
        await store.release_async(key)
        raise
    await store.complete_async(key, fp, IdempotentResult(status_code=code, body=body))
    return JSONResponse(body, status_code=code)


def _request_context(request: Request) -> tuple[str | None, str | None]:
    """``(traceparent, correlation_id)`` of the request, as the request middleware found them."""
    state = request.state
    return getattr(state, "traceparent", None), getattr(state, "correlation_id", None)


async def _produce(request: Request, topic: str, events: Sequence[Event]) -> None:
    try:
        await request.app.state.producer.produce(topic, events)
    except UnacknowledgedError as exc:
        _log.warning("ingest.unavailable", topic=topic, error=str(exc))
        raise _unavailable(request, str(exc)) from exc
    except DeliveryError as exc:
        _log.warning("ingest.delivery_failed", topic=topic, error=str(exc))
        raise _unavailable(request, str(exc)) from exc


def default_key_field(topic: str, type_: str, field_names: set[str] | frozenset[str]) -> str | None:
    """The field whose value keys an event of ``type_`` on ``topic`` when the caller names none.

    The catalogue topic's key when ``topic`` is in :data:`streams.catalogue.CATALOGUE` and the key is a
    field of the type; for a topic outside the catalogue, the key of the first catalogue topic that
    carries ``type_`` (``run_id`` for ``sophia.agent.*``), so that a run's events stay on one partition
    and in order on any topic; None (each event keyed by its id) when neither applies.
    """
    spec = CATALOGUE.get(topic)
    if spec is not None:
        return spec.key if spec.key in field_names else None
    for s in CATALOGUE.values():
        if type_ in s.schemas and s.key in field_names:
            return s.key
    return None


async def _topic_partitions(request: Request, topic: str) -> int:
    topics: TopicDirectory = request.app.state.topics
    n = topics.cached_partitions(topic)  # no thread hop while the listing is fresh
    if n is not None:
        return n
    try:
        n = await run_in_threadpool(topics.partitions, topic)
    except BrokerUnavailableError as exc:
        raise _unavailable(request, str(exc)) from exc
    if n is None:
        raise _problem(status.HTTP_404_NOT_FOUND, f"topic {topic!r} does not exist", topic=topic)
    return n


# ------------------------------------------------------------------------------------------------ events

router = APIRouter(tags=["ingest"])

_TOPIC_DOC = "Topic to produce to (default: the catalogue's topic of the type)."
_KEY_FIELD_DOC = (
    "Field whose value is the key (default: the topic's key; on a topic outside the catalogue, the key "
    "of the catalogue topic that carries this type, e.g. run_id for sophia.agent.*; else the event id)."
)
_OPTIONAL_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}]}

# The route reads its path and query parameters and authenticates in its body (see ingest_events), so its
# OpenAPI operation declares them here, as FastAPI would have derived them from a signature with
# ``type: str``, ``topic``/``key_field: str | None = Query(None)`` and ``Depends(authenticate_request)``.
_EVENTS_OPENAPI: dict[str, Any] = {
    "security": BEARER_SECURITY,
    "parameters": [
        {"name": "type", "in": "path", "required": True, "schema": {"type": "string", "title": "Type"}},
        {
            "name": "topic",
            "in": "query",
            "required": False,
            "description": _TOPIC_DOC,
            "schema": {**_OPTIONAL_STRING, "description": _TOPIC_DOC, "title": "Topic"},
        },
        {
            "name": "key_field",
            "in": "query",
            "required": False,
            "description": _KEY_FIELD_DOC,
            "schema": {**_OPTIONAL_STRING, "description": _KEY_FIELD_DOC, "title": "Key Field"},
        },
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"type": "object", "description": "One event's data, as the Avro record in JSON."},
                        {"type": "array", "items": {"type": "object"}, "description": "A batch."},
                    ]
                },
                "example": {"run_id": "run-1", "event_time": "2025-01-01T00:00:00Z"},
            }
        },
    },
}


@router.post(
    "/events/{type}",
    status_code=status.HTTP_202_ACCEPTED,
    openapi_extra=_EVENTS_OPENAPI,
    summary="Produce one event or a batch",
    responses={
        400: {"description": "The body is not JSON, or not an object or array of objects."},
        401: {"description": "No token, or an unknown or revoked one."},
        403: {"description": "The token lacks produce:<topic>."},
        404: {"description": "Unknown event type or topic."},
        409: {"description": "A request with the same Idempotency-Key is in progress."},
        413: {"description": "The body or the batch is too large."},
        422: {"description": "An event does not match its schema: names the field and the batch index."},
        429: {"description": "Rate limit exceeded (Retry-After)."},
        503: {"description": "The broker did not acknowledge (Retry-After); nothing was acknowledged."},
    },
)
async def ingest_events(request: Request) -> JSONResponse:
    """Validate the JSON body against the Avro schema ``type`` and produce it.

    The body is one JSON object or an array of them. Timestamp fields take RFC 3339 strings or epoch
    milliseconds. Every event is checked before any is produced: one bad item refuses the whole batch.
    Answers 202 with the event ids once the broker acknowledged every record. With an
    ``Idempotency-Key`` header a retry returns the first answer and produces nothing new.
    """
    # (not in the docstring: that is the OpenAPI description) the token is checked first and the path and
    # query parameters read here (``topic`` and ``key_field``: the last value when repeated), as FastAPI's
    # dependency solving did, without its per-request cost; the OpenAPI operation is ``_EVENTS_OPENAPI``.
    principal = await authenticate(request)
    type = request.path_params["type"]
    query = request.query_params
    topic: str | None = query.get("topic")
    key_field: str | None = query.get("key_field")
    state = request.app.state
    api = state.api_settings
    serde: AvroSerde = state.serde
    try:
        schema = serde.registry.schema_for(serde.registry.id_for(type))
    except SchemaNotFoundError as exc:
        raise _problem(status.HTTP_404_NOT_FOUND, f"unknown event type {type!r}", type=type) from exc
    if topic is None:
        carriers = [t for t in CATALOGUE.values() if type in t.schemas]
        if not carriers:
            raise _problem(422, f"no catalogue topic carries {type}; pass ?topic=", field="topic")
        topic = carriers[0].name
    elif topic in CATALOGUE and type not in CATALOGUE[topic].schemas:
        raise _problem(422, f"topic {topic!r} does not carry {type}", field="topic")
    require_scope(principal, f"produce:{topic}")
    body = await read_body(request, api.max_body_bytes)
    await _topic_partitions(request, topic)
    idem_key = request.headers.get("idempotency-key")
    if idem_key is not None and not (0 < len(idem_key) <= 255):
        raise _problem(status.HTTP_400_BAD_REQUEST, "Idempotency-Key must be 1 to 255 characters")

    async def handle() -> tuple[int, dict[str, Any]]:
        traceparent, correlation_id = _request_context(request)
        events = _events_from_body(
            body, type, schema, topic, key_field, principal, idem_key, serde, api.max_batch_events,
            traceparent=traceparent, correlation_id=correlation_id,
        )  # fmt: skip
        await _produce(request, topic, events)
        _log.debug("ingest.accepted", topic=topic, type=type, count=len(events), token_id=principal.token_id)
        return status.HTTP_202_ACCEPTED, {
            "topic": topic,
            "count": len(events),
            "ids": [e.attributes.id for e in events],
        }

    scoped_key = f"events:{principal.token_id}:{idem_key}" if idem_key is not None else None
    return await _idempotent(request, scoped_key, lambda: _fingerprint(request, body), handle)


def _events_from_body(
    body: bytes,
    type_: str,
    schema: Mapping[str, Any],
    topic: str,
    key_field: str | None,
    principal: Principal,
    idem_key: str | None,
    serde: AvroSerde,
    max_batch_events: int,
    *,
    traceparent: str | None = None,
    correlation_id: str | None = None,
) -> list[Event]:
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _problem(status.HTTP_400_BAD_REQUEST, f"body is not valid JSON: {exc}") from exc
    batch = isinstance(parsed, list)
    items = parsed if batch else [parsed]
    if batch and not items:
        raise _problem(status.HTTP_400_BAD_REQUEST, "empty batch: send at least one event")
    if len(items) > max_batch_events:
        raise _problem(413, f"batch of {len(items)} events exceeds {max_batch_events}")
    field_names = {f["name"] for f in schema["fields"]}
    if key_field is not None and key_field not in field_names:
        raise _problem(422, f"key_field {key_field!r} is not a field of {type_}", field="key_field")
    key_field = key_field or default_key_field(topic, type_, field_names)
    ts_fields = timestamp_fields(schema)
    events: list[Event] = []
    now = datetime.now(UTC)
    for index, item in enumerate(items):
        where = {"index": index} if batch else {}
        if not isinstance(item, dict):
            raise _problem(
                status.HTTP_400_BAD_REQUEST if not batch else 422,
                f"{'item ' + str(index) if batch else 'body'} is not a JSON object",
                **where,
            )
        datum = coerce_json_datum(schema, item)
        try:
            serde.check(type_, datum)
        except SchemaValidationError as exc:
            prefix = f"item {index}: " if batch else ""
            raise _problem(422, prefix + str(exc), field=exc.field, **where) from exc
        event_time = next((datum[f] for f in ts_fields if isinstance(datum.get(f), datetime)), now)
        event_id = (
            deterministic_id("api", principal.token_id, idem_key, index)
            if idem_key is not None
            else str(uuid.uuid4())
        )
        key = str(datum[key_field]) if key_field and datum.get(key_field) is not None else event_id
        events.append(
            Event.create(
                type_,
                key,
                datum,
                source=f"/api/tokens/{principal.token_id}",
                time=event_time,
                id=event_id,
                correlation_id=correlation_id,
                traceparent=traceparent,
            )
        )
    return events


# ---------------------------------------------------------------------------------------------- webhooks


def _secret(request: Request, platform: str) -> str:
    api = request.app.state.api_settings
    value = getattr(api, f"{platform}_secret")
    if value is None or not value.get_secret_value():
        raise _problem(
            status.HTTP_404_NOT_FOUND,
            f"{platform} webhooks are not configured (set BACKBONE_API_{platform.upper()}_SECRET)",
        )
    return str(value.get_secret_value())


async def _webhook_preamble(request: Request, platform: str) -> tuple[str, bytes]:
    secret = _secret(request, platform)
    api = request.app.state.api_settings
    await enforce_rate_limit(
        request, f"webhook:{platform}", rate_per_second=api.webhook_rate_per_second, burst=api.webhook_burst
    )
    return secret, await read_body(request, api.max_body_bytes)


async def _deliver_external(
    request: Request,
    platform: str,
    delivery_id: str,
    body: bytes,
    mapped: ExternalEvent,
    extra: Sequence[Event] = (),
) -> JSONResponse:
    """Produce the mapped event, then ``extra`` events derived from the same delivery (a push's commits)."""
    api = request.app.state.api_settings

    async def handle() -> tuple[int, dict[str, Any]]:
        traceparent, correlation_id = _request_context(request)
        event = Event.create(
            EXTERNAL_EVENT_SCHEMA,
            mapped.entity,
            external_event_to_avro(mapped),
            source=f"/webhooks/{platform}",
            time=mapped.occurred_at,
            id=deterministic_id("webhook", platform, delivery_id),
            correlation_id=correlation_id,
            traceparent=traceparent,
        )
        batch = [event, *(e.with_traceparent(traceparent) if traceparent else e for e in extra)]
        await _produce(request, api.external_topic, batch)
        _log.info("ingest.webhook", platform=platform, kind=mapped.kind, delivery_id=delivery_id)
        return status.HTTP_202_ACCEPTED, {"topic": api.external_topic, "count": len(batch),
                                          "ids": [e.attributes.id for e in batch], "kind": mapped.kind}  # fmt: skip

    return await _idempotent(
        request, f"webhook:{platform}:{delivery_id}", lambda: hashlib.sha256(body).hexdigest(), handle
    )


def _signature_refused(exc: WebhookSignatureError) -> HTTPException:
    return _problem(status.HTTP_401_UNAUTHORIZED, str(exc), platform=exc.platform)


_WEBHOOK_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing, forged or stale signature: nothing produced."},
    404: {"description": "This webhook is not configured."},
    413: {"description": "Body too large."},
    422: {"description": "A verified body that cannot be mapped."},
    503: {"description": "The broker did not acknowledge (Retry-After)."},
}


@router.post("/webhooks/github", status_code=202, tags=["webhooks"], responses=_WEBHOOK_RESPONSES)
async def github_webhook(request: Request) -> JSONResponse:
    """A GitHub webhook delivery (``X-Hub-Signature-256``, ``X-GitHub-Event``, ``X-GitHub-Delivery``),
    produced as a ``sophia.external.ExternalEvent``; redeliveries of one delivery id produce nothing new."""
    secret, body = await _webhook_preamble(request, "github")
    try:
        verify_github_signature(
            secret=secret, body=body, signature_header=request.headers.get("x-hub-signature-256")
        )
    except WebhookSignatureError as exc:
        raise _signature_refused(exc) from exc
    event_name = request.headers.get("x-github-event")
    delivery = request.headers.get("x-github-delivery")
    if not event_name or not delivery:
        raise _problem(
            status.HTTP_400_BAD_REQUEST, "X-GitHub-Event and X-GitHub-Delivery headers are required"
        )
    if event_name == "ping":
        return JSONResponse({"pong": True, "delivery": delivery}, status_code=200)
    try:
        mapped = map_github_webhook(
            event_name=event_name, body=body, delivery_id=delivery, received_at=datetime.now(UTC)
        )
    except WebhookPayloadError as exc:
        raise _problem(422, str(exc)) from exc
    extra: list[Event] = []
    if event_name == "push":  # the pushed commits as git.commit events, like the commit importer's
        payload = json.loads(body)
        extra = commits_of_push(payload, repo=payload["repository"]["full_name"], pushed_at=mapped.occurred_at,
                                pusher=mapped.actor)  # fmt: skip
    return await _deliver_external(request, "github", delivery, body, mapped, extra)


@router.post("/webhooks/slack", status_code=202, tags=["webhooks"], responses=_WEBHOOK_RESPONSES)
async def slack_webhook(request: Request) -> JSONResponse:
    """A Slack request (v0 signing secret, ``X-Slack-Request-Timestamp`` within 5 minutes): Events API
    callbacks, slash commands and interactions; answers ``url_verification`` challenges."""
    secret, body = await _webhook_preamble(request, "slack")
    now = datetime.now(UTC)
    try:
        verify_slack_signature(
            secret=secret, body=body, signature_header=request.headers.get("x-slack-signature"),
            timestamp_header=request.headers.get("x-slack-request-timestamp"), now=now,
        )  # fmt: skip
    except WebhookSignatureError as exc:
        raise _signature_refused(exc) from exc
    try:
        mapped = map_slack_webhook(body, request.headers.get("content-type", ""), now)
    except WebhookPayloadError as exc:
        raise _problem(422, str(exc)) from exc
    if isinstance(mapped, dict):
        return JSONResponse(mapped, status_code=200)
    return await _deliver_external(request, "slack", mapped.source_id, body, mapped)


@router.post("/webhooks/linear", status_code=202, tags=["webhooks"], responses=_WEBHOOK_RESPONSES)
async def linear_webhook(request: Request) -> JSONResponse:
    """A Linear webhook (``Linear-Signature``, ``webhookTimestamp`` within a minute), de-duplicated by
    ``Linear-Delivery``."""
    secret, body = await _webhook_preamble(request, "linear")
    try:
        payload = verify_linear_signature(
            secret=secret,
            body=body,
            signature_header=request.headers.get("linear-signature"),
            now=datetime.now(UTC),
        )
    except WebhookSignatureError as exc:
        raise _signature_refused(exc) from exc
    except WebhookPayloadError as exc:
        raise _problem(422, str(exc)) from exc
    delivery = request.headers.get("linear-delivery") or hashlib.sha256(body).hexdigest()
    try:
        mapped = map_linear_webhook(payload, delivery)
    except WebhookPayloadError as exc:
        raise _problem(422, str(exc)) from exc
    return await _deliver_external(request, "linear", delivery, body, mapped)

"""The HTTP API (``backbone api``): ingest, webhooks, Server-Sent Events, and the projections' reads.

:func:`create_app` builds the FastAPI application. Its lifespan opens what the routes share, on
``app.state``: ``pg_pool`` (psycopg ``ConnectionPool``), ``redis`` (a ``redis.Redis`` client),
``producer`` (:class:`streams.acking.AckingProducer`), ``serde``, ``tokens``
(:class:`backbone.http.auth.TokenStore`), ``rate_limiter``, ``idempotency``, ``topics`` (broker topic
listing) and ``sse_streams`` (the live SSE streams). The OpenAPI document is at ``/openapi.json``,
the docs at ``/docs``.

Routes: ``POST /events/{type}``, ``POST /webhooks/{github,slack,linear}`` (:mod:`backbone.http.ingest`),
``GET /subscribe/{topic}`` (:mod:`backbone.http.sse`), ``GET /healthz``, and the read endpoints of the
projections (:mod:`backbone.http.read`).
"""

from __future__ import annotations

import inspect
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, Self

import psycopg
import redis
import redis.asyncio
import structlog
from confluent_kafka.admin import AdminClient
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from opentelemetry.trace import Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from psycopg_pool import ConnectionPool
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from backbone.http.auth import IdempotencyStore, RateLimiter, TokenStore, authenticate_request
from core import tracing
from core.observability import REGISTRY
from core.settings import Settings

__all__ = ["ApiSettings", "ServerThread", "create_app"]

_log = structlog.get_logger(__name__)


class ApiSettings(BaseSettings):
    """Settings of the HTTP API (env prefix ``BACKBONE_API_``).

    Attributes:
        host: interface uvicorn binds.
        port: TCP port.
        auth_required: require a Bearer token on ingest and subscribe routes (turn off only on a
            developer's machine; the webhooks are always checked by signature).
        max_body_bytes: largest request body accepted (413 above).
        max_batch_events: most events in one ``POST /events/{type}`` batch (413 above).
        rate_per_second: default token-bucket refill per API token (requests per second).
        burst: default bucket size per API token (requests).
        rate_lease_seconds: how long an API process may keep tokens it took from a bucket in Redis in
            advance, to spend without a Redis call per request (a lease of up to ``rate * lease``
            tokens, at most a tenth of the burst; buckets slower than 2 tokens per lease are never
            leased); 0 asks Redis on every request. The limit holds across replicas either way; a
            lease's leftover tokens are lost when it expires (:class:`backbone.http.auth.RateLimiter`).
        webhook_rate_per_second: refill of each webhook platform's bucket (requests per second).
        webhook_burst: bucket size of each webhook platform (requests).
        idempotency_ttl_seconds: how long a first response is kept for its idempotency key.
        idempotency_pending_ttl_seconds: how long a key stays claimed by a request that never finished
            (the API died in it): retries with that key get a 409 until then. Must exceed
            ``ack_timeout_seconds``, or a retry could claim the key while the first request still waits
            for the broker.
        token_cache_seconds: how long an API process keeps a live token in memory instead of querying
            PostgreSQL per request (0 turns the cache off). Revocations reach it at once by ``NOTIFY``;
            while its listener is disconnected the cache is off (:class:`backbone.http.auth.TokenStore`).
        ack_timeout_seconds: how long ingest waits for the broker's acknowledgement before a 503.
        retry_after_seconds: ``Retry-After`` sent with a 503.
        github_secret: GitHub webhook secret; unset disables ``/webhooks/github``.
        slack_secret: Slack signing secret; unset disables ``/webhooks/slack``.
        linear_secret: Linear webhook signing secret; unset disables ``/webhooks/linear``.
        external_topic: topic of the webhooks' ``sophia.external.ExternalEvent`` records (created at
            start with 3 partitions when missing).
        sse_buffer_events: most events buffered per SSE stream before its consumer pauses.
        sse_heartbeat_seconds: idle time after which an SSE comment is sent as a heartbeat.
    """

    model_config = SettingsConfigDict(env_prefix="BACKBONE_API_", extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    auth_required: bool = True
    max_body_bytes: int = Field(default=1_048_576, ge=1)
    max_batch_events: int = Field(default=1000, ge=1)
    rate_per_second: float = Field(default=200.0, gt=0)
    burst: int = Field(default=400, ge=1)
    rate_lease_seconds: float = Field(default=0.05, ge=0)
    webhook_rate_per_second: float = Field(default=50.0, gt=0)
    webhook_burst: int = Field(default=200, ge=1)
    idempotency_ttl_seconds: int = Field(default=86_400, ge=1)
    idempotency_pending_ttl_seconds: int = Field(default=120, ge=1)
    token_cache_seconds: float = Field(default=30.0, ge=0)
    ack_timeout_seconds: float = Field(default=10.0, gt=0)
    retry_after_seconds: int = Field(default=5, ge=1)
    github_secret: SecretStr | None = None
    slack_secret: SecretStr | None = None
    linear_secret: SecretStr | None = None
    external_topic: str = "external.events"
    sse_buffer_events: int = Field(default=1000, ge=1)
    sse_heartbeat_seconds: float = Field(default=15.0, gt=0)

    @model_validator(mode="after")
    def _pending_outlives_the_ack_wait(self) -> ApiSettings:
        if self.idempotency_pending_ttl_seconds <= self.ack_timeout_seconds:
            raise ValueError(
                f"idempotency_pending_ttl_seconds ({self.idempotency_pending_ttl_seconds}) must exceed "
                f"ack_timeout_seconds ({self.ack_timeout_seconds}): a retry could otherwise claim a key "
                "whose first request still waits for the broker"
            )
        return self


_REQUESTS = Counter(
    "backbone_api_requests", "HTTP requests answered", ["method", "route", "status"], registry=REGISTRY
)
_LATENCY = Histogram(
    "backbone_api_request_seconds",
    "Time to the first byte of the answer to an HTTP request",
    ["method", "route"],
    registry=REGISTRY,
)


def _header_id(value: str | None) -> str | None:
    """An id from a request header when it is 1 to 128 printable ASCII characters, else ``None``."""
    if value and len(value) <= 128 and value.isascii() and value.isprintable():
        return value
    return None


class _RequestMiddleware:
    """Pure ASGI middleware, one layer for what every request needs: its metrics, its ids, its trace.

    * Metrics: counts requests and times them to the first byte of the answer per route template, so
      labels stay bounded (never the raw path).
    * ``X-Request-Id`` (taken from the request when it is 1 to 128 printable ASCII characters, else a new
      UUID4 hex) and ``X-Correlation-Id`` (when sent) are bound in structlog's context variables for
      every log line of the request (``request_id``, ``correlation_id``, and ``trace_id`` when the
      request carries or starts a trace); the answer carries ``X-Request-Id``.
    * The W3C ``traceparent`` header (ignored when invalid) is continued: with tracing on, a SERVER
      span ``<method> <route>`` is current while the request runs, so the ``send`` spans of ingest are
      its children.
    * For the routes: ``request.state.request_id``, ``correlation_id`` (or ``None``) and ``traceparent``
      (the server span's, else the request's valid header, else ``None``).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        raw_request_id = raw_correlation_id = raw_traceparent = None
        for name, value in scope.get("headers") or ():  # ASGI header names are lower-case bytes
            if name == b"x-request-id":
                raw_request_id = value.decode("latin-1")
            elif name == b"x-correlation-id":
                raw_correlation_id = value.decode("latin-1")
            elif name == b"traceparent":
                raw_traceparent = value.decode("latin-1")
        request_id = _header_id(raw_request_id) or uuid.uuid4().hex
        correlation_id = _header_id(raw_correlation_id)
        traceparent = tracing.normalise_traceparent(raw_traceparent) if raw_traceparent else None
        method = scope.get("method", "GET")
        status_code = [500]
        request_id_header = (b"x-request-id", request_id.encode())

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_code[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), request_id_header]}
                template = getattr(scope.get("route"), "path", "unmatched")
                _LATENCY.labels(method, template).observe(time.perf_counter() - start)
                _REQUESTS.labels(method, template, str(status_code[0])).inc()
            await send(message)

        if not tracing.is_enabled():
            await self._run(scope, receive, send_wrapper, request_id, correlation_id, traceparent)
            return
        attributes = {"http.request.method": method, "url.path": scope.get("path", ""),
                      "url.scheme": scope.get("scheme", "http")}  # fmt: skip
        with tracing.server_span(method, traceparent, attributes) as span:
            if span is not None:
                traceparent = tracing.current_traceparent()
            try:
                await self._run(scope, receive, send_wrapper, request_id, correlation_id, traceparent)
            finally:
                if span is not None:
                    template = getattr(scope.get("route"), "path", None)
                    if template is not None:
                        span.update_name(f"{method} {template}")
                        span.set_attribute("http.route", template)
                    span.set_attribute("http.response.status_code", status_code[0])
                    if status_code[0] >= 500:
                        span.set_status(Status(StatusCode.ERROR))

    async def _run(
        self,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        request_id: str,
        correlation_id: str | None,
        traceparent: str | None,
    ) -> None:
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, correlation_id=correlation_id, traceparent=traceparent)
        binds = {"request_id": request_id}
        if correlation_id is not None:
            binds["correlation_id"] = correlation_id
        trace_id = tracing.trace_id_of(traceparent) if traceparent is not None else None
        if trace_id is not None:
            binds["trace_id"] = trace_id
        tokens = structlog.contextvars.bind_contextvars(**binds)
        try:
            await self.app(scope, receive, send)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)


def _instrument(app: FastAPI) -> None:
    app.add_middleware(_RequestMiddleware)


def create_app(settings: Settings, api: ApiSettings | None = None) -> FastAPI:
    """Build the API application; nothing connects until its lifespan starts.

    Args:
        settings: servers (Kafka, PostgreSQL, Redis, schema registry) with their URLs filled in
            (``core.stack.load_settings()`` completes them from a running dev stack).
        api: the API's own settings (default: read from ``BACKBONE_API_*``).

    Returns:
        The FastAPI app; serve it with uvicorn (``backbone api``).
    """
    from backbone.http import ingest, read, sse
    from connectors.mappers import EXTERNAL_TOPICS
    from streams.acking import AckingProducer, TopicDirectory
    from streams.serde import serde_from_settings

    api = api or ApiSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        serde = serde_from_settings(settings)
        pool = ConnectionPool(
            settings.postgres.dsn(),
            min_size=settings.postgres.pool_min_size,
            max_size=max(settings.postgres.pool_max_size, 4),
            open=False,
            name="backbone-api",
            # a connection PostgreSQL dropped (a restart, pg_terminate_backend, an idle timeout) is
            # replaced when it is handed out, not found broken by the request that gets it (a 503)
            check=ConnectionPool.check_connection,
        )
        await run_in_threadpool(pool.open, True, 30.0)
        client = redis.Redis.from_url(settings.redis.dsn(), socket_timeout=5, socket_connect_timeout=5)
        # the routes' per-request Redis calls (rate limit, idempotency) on the event loop, without a thread hop
        aclient = redis.asyncio.Redis.from_url(
            settings.redis.dsn(), socket_timeout=5, socket_connect_timeout=5
        )
        admin = AdminClient(settings.kafka.librdkafka())
        producer = AckingProducer(settings.kafka, serde, ack_timeout_seconds=api.ack_timeout_seconds)
        topics = TopicDirectory(admin)
        tokens = TokenStore(pool, cache_seconds=api.token_cache_seconds)
        await run_in_threadpool(tokens.ensure_schema)
        tokens.start_listener()
        try:
            specs = [replace(s, name=api.external_topic) for s in EXTERNAL_TOPICS]
            created = await run_in_threadpool(topics.ensure, specs)
            if created:
                _log.info("api.topics_created", topics=created)
        except Exception as exc:  # noqa: BLE001 - the broker may come later; ingest answers 503 until then
            _log.warning("api.topic_creation_failed", error=str(exc))
        app.state.settings = settings
        app.state.kafka = settings.kafka
        app.state.api_settings = api
        app.state.serde = serde
        app.state.pg_pool = pool
        app.state.redis = client
        app.state.producer = producer
        app.state.topics = topics
        app.state.tokens = tokens
        app.state.rate_limiter = RateLimiter(client, aclient=aclient, lease_seconds=api.rate_lease_seconds)
        app.state.idempotency = IdempotencyStore(
            client,
            ttl_seconds=api.idempotency_ttl_seconds,
            pending_ttl_seconds=api.idempotency_pending_ttl_seconds,
            aclient=aclient,
        )
        app.state.sse_streams = set()
        _log.info("api.started", kafka=settings.kafka.bootstrap_servers)
        try:
            yield
        finally:
            await run_in_threadpool(tokens.stop_listener)
            await run_in_threadpool(producer.close)
            client.close()
            await aclient.aclose()
            await run_in_threadpool(pool.close)

    # FastAPI >= 0.16x traces requests itself once a global tracer provider exists; the request middleware
    # below makes the server span (whichever FastAPI is installed, and only when core.tracing is on), so
    # FastAPI's own spans are turned off rather than doubled. Its OpenTelemetry metrics and logs are off too:
    # the backbone's request metrics are Prometheus's (``_RequestMiddleware``), and with all three off FastAPI
    # skips its per-request check of the global OpenTelemetry providers (about 2 % of the event loop's time
    # under load, py-spy, 2026-12-04).
    native = (
        {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
        if "telemetry" in inspect.signature(FastAPI).parameters
        else {}
    )
    app = FastAPI(
        title="Sophia backbone API",
        version="0.1.0",
        summary="Ingest events, receive webhooks, subscribe to topics as Server-Sent Events, read projections.",
        lifespan=lifespan,
        **native,  # type: ignore[arg-type]
    )
    app.include_router(ingest.router)
    app.include_router(sse.router)
    app.include_router(read.router, dependencies=[Depends(authenticate_request)])  # any valid token may read

    _instrument(app)

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    async def metrics() -> Response:
        """Prometheus text format of the backbone's registry (requests, latencies, projection counters)."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", tags=["ops"])
    async def healthz(request: Request) -> JSONResponse:
        """Liveness and the reachability of PostgreSQL and Redis (200 when both answer, else 503)."""
        state = request.app.state

        def probe() -> dict[str, Any]:
            out: dict[str, Any] = {"sse_streams": len(state.sse_streams)}
            try:
                with state.pg_pool.connection(timeout=2) as conn:
                    conn.execute("select 1")
                out["postgres"] = True
            except (psycopg.Error, Exception):  # noqa: BLE001 - reported, not raised
                out["postgres"] = False
            try:
                out["redis"] = bool(state.redis.ping())
            except redis.RedisError:
                out["redis"] = False
            out["ok"] = out["postgres"] and out["redis"]
            return out

        body = await run_in_threadpool(probe)
        return JSONResponse(body, status_code=200 if body["ok"] else 503)

    return app


class ServerThread:
    """Serve an app with uvicorn on a background thread (tests and benchmarks).

    Args:
        app: the ASGI app.
        host: interface to bind.
        port: TCP port (0: a free one).

    Use as a context manager; :attr:`url` is ``http://host:port``.

    Raises:
        TimeoutError: the server did not start (or its lifespan failed) within 60 s.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host=host, port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=5
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="api-server", daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise TimeoutError("the API server did not start (see its log)")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)

"""The projections' read endpoints, as a FastAPI router (mounted by ``backbone api``).

The app provides ``app.state.pg_pool`` (a ``psycopg_pool.ConnectionPool``) and ``app.state.redis``
(a Redis client, or None); optionally ``app.state.serde`` (decodes event data in ``/audit``) and
``app.state.kafka`` (``KafkaSettings``: adds the lag to ``/projections``).

Endpoints: ``GET /runs`` (filter ``outcome``, ``model``; paging ``limit`` + ``offset`` or ``cursor``),
``GET /runs/{run_id}`` (Redis read model when ready, else PostgreSQL), ``GET /models``,
``GET /insights`` (the latest insight per kind and entity), ``GET /projections``, ``GET /audit/{entity}``,
and the routing view (:mod:`projections.routing`): ``GET /routing/decisions`` (latest first; filter
``policy``, ``model``, ``request_id``; paging ``limit`` + ``offset``), ``GET /routing/models`` (per-model
statistics) and ``GET /routing/requests/{request_id}`` (the request's audit: decisions with every
candidate, outcomes); and the incidents view (:mod:`projections.incidents`): ``GET /incidents`` (filter
``status``), ``GET /incidents/{incident_id}`` (its audit chain), ``GET /anomalies`` (filter ``series``),
``GET /correlations`` (filter ``entity``).
Errors answer ``{"detail": "<message>"}`` with 404 (unknown run, no such view yet) or 422 (bad input).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, HTTPException, Query, Request
from psycopg.rows import dict_row

from projections import routing
from projections.audit import audit_trail
from projections.incidents import incident_audit, list_anomalies, list_correlations, list_incidents
from projections.read_models import plain_run, read_run
from projections.registry import PROJECTIONS, projection_status

__all__ = ["router"]

router = APIRouter(tags=["projections"])

_OUTCOMES = ("RESOLVED", "UNRESOLVED", "UNKNOWN")


@contextmanager
def _conn(request: Request) -> Iterator[psycopg.Connection]:
    pool = getattr(request.app.state, "pg_pool", None)
    if pool is None:
        raise HTTPException(503, "no PostgreSQL pool configured (app.state.pg_pool)")
    with pool.connection() as conn:
        try:
            yield conn
        except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName) as exc:
            raise HTTPException(404, f"the view does not exist yet (has its projection run?): {exc}") from exc


def _cursor_encode(run_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": run_id}).encode()).decode()


def _cursor_decode(cursor: str) -> str:
    try:
        return str(json.loads(base64.urlsafe_b64decode(cursor.encode()))["after"])
    except (ValueError, KeyError, TypeError) as exc:
        raise HTTPException(422, f"invalid cursor {cursor!r}") from exc


@router.get("/runs", summary="Agent runs (filter, page)")
def list_runs(
    request: Request,
    outcome: Annotated[str | None, Query(description="RESOLVED, UNRESOLVED or UNKNOWN")] = None,
    model: Annotated[str | None, Query(description="only runs that called this model")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
    cursor: Annotated[
        str | None, Query(description="next_cursor of the previous page (instead of offset)")
    ] = None,
) -> dict[str, Any]:
    """Runs ordered by run id: ``{"items": [...], "next_cursor": str | null}``."""
    where, params = [], []
    if outcome is not None:
        if outcome.upper() not in _OUTCOMES:
            raise HTTPException(422, f"outcome must be one of {', '.join(_OUTCOMES)}, not {outcome!r}")
        where.append("r.outcome = %s")
        params.append(outcome.upper())
    if model is not None:
        where.append(
            "EXISTS (SELECT 1 FROM proj_agent_runs.agent_run_models m WHERE m.run_id = r.run_id AND m.model = %s)"
        )
        params.append(model)
    if cursor is not None:
        if offset:
            raise HTTPException(422, "give either cursor or offset, not both")
        where.append("r.run_id > %s")
        params.append(_cursor_decode(cursor))
    sql = "SELECT r.* FROM proj_agent_runs.agent_runs r"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY r.run_id LIMIT %s OFFSET %s"
    params += [limit + 1, offset]
    with _conn(request) as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(sql, params).fetchall()
    items = [plain_run(r) for r in rows[:limit]]
    nxt = _cursor_encode(items[-1]["run_id"]) if len(rows) > limit else None
    return {"items": items, "next_cursor": nxt}


@router.get("/runs/{run_id}", summary="One agent run, with its per-model usage")
def get_run(request: Request, run_id: str) -> dict[str, Any]:
    """The run's latest state (``source``: ``redis`` or ``postgres``) and its models; 404 if unknown."""
    with _conn(request) as conn:
        row, source = read_run(getattr(request.app.state, "redis", None), conn, run_id)
        if row is None:
            raise HTTPException(404, f"no run {run_id!r}")
        with conn.cursor(row_factory=dict_row) as cur:
            models = cur.execute(
                "SELECT model, provider, llm_calls, prompt_tokens, completion_tokens, cost_usd "
                "FROM proj_agent_runs.agent_run_models WHERE run_id = %s ORDER BY model, provider",
                (run_id,),
            ).fetchall()
    return {**row, "models": [plain_run(m) for m in models], "source": source}


@router.get("/models", summary="Per-model usage over all runs")
def list_models(request: Request) -> list[dict[str, Any]]:
    """Rows of ``agent_model_usage``, most expensive model first."""
    with _conn(request) as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT * FROM proj_agent_runs.agent_model_usage ORDER BY cost_usd DESC, model"
        ).fetchall()
    return [plain_run(r) for r in rows]


@router.get("/insights", summary="The latest insight per kind and entity")
def list_insights(
    request: Request,
    kind: str | None = None,
    entity: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[dict[str, Any]]:
    """Newest first; filter by ``kind`` (e.g. ``run.summary``) and ``entity`` (e.g. ``run:<id>``)."""
    where, params = [], []
    if kind:
        where.append("kind = %s")
        params.append(kind)
    if entity:
        where.append("entity = %s")
        params.append(entity)
    sql = "SELECT * FROM proj_insights.insights_latest"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY event_time DESC, kind, entity LIMIT %s OFFSET %s"
    with _conn(request) as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(sql, [*params, limit, offset]).fetchall()
    return [plain_run(r) for r in rows]


@router.get("/projections", summary="Each projection's version, checkpoints and lag")
def list_projections(request: Request) -> list[dict[str, Any]]:
    """Status of every known projection (lag only when ``app.state.kafka`` is set)."""
    kafka = getattr(request.app.state, "kafka", None)
    with _conn(request) as conn:
        return [projection_status(conn, name, kafka=kafka).as_json() for name in PROJECTIONS]


@router.get("/audit/{entity}", summary="Every event about one entity, with its causation chain")
def get_audit(
    request: Request,
    entity: str,
    from_: Annotated[datetime | None, Query(alias="from", description="first event time (inclusive)")] = None,
    to: Annotated[datetime | None, Query(description="last event time (exclusive)")] = None,
) -> list[dict[str, Any]]:
    """Entries in event-time order; 404 when nothing is archived about the entity."""
    for name, t in (("from", from_), ("to", to)):
        if t is not None and t.tzinfo is None:
            raise HTTPException(422, f"{name} must carry a time zone (e.g. 2025-11-18T22:55:01Z)")
    try:
        with _conn(request) as conn:
            entries = audit_trail(
                conn, entity, start=from_, end=to, serde=getattr(request.app.state, "serde", None)
            )
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc
    if not entries:
        raise HTTPException(404, f"no archived event about {entity!r}")
    return [e.as_json() for e in entries]


def _no_nul(**values: str | None) -> None:
    """422 for a text that PostgreSQL cannot hold (a NUL character)."""
    for name, v in values.items():
        if v is not None and "\x00" in v:
            raise HTTPException(422, f"{name} must not contain a NUL character")


@router.get("/routing/decisions", summary="The policy router's decisions, latest first")
def list_routing_decisions(
    request: Request,
    policy: str | None = None,
    model: Annotated[str | None, Query(description="the chosen model")] = None,
    request_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[dict[str, Any]]:
    """Rows of ``routing_decisions`` (candidates with their scores and reasons, ``decided_at`` RFC 3339)."""
    _no_nul(policy=policy, model=model, request_id=request_id)
    with _conn(request) as conn:
        return routing.decisions(
            conn, limit=limit, offset=offset, policy=policy, model=model, request_id=request_id
        )


@router.get("/routing/models", summary="Per-model routing statistics")
def list_routing_models(request: Request) -> list[dict[str, Any]]:
    """Rows of ``routing_model_stats``: decisions, fallbacks, outcomes, success rate, latency p50/p95 (ms),
    cost (USD)."""
    with _conn(request) as conn:
        return routing.model_stats(conn)


@router.get("/routing/requests/{request_id}", summary="The routing audit of one request")
def get_routing_request(request: Request, request_id: str) -> dict[str, Any]:
    """``{"request_id", "decisions", "outcomes"}``; 404 when the routing view knows nothing of it."""
    _no_nul(request_id=request_id)
    with _conn(request) as conn:
        audit = routing.request_audit(conn, request_id)
    if not audit.decisions and not audit.outcomes:
        raise HTTPException(404, f"no routing decision or outcome for request {request_id!r}")
    return audit.as_json()


# -- the incidents projection (projections.incidents) ---------------------------------------------------------------


@router.get("/incidents", summary="Incidents with their ranked root-cause candidates")
def get_incidents(
    request: Request,
    status: Annotated[str | None, Query(pattern="^(open|closed)$", description="open or closed")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[dict[str, Any]]:
    """Newest first (by their first anomaly); times RFC 3339, ``candidates`` a list of ``{rank, pod,
    service, score, evidence}``."""
    with _conn(request) as conn:
        return list_incidents(conn, status=status, limit=limit, offset=offset)


@router.get("/incidents/{incident_id}", summary="One incident and its chain from first anomaly to causes")
def get_incident_chain(request: Request, incident_id: str) -> dict[str, Any]:
    """``{"incident", "insights", "chain"}`` (see :func:`projections.incidents.incident_audit`); 404 if unknown."""
    _no_nul(incident_id=incident_id)
    with _conn(request) as conn:
        found = incident_audit(conn, incident_id)
    if found is None:
        raise HTTPException(404, f"no incident {incident_id!r}")
    return found


@router.get("/anomalies", summary="Anomaly alerts (anomaly.detected)")
def get_anomalies(
    request: Request,
    series: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[dict[str, Any]]:
    """Newest first; filter by ``series`` (e.g. ``pod:<pod>/<metric>``)."""
    _no_nul(series=series)
    with _conn(request) as conn:
        return list_anomalies(conn, series=series, limit=limit, offset=offset)


@router.get("/correlations", summary="Correlation links (correlation.link)")
def get_correlations(
    request: Request,
    entity: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[dict[str, Any]]:
    """Newest first; ``entity`` matches the commit or the message."""
    _no_nul(entity=entity)
    with _conn(request) as conn:
        return list_correlations(conn, entity=entity, limit=limit, offset=offset)

"""The incident views: incidents with their ranked root causes, the anomalies behind them, the anomaly
processor's alerts and the correlation links; and the reads over them (CLI, HTTP, ``backbone audit
incident:<id>``).

Built from three insight topics (``sophia.insight.Insight``), told apart by the insight ``kind``, not by
the topic (so a test or a replay may read them from any topic):

* ``insights.incidents``: ``incident.opened`` / ``incident.updated`` / ``incident.closed`` from
  :mod:`processors.incidents.app` (entity and key ``incident:<id>``). Its labels carry ``priority``,
  ``detector_version``, ``top1_pod``, ``top1_service``, ``candidates`` (JSON list of ``{rank, pod,
  service, score, evidence}``) and ``anomalies`` (JSON list, at most 200, sorted by window, of
  ``{window_start_ms, pod, service, signal, score, value, baseline, detail}``); its metrics
  ``anomalies_count``, ``services_count``, ``first_anomaly_window_ms``, ``opened_window_ms``,
  ``window_ms``, ``last_anomaly_window_ms`` (epoch ms, as doubles). Its label ``suspect_changes`` (a JSON
  list of ``{change_id, origin, change_kind, summary, changed_at, lead_seconds, services,
  candidate_rank}``, :mod:`processors.incidents.incident`) is projected (``[]`` when an older insight
  lacks it).
* ``insights.anomalies``: ``anomaly.detected`` from :mod:`processors.incidents.anomaly_app` (entity and key
  ``series:<series>``): metrics ``score`` (0..1), ``value``, ``sample_index``, ``window_seconds``; labels
  ``series``, ``detector_version``, ``window_start``, ``window_end`` (ISO 8601).
* ``insights.correlations``: ``correlation.link`` from :mod:`processors.correlation` (entity and key: the
  commit ``git:<owner>/<repo>@<sha>``): metrics ``lag_seconds`` (message time minus commit time),
  ``cosine`` (embedding links); labels ``method``, ``slack_entity``, ``commit_entity``, ``commit_sha``,
  ``repo``, ``reference`` (reference links).

Insights of other kinds are not this view's concern and are skipped.

Tables (schema ``proj_incidents``):

* ``incidents``: one row per incident. ``opened_at`` / ``closed_at`` are the event times of its
  ``incident.opened`` / ``incident.closed`` insights (the earliest / latest seen), ``first_anomaly_at`` the
  start of the window of its first anomaly; every other column comes from its *latest* insight, latest by
  ``(event_time, kind order opened < updated < closed, insight_id)``, so the row does not depend on the
  order the insights arrive in and a rebuild equals the live view. ``services`` and ``pods`` are those of
  the anomalies the latest insight lists and of its candidates.
* ``incident_insights``: every incident insight (kind, event time, counts, top candidate).
* ``incident_anomalies``: the union of the anomalies the incident's insights list, one row per
  ``(incident, window, pod, signal, detail)`` (two new log templates of one pod in one window differ
  by their detail); ``joined_at`` is the event time of the first insight that listed it.
* ``anomalies``: one row per ``anomaly.detected`` insight (by insight id).
* ``correlations``: one row per ``correlation.link`` insight (by insight id); ``source_a`` / ``source_b``
  are the source systems of the two ends (``slack`` / ``git``), ``lag_seconds`` = time(a) - time(b).

A record the view cannot read (an insight without its required labels or metrics, a ``candidates`` label
that is not a JSON list, an entity that is not its key) raises :class:`ProjectionApplyError`; the runner
dead-letters it with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from projections.errors import ProjectionApplyError
from streams.consumer import ConsumedEvent
from streams.envelope import format_time

__all__ = [
    "ANOMALY_KIND",
    "CORRELATION_KIND",
    "INCIDENT_KINDS",
    "SCHEMA",
    "IncidentState",
    "IncidentsProjection",
    "get_incident",
    "incident_audit",
    "list_anomalies",
    "list_correlations",
    "list_incidents",
    "merge_incident",
    "parse_anomaly",
    "parse_correlation",
    "parse_incident",
]

INSIGHT_SCHEMA = "sophia.insight.Insight"
INCIDENT_KINDS = {"incident.opened": 0, "incident.updated": 1, "incident.closed": 2}
"""Incident insight kinds and their order at equal event time (a close outranks an update)."""
ANOMALY_KIND = "anomaly.detected"
CORRELATION_KIND = "correlation.link"
SCHEMA = "proj_incidents"
"""The projection's PostgreSQL schema (``projections.runner.schema_name("incidents")``)."""

DDL = """
CREATE TABLE IF NOT EXISTS incidents (
    incident_id        text        PRIMARY KEY,
    entity             text        NOT NULL,
    status             text        GENERATED ALWAYS AS (CASE WHEN closed_at IS NULL THEN 'open' ELSE 'closed' END) STORED,
    opened_at          timestamptz,
    closed_at          timestamptz,
    first_anomaly_at   timestamptz NOT NULL,
    last_anomaly_at    timestamptz NOT NULL,
    priority           text        NOT NULL,
    services           text[]      NOT NULL,
    pods               text[]      NOT NULL,
    anomalies_count    integer     NOT NULL,
    services_count     integer     NOT NULL,
    summary            text        NOT NULL,
    top1_pod           text,
    top1_service       text,
    candidates         jsonb       NOT NULL,
    suspect_changes    jsonb       NOT NULL,
    detector_version   text        NOT NULL,
    latest_kind        text        NOT NULL,
    latest_rank        smallint    NOT NULL,
    latest_event_at    timestamptz NOT NULL,
    latest_insight_id  text        NOT NULL
);
CREATE INDEX IF NOT EXISTS incidents_first_anomaly ON incidents (first_anomaly_at DESC);
CREATE TABLE IF NOT EXISTS incident_insights (
    insight_id      text        PRIMARY KEY,
    incident_id     text        NOT NULL,
    kind            text        NOT NULL,
    event_time      timestamptz NOT NULL,
    anomalies_count integer     NOT NULL,
    priority        text        NOT NULL,
    top1_pod        text,
    summary         text        NOT NULL,
    event_id        text        NOT NULL
);
CREATE INDEX IF NOT EXISTS incident_insights_incident ON incident_insights (incident_id, event_time);
CREATE TABLE IF NOT EXISTS incident_anomalies (
    incident_id  text             NOT NULL,
    window_start timestamptz      NOT NULL,
    pod          text             NOT NULL,
    signal       text             NOT NULL,
    service      text             NOT NULL,
    score        double precision NOT NULL,
    value        double precision NOT NULL,
    baseline     double precision NOT NULL,
    detail       text             NOT NULL,
    joined_at    timestamptz      NOT NULL,
    PRIMARY KEY (incident_id, window_start, pod, signal, detail)
);
CREATE TABLE IF NOT EXISTS anomalies (
    insight_id       text             PRIMARY KEY,
    entity           text             NOT NULL,
    series           text             NOT NULL,
    event_time       timestamptz      NOT NULL,
    score            double precision NOT NULL,
    value            double precision NOT NULL,
    sample_index     bigint,
    window_start     timestamptz,
    window_end       timestamptz,
    window_seconds   double precision,
    detector_version text             NOT NULL,
    summary          text             NOT NULL,
    event_id         text             NOT NULL,
    causation_id     text
);
CREATE INDEX IF NOT EXISTS anomalies_series_time ON anomalies (series, event_time);
CREATE INDEX IF NOT EXISTS anomalies_time ON anomalies (event_time DESC);
CREATE TABLE IF NOT EXISTS correlations (
    insight_id     text             PRIMARY KEY,
    entity         text             NOT NULL,
    method         text             NOT NULL,
    event_time     timestamptz      NOT NULL,
    message_entity text             NOT NULL,
    commit_entity  text             NOT NULL,
    commit_sha     text,
    repo           text,
    reference      text,
    source_a       text             NOT NULL,
    source_b       text             NOT NULL,
    lag_seconds    double precision NOT NULL,
    cosine         double precision,
    summary        text             NOT NULL,
    event_id       text             NOT NULL,
    causation_id   text
);
CREATE INDEX IF NOT EXISTS correlations_entity ON correlations (entity, event_time);
"""

_INCIDENT_COLS = (
    "incident_id", "entity", "opened_at", "closed_at", "first_anomaly_at", "last_anomaly_at", "priority",
    "services", "pods", "anomalies_count", "services_count", "summary", "top1_pod", "top1_service",
    "candidates", "suspect_changes", "detector_version", "latest_kind", "latest_rank", "latest_event_at",
    "latest_insight_id",
)  # fmt: skip
_LATEST = _INCIDENT_COLS[5:]  # from last_anomaly_at on: the latest insight's
_NEWER = (
    "(excluded.latest_event_at, excluded.latest_rank, excluded.latest_insight_id) > "
    "(incidents.latest_event_at, incidents.latest_rank, incidents.latest_insight_id)"
)
_UPSERT_INCIDENT = (
    f"INSERT INTO incidents ({', '.join(_INCIDENT_COLS)}) VALUES ({', '.join(['%s'] * len(_INCIDENT_COLS))}) "
    "ON CONFLICT (incident_id) DO UPDATE SET "
    "opened_at = least(incidents.opened_at, excluded.opened_at), "
    "closed_at = greatest(incidents.closed_at, excluded.closed_at), "
    "first_anomaly_at = least(incidents.first_anomaly_at, excluded.first_anomaly_at), "
    + ", ".join(f"{c} = CASE WHEN {_NEWER} THEN excluded.{c} ELSE incidents.{c} END" for c in _LATEST)
)
_INSERT_INCIDENT_INSIGHT = """
INSERT INTO incident_insights (insight_id, incident_id, kind, event_time, anomalies_count, priority, top1_pod,
                               summary, event_id)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (insight_id) DO NOTHING
"""
_UPSERT_INCIDENT_ANOMALY = """
INSERT INTO incident_anomalies (incident_id, window_start, pod, signal, service, score, value, baseline, detail,
                                joined_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (incident_id, window_start, pod, signal, detail) DO UPDATE SET
    joined_at = least(incident_anomalies.joined_at, excluded.joined_at)
"""
_ANOMALY_COLS = (
    "insight_id", "entity", "series", "event_time", "score", "value", "sample_index", "window_start",
    "window_end", "window_seconds", "detector_version", "summary", "event_id", "causation_id",
)  # fmt: skip
_INSERT_ANOMALY = (
    f"INSERT INTO anomalies ({', '.join(_ANOMALY_COLS)}) VALUES ({', '.join(['%s'] * len(_ANOMALY_COLS))}) "
    "ON CONFLICT (insight_id) DO NOTHING"
)
_CORRELATION_COLS = (
    "insight_id", "entity", "method", "event_time", "message_entity", "commit_entity", "commit_sha", "repo",
    "reference", "source_a", "source_b", "lag_seconds", "cosine", "summary", "event_id", "causation_id",
)  # fmt: skip
_INSERT_CORRELATION = (
    f"INSERT INTO correlations ({', '.join(_CORRELATION_COLS)}) "
    f"VALUES ({', '.join(['%s'] * len(_CORRELATION_COLS))}) ON CONFLICT (insight_id) DO NOTHING"
)


# -- parsing (pure) ----------------------------------------------------------------------------------------------


def _time(v: Any, what: str) -> datetime:
    if isinstance(v, datetime):
        if v.tzinfo is None:
            raise ProjectionApplyError(f"{what} is a naive datetime")
        return v.astimezone(UTC)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return datetime.fromtimestamp(v / 1000, UTC)
    if isinstance(v, str):
        try:
            t = datetime.fromisoformat(v)
        except ValueError:
            raise ProjectionApplyError(f"{what} {v!r} is not an ISO 8601 time") from None
        if t.tzinfo is None:
            raise ProjectionApplyError(f"{what} {v!r} has no time zone")
        return t.astimezone(UTC)
    raise ProjectionApplyError(f"{what} {v!r} is not a time")


def _need(d: Mapping[str, Any], name: str, what: str) -> Any:
    v = d.get(name)
    if v is None:
        raise ProjectionApplyError(f"{what} has no {name!r}")
    return v


def _json_list(
    labels: Mapping[str, str], name: str, what: str, *, required: bool = True
) -> list[dict[str, Any]]:
    raw = labels.get(name)
    if raw is None:
        if required:
            raise ProjectionApplyError(f"{what} has no label {name!r}")
        return []
    try:
        items = json.loads(raw)
    except ValueError as exc:
        raise ProjectionApplyError(f"{what}: label {name!r} is not JSON ({exc})") from None
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise ProjectionApplyError(f"{what}: label {name!r} is not a JSON list of objects")
    return items


def _check_key(data: Mapping[str, Any], key: str | None, what: str) -> str:
    entity = str(data.get("entity") or "")
    if not entity or (key is not None and key != entity):
        raise ProjectionApplyError(f"{what}: entity {entity!r} does not match key {key!r}")
    return entity


@dataclass(frozen=True, slots=True, kw_only=True)
class IncidentState:
    """What one incident insight says (see the module docstring for the labels and metrics read).

    Attributes:
        incident_id: the id (the entity without ``incident:``).
        kind, rank: the insight kind and its order (:data:`INCIDENT_KINDS`).
        row: the ``incidents`` row this insight alone gives (column -> value; JSON columns as text).
        anomalies: ``incident_anomalies`` rows (without ``incident_id`` and ``joined_at``).
        insight: the ``incident_insights`` row (without ``event_id``).
    """

    incident_id: str
    kind: str
    rank: int
    row: dict[str, Any]
    anomalies: list[tuple[Any, ...]] = field(default_factory=list)
    insight: tuple[Any, ...] = ()

    @property
    def order(self) -> tuple[datetime, int, str]:
        """``(event_time, rank, insight_id)``: the larger is the later state."""
        return (self.row["latest_event_at"], self.rank, self.row["latest_insight_id"])


def parse_incident(data: Mapping[str, Any], key: str | None = None) -> IncidentState:
    """Read an ``incident.*`` insight's datum.

    Args:
        data: the decoded ``sophia.insight.Insight`` (``event_time`` an aware datetime or epoch ms).
        key: the record key (must equal the entity when given).

    Raises:
        ProjectionApplyError: another kind, an entity that is not ``incident:<id>`` or not the key, a
            missing label or metric, a ``candidates`` / ``anomalies`` / ``suspect_changes`` label that is
            not a JSON list of objects, or anomalies/candidates without their fields.
    """
    kind = str(data.get("kind"))
    if kind not in INCIDENT_KINDS:
        raise ProjectionApplyError(f"{kind!r} is not an incident insight kind")
    iid = str(data.get("insight_id") or "")
    what = f"incident insight {iid or '?'}"
    entity = _check_key(data, key, what)
    prefix, _, incident_id = entity.partition(":")
    if prefix != "incident" or not incident_id:
        raise ProjectionApplyError(f"{what}: entity {entity!r} is not incident:<id>")
    if not iid:
        raise ProjectionApplyError(f"{what} has no insight_id")
    t = _time(_need(data, "event_time", what), f"{what} event_time")
    metrics, labels = data.get("metrics") or {}, data.get("labels") or {}
    candidates = _json_list(labels, "candidates", what)
    listed = _json_list(labels, "anomalies", what)
    suspects = _json_list(labels, "suspect_changes", what, required=False)
    try:
        anomalies = [
            (_time(a["window_start_ms"], f"{what} anomaly window"), str(a["pod"]), str(a["signal"]),
             str(a["service"]), float(a["score"]), float(a["value"]), float(a["baseline"]), str(a.get("detail") or ""))
            for a in listed
        ]  # fmt: skip
        for c in candidates:
            int(c["rank"]), str(c["pod"]), str(c["service"]), float(c["score"]), list(c["evidence"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProjectionApplyError(f"{what}: an anomaly or candidate lacks {exc}") from None
    candidates = sorted(candidates, key=lambda c: int(c["rank"]))
    services = sorted({a[3] for a in anomalies} | {str(c["service"]) for c in candidates})
    pods = sorted({a[1] for a in anomalies} | {str(c["pod"]) for c in candidates})
    count = int(_need(metrics, "anomalies_count", what))
    priority = str(_need(labels, "priority", what))
    row = {
        "incident_id": incident_id, "entity": entity,
        "opened_at": t if kind == "incident.opened" else None,
        "closed_at": t if kind == "incident.closed" else None,
        "first_anomaly_at": _time(_need(metrics, "first_anomaly_window_ms", what), f"{what} first anomaly"),
        "last_anomaly_at": _time(_need(metrics, "last_anomaly_window_ms", what), f"{what} last anomaly"),
        "priority": priority, "services": services, "pods": pods, "anomalies_count": count,
        "services_count": int(_need(metrics, "services_count", what)), "summary": str(data.get("summary") or ""),
        "top1_pod": labels.get("top1_pod") or None, "top1_service": labels.get("top1_service") or None,
        "candidates": json.dumps(candidates, sort_keys=True), "suspect_changes": json.dumps(suspects, sort_keys=True),
        "detector_version": str(_need(labels, "detector_version", what)), "latest_kind": kind,
        "latest_rank": INCIDENT_KINDS[kind], "latest_event_at": t, "latest_insight_id": iid,
    }  # fmt: skip
    insight = (iid, incident_id, kind, t, count, priority, row["top1_pod"], row["summary"])
    return IncidentState(
        incident_id=incident_id,
        kind=kind,
        rank=INCIDENT_KINDS[kind],
        row=row,
        anomalies=anomalies,
        insight=insight,
    )


def parse_anomaly(data: Mapping[str, Any], key: str | None = None) -> dict[str, Any]:
    """An ``anomalies`` row (without ``event_id`` / ``causation_id``) from an ``anomaly.detected`` datum.

    Raises:
        ProjectionApplyError: an entity that is not the key or not ``series:<series>``, no ``series``
            label, no ``score`` or ``value`` metric, no ``detector_version``, a window bound that is not
            an ISO 8601 time with a zone.
    """
    iid = str(data.get("insight_id") or "")
    what = f"anomaly insight {iid or '?'}"
    if not iid:
        raise ProjectionApplyError(f"{what} has no insight_id")
    entity = _check_key(data, key, what)
    metrics, labels = data.get("metrics") or {}, data.get("labels") or {}
    series = str(_need(labels, "series", what))
    if entity != f"series:{series}":
        raise ProjectionApplyError(f"{what}: entity {entity!r} is not series:{series}")
    ws, we = labels.get("window_start"), labels.get("window_end")
    idx = metrics.get("sample_index")
    return {
        "insight_id": iid, "entity": entity, "series": series,
        "event_time": _time(_need(data, "event_time", what), f"{what} event_time"),
        "score": float(_need(metrics, "score", what)), "value": float(_need(metrics, "value", what)),
        "sample_index": int(idx) if idx is not None else None,
        "window_start": _time(ws, f"{what} window_start") if ws else None,
        "window_end": _time(we, f"{what} window_end") if we else None,
        "window_seconds": metrics.get("window_seconds"),
        "detector_version": str(_need(labels, "detector_version", what)), "summary": str(data.get("summary") or ""),
    }  # fmt: skip


def _source(entity: str) -> str:
    return entity.partition(":")[0] if ":" in entity else entity


def parse_correlation(data: Mapping[str, Any], key: str | None = None) -> dict[str, Any]:
    """A ``correlations`` row (without ``event_id`` / ``causation_id``) from a ``correlation.link`` datum.

    ``source_a`` is the system of the message (``slack``), ``source_b`` that of the commit (``git``), and
    ``lag_seconds`` = message time - commit time, as :mod:`processors.correlation.lag` counts it.

    Raises:
        ProjectionApplyError: an entity that is not the key or not the commit entity, no ``method``,
            ``slack_entity`` or ``commit_entity`` label, no ``lag_seconds`` metric.
    """
    iid = str(data.get("insight_id") or "")
    what = f"correlation insight {iid or '?'}"
    if not iid:
        raise ProjectionApplyError(f"{what} has no insight_id")
    entity = _check_key(data, key, what)
    metrics, labels = data.get("metrics") or {}, data.get("labels") or {}
    message, commit = str(_need(labels, "slack_entity", what)), str(_need(labels, "commit_entity", what))
    if entity != commit:
        raise ProjectionApplyError(f"{what}: entity {entity!r} is not its commit {commit!r}")
    cosine = metrics.get("cosine")
    return {
        "insight_id": iid, "entity": entity, "method": str(_need(labels, "method", what)),
        "event_time": _time(_need(data, "event_time", what), f"{what} event_time"),
        "message_entity": message, "commit_entity": commit, "commit_sha": labels.get("commit_sha") or None,
        "repo": labels.get("repo") or None, "reference": labels.get("reference"),
        "source_a": _source(message), "source_b": _source(commit),
        "lag_seconds": float(_need(metrics, "lag_seconds", what)),
        "cosine": float(cosine) if cosine is not None else None, "summary": str(data.get("summary") or ""),
    }  # fmt: skip


def merge_incident(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Merge two ``incidents`` rows of one incident the way the upsert does: earliest ``opened_at`` and
    ``first_anomaly_at``, latest ``closed_at``, every other column from the later state (by
    ``(latest_event_at, latest_rank, latest_insight_id)``). Commutative and associative."""
    if old is None:
        return dict(new)

    def order(r: Mapping[str, Any]) -> tuple[Any, ...]:
        return (r["latest_event_at"], r["latest_rank"], r["latest_insight_id"])

    out = dict(new if order(new) > order(old) else old)
    for col, pick in (("opened_at", min), ("closed_at", max), ("first_anomaly_at", min)):
        vals = [v for v in (old[col], new[col]) if v is not None]
        out[col] = pick(vals) if vals else None
    return out


# -- the projection ------------------------------------------------------------------------------------------------


class IncidentsProjection:
    """Incidents, their anomalies and ranked causes; anomaly alerts; correlation links.

    Reads ``insights.incidents``, ``insights.anomalies`` and ``insights.correlations`` (or ``topics``);
    every insight kind is told apart by ``kind``. Idempotent (rows keyed by insight id or incident; the
    incident row keeps the latest state by event time) and independent of arrival order.
    """

    name = "incidents"
    version = 1
    topics: tuple[str, ...] = ("insights.incidents", "insights.anomalies", "insights.correlations")

    def __init__(self, topics: Sequence[str] | None = None) -> None:
        if topics is not None:
            self.topics = tuple(topics)

    def create(self, conn: psycopg.Connection) -> None:
        """Create the five tables (idempotent)."""
        conn.execute(DDL)

    def apply(self, cur: psycopg.Cursor, events: Sequence[ConsumedEvent]) -> None:
        """Fold a batch per incident, then upsert the rows.

        Raises:
            ProjectionApplyError: an event that is not a ``sophia.insight.Insight``, or an insight of a
                known kind this view cannot read (see :func:`parse_incident`, :func:`parse_anomaly`,
                :func:`parse_correlation`).
        """
        incidents: dict[str, dict[str, Any]] = {}
        listed: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        insights, anomalies, correlations = [], [], []
        for e in events:
            if e.schema != INSIGHT_SCHEMA:
                raise ProjectionApplyError(f"event {e.attributes.id}: {e.schema} is not an insight")
            d, kind = e.data, e.data.get("kind")
            if kind in INCIDENT_KINDS:
                st = parse_incident(d, e.key)
                incidents[st.incident_id] = merge_incident(incidents.get(st.incident_id), st.row)
                insights.append((*st.insight, e.attributes.id))
                t = st.row["latest_event_at"]
                for a in st.anomalies:
                    k = (st.incident_id, a[0], a[1], a[2], a[7])
                    old = listed.get(k)
                    if old is None or t < old[-1]:
                        listed[k] = (st.incident_id, *a, t)
            elif kind == ANOMALY_KIND:
                r = parse_anomaly(d, e.key)
                anomalies.append(
                    (*(r[c] for c in _ANOMALY_COLS[:-2]), e.attributes.id, e.attributes.causation_id)
                )
            elif kind == CORRELATION_KIND:
                r = parse_correlation(d, e.key)
                correlations.append(
                    (*(r[c] for c in _CORRELATION_COLS[:-2]), e.attributes.id, e.attributes.causation_id)
                )
            # other insight kinds are not this view's concern
        if incidents:
            cur.executemany(_UPSERT_INCIDENT, [[r[c] for c in _INCIDENT_COLS] for r in incidents.values()])
        if insights:
            cur.executemany(_INSERT_INCIDENT_INSIGHT, insights)
        if listed:
            cur.executemany(_UPSERT_INCIDENT_ANOMALY, list(listed.values()))
        if anomalies:
            cur.executemany(_INSERT_ANOMALY, anomalies)
        if correlations:
            cur.executemany(_INSERT_CORRELATION, correlations)


# -- reads -----------------------------------------------------------------------------------------------------------


def _plain(row: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-ready: datetimes as RFC 3339."""
    return {k: format_time(v) if isinstance(v, datetime) else v for k, v in row.items()}


def _rows(conn: psycopg.Connection, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(sql, params).fetchall()
    if not conn.autocommit:
        conn.rollback()
    return [_plain(r) for r in rows]


_INCIDENT_LIST = (
    "incident_id, entity, status, opened_at, closed_at, first_anomaly_at, last_anomaly_at, priority, services, "
    "pods, anomalies_count, services_count, summary, top1_pod, top1_service, candidates, suspect_changes, "
    "detector_version, latest_kind, latest_event_at, latest_insight_id"
)


def list_incidents(
    conn: psycopg.Connection,
    *,
    status: str | None = None,
    limit: int = 100,
    offset: int = 0,
    schema: str = SCHEMA,
) -> list[dict[str, Any]]:
    """Incidents, newest first (by the start of their first anomaly's window), as JSON-ready dicts
    (times RFC 3339; ``candidates`` and ``suspect_changes`` lists).

    Args:
        status: ``open`` or ``closed`` (None: both).

    Raises:
        ValueError: another status.
        psycopg.errors.UndefinedTable: the projection has not run (no tables).
    """
    where, params = "", []
    if status is not None:
        if status not in ("open", "closed"):
            raise ValueError(f"status must be open or closed, not {status!r}")
        where, params = " WHERE status = %s", [status]
    return _rows(conn, f"SELECT {_INCIDENT_LIST} FROM {schema}.incidents{where} "
                 "ORDER BY first_anomaly_at DESC, incident_id LIMIT %s OFFSET %s", [*params, limit, offset])  # fmt: skip


def _incident_id(incident: str) -> str:
    incident = incident.strip()
    return incident.partition(":")[2] if incident.startswith("incident:") else incident


def get_incident(conn: psycopg.Connection, incident: str, *, schema: str = SCHEMA) -> dict[str, Any] | None:
    """One incident (``<id>`` or ``incident:<id>``) with its ``anomalies`` (in event time) and its
    ``insights`` (the opened/updated/closed insights, in event time); None when unknown.

    Raises:
        psycopg.errors.UndefinedTable: the projection has not run.
    """
    iid = _incident_id(incident)
    found = _rows(conn, f"SELECT {_INCIDENT_LIST} FROM {schema}.incidents WHERE incident_id = %s", [iid])
    if not found:
        return None
    row = found[0]
    row["anomalies"] = _rows(
        conn,
        f"SELECT window_start, pod, service, signal, score, value, baseline, detail, joined_at "
        f"FROM {schema}.incident_anomalies WHERE incident_id = %s ORDER BY window_start, pod, signal, detail",
        [iid],
    )
    row["insights"] = _rows(
        conn,
        f"SELECT insight_id, kind, event_time, anomalies_count, priority, top1_pod, summary "
        f"FROM {schema}.incident_insights WHERE incident_id = %s ORDER BY event_time, kind, insight_id",
        [iid],
    )
    return row


def list_anomalies(
    conn: psycopg.Connection,
    *,
    series: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
    schema: str = SCHEMA,
) -> list[dict[str, Any]]:
    """Anomaly alerts, newest first; filter by ``series`` and event time ``since`` (inclusive, aware).

    Raises:
        psycopg.errors.UndefinedTable: the projection has not run.
    """
    where: list[str] = []
    params: list[Any] = []
    if series:
        where.append("series = %s")
        params.append(series)
    if since is not None:
        where.append("event_time >= %s")
        params.append(since)
    sql = (f"SELECT {', '.join(_ANOMALY_COLS)} FROM {schema}.anomalies"
           + (" WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY event_time DESC, insight_id LIMIT %s OFFSET %s")  # fmt: skip
    return _rows(conn, sql, [*params, limit, offset])


def list_correlations(
    conn: psycopg.Connection,
    *,
    entity: str | None = None,
    limit: int = 100,
    offset: int = 0,
    schema: str = SCHEMA,
) -> list[dict[str, Any]]:
    """Correlation links, newest first; ``entity`` matches the commit or the message entity.

    Raises:
        psycopg.errors.UndefinedTable: the projection has not run.
    """
    where, params = "", []
    if entity:
        where, params = " WHERE entity = %s OR message_entity = %s", [entity, entity]
    return _rows(conn, f"SELECT {', '.join(_CORRELATION_COLS)} FROM {schema}.correlations{where} "
                 "ORDER BY event_time DESC, insight_id LIMIT %s OFFSET %s", [*params, limit, offset])  # fmt: skip


def incident_audit(conn: psycopg.Connection, incident: str, *, schema: str = SCHEMA) -> dict[str, Any] | None:
    """The chain of one incident, from its first anomaly to its ranked causes; None when unknown.

    Returns:
        ``{"incident": <the incidents row>, "insights": [...], "chain": [...]}`` where ``chain`` is, in
        this order: ``{"step": "anomaly", ...}`` for each anomaly that joined the incident, in event
        time (window start, then pod and signal; ``joined_at`` is when an insight first listed it);
        ``{"step": "alert", ...}`` for each ``anomaly.detected`` alert of the anomaly processor on one of
        the incident's pods (series ``pod:<pod>/<metric>``) between its first anomaly and its close (or
        latest insight), in event time; ``{"step": "candidate", ...}`` for each ranked root-cause
        candidate (rank, pod, service, score, evidence); ``{"step": "suspect_change", ...}`` for each
        suspect change its latest insight carries.

    Raises:
        psycopg.errors.UndefinedTable: the projection has not run.
    """
    found = get_incident(conn, incident, schema=schema)
    if found is None:
        return None
    anomalies, insights = found.pop("anomalies"), found.pop("insights")
    chain: list[dict[str, Any]] = [{"step": "anomaly", **a} for a in anomalies]
    iid = found["incident_id"]
    alerts = _rows(
        conn,
        f"SELECT a.insight_id, a.series, a.event_time, a.score, a.value, a.detector_version, a.summary "
        f"FROM {schema}.anomalies a JOIN {schema}.incidents i ON i.incident_id = %s "
        "WHERE substring(a.series from '^pod:([^/]+)/') = ANY(i.pods) "
        "AND a.event_time >= i.first_anomaly_at AND a.event_time <= coalesce(i.closed_at, i.latest_event_at) "
        "ORDER BY a.event_time, a.series, a.insight_id",
        [iid],
    )
    chain += [{"step": "alert", **a} for a in alerts]
    chain += [{"step": "candidate", **c} for c in found["candidates"]]
    chain += [{"step": "suspect_change", **s} for s in found["suspect_changes"]]
    return {"incident": found, "insights": insights, "chain": chain}

"""The agent-run views: one row per run, one per (run, model, provider), and per-model usage; and the
insight feed (the latest insight per kind and entity).

Built from ``agent.events`` (``sophia.agent.RunLifecycle``, ``LlmCall``, ``ToolCall``) and
``insights.runs`` (``sophia.insight.Insight``). Costs are ``numeric``: sums are exact and independent
of batch boundaries, so a rebuild equals the live view row for row.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg

from projections.errors import ProjectionApplyError
from streams.columnar import ColumnarBatch
from streams.consumer import ConsumedEvent

__all__ = ["AgentRunsProjection", "InsightsProjection"]

DDL = """
CREATE TABLE IF NOT EXISTS agent_runs (
    run_id              text PRIMARY KEY,
    agent               text,
    task                text,
    started_at          timestamptz,
    finished_at         timestamptz,
    last_event_at       timestamptz,
    outcome             text,
    exit_status         text,
    steps               integer NOT NULL DEFAULT 0,
    llm_calls           integer NOT NULL DEFAULT 0,
    calls_without_cost  integer NOT NULL DEFAULT 0,
    tool_calls          integer NOT NULL DEFAULT 0,
    failing_tool_calls  integer NOT NULL DEFAULT 0,
    prompt_tokens       bigint  NOT NULL DEFAULT 0,
    completion_tokens   bigint  NOT NULL DEFAULT 0,
    cost_usd            numeric NOT NULL DEFAULT 0,
    reported_cost_usd   numeric
);
CREATE TABLE IF NOT EXISTS agent_run_models (
    run_id            text    NOT NULL,
    model             text    NOT NULL,
    provider          text    NOT NULL DEFAULT '',
    llm_calls         integer NOT NULL DEFAULT 0,
    prompt_tokens     bigint  NOT NULL DEFAULT 0,
    completion_tokens bigint  NOT NULL DEFAULT 0,
    cost_usd          numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, model, provider)
);
CREATE OR REPLACE VIEW agent_model_usage AS
SELECT m.model,
       array_agg(DISTINCT m.provider ORDER BY m.provider) FILTER (WHERE m.provider <> '') AS providers,
       count(DISTINCT m.run_id)                                        AS runs,
       count(DISTINCT m.run_id) FILTER (WHERE r.outcome = 'RESOLVED')  AS resolved_runs,
       sum(m.llm_calls)::bigint                                        AS llm_calls,
       sum(m.prompt_tokens)::bigint                                    AS prompt_tokens,
       sum(m.completion_tokens)::bigint                                AS completion_tokens,
       sum(m.cost_usd)                                                 AS cost_usd
FROM agent_run_models m JOIN agent_runs r USING (run_id)
GROUP BY m.model;
"""

_RUN_COLS = (
    "run_id", "agent", "task", "started_at", "finished_at", "last_event_at", "outcome", "exit_status", "steps",
    "llm_calls", "calls_without_cost", "tool_calls", "failing_tool_calls", "prompt_tokens", "completion_tokens",
    "cost_usd", "reported_cost_usd",
)  # fmt: skip
_RUN_TYPES = (
    "text", "text", "text", "timestamptz", "timestamptz", "timestamptz", "text", "text", "int", "int", "int", "int",
    "int", "bigint", "bigint", "numeric", "numeric",
)  # fmt: skip
_UPSERT_RUN = f"""
INSERT INTO agent_runs ({", ".join(_RUN_COLS)})
SELECT * FROM unnest({", ".join(f"%s::{t}[]" for t in _RUN_TYPES)})
ON CONFLICT (run_id) DO UPDATE SET
    agent = coalesce(excluded.agent, agent_runs.agent),
    task = coalesce(excluded.task, agent_runs.task),
    started_at = least(agent_runs.started_at, excluded.started_at),
    finished_at = greatest(agent_runs.finished_at, excluded.finished_at),
    last_event_at = greatest(agent_runs.last_event_at, excluded.last_event_at),
    outcome = coalesce(excluded.outcome, agent_runs.outcome),
    exit_status = coalesce(excluded.exit_status, agent_runs.exit_status),
    steps = greatest(agent_runs.steps, excluded.steps),
    llm_calls = agent_runs.llm_calls + excluded.llm_calls,
    calls_without_cost = agent_runs.calls_without_cost + excluded.calls_without_cost,
    tool_calls = agent_runs.tool_calls + excluded.tool_calls,
    failing_tool_calls = agent_runs.failing_tool_calls + excluded.failing_tool_calls,
    prompt_tokens = agent_runs.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = agent_runs.completion_tokens + excluded.completion_tokens,
    cost_usd = agent_runs.cost_usd + excluded.cost_usd,
    reported_cost_usd = coalesce(excluded.reported_cost_usd, agent_runs.reported_cost_usd)
"""
_UPSERT_MODEL = """
INSERT INTO agent_run_models (run_id, model, provider, llm_calls, prompt_tokens, completion_tokens, cost_usd)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::int[], %s::bigint[], %s::bigint[], %s::numeric[])
ON CONFLICT (run_id, model, provider) DO UPDATE SET
    llm_calls = agent_run_models.llm_calls + excluded.llm_calls,
    prompt_tokens = agent_run_models.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = agent_run_models.completion_tokens + excluded.completion_tokens,
    cost_usd = agent_run_models.cost_usd + excluded.cost_usd
"""


def _usd(v: float | None) -> Decimal:
    # the float's shortest repr, so 0.00618 is stored as 0.00618 and sums are exact
    return Decimal(repr(v)) if v is not None else Decimal(0)


def _max(a: Any, b: Any) -> Any:
    return b if a is None else a if b is None else max(a, b)


def _min(a: Any, b: Any) -> Any:
    return b if a is None else a if b is None else min(a, b)


def _upsert(cur: psycopg.Cursor, runs: dict[str, dict[str, Any]], models: list[tuple[Any, ...]]) -> None:
    """Upsert a batch's per-run and per-(run, model, provider) deltas, one statement each (column
    arrays through ``unnest``; a batch has at most one row per key, as ``ON CONFLICT`` requires)."""
    if runs:
        cur.execute(_UPSERT_RUN, [[r[c] for r in runs.values()] for c in _RUN_COLS])
    if models:
        cur.execute(_UPSERT_MODEL, [list(col) for col in zip(*models, strict=True)])


class AgentRunsProjection:
    """Per-run and per-model views of agent activity.

    Refuses (dead-letters) an event whose ``run_id`` is empty or differs from the record key.
    """

    name = "agent_runs"
    version = 1
    topics: tuple[str, ...] = ("agent.events",)

    def __init__(self, topics: Sequence[str] | None = None) -> None:
        if topics is not None:
            self.topics = tuple(topics)

    def create(self, conn: psycopg.Connection) -> None:
        """Create ``agent_runs``, ``agent_run_models`` and the ``agent_model_usage`` view."""
        conn.execute(DDL)

    def apply(self, cur: psycopg.Cursor, events: Sequence[ConsumedEvent]) -> None:
        """Fold a batch into per-run and per-(run, model) deltas, then upsert them.

        Raises:
            ProjectionApplyError: an event without a run id, or whose run id is not its key.
        """
        runs: dict[str, dict[str, Any]] = {}
        models: dict[tuple[str, str, str], list[Any]] = {}
        for e in events:
            d = e.data
            run_id = d.get("run_id")
            if not run_id or (e.key is not None and e.key != run_id):
                raise ProjectionApplyError(
                    f"event {e.attributes.id}: run_id {run_id!r} does not match key {e.key!r}"
                )
            r = runs.get(run_id)
            if r is None:
                r = runs[run_id] = dict.fromkeys(_RUN_COLS)
                r.update(run_id=run_id, steps=0, llm_calls=0, calls_without_cost=0, tool_calls=0,
                         failing_tool_calls=0, prompt_tokens=0, completion_tokens=0, cost_usd=Decimal(0))  # fmt: skip
            t: datetime = d["event_time"]
            r["last_event_at"] = _max(r["last_event_at"], t)
            if e.schema == "sophia.agent.LlmCall":
                cost = d.get("cost_usd")
                r["llm_calls"] += 1
                r["steps"] = max(r["steps"], d["step"])
                r["prompt_tokens"] += d["prompt_tokens"]
                r["completion_tokens"] += d["completion_tokens"]
                r["cost_usd"] += _usd(cost)
                r["calls_without_cost"] += cost is None
                key = (run_id, d["model"], d.get("provider") or "")
                m = models.setdefault(key, [0, 0, 0, Decimal(0)])
                m[0] += 1
                m[1] += d["prompt_tokens"]
                m[2] += d["completion_tokens"]
                m[3] += _usd(cost)
            elif e.schema == "sophia.agent.ToolCall":
                r["tool_calls"] += 1
                r["steps"] = max(r["steps"], d["step"])
                rc = d.get("return_code")
                r["failing_tool_calls"] += rc is not None and rc != 0
            elif e.schema == "sophia.agent.RunLifecycle":
                r["agent"] = d.get("agent") or r["agent"]
                r["task"] = d.get("task") or r["task"]
                if d["phase"] == "STARTED":
                    r["started_at"] = _min(r["started_at"], t)
                else:
                    r["finished_at"] = _max(r["finished_at"], t)
                    r["outcome"] = d.get("outcome") or r["outcome"]
                    r["exit_status"] = d.get("exit_status") or r["exit_status"]
                    rc = d.get("reported_cost_usd")
                    r["reported_cost_usd"] = _usd(rc) if rc is not None else r["reported_cost_usd"]
            # other schemas on the topic are not this view's concern
        _upsert(cur, runs, [(*k, *v) for k, v in models.items()])

    def apply_columns(self, cur: psycopg.Cursor, batch: ColumnarBatch) -> None:
        """The same fold as :meth:`apply`, on a column-wise decoded batch (polars group-bys).

        Gives the same rows as :meth:`apply` on the same events: counts and token sums are integer
        sums, steps and times are max/min, the lifecycle's agent, task, outcome, exit status and
        reported cost are the last non-empty value in batch order, and costs are summed as
        ``Decimal(repr(cost_usd))`` per event, so sums stay exact.

        Raises:
            ProjectionApplyError: an event without a run id, or whose run id is not its key, or a
                schema this fold does not know (the runner then applies the batch record by record).
        """
        import polars as pl

        known = {"sophia.agent.LlmCall", "sophia.agent.ToolCall", "sophia.agent.RunLifecycle"}
        for schema, df in batch.frames.items():
            if schema not in known:
                raise ProjectionApplyError(f"{schema} is not folded column-wise")
            bad = df.filter(
                pl.col("run_id").is_null()
                | (pl.col("run_id") == "")
                | (pl.col("_key").is_not_null() & (pl.col("_key") != pl.col("run_id")))
            )
            if bad.height:
                row = bad.row(0, named=True)
                raise ProjectionApplyError(
                    f"event {row['_event_id']}: run_id {row['run_id']!r} does not match key {row['_key']!r}"
                )
        runs: dict[str, dict[str, Any]] = {}

        def run(run_id: str) -> dict[str, Any]:
            r = runs.get(run_id)
            if r is None:
                r = runs[run_id] = dict.fromkeys(_RUN_COLS)
                r.update(run_id=run_id, steps=0, llm_calls=0, calls_without_cost=0, tool_calls=0,
                         failing_tool_calls=0, prompt_tokens=0, completion_tokens=0, cost_usd=Decimal(0))  # fmt: skip
            return r

        models: list[tuple[Any, ...]] = []
        llm = batch.frames.get("sophia.agent.LlmCall")
        if llm is not None:
            per_model = llm.group_by("run_id", "model", pl.col("provider").fill_null("")).agg(
                pl.len().alias("n"),
                pl.col("step").max().alias("steps"),
                pl.col("prompt_tokens").sum().alias("pt"),
                pl.col("completion_tokens").sum().alias("ct"),
                pl.col("cost_usd").is_null().sum().alias("no_cost"),
                pl.col("event_time").max().alias("last"),
                pl.col("cost_usd").drop_nulls().alias("costs"),
            )
            for run_id, model, provider, n, steps, pt, ct, no_cost, last, costs in per_model.iter_rows():
                cost = sum((Decimal(repr(c)) for c in costs), Decimal(0))
                models.append((run_id, model, provider, n, pt, ct, cost))
                r = run(run_id)
                r["llm_calls"] += n
                r["steps"] = max(r["steps"], steps)
                r["prompt_tokens"] += pt
                r["completion_tokens"] += ct
                r["cost_usd"] += cost
                r["calls_without_cost"] += no_cost
                r["last_event_at"] = _max(r["last_event_at"], last)
        tools = batch.frames.get("sophia.agent.ToolCall")
        if tools is not None:
            rc = pl.col("return_code")
            per_run = tools.group_by("run_id").agg(
                pl.len().alias("n"),
                pl.col("step").max().alias("steps"),
                (rc.is_not_null() & (rc != 0)).sum().alias("failing"),
                pl.col("event_time").max().alias("last"),
            )
            for run_id, n, steps, failing, last in per_run.iter_rows():
                r = run(run_id)
                r["tool_calls"] += n
                r["steps"] = max(r["steps"], steps)
                r["failing_tool_calls"] += failing
                r["last_event_at"] = _max(r["last_event_at"], last)
        life = batch.frames.get("sophia.agent.RunLifecycle")
        if life is not None:
            finished = pl.col("phase").cast(pl.String) != "STARTED"

            def last_set(col: str, when: pl.Expr | None = None) -> pl.Expr:
                c = pl.col(col).cast(pl.String) if col == "outcome" else pl.col(col)
                cond = c.is_not_null() & (c != "") if col != "reported_cost_usd" else c.is_not_null()
                return c.filter(cond if when is None else cond & when).last().alias(col)

            per_run = (
                life.sort("_pos")
                .group_by("run_id", maintain_order=True)
                .agg(
                    last_set("agent"),
                    last_set("task"),
                    pl.col("event_time").filter(~finished).min().alias("started_at"),
                    pl.col("event_time").filter(finished).max().alias("finished_at"),
                    last_set("outcome", finished),
                    last_set("exit_status", finished),
                    last_set("reported_cost_usd", finished),
                    pl.col("event_time").max().alias("last"),
                )
            )
            for d in per_run.iter_rows(named=True):
                r = run(d["run_id"])
                r["agent"] = d["agent"] or r["agent"]
                r["task"] = d["task"] or r["task"]
                r["started_at"] = _min(r["started_at"], d["started_at"])
                r["finished_at"] = _max(r["finished_at"], d["finished_at"])
                r["outcome"] = d["outcome"] or r["outcome"]
                r["exit_status"] = d["exit_status"] or r["exit_status"]
                if d["reported_cost_usd"] is not None:
                    r["reported_cost_usd"] = _usd(d["reported_cost_usd"])
                r["last_event_at"] = _max(r["last_event_at"], d["last"])
        _upsert(cur, runs, models)


INSIGHTS_DDL = """
CREATE TABLE IF NOT EXISTS insights_latest (
    kind         text        NOT NULL,
    entity       text        NOT NULL,
    insight_id   text        NOT NULL,
    event_time   timestamptz NOT NULL,
    summary      text        NOT NULL,
    metrics      jsonb       NOT NULL,
    labels       jsonb       NOT NULL,
    event_id     text        NOT NULL,
    causation_id text,
    PRIMARY KEY (kind, entity)
);
CREATE INDEX IF NOT EXISTS insights_latest_time ON insights_latest (event_time DESC);
"""
_UPSERT_INSIGHT = """
INSERT INTO insights_latest (kind, entity, insight_id, event_time, summary, metrics, labels, event_id, causation_id)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (kind, entity) DO UPDATE SET
    insight_id = excluded.insight_id, event_time = excluded.event_time, summary = excluded.summary,
    metrics = excluded.metrics, labels = excluded.labels, event_id = excluded.event_id,
    causation_id = excluded.causation_id
WHERE (excluded.event_time, excluded.insight_id) > (insights_latest.event_time, insights_latest.insight_id)
"""


class InsightsProjection:
    """The insight feed: the latest insight per ``(kind, entity)`` from ``insights.runs``.

    "Latest" is by event time, ties broken by insight id, so the result does not depend on the order
    the insights arrive in (a rebuild equals the live view).
    """

    name = "insights"
    version = 1
    topics: tuple[str, ...] = ("insights.runs",)

    def __init__(self, topics: Sequence[str] | None = None) -> None:
        if topics is not None:
            self.topics = tuple(topics)

    def create(self, conn: psycopg.Connection) -> None:
        """Create ``insights_latest``."""
        conn.execute(INSIGHTS_DDL)

    def apply(self, cur: psycopg.Cursor, events: Sequence[ConsumedEvent]) -> None:
        """Keep the latest insight per (kind, entity) of the batch, then upsert it.

        Raises:
            ProjectionApplyError: an event that is not a ``sophia.insight.Insight``.
        """
        import json

        latest: dict[tuple[str, str], tuple[Any, ...]] = {}
        for e in events:
            if e.schema != "sophia.insight.Insight":
                raise ProjectionApplyError(f"event {e.attributes.id}: {e.schema} is not an insight")
            d = e.data
            row = (
                d["kind"], d["entity"], d["insight_id"], d["event_time"], d.get("summary", ""),
                json.dumps(d.get("metrics") or {}, sort_keys=True), json.dumps(d.get("labels") or {}, sort_keys=True),
                e.attributes.id, e.attributes.causation_id,
            )  # fmt: skip
            k = (d["kind"], d["entity"])
            old = latest.get(k)
            if old is None or (row[3], row[2]) > (old[3], old[2]):
                latest[k] = row
        if latest:
            cur.executemany(_UPSERT_INSIGHT, list(latest.values()))

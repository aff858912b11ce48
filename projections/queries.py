"""Read the views (used by the CLI, the API and the demo report)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row

__all__ = ["agent_runs", "model_usage", "totals"]


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: float(v) if isinstance(v, Decimal) else v for k, v in row.items()}


def agent_runs(
    conn: psycopg.Connection, *, limit: int = 1000, outcome: str | None = None
) -> list[dict[str, Any]]:
    """Rows of ``agent_runs`` ordered by start time (``cost_usd`` as float USD)."""
    sql = "SELECT * FROM proj_agent_runs.agent_runs"
    params: list[Any] = []
    if outcome:
        sql += " WHERE outcome = %s"
        params.append(outcome.upper())
    sql += " ORDER BY started_at NULLS LAST, run_id LIMIT %s"
    params.append(limit)
    with conn.cursor(row_factory=dict_row) as cur:
        return [_plain(r) for r in cur.execute(sql, params).fetchall()]


def model_usage(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Rows of the ``agent_model_usage`` view, most expensive model first."""
    with conn.cursor(row_factory=dict_row) as cur:
        return [
            _plain(r)
            for r in cur.execute(
                "SELECT * FROM proj_agent_runs.agent_model_usage ORDER BY cost_usd DESC"
            ).fetchall()
        ]


def totals(conn: psycopg.Connection) -> dict[str, Any]:
    """Totals over all runs: runs, resolved, llm_calls, tool_calls, tokens and cost_usd (rounded to 1e-6)."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            """SELECT count(*) AS runs,
                      count(*) FILTER (WHERE outcome = 'RESOLVED') AS resolved,
                      count(*) FILTER (WHERE finished_at IS NOT NULL) AS finished,
                      coalesce(sum(llm_calls), 0)::bigint AS llm_calls,
                      coalesce(sum(calls_without_cost), 0)::bigint AS calls_without_cost,
                      coalesce(sum(tool_calls), 0)::bigint AS tool_calls,
                      coalesce(sum(failing_tool_calls), 0)::bigint AS failing_tool_calls,
                      coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
                      coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens,
                      round(coalesce(sum(cost_usd), 0), 6) AS cost_usd,
                      min(started_at) AS first_event_at, max(last_event_at) AS last_event_at
               FROM proj_agent_runs.agent_runs"""
        ).fetchone()
    return _plain(row or {})

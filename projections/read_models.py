"""Redis read models: the latest state of each agent run as a Redis hash, for hot reads.

PostgreSQL is the truth. :class:`RunReadModel` is the runner's ``after_commit`` hook: after each
committed batch it reads the touched runs back from ``proj_agent_runs.agent_runs`` and writes one hash
per run (``<prefix><run_id>``: every column, each value JSON-encoded). A Redis failure never fails
the projection: the model marks itself **stale** (in memory and in PostgreSQL,
``proj_agent_runs.read_model_state``, so a restarted process knows too) and, at the next batch once
Redis answers, refills every run from PostgreSQL before it clears the mark.

Readers (:func:`read_run`) use Redis only while the ``<prefix>__ready__`` key exists: a refill
deletes it first and sets it last, a Redis that lost its memory has none, and any Redis error reads
PostgreSQL instead. So a Redis outage degrades reads to PostgreSQL and never loses a write.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
import redis
import structlog
from psycopg.rows import dict_row

from streams.consumer import ConsumedEvent
from streams.envelope import format_time

__all__ = ["DEFAULT_PREFIX", "RunReadModel", "plain_run", "read_run"]

log = structlog.get_logger(__name__)

DEFAULT_PREFIX = "backbone:run:"
_READY = "__ready__"
_STATE_DDL = """
CREATE TABLE IF NOT EXISTS {schema}.read_model_state (
    read_model text PRIMARY KEY,
    stale      boolean     NOT NULL,
    since      timestamptz NOT NULL DEFAULT now()
)"""


def plain_run(row: dict[str, Any]) -> dict[str, Any]:
    """A run row as JSON-ready values (numbers as float/int, times as RFC 3339): the shape both Redis and
    PostgreSQL reads return."""
    out = {}
    for k, v in row.items():
        if isinstance(v, Decimal):
            v = float(v)
        elif isinstance(v, datetime):
            v = format_time(v)
        out[k] = v
    return out


class RunReadModel:
    """Keep ``<prefix><run_id>`` hashes in Redis equal to ``agent_runs`` rows in PostgreSQL.

    Args:
        client: the Redis client (give it a short ``socket_timeout``: an outage then costs little).
        dsn: PostgreSQL connection string.
        schema: the agent-run projection's schema.
        prefix: key prefix of the hashes.
        name: the read model's name in ``read_model_state``.
    """

    def __init__(
        self,
        client: redis.Redis,
        dsn: str,
        *,
        schema: str = "proj_agent_runs",
        prefix: str = DEFAULT_PREFIX,
        name: str = "runs",
    ) -> None:
        self.client = client
        self.dsn = dsn
        self.schema = schema
        self.prefix = prefix
        self.name = name
        self.stale: bool | None = None  # None: not read from PostgreSQL yet
        self.failures = 0
        self.refills = 0
        self._conn: psycopg.Connection | None = None

    def _pg(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True)
            self._conn.execute(_STATE_DDL.format(schema=self.schema))
        return self._conn

    def _mark(self, stale: bool) -> None:
        self._pg().execute(
            f"INSERT INTO {self.schema}.read_model_state (read_model, stale) VALUES (%s, %s) "
            "ON CONFLICT (read_model) DO UPDATE SET stale = excluded.stale, since = now()",
            (self.name, stale),
        )
        self.stale = stale

    def _load_stale(self) -> bool:
        row = (
            self._pg()
            .execute(f"SELECT stale FROM {self.schema}.read_model_state WHERE read_model = %s", (self.name,))
            .fetchone()
        )
        # never written: Redis may hold nothing yet, so fill it once
        return True if row is None else bool(row[0])

    def _rows(self, run_ids: Sequence[str] | None) -> list[dict[str, Any]]:
        with self._pg().cursor(row_factory=dict_row) as cur:
            if run_ids is None:
                return cur.execute(f"SELECT * FROM {self.schema}.agent_runs").fetchall()
            return cur.execute(
                f"SELECT * FROM {self.schema}.agent_runs WHERE run_id = ANY(%s)", (list(run_ids),)
            ).fetchall()

    def _write(self, rows: list[dict[str, Any]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for r in rows:
            pipe.hset(self.prefix + r["run_id"], mapping={k: json.dumps(v) for k, v in plain_run(r).items()})
        pipe.execute()

    def refill(self) -> int:
        """Rewrite every run from PostgreSQL (readers use PostgreSQL meanwhile); return the runs written.

        Raises:
            redis.RedisError: Redis failed (the model stays stale).
        """
        self.client.delete(self.prefix + _READY)
        rows = self._rows(None)
        for i in range(0, len(rows), 1000):
            self._write(rows[i : i + 1000])
        self.client.set(self.prefix + _READY, "1")
        self._mark(False)
        self.refills += 1
        log.info("read model refilled from postgres", read_model=self.name, runs=len(rows))
        return len(rows)

    def after_commit(self, events: Sequence[ConsumedEvent]) -> None:
        """Runner hook: write the runs touched by a committed batch (or refill when stale); never raises
        for a Redis failure (it marks the model stale instead)."""
        self.after_commit_keys([e.key or e.data.get("run_id") for e in events])

    def after_commit_keys(self, keys: Sequence[str | None]) -> None:
        """The hook of the runner's columnar path: ``keys`` are the run ids (record keys) of the
        records a committed batch applied; same effect as :meth:`after_commit`."""
        if self.stale is None:
            self.stale = self._load_stale()
        try:
            if self.stale:
                self.refill()
                return
            run_ids = sorted(set(keys) - {None})
            if run_ids:
                self._write(self._rows(run_ids))
        except redis.RedisError as exc:
            self.failures += 1
            log.warning("redis unavailable; read model marked stale", read_model=self.name, error=str(exc))
            if not self.stale:
                self._mark(True)

    __call__ = after_commit

    def close(self) -> None:
        """Close the PostgreSQL connection."""
        if self._conn is not None:
            self._conn.close()


def read_run(
    client: redis.Redis | None,
    conn: psycopg.Connection,
    run_id: str,
    *,
    schema: str = "proj_agent_runs",
    prefix: str = DEFAULT_PREFIX,
) -> tuple[dict[str, Any] | None, str]:
    """The latest state of one run, from Redis when it is ready, else from PostgreSQL.

    Args:
        client: Redis client, or None to read PostgreSQL only.
        conn: PostgreSQL connection.
        run_id: the run.
        schema: the agent-run projection's schema.
        prefix: key prefix of the hashes.

    Returns:
        ``(row or None, "redis" | "postgres")``: the row JSON-ready (see :func:`plain_run`).
    """
    if client is not None:
        try:
            pipe = client.pipeline(transaction=False)
            pipe.exists(prefix + _READY)
            pipe.hgetall(prefix + run_id)
            ready, h = pipe.execute()
            if ready and h:
                return {
                    (k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in h.items()
                }, "redis"
        except redis.RedisError as exc:
            log.info("redis read failed; reading postgres", run_id=run_id, error=str(exc))
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f"SELECT * FROM {schema}.agent_runs WHERE run_id = %s", (run_id,)).fetchone()
    return (plain_run(row) if row else None), "postgres"

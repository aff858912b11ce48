"""The healing read model: circuit states, open warnings and escalations in PostgreSQL and Redis.

PostgreSQL is the truth (schema ``proj_healing``): ``circuits`` (one row per circuit: state, when it
changed, the counts of the transition, config version), ``warnings`` (one row per run and signal: the
highest level reached), ``escalations`` (one row per escalation: open until acked) and ``decisions``
(every decision, the audit trail, keyed by the decision's deterministic id so a replay writes nothing
new). The view ``proj_healing.status`` lists every circuit that is not closed, every open warning and
every pending escalation in one table.

Redis holds the hot copy the client reads on every call: one hash per circuit,
``<prefix><circuit>`` (fields ``state``, ``changed_at``, ``config_version``), and ``<prefix>__ready__``
once the hashes were filled from PostgreSQL. :meth:`HealingReadModel.circuit_state` reads Redis while
that key exists, and PostgreSQL when Redis fails or is not ready; a circuit nobody has seen is closed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import psycopg
import redis
import structlog
from psycopg.rows import dict_row

from processors.healing.decisions import Decision

__all__ = ["DDL", "DEFAULT_PREFIX", "READY_KEY", "HealingReadModel"]

log = structlog.get_logger(__name__)

DEFAULT_PREFIX = "backbone:circuit:"
READY_KEY = "__ready__"
"""Key (under the prefix) the read model sets once Redis holds every circuit it wrote; removed when a
Redis write fails, so readers fall back to PostgreSQL."""
_READY = READY_KEY

DDL = """
CREATE SCHEMA IF NOT EXISTS proj_healing;
CREATE TABLE IF NOT EXISTS proj_healing.decisions (
    id text PRIMARY KEY, kind text NOT NULL, subject text NOT NULL, event_time timestamptz NOT NULL,
    config_version bigint NOT NULL, causation_id text, details jsonb NOT NULL, seq bigserial NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_subject ON proj_healing.decisions (subject, event_time);
CREATE TABLE IF NOT EXISTS proj_healing.circuits (
    circuit text PRIMARY KEY, state text NOT NULL, changed_at timestamptz NOT NULL,
    config_version bigint NOT NULL, last_decision_id text NOT NULL, details jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS proj_healing.warnings (
    run_id text NOT NULL, signal text NOT NULL, level text NOT NULL, step integer NOT NULL,
    raised_at timestamptz NOT NULL, decision_id text NOT NULL, open boolean NOT NULL DEFAULT true,
    PRIMARY KEY (run_id, signal)
);
CREATE TABLE IF NOT EXISTS proj_healing.escalations (
    id text PRIMARY KEY, subject text NOT NULL, raised_at timestamptz NOT NULL, reason text,
    details jsonb NOT NULL, acked_by text, acked_note text, acked_at timestamptz
);
CREATE OR REPLACE VIEW proj_healing.status AS
    SELECT 'circuit' AS kind, circuit AS subject, state AS status, changed_at AS since, last_decision_id AS id
      FROM proj_healing.circuits WHERE state <> 'closed'
    UNION ALL
    SELECT 'warning', 'run:' || run_id || '/' || signal, level, raised_at, decision_id
      FROM proj_healing.warnings WHERE open
    UNION ALL
    SELECT 'escalation', subject, 'pending', raised_at, id
      FROM proj_healing.escalations WHERE acked_at IS NULL;
"""

_CIRCUIT_KINDS = {"circuit_opened", "circuit_half_open", "circuit_closed"}


class HealingReadModel:
    """Writes decisions into the read model and reads circuit states back.

    Args:
        pg_url: PostgreSQL URL (``postgresql://...``).
        redis_client: a ``redis.Redis``, or ``None`` to use PostgreSQL only.
        prefix: Redis key prefix of the circuit hashes.
    """

    def __init__(
        self, pg_url: str, redis_client: redis.Redis | None = None, *, prefix: str = DEFAULT_PREFIX
    ) -> None:
        self.pg_url = pg_url
        self.redis = redis_client
        self.prefix = prefix
        self._writer: psycopg.Connection[Any] | None = None

    def _writer_connection(self) -> psycopg.Connection[Any]:
        """The connection :meth:`apply` writes through, kept open between calls (a connection per call
        cost the healer's agent a PostgreSQL connect, several ms, for each record that gave decisions)."""
        if self._writer is None or self._writer.closed or self._writer.broken:
            self._writer = psycopg.connect(self.pg_url, autocommit=True)
        return self._writer

    def close(self) -> None:
        """Close the writer connection, if one is open."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def ensure_schema(self) -> None:
        """Create the schema, tables and view when missing.

        Raises:
            psycopg.Error: PostgreSQL refused or is unreachable.
        """
        with psycopg.connect(self.pg_url, autocommit=True) as conn, conn.transaction():
            # concurrent `CREATE SCHEMA IF NOT EXISTS` can fail with a unique violation: take turns
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('backbone-healing-ddl'))")
            conn.execute(DDL)

    def apply(self, decisions: Iterable[Decision]) -> int:
        """Write decisions (one transaction), then refresh the Redis hashes of the circuits they touched.

        The writer connection is reused; a broken one (PostgreSQL restarted, the backend killed) is
        replaced and the transaction tried once more (nothing of the failed one was written).

        Returns:
            How many decisions were new (a replayed decision, same id, changes nothing).

        Raises:
            psycopg.Error: PostgreSQL failed (nothing was written). A Redis failure is logged and
                leaves Redis not ready, so readers use PostgreSQL.
        """
        decisions = list(decisions)
        try:
            new, touched = self._write(decisions)
        except psycopg.OperationalError:
            if self._writer is not None and not self._writer.broken and not self._writer.closed:
                raise  # the statement failed, not the connection
            self.close()
            new, touched = self._write(decisions)
        if touched and self.redis is not None:
            try:
                pipe = self.redis.pipeline()
                for circuit, (state, changed_at, version) in touched.items():
                    pipe.hset(
                        self.prefix + circuit,
                        mapping={"state": state, "changed_at": changed_at, "config_version": version},
                    )
                pipe.set(self.prefix + _READY, "1")
                pipe.execute()
            except redis.RedisError as exc:
                log.warning("healing_read_model_redis_failed", error=str(exc))
                self._unready()
        return new

    def _write(self, decisions: list[Decision]) -> tuple[int, dict[str, tuple[str, str, int]]]:
        new = 0
        touched: dict[str, tuple[str, str, int]] = {}
        conn = self._writer_connection()
        with conn.transaction():
            for d in decisions:
                cur = conn.execute(
                    "INSERT INTO proj_healing.decisions (id, kind, subject, event_time, config_version, causation_id, details)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                    (
                        d.id,
                        d.kind,
                        d.subject,
                        d.event_time,
                        d.config_version,
                        d.causation_id,
                        json.dumps(d.details, default=str),
                    ),
                )
                if cur.rowcount == 0:
                    continue
                new += 1
                self._apply_one(conn, d, touched)
        return new, touched

    def _unready(self) -> None:
        try:
            if self.redis is not None:
                self.redis.delete(self.prefix + _READY)
        except redis.RedisError:
            pass

    def _apply_one(
        self, conn: psycopg.Connection, d: Decision, touched: dict[str, tuple[str, str, int]]
    ) -> None:
        det = d.details
        if d.kind in _CIRCUIT_KINDS:
            circuit = det["circuit"]
            row = conn.execute(
                "SELECT changed_at FROM proj_healing.circuits WHERE circuit = %s", (circuit,)
            ).fetchone()
            if row is not None and row[0] > d.event_time:
                return  # an older transition arriving late does not overwrite a newer state
            conn.execute(
                "INSERT INTO proj_healing.circuits (circuit, state, changed_at, config_version, last_decision_id, details)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (circuit) DO UPDATE SET state = EXCLUDED.state,"
                " changed_at = EXCLUDED.changed_at, config_version = EXCLUDED.config_version,"
                " last_decision_id = EXCLUDED.last_decision_id, details = EXCLUDED.details",
                (
                    circuit,
                    det["to_state"],
                    d.event_time,
                    d.config_version,
                    d.id,
                    json.dumps(det, default=str),
                ),
            )
            touched[circuit] = (det["to_state"], d.event_time.isoformat(), d.config_version)
        elif d.kind == "agent_warning":
            conn.execute(
                "INSERT INTO proj_healing.warnings (run_id, signal, level, step, raised_at, decision_id)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (run_id, signal) DO UPDATE SET level = EXCLUDED.level,"
                " step = EXCLUDED.step, raised_at = EXCLUDED.raised_at, decision_id = EXCLUDED.decision_id",
                (det["run_id"], det["signal"], det["level"], int(det["step"]), d.event_time, d.id),
            )
        elif d.kind == "escalation":
            conn.execute(
                "INSERT INTO proj_healing.escalations (id, subject, raised_at, reason, details) VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (id) DO NOTHING",
                (
                    d.id,
                    d.subject,
                    d.event_time,
                    det.get("reason") or det.get("action"),
                    json.dumps(det, default=str),
                ),
            )
        elif d.kind == "escalation_acked":
            conn.execute(
                "UPDATE proj_healing.escalations SET acked_by = %s, acked_note = %s, acked_at = %s WHERE id = %s",
                (det["by"], det["note"], d.event_time, det["escalation_id"]),
            )

    def close_run(self, run_id: str) -> None:
        """Close the warnings of a finished run."""
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            conn.execute("UPDATE proj_healing.warnings SET open = false WHERE run_id = %s", (run_id,))

    def circuit_state(self, circuit: str) -> str:
        """State of ``circuit`` (``closed``, ``open`` or ``half_open``): Redis when ready, else PostgreSQL.

        Raises:
            psycopg.Error: Redis could not answer and PostgreSQL failed too.
        """
        if self.redis is not None:
            try:
                if self.redis.exists(self.prefix + _READY):
                    state = self.redis.hget(self.prefix + circuit, "state")
                    return state.decode() if isinstance(state, bytes) else (state or "closed")
            except redis.RedisError as exc:
                log.warning("healing_read_model_redis_read_failed", error=str(exc))
        with psycopg.connect(self.pg_url) as conn:
            row = conn.execute(
                "SELECT state FROM proj_healing.circuits WHERE circuit = %s", (circuit,)
            ).fetchone()
        return row[0] if row else "closed"

    def status(self) -> dict[str, Any]:
        """``{"circuits": [...], "warnings": [...], "escalations": [...]}`` from PostgreSQL (open ones only for the last two).

        Raises:
            psycopg.Error: PostgreSQL failed.
        """
        with psycopg.connect(self.pg_url, row_factory=dict_row) as conn:
            circuits = conn.execute(
                "SELECT circuit, state, changed_at, config_version, last_decision_id FROM proj_healing.circuits ORDER BY circuit"
            ).fetchall()
            warnings = conn.execute(
                "SELECT run_id, signal, level, step, raised_at, decision_id FROM proj_healing.warnings WHERE open"
                " ORDER BY run_id, signal"
            ).fetchall()
            escalations = conn.execute(
                "SELECT id, subject, raised_at, reason FROM proj_healing.escalations WHERE acked_at IS NULL ORDER BY raised_at, id"
            ).fetchall()
        return {"circuits": circuits, "warnings": warnings, "escalations": escalations}

    def escalation(self, escalation_id: str) -> dict[str, Any] | None:
        """One escalation row, or ``None``."""
        with psycopg.connect(self.pg_url, row_factory=dict_row) as conn:
            return conn.execute(
                "SELECT * FROM proj_healing.escalations WHERE id = %s", (escalation_id,)
            ).fetchone()

    def audit(self, subject: str) -> list[dict[str, Any]]:
        """Every decision about ``subject`` (``circuit:provider:Google``, ``config:KEY``), in event-time order (ties: the order they were decided in)."""
        with psycopg.connect(self.pg_url, row_factory=dict_row) as conn:
            return conn.execute(
                "SELECT id, kind, subject, event_time, config_version, causation_id, details FROM proj_healing.decisions"
                " WHERE subject = %s ORDER BY event_time, seq",
                (subject,),
            ).fetchall()

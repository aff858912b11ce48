"""Shared helpers of the benchmarks: an embedded stack, realistic events, a result table."""

from __future__ import annotations

import contextlib
import itertools
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from core.settings import KafkaSettings, PostgresSettings, RedisSettings, Settings
from streams.envelope import Event, deterministic_id

__all__ = ["API_SERVE", "ROOT", "bench_stack", "free_port", "print_table", "realistic_events"]

ROOT = Path(__file__).resolve().parents[1]

API_SERVE = (
    "import uvicorn; from backbone.http.app import ApiSettings, create_app; from core.stack import load_settings; "
    "from core.eventloop import uvicorn_options; "
    "from core.observability import configure_logging; configure_logging('WARNING'); s = load_settings(); "
    "uvicorn.run(create_app(s, ApiSettings()), host='127.0.0.1', port={port}, log_level='warning', "
    "**uvicorn_options(s.event_loop))"
)
"""``python -c`` source serving the backbone's API with uvicorn on ``{port}`` (settings from the environment; the
event loop and HTTP parser of ``BACKBONE_EVENT_LOOP``, as ``backbone api`` serves it)."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def bench_stack() -> Iterator[Settings]:
    """An embedded stack in a temp dir, unless BACKBONE_* URLs are configured (then those are used)."""
    from backbone.devstack import DevStack
    from core.settings import get_settings

    with (
        tempfile.TemporaryDirectory(prefix="backbone-bench-") as tmp,
        DevStack(get_settings(), state_dir=Path(tmp), durable=False) as info,
    ):
        yield Settings(
            kafka=KafkaSettings(bootstrap_servers=info.kafka_bootstrap),
            postgres=PostgresSettings(url=info.postgres_url),
            redis=RedisSettings(url=info.redis_url),
        )


def stack_settings(info: Any, state_dir: Path, database_prefix: str) -> tuple[Settings, str]:
    """Settings for a started dev stack (``backbone.devstack.StackInfo``) with a database of its own, created
    here (``<database_prefix>_<random>``); returns ``(settings, postgres url)``.

    Raises:
        psycopg.Error: the stack's PostgreSQL refused the database.
    """
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    import psycopg
    from psycopg import sql
    from pydantic import SecretStr

    database = f"{database_prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(info.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(database)))
    pg_url = urlunsplit(urlsplit(info.postgres_url)._replace(path=f"/{database}"))
    settings = Settings(state_dir=state_dir, postgres=PostgresSettings(url=SecretStr(pg_url)),
                        redis=RedisSettings(url=SecretStr(info.redis_url)))  # fmt: skip
    settings = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"bootstrap_servers": info.kafka_bootstrap})}
    )
    return settings, pg_url


def realistic_events(n: int | None = None, *, copies: int | None = None) -> list[Event]:
    """``n`` agent events (or, with ``copies``, that many whole copies of the runs) made by repeating the real
    runs of ``datasets/agent_runs`` under new run ids (each copy keeps the real sizes, models, tokens and
    costs). Copy ``k`` is moved ``k`` times the real
    runs' event-time span (plus an hour) later, in its ``datetime`` fields and its CloudEvents ``time``, so
    event time goes on as in a live stream: a processor's event-time windows close on earlier copies as they
    would on earlier runs. (Until 2026-12-06 every copy had the real runs' times, so windows never closed
    and the healer's agent-health state grew with the number of copies: 0.73 / 0.87 of plain Faust at
    150,000 events against 1.34-1.42 at 30,000.)"""
    from connectors.agent_runs import ParsedRun, iter_runs

    base = [
        e for r in iter_runs(ROOT / "datasets" / "agent_runs") if isinstance(r, ParsedRun) for e in r.events
    ]
    if copies is not None:
        n = copies * len(base)
    if n is None:
        raise TypeError("realistic_events needs n or copies")
    times = [e.attributes.time for e in base]
    step = max(times) - min(times) + timedelta(hours=1)
    out: list[Event] = []
    for copy in itertools.count():
        offset = step * copy
        for e in base:
            if len(out) >= n:
                return out
            run = f"{e.key}#{copy}"
            data = {k: v + offset if isinstance(v, datetime) else v for k, v in e.data.items()}
            data["run_id"] = run
            attrs = replace(e.attributes, id=deterministic_id(e.attributes.id, copy), subject=run,
                            time=e.attributes.time + offset)  # fmt: skip
            out.append(Event(schema=e.schema, key=run, data=data, attributes=attrs))
    return out


def print_table(title: str, rows: list[tuple[str, float, str]], baseline: str) -> None:
    """Print ``(name, rate, unit)`` rows with each rate as a ratio of the baseline's."""
    base = next(r for n, r, _ in rows if n == baseline)
    t = Table(title=title)
    for c in ("path", "rate", "unit", f"ratio to {baseline}"):
        t.add_column(c, justify="left" if c == "path" else "right")
    for name, rate, unit in rows:
        t.add_row(name, f"{rate:,.0f}", unit, f"{rate / base:.2f}")
    Console().print(t)

"""What every ``backbone`` command shares: one ``--json`` option, one translation of known failures into
one red line and exit code 2, one table style, and the settings + serde of a command.

Exit codes: 0 success, 1 a finding or a failed check the command reports itself, 2 a usage or
configuration problem (bad input, unreachable server, refused value) printed as one line.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from core.settings import Settings
from streams.serde import AvroSerde

__all__ = [
    "PROJECTION_BATCH_SIZE",
    "JsonOpt",
    "clear_errors",
    "context",
    "emit_json",
    "err",
    "fmt",
    "out",
    "print_cells",
    "print_records",
    "print_rows",
    "settings_only",
    "stop_on_signals",
]

PROJECTION_BATCH_SIZE = 20_000
"""The projection commands' default batch size: :data:`projections.runner.DEFAULT_BATCH_SIZE` (a unit test
checks), written here so that every ``backbone`` call does not import the projections (redis, psycopg)."""

F = TypeVar("F", bound=Callable[..., Any])

out = Console()
"""Standard output (tables, reports)."""
err = Console(stderr=True)
"""Standard error (progress, warnings, errors)."""

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print JSON instead of a table.", envvar="BACKBONE_JSON")
]
"""The one ``--json`` option of every command that prints data."""


def clear_errors(fn: F) -> F:
    """Turn known failures into one red line on standard error and exit code 2 (no traceback).

    Known failures: every :class:`core.errors.BackboneError`, PostgreSQL connection failures,
    ``ValueError``, ``KeyError``, ``TimeoutError``, ``FileNotFoundError``.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import psycopg

        from core.errors import BackboneError

        try:
            return fn(*args, **kwargs)
        except (
            BackboneError,
            psycopg.OperationalError,
            ValueError,
            KeyError,
            TimeoutError,
            FileNotFoundError,
        ) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            err.print(f"[red]error:[/red] {escape(str(msg))}", highlight=False)  # a value in it is no markup
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def settings_only() -> Settings:
    """Settings from the environment, completed from a running dev stack, with logging configured."""
    from core.observability import configure_logging
    from core.stack import load_settings

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    return settings


def context(*, kafka: bool = True) -> tuple[Settings, AvroSerde]:
    """Settings (completed from a running dev stack) and the serde of the configured registry.

    Args:
        kafka: check first that the broker answers, so that an unreachable one is one clear line,
            not a 30-second delivery timeout.

    Raises:
        streams.errors.BrokerUnavailableError: ``kafka`` and the broker did not answer within 5 s.
        ValueError: ``kafka`` and no bootstrap servers are configured or running.
    """
    from streams.broker import require_broker
    from streams.serde import serde_from_settings

    settings = settings_only()
    if kafka:
        require_broker(settings.kafka, timeout_seconds=5)
    return settings, serde_from_settings(settings)


def fmt(v: Any) -> str:
    """One table cell: thousands separators, 4 decimals, UTC datetimes, comma-joined lists."""
    if isinstance(v, float):
        return f"{v:,.4f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, datetime):
        return v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return "" if v is None else str(v)


def print_rows(rows: list[dict[str, Any]], columns: list[str], title: str, as_json: bool) -> None:
    """Print ``rows`` as a rich table of ``columns`` (numbers right-aligned), or as JSON with ``as_json``.

    When the table is wider than the terminal, each row is printed as a block of ``column  value`` lines
    instead (psql's ``\\x auto``), so no value is cut: a shrunk table would print ``1,234,5…`` for
    1,234,567 and an id without its end.
    """
    if as_json:
        emit_json(rows)
        return
    right = {c for c in columns if rows and isinstance(rows[0].get(c), (int, float))}
    print_cells([[fmt(r.get(c)) for c in columns] for r in rows], columns, title, right=right)


def print_cells(
    cells: list[list[str]], columns: Sequence[str], title: str | None, *, right: Collection[str] = ()
) -> None:
    """Print formatted rows (one string per column) as a rich table, the ``right`` columns right-aligned.

    When the table is wider than the terminal, a few rows (at most :data:`TRANSPOSE_MAX_ROWS`, e.g. an
    evaluation's policies side by side) are printed transposed, a line per column and a column per row
    headed by the row's first value, if that fits; otherwise each row is a :func:`print_records` block.
    No value is ever cut."""
    table = Table(title=None if title is None else escape(title))
    for c in columns:
        table.add_column(escape(c), justify="right" if c in right else "left")
    for row in cells:  # values as text: "[/usr]" in a value is no markup to render
        table.add_row(*(Text(str(v)) for v in row))
    if _fits(table):
        out.print(table)
        return
    if 1 < len(cells) <= TRANSPOSE_MAX_ROWS:
        turned = Table(title=None if title is None else escape(title))  # the first column names the rows
        turned.add_column(escape(columns[0]))
        for row in cells:
            turned.add_column(escape(str(row[0])))
        for i, c in enumerate(columns[1:], 1):
            turned.add_row(Text(c), *(Text(str(row[i])) for row in cells))
        if _fits(turned):
            out.print(turned)
            return
    print_records(cells, columns, title or "row")


TRANSPOSE_MAX_ROWS = 6
"""The most rows :func:`print_cells` prints transposed when its table is too wide."""


def _fits(table: Table) -> bool:
    """Whether ``table`` at its natural width (no column shrunk) fits the terminal's width."""
    return Measurement.get(out, out.options.update_width(1_000_000), table).maximum <= out.width


def print_records(cells: list[list[str]], columns: Sequence[str], title: str) -> None:
    """Print formatted rows as one block per row (psql's expanded display): a ``-[ title: n of N ]-``
    header, then a ``column  value`` line per column, the names padded to the longest; plain text, no
    markup, long values wrapped by the terminal rather than cut."""
    width = max((len(c) for c in columns), default=0)
    lines: list[str] = []
    for n, row in enumerate(cells, 1):
        lines.append(f"-[ {title}: {n} of {len(cells)} ]-")
        lines.extend(f"{c.ljust(width)}  {v}" for c, v in zip(columns, row, strict=True))
    if not cells:
        lines.append(f"{title}: no rows")
    out.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)


def emit_json(value: Any) -> None:
    """Write ``value`` as indented JSON to standard output, unwrapped (safe to pipe into ``jq``)."""
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
    sys.stdout.flush()


SHUTDOWN_TIMEOUT_SECONDS = 15.0
"""How long a long-running command waits for its loops to finish after SIGTERM/SIGINT before it gives up."""


def stop_on_signals(*stops: Callable[[], Any], exit_after_seconds: float | None = None) -> threading.Event:
    """Make SIGTERM and SIGINT ask a long-running command to stop instead of killing it (called from another
    thread than the main one, it installs nothing): the first signal sets the returned event and calls each of ``stops`` (e.g. ``runner.stop``);
    a later one is logged and otherwise ignored, so the command can finish the batch it is on, commit it
    and exit 0.

    Args:
        stops: called (in the signal handler, so they must not block) at the first signal.
        exit_after_seconds: when set, the process exits with code 70 (``os._exit``: nothing else runs) if it
            is still running this long after the first signal; the bound on a shutdown that may hang
            (clients waiting on a broker that has gone).

    Returns:
        The event, set once a signal has arrived.
    """
    stopping = threading.Event()

    def expire() -> None:
        err.print(f"[red]still stopping after {exit_after_seconds} s: exiting now[/red]")
        sys.stderr.flush()
        os._exit(70)

    def handle(signum: int, _frame: Any) -> None:
        if stopping.is_set():
            err.print(f"{signal.Signals(signum).name} again: still stopping")
            return
        stopping.set()
        err.print(f"{signal.Signals(signum).name}: stopping")
        if exit_after_seconds is not None:
            timer = threading.Timer(exit_after_seconds, expire)
            timer.daemon = True
            timer.start()
        for stop in stops:
            stop()

    if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handle)
    return stopping

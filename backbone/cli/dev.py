"""``backbone dev``: start, stop and inspect the embedded dev stack (Tansu, PostgreSQL, Redis).

The state directory is ``Settings.state_dir`` (``BACKBONE_STATE_DIR``, default ``.backbone``); a
server configured through ``BACKBONE_KAFKA__BOOTSTRAP_SERVERS``, ``BACKBONE_POSTGRES__URL`` or
``BACKBONE_REDIS__URL`` is used instead of an embedded one.
"""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from backbone.errors import StackError
from core.settings import get_settings

if TYPE_CHECKING:  # the stack (psycopg, the projections) is imported by the commands, not by every call
    from backbone.devstack import StackInfo
    from projections.reseed import PartitionRestored, ReseedReport

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False)

_console = Console()
_err = Console(stderr=True)


def _urls(info: StackInfo) -> dict[str, str]:
    return {"kafka": info.kafka_bootstrap, "postgres": info.postgres_url, "redis": info.redis_url}


def _table(info: StackInfo) -> Table:
    table = Table(title=f"dev stack in {info.state_dir}")
    table.add_column("component")
    table.add_column("address", overflow="fold")
    table.add_column("pid", justify="right")
    table.add_column("source")
    table.add_column("since")
    from backbone.devstack import COMPONENTS

    for name in COMPONENTS:
        embedded = info.embedded.get(name, False)
        table.add_row(
            name,
            _urls(info)[name],
            str(info.pids.get(name, "")),
            "embedded" if embedded else "configured",
            info.started_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
    return table


def _print_env(info: StackInfo) -> None:
    _console.print(f"BACKBONE_KAFKA__BOOTSTRAP_SERVERS={info.kafka_bootstrap}", highlight=False)
    _console.print(f"BACKBONE_POSTGRES__URL={info.postgres_url}", highlight=False)
    _console.print(f"BACKBONE_REDIS__URL={info.redis_url}", highlight=False)


@app.command()
def up(
    detach: bool = typer.Option(
        False,
        "--detach",
        "-d",
        envvar="BACKBONE_DEV_DETACH",
        help="Start the stack, leave it running and return (stop it with `backbone dev down`).",
    ),
    startup_timeout_seconds: float = typer.Option(
        60.0,
        "--startup-timeout-seconds",
        envvar="BACKBONE_DEV_STARTUP_TIMEOUT_SECONDS",
        help="How long each server may take to answer.",
    ),
    durable: bool = typer.Option(
        True,
        "--durable/--no-durable",
        envvar="BACKBONE_DEV_DURABLE",
        help="Embedded PostgreSQL with fsync and synchronous commits (PostgreSQL's defaults), kept across "
        "restarts, and the embedded broker re-seeded from the event archive; --no-durable is faster, may lose the "
        "last commits if the machine crashes, and starts empty each time.",
    ),
    fresh: bool = typer.Option(
        False,
        "--fresh",
        help="Start a durable stack empty: re-initialise the embedded PostgreSQL (projections, config, archive).",
    ),
) -> None:
    """Start the dev stack; in the foreground until Ctrl-C or SIGTERM, or detached with --detach."""
    settings = get_settings()
    from backbone.devstack import DevStack

    stack = DevStack(settings, startup_timeout_seconds=startup_timeout_seconds, durable=durable, fresh=fresh)
    # SIGTERM behaves like Ctrl-C: during start() it stops what was started, afterwards it stops the
    # stack. (Blocking the signals instead would be inherited by the servers' signal masks.)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            info = stack.start()
        except StackError as exc:
            _err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(1) from exc
        _console.print(_table(info))
        if stack.reseed_report is not None and stack.reseed_report.archive_found:
            _print_reseed(stack.reseed_report)
        _print_env(info)
        if detach:
            _console.print(f"detached; logs in {info.state_dir / 'logs'}; stop with `backbone dev down`")
            return
        _console.print("running; Ctrl-C to stop")
        try:
            while True:
                signal.pause()
        except KeyboardInterrupt:
            _console.print("stopping")
        stack.stop()
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_reseed(report: ReseedReport) -> None:
    """What the re-seed of the embedded broker from the archive restored, and the window of loss."""
    if not report.partitions:
        _console.print(
            "event archive: nothing to restore"
            + (
                f" (present on the broker: {', '.join(report.present_topics)})"
                if report.present_topics
                else ""
            )
        )
        return
    table = Table(title=f"log re-seeded from the event archive in {report.seconds:.1f} s")
    for col in ("topic", "partitions", "records", "end offset", "gaps"):
        table.add_column(col, justify="left" if col == "topic" else "right")
    by_topic: dict[str, list[PartitionRestored]] = {}
    for p in report.partitions:
        by_topic.setdefault(p.topic, []).append(p)
    for topic, parts in sorted(by_topic.items()):
        table.add_row(topic, str(len(parts)), str(sum(p.records for p in parts)),
                      str(max(p.restored_end for p in parts)), str(sum(p.gaps for p in parts)))  # fmt: skip
    _console.print(table)
    lost = [c for c in report.checkpoints_moved if c.lost_events]
    if lost:
        names = sorted({c.projection for c in lost})
        _err.print(
            f"[yellow]window of loss:[/yellow] {report.lost_events} event(s) were applied by projections but not "
            f"archived before the broker stopped; they are gone from the log. Checkpoints moved back for "
            f"{', '.join(names)}; run `backbone projections rebuild NAME` to drop them from those views.",
            highlight=False,
        )
    else:
        _console.print(
            "window of loss: no projection had applied a record the archive lacks (records acknowledged after the "
            "archive's last batch and read by no projection are not counted)"
        )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command()
def down(
    timeout_seconds: float = typer.Option(
        10.0,
        "--timeout-seconds",
        envvar="BACKBONE_DEV_STOP_TIMEOUT_SECONDS",
        help="How long each server may take to exit before it is killed.",
    ),
) -> None:
    """Stop the dev stack started from this state directory (only the embedded servers)."""
    state_dir = get_settings().state_dir
    try:
        from backbone.devstack import stop_stack

        info = stop_stack(state_dir, timeout_seconds=timeout_seconds)
    except StackError as exc:
        _err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from exc
    if info is None:
        _console.print(f"no dev stack runs from {state_dir.absolute()}")
        return
    _console.print(f"stopped the dev stack in {info.state_dir} (pids {info.pids})", highlight=False)


@app.command()
def status(
    as_json: bool = typer.Option(
        False, "--json", envvar="BACKBONE_DEV_JSON", help="Print the stack as JSON (stack.json plus running)."
    ),
) -> None:
    """Show what runs, where, its pid and since when; exit code 1 when no stack runs."""
    state_dir = get_settings().state_dir
    from backbone.devstack import read_stack, stack_file

    info = read_stack(state_dir)
    if info is None:
        # read_stack removes a stack.json whose servers all exited; one left means some still run.
        broken = stack_file(state_dir).exists()
        if as_json:
            typer.echo(json.dumps({"running": False, "state_dir": str(state_dir.absolute())}))
        elif broken:
            _console.print(
                f"the dev stack in {state_dir.absolute()} is broken (some servers exited); "
                "run `backbone dev down`"
            )
        else:
            _console.print(f"no dev stack runs from {state_dir.absolute()}")
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps({"running": True, **info.to_dict()}, sort_keys=True))
        return
    _console.print(_table(info))
    uptime = datetime.now(UTC) - info.started_at
    _console.print(f"up for {int(uptime.total_seconds())} s", highlight=False)

"""``backbone connectors``: lint, plan and apply connector specs; inspect and operate Kafka Connect.

Commands: ``lint [FILE...]``, ``plan [FILE...]``, ``apply [FILE...]``, ``status [NAME]``,
``restart NAME``, ``pause NAME``, ``resume NAME``, ``delete NAME``. Files default to
``connectors/specs/``. ``--connect-url`` (env ``BACKBONE_CONNECT_URL``) names the Connect REST URL.

Exit codes: 0 success; 1 lint errors, invalid configs, or a plan with changes under
``--detailed-exitcode``; 2 bad usage or an unreadable spec; 3 Kafka Connect answered an error;
4 Kafka Connect is unreachable.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import structlog
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:  # httpx and the client are imported by the commands, not by every ``backbone`` call
    from connectors.kafka_connect import ConnectorDiff, KafkaConnectClient

DEFAULT_CONNECT_URL = "http://127.0.0.1:8083"
"""Mirrors :data:`connectors.kafka_connect.DEFAULT_CONNECT_URL` (a unit test checks)."""

__all__ = ["EXIT_CONNECT_ERROR", "EXIT_FINDINGS", "EXIT_UNREACHABLE", "EXIT_USAGE", "app"]

EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_CONNECT_ERROR = 3
EXIT_UNREACHABLE = 4

app = typer.Typer(
    name="connectors",
    help="Debezium / Kafka Connect connectors: lint, plan and apply specs; status, restart, pause, resume, delete.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

_out = Console(soft_wrap=True)
_err = Console(stderr=True, soft_wrap=True)

ConnectUrl = Annotated[
    str,
    typer.Option(
        "--connect-url", envvar="BACKBONE_CONNECT_URL", show_envvar=True, help="Kafka Connect REST URL."
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Files = Annotated[
    list[Path] | None,
    typer.Argument(help="Spec files or folders (default: connectors/specs/).", show_default=False),
]
Name = Annotated[str, typer.Argument(help="Connector name.")]

T = TypeVar("T")


def _fail(message: str, code: int) -> NoReturn:
    _err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _connect(url: str, call: Callable[[KafkaConnectClient], T]) -> T:
    from connectors.kafka_connect import (
        KafkaConnectClient,
        KafkaConnectError,
        KafkaConnectHTTPError,
        KafkaConnectUnavailableError,
        RetryPolicy,
    )

    logger = structlog.wrap_logger(structlog.PrintLogger(sys.stderr))  # keep stdout for data (--json)
    try:
        with KafkaConnectClient(url, retry=RetryPolicy(max_attempts=3), logger=logger) as client:
            return call(client)
    except KafkaConnectUnavailableError as exc:
        _fail(str(exc), EXIT_UNREACHABLE)
    except KafkaConnectHTTPError as exc:
        _fail(f"{exc.method} {exc.url}: HTTP {exc.status_code}: {exc.connect_message}", EXIT_CONNECT_ERROR)
    except KafkaConnectError as exc:
        _fail(str(exc), EXIT_CONNECT_ERROR)


def _specs(files: list[Path] | None) -> list[Any]:
    from connectors.lint import ConnectorSpecError, load_specs

    try:
        return load_specs(files or [])
    except ConnectorSpecError as exc:
        _fail(str(exc), EXIT_USAGE)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(_jsonable(value), indent=2, sort_keys=True))


def _shown(key: str, value: str | None) -> str:
    from connectors.lint import is_secret_key

    if value is None:
        return "-"
    if is_secret_key(key) and not value.startswith("${"):
        return "******"
    return value


@app.command()
def lint(files: Files = None, as_json: AsJson = False) -> None:
    """Lint spec files: required keys, pre-2.0 property names, literal secrets."""
    from connectors.lint import LintLevel, lint_spec

    specs = _specs(files)
    results = [(spec, lint_spec(spec)) for spec in specs]
    errors = sum(1 for _, findings in results for f in findings if f.level is LintLevel.ERROR)
    if as_json:
        _print_json([{"name": s.name, "path": s.path, "findings": findings} for s, findings in results])
    else:
        table = Table("connector", "level", "key", "message", title="connector lint")
        for spec, findings in results:
            for f in findings:
                colour = "red" if f.level is LintLevel.ERROR else "yellow"
                table.add_row(
                    escape(spec.name), f"[{colour}]{f.level.value}[/]", escape(f.key), escape(f.message)
                )
        if table.row_count:
            _out.print(table)
        _out.print(f"{len(specs)} spec(s), {errors} error(s)")
    if errors:
        raise typer.Exit(EXIT_FINDINGS)


def _plan_table(diffs: list[ConnectorDiff]) -> Table:
    from connectors.kafka_connect import PlanAction

    table = Table("connector", "action", "key", "live", "desired", title="connector plan")
    for diff in diffs:
        if diff.action in (PlanAction.UPDATE,):
            for change in diff.changes:
                table.add_row(
                    escape(diff.name),
                    diff.action.value,
                    escape(change.key),
                    escape(_shown(change.key, change.live)),
                    escape(_shown(change.key, change.desired)),
                )
        else:
            detail = f"{len(diff.changes)} keys" if diff.action is PlanAction.CREATE else ""
            table.add_row(escape(diff.name), diff.action.value, detail, "", "")
    return table


@app.command()
def plan(
    files: Files = None,
    connect_url: ConnectUrl = DEFAULT_CONNECT_URL,
    as_json: AsJson = False,
    detailed_exitcode: Annotated[
        bool,
        typer.Option("--detailed-exitcode", help="Exit 1 when the plan has creates, updates or deletes."),
    ] = False,
) -> None:
    """Show what `apply` would change: create, update (changed keys), unchanged, delete-candidate."""
    from connectors.kafka_connect import PlanAction

    specs = _specs(files)
    diffs = _connect(connect_url, lambda client: client.plan(specs))
    if as_json:
        _print_json([{"name": d.name, "action": d.action, "changes": d.changes} for d in diffs])
    else:
        _out.print(_plan_table(diffs))
    if detailed_exitcode and any(d.action is not PlanAction.UNCHANGED for d in diffs):
        raise typer.Exit(EXIT_FINDINGS)


@app.command()
def apply(
    files: Files = None,
    connect_url: ConnectUrl = DEFAULT_CONNECT_URL,
    delete_missing: Annotated[
        bool, typer.Option("--delete-missing", help="Delete live connectors that no spec declares.")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Validate and apply specs (PUT /connectors/NAME/config); idempotent. Lint errors stop it."""
    from connectors.lint import LintLevel, lint_spec

    specs = _specs(files)
    blocking = [(s.name, f) for s in specs for f in lint_spec(s) if f.level is LintLevel.ERROR]
    if blocking:
        for name, finding in blocking:
            _err.print(escape(f"{name}: {finding.key}: {finding.message}"), highlight=False)
        _fail(f"{len(blocking)} lint error(s); nothing applied", EXIT_FINDINGS)
    outcomes = _connect(connect_url, lambda client: client.apply(specs, delete_missing=delete_missing))
    if as_json:
        _print_json(outcomes)
    else:
        table = Table("connector", "action", "result", "errors", title="connector apply")
        for o in outcomes:
            table.add_row(
                escape(o.name),
                o.action.value,
                o.done,
                escape("; ".join(f"{e.key}: {e.message}" for e in o.errors)),
            )
        _out.print(table)
    if any(o.done == "invalid" for o in outcomes):
        raise typer.Exit(EXIT_FINDINGS)


@app.command()
def status(
    name: Annotated[str | None, typer.Argument(help="Connector name (default: all).")] = None,
    connect_url: ConnectUrl = DEFAULT_CONNECT_URL,
    as_json: AsJson = False,
) -> None:
    """Show the state of a connector and its tasks (all connectors when NAME is omitted)."""

    def fetch(client: KafkaConnectClient) -> list[Any]:
        names = [name] if name else client.list_connectors()
        return [client.get_status(n) for n in names]

    statuses = _connect(connect_url, fetch)
    if as_json:
        _print_json(statuses)
        return
    table = Table("connector", "state", "task", "task state", "worker", title="connector status")
    for s in statuses:
        colour = "green" if s.healthy else "red"
        table.add_row(escape(s.name), f"[{colour}]{escape(s.state)}[/]", "", "", escape(s.worker_id or ""))
        for t in s.tasks:
            table.add_row("", "", str(t.id), escape(t.state), escape(t.worker_id or ""))
            if t.trace:
                table.add_row("", "", "", escape((t.trace.splitlines() or [""])[0]), "")
    _out.print(table)


@app.command()
def restart(
    name: Name,
    connect_url: ConnectUrl = DEFAULT_CONNECT_URL,
    include_tasks: Annotated[bool, typer.Option("--include-tasks/--no-include-tasks")] = True,
    only_failed: Annotated[bool, typer.Option("--only-failed")] = False,
    as_json: AsJson = False,
) -> None:
    """Restart a connector (and its tasks by default; only the failed ones with --only-failed)."""
    result = _connect(
        connect_url, lambda c: c.restart(name, include_tasks=include_tasks, only_failed=only_failed)
    )
    if as_json:
        _print_json({"name": name, "restarted": True, "status": result})
    else:
        _out.print(f"restart of {name} requested")


@app.command()
def pause(name: Name, connect_url: ConnectUrl = DEFAULT_CONNECT_URL) -> None:
    """Pause a connector and its tasks."""
    _connect(connect_url, lambda c: c.pause(name))
    _out.print(f"pause of {name} requested")


@app.command()
def resume(name: Name, connect_url: ConnectUrl = DEFAULT_CONNECT_URL) -> None:
    """Resume a paused connector and its tasks."""
    _connect(connect_url, lambda c: c.resume(name))
    _out.print(f"resume of {name} requested")


@app.command()
def delete(
    name: Name,
    connect_url: ConnectUrl = DEFAULT_CONNECT_URL,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a connector (its offsets and topics stay)."""
    if not yes and not typer.confirm(f"delete connector {name}?"):
        _fail("not confirmed; nothing deleted", EXIT_USAGE)
    _connect(connect_url, lambda c: c.delete(name))
    _out.print(f"deleted {name}")

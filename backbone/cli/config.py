"""``backbone config ...``: set, list, show, history, rollback, retire and watch configuration keys.

Mounted by :mod:`backbone.cli` as ``backbone config``. Every option has an environment twin
(``BACKBONE_CONFIG_<OPTION>``, shown in ``--help``); every command that prints data has ``--json``.
Errors are printed as one line on stderr with exit status 1 (2 for a stale expected version).
The long-running ``relay`` and ``project`` commands run the outbox relay and the Redis read model.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from backbone.cli.helpers import JsonOpt, emit_json, print_cells
from core.settings import Settings, get_settings
from streams.envelope import parse_time

if TYPE_CHECKING:
    from configuration.store import ConfigStore, ConfigVersion

# configuration's modules (eventsourcing, psycopg, redis) are imported by the commands that use them, not
# by every ``backbone`` call; CONFIG_TOPIC mirrors configuration.relay.CONFIG_TOPIC (a unit test checks)
CONFIG_TOPIC = "config.changes"

__all__ = ["app"]

app = typer.Typer(
    help="Configuration as event-sourced aggregates: versions, time travel, rollback.", no_args_is_help=True
)
_out = Console()
_err = Console(stderr=True)

Author = Annotated[
    str, typer.Option("--author", envvar="BACKBONE_CONFIG_AUTHOR", help="Who makes the change.")
]
Reason = Annotated[str, typer.Option("--reason", envvar="BACKBONE_CONFIG_REASON", help="Why.")]
Causation = Annotated[
    str | None,
    typer.Option(
        "--causation-id",
        envvar="BACKBONE_CONFIG_CAUSATION_ID",
        help="Id of the command or decision event that asked for the change.",
    ),
]
Expected = Annotated[
    int | None,
    typer.Option(
        "--expected-version",
        envvar="BACKBONE_CONFIG_EXPECTED_VERSION",
        help="Refuse the change unless the key is at this version (0: must not exist).",
    ),
]


def _settings() -> Settings:
    from core.stack import resolve_settings

    return resolve_settings(get_settings())


@contextmanager
def _store() -> Iterator[ConfigStore]:
    from configuration.errors import ConfigurationError, StaleVersionError
    from configuration.store import ConfigStore

    try:
        store = ConfigStore(_settings())
    except (ConfigurationError, ValueError) as exc:
        _err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    try:
        yield store
    except StaleVersionError as exc:
        _err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    except (ConfigurationError, ValueError) as exc:
        _err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    finally:
        store.close()


def _time(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 time") from exc


def _print_version(v: ConfigVersion, as_json: bool) -> None:
    if as_json:
        emit_json(v.as_json())
        return
    extra = ""
    if v.restored_version is not None:
        extra = f" (restores v{v.restored_version}, rolled back from v{v.rolled_back_from_version})"
    _out.print(f"[bold]{escape(v.key)}[/bold] v{v.version} {v.change}{extra}")
    _out.print(escape(f"  by {v.author} at {v.changed_at.isoformat()}: {v.reason}"))
    if v.schema_name:
        _out.print(escape(f"  schema {v.schema_name}"))
    emit_json(v.value)


@app.command("set")
def set_(
    key: Annotated[str, typer.Argument(help="Configuration key, e.g. routing.policy.default.")],
    value: Annotated[str | None, typer.Argument(help="The value, a JSON object.")] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", "-f", envvar="BACKBONE_CONFIG_FILE", help="Read the JSON value from this file."
        ),
    ] = None,
    author: Author = ...,  # type: ignore[assignment]
    reason: Reason = ...,  # type: ignore[assignment]
    expected_version: Expected = None,
    causation_id: Causation = None,
    as_json: JsonOpt = False,
) -> None:
    """Store a new version of KEY (validated against its schema when one is registered)."""
    if (value is None) == (file is None):
        raise typer.BadParameter("give the value or --file, not both")
    text = value if value is not None else file.read_text()  # type: ignore[union-attr]
    from configuration.store import value_from_json

    try:
        parsed = value_from_json(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    with _store() as store:
        v = store.set(
            key,
            parsed,
            author=author,
            reason=reason,
            expected_version=expected_version,
            causation_id=causation_id,
        )
    _print_version(v, as_json)


@app.command("keys")
def keys(as_json: JsonOpt = False) -> None:
    """List the keys with their current version and schema."""
    with _store() as store:
        infos = store.keys()
    if as_json:
        emit_json([k.as_json() for k in infos])
        return
    cells = [
        [k.key, str(k.version), k.schema_name or "-", k.changed_at.isoformat(), "yes" if k.retired else ""]
        for k in infos
    ]
    print_cells(
        cells, ["key", "version", "schema", "changed at", "retired"], "configuration keys", right={"version"}
    )


@app.command("show")
def show(
    key: Annotated[str, typer.Argument(help="Configuration key.")],
    version: Annotated[
        int | None, typer.Option("--version", envvar="BACKBONE_CONFIG_VERSION", help="Show this version.")
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(
            "--at", envvar="BACKBONE_CONFIG_AT", help="Show the value as it was at this ISO 8601 instant."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show KEY's value now, at a version, or as it was at an instant, with who and why."""
    with _store() as store:
        v = store.get(key, version=version, at=_time(at))
    _print_version(v, as_json)


@app.command("history")
def history(key: Annotated[str, typer.Argument(help="Configuration key.")], as_json: JsonOpt = False) -> None:
    """Every version of KEY: author, reason, time and the diff to the previous version."""
    with _store() as store:
        versions = store.history(key)
    if as_json:
        emit_json([v.as_json() for v in versions])
        return
    for v in versions:
        extra = f" restores v{v.restored_version}" if v.restored_version is not None else ""
        _out.print(
            f"[bold]v{v.version}[/bold] {v.change}{extra} {v.changed_at.isoformat()} "
            + escape(f"{v.author}: {v.reason}")  # people's words and values are text, not markup
        )
        for d in v.diff:
            _out.print(
                escape(f"    {d['op']:8} {d['path']}: {json.dumps(d['old'])} -> {json.dumps(d['new'])}")
            )


@app.command("rollback")
def rollback(
    key: Annotated[str, typer.Argument(help="Configuration key.")],
    to_version: Annotated[
        int | None,
        typer.Option(
            "--to-version", envvar="BACKBONE_CONFIG_TO_VERSION", help="Restore this version's value."
        ),
    ] = None,
    to_time: Annotated[
        str | None,
        typer.Option(
            "--to-time",
            envvar="BACKBONE_CONFIG_TO_TIME",
            help="Restore the value current at this ISO 8601 instant.",
        ),
    ] = None,
    author: Author = "cli",
    reason: Reason = ...,  # type: ignore[assignment]
    expected_version: Expected = None,
    causation_id: Causation = None,
    as_json: JsonOpt = False,
) -> None:
    """Append a new version of KEY whose value is an older one (history is never rewritten)."""
    if (to_version is None) == (to_time is None):
        raise typer.BadParameter("give exactly one of --to-version and --to-time")
    with _store() as store:
        v = store.rollback(
            key,
            to_version=to_version,
            to_time=_time(to_time),
            author=author,
            reason=reason,
            expected_version=expected_version,
            causation_id=causation_id,
        )
    _print_version(v, as_json)


@app.command("retire")
def retire(
    key: Annotated[str, typer.Argument(help="Configuration key.")],
    author: Author = ...,  # type: ignore[assignment]
    reason: Reason = ...,  # type: ignore[assignment]
    expected_version: Expected = None,
    as_json: JsonOpt = False,
) -> None:
    """Retire KEY: it keeps its history and takes no new versions."""
    with _store() as store:
        v = store.retire(key, author=author, reason=reason, expected_version=expected_version)
    _print_version(v, as_json)


@app.command("watch")
def watch(
    keys_: Annotated[list[str] | None, typer.Argument(metavar="[KEY]...", help="Only these keys.")] = None,
    topic: Annotated[str, typer.Option("--topic", envvar="BACKBONE_CONFIG_TOPIC")] = CONFIG_TOPIC,
    from_beginning: Annotated[
        bool,
        typer.Option(
            "--from-beginning", envvar="BACKBONE_CONFIG_FROM_BEGINNING", help="Replay the topic first."
        ),
    ] = False,
    max_events: Annotated[
        int,
        typer.Option(
            "--max-events",
            envvar="BACKBONE_CONFIG_MAX_EVENTS",
            help="Stop after this many changes (0: never).",
        ),
    ] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Follow configuration changes as they reach the config topic (de-duplicated by event id)."""
    import uuid

    from confluent_kafka import KafkaError

    from configuration.relay import CONFIG_CHANGE_SCHEMA
    from streams.consumer import ConsumedEvent, decode_message, make_consumer
    from streams.serde import serde_from_settings

    settings = _settings()
    serde = serde_from_settings(settings)
    consumer = make_consumer(
        settings.kafka,
        f"config-watch-{uuid.uuid4().hex[:8]}",
        **{"auto.offset.reset": "earliest" if from_beginning else "latest"},
    )
    consumer.subscribe([topic])
    wanted = set(keys_ or [])
    seen: set[str] = set()
    shown = 0
    try:
        while max_events == 0 or shown < max_events:
            for m in consumer.consume(100, 0.5):
                if m.error() is not None:
                    if m.error().code() != KafkaError._PARTITION_EOF:
                        _err.print(f"[yellow]{m.error()}[/yellow]")
                    continue
                e = decode_message(serde, m)
                if not isinstance(e, ConsumedEvent) or e.schema != CONFIG_CHANGE_SCHEMA:
                    continue
                if e.attributes.id in seen or (wanted and e.data["key"] not in wanted):
                    continue
                seen.add(e.attributes.id)
                shown += 1
                d = e.data
                if as_json:
                    print(json.dumps(e.as_json()), flush=True)
                else:
                    _out.print(
                        f"{d['changed_at'].isoformat()} [bold]{escape(d['key'])}[/bold] v{d['version']} "
                        + escape(f"{d['change']} by {d['author']}: {d['reason']} {d['value_json'] or ''}")
                    )
                if max_events and shown >= max_events:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


def _run_until_signal(run: Callable[[threading.Event], Any]) -> None:
    import signal

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run(stop)


@app.command("relay")
def relay(
    topic: Annotated[str, typer.Option("--topic", envvar="BACKBONE_CONFIG_TOPIC")] = CONFIG_TOPIC,
    name: Annotated[str, typer.Option("--name", envvar="BACKBONE_CONFIG_RELAY_NAME")] = "config-relay",
    batch_size: Annotated[int, typer.Option("--batch-size", envvar="BACKBONE_CONFIG_RELAY_BATCH_SIZE")] = 100,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port", envvar="BACKBONE_CONFIG_METRICS_PORT", help="Serve /metrics on this port."
        ),
    ] = None,
    until_caught_up: Annotated[
        bool,
        typer.Option(
            "--until-caught-up",
            envvar="BACKBONE_CONFIG_RELAY_ONCE",
            help="Publish what is stored now, then exit.",
        ),
    ] = False,
) -> None:
    """Run the outbox relay: publish every stored configuration event to the config topic.

    When PostgreSQL cannot be reached at start, the relay waits for it (retrying with backoff from 0.2 s to
    5 s, a ``config_relay.postgres_error`` log line each time, SIGTERM or SIGINT end the wait with exit code
    0), as it does once running; with ``--until-caught-up`` it says so in one line and exits 1."""
    import signal

    from configuration.errors import ConfigStoreUnavailableError
    from configuration.relay import OutboxRelay
    from core.observability import serve_metrics

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if until_caught_up:
        try:
            r = OutboxRelay(_settings(), topic=topic, name=name, batch_size=batch_size)
        except ConfigStoreUnavailableError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
    else:
        waited = OutboxRelay.when_reachable(stop, _settings(), topic=topic, name=name, batch_size=batch_size)
        if waited is None:
            return
        r = waited
    if metrics_port is not None:
        serve_metrics(metrics_port, host="0.0.0.0", registry=r.metrics.registry)
    try:
        if until_caught_up:
            total = 0
            while n := r.run_once():
                total += n
            typer.echo(f"published {total} configuration event(s) to {topic}")
        else:
            r.run(stop)
    finally:
        r.close()


@app.command("project")
def project(
    topic: Annotated[str, typer.Option("--topic", envvar="BACKBONE_CONFIG_TOPIC")] = CONFIG_TOPIC,
    group: Annotated[
        str, typer.Option("--group", envvar="BACKBONE_CONFIG_PROJECTION_GROUP")
    ] = "config-projection",
) -> None:
    """Run the Redis current-value read model of the config topic."""
    from configuration.projection import ConfigProjection

    p = ConfigProjection(_settings(), topic=topic, group_id=group)
    try:
        _run_until_signal(p.run)
    finally:
        p.close()

"""``backbone projections`` (list, status, rebuild, run), ``backbone audit`` and the ``--into`` of
``backbone replay``.

The lead mounts them in :mod:`backbone.cli`: ``root.add_typer(projections.app, name="projections")``,
``root.command()(projections.audit)``, and ``replay --into NAME`` calls :func:`replay_into`.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from backbone.cli.helpers import (
    PROJECTION_BATCH_SIZE,
    SHUTDOWN_TIMEOUT_SECONDS,
    JsonOpt,
    clear_errors,
    context,
    err,
    fmt,
    out,
    print_rows,
    stop_on_signals,
)

__all__ = ["app", "audit", "make_runners", "replay_into"]

app = typer.Typer(help="Projections: status, rebuild, run.", no_args_is_help=True)


def _redis_client(settings: Any) -> Any:
    """A Redis client with short timeouts (an outage then costs little), or None when none is configured."""
    import redis

    try:
        url = settings.redis.dsn()
    except ValueError:
        return None
    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


@app.command("list")
@clear_errors
def list_(as_json: JsonOpt = False) -> None:
    """Every known projection: name, version, topics and PostgreSQL schema."""
    from projections.registry import PROJECTIONS
    from projections.runner import schema_name

    rows = []
    for name, factory in PROJECTIONS.items():
        p = factory()
        rows.append(
            {"name": name, "version": p.version, "topics": list(p.topics), "schema": schema_name(name)}
        )
    print_rows(rows, ["name", "version", "topics", "schema"], "projections", as_json)


@app.command()
@clear_errors
def status(
    names: Annotated[list[str] | None, typer.Argument(help="Projections (default: all).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Version, lag per partition (events behind the log end), last checkpoint and when it last advanced."""
    import psycopg

    from projections.registry import PROJECTIONS, projection_status

    settings, _ = context()
    with psycopg.connect(settings.postgres.dsn()) as conn:
        statuses = [projection_status(conn, n, kafka=settings.kafka) for n in (names or list(PROJECTIONS))]
    if as_json:
        out.print_json(json.dumps([s.as_json() for s in statuses]))
        return
    for s in statuses:
        due = " [yellow](rebuild due)[/yellow]" if s.stored_version not in (None, s.version) else ""
        table = Table(
            title=f"{s.name} v{s.version} (tables v{s.stored_version if s.stored_version is not None else '-'}){due}, "
            f"lag {fmt(s.lag_events) or '?'}, last advanced {fmt(s.last_advanced_at) or 'never'}"
        )
        for c in ("topic", "partition", "checkpoint", "log_end", "lag_events", "advanced_at"):
            table.add_column(c, justify="left" if c in ("topic", "advanced_at") else "right")
        for p in s.partitions:
            table.add_row(p.topic, str(p.partition), fmt(p.checkpoint), fmt(p.log_end), fmt(p.lag_events),
                          fmt(p.advanced_at))  # fmt: skip
        out.print(table)


@app.command("rebuild")
@clear_errors
def rebuild_cmd(
    name: Annotated[str, typer.Argument(help="The projection to rebuild.")],
    verify: Annotated[
        bool,
        typer.Option(
            help="Compare rebuilt and live tables row for row; no swap on a difference.",
            envvar="BACKBONE_REBUILD_VERIFY",
        ),
    ] = False,
    batch_size: Annotated[
        int, typer.Option(help="Records per transaction.", envvar="BACKBONE_BATCH_SIZE")
    ] = PROJECTION_BATCH_SIZE,
    as_json: JsonOpt = False,
) -> None:
    """Replay the archive and the log into fresh tables while the live projection keeps serving, then swap
    them in one transaction."""
    from projections.read_models import RunReadModel
    from projections.rebuild import RebuildVerifyError, rebuild

    settings, serde = context()
    try:
        report = rebuild(settings, serde, name, verify=verify, batch_size=batch_size, progress=not as_json)
    except RebuildVerifyError as exc:
        err.print(f"[bold red]verify FAILED, nothing swapped:[/bold red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    if name == "agent_runs" and (client := _redis_client(settings)) is not None:
        model = RunReadModel(client, settings.postgres.dsn())
        try:
            model.refill()
        except Exception as exc:  # noqa: BLE001 - Redis is optional; readers fall back to PostgreSQL
            err.print(
                f"[yellow]Redis read model not refilled ({exc}); it refills when the runner next writes[/yellow]"
            )
        finally:
            model.close()
    if as_json:
        out.print_json(json.dumps(report.as_json()))
        return
    verified = ", verified: rebuilt == live" if report.verified else ""
    out.print(f"rebuilt {name}: {report.events:,} events ({report.from_archive:,} from the archive) in "
              f"{report.seconds:.1f} s, {report.events_per_second:,.0f} events/s{verified}; swapped in")  # fmt: skip


def make_runners(
    settings: Any,
    serde: Any,
    names: list[str],
    *,
    batch_size: int = PROJECTION_BATCH_SIZE,
    read_models: bool = True,
    topics: list[str] | None = None,
) -> list[Any]:
    """One runner per projection name (each its own consumer group and schema); the agent-run runner
    gets the Redis read model hook when Redis is configured and ``read_models``; ``topics`` replaces
    the topics every named projection reads."""
    from projections.read_models import RunReadModel
    from projections.registry import get_projection
    from projections.runner import ProjectionRunner

    runners = []
    for n in names:
        projection = get_projection(n)
        if topics:
            projection.topics = tuple(topics)
        hook = None
        if n == "agent_runs" and read_models and (client := _redis_client(settings)) is not None:
            hook = RunReadModel(client, settings.postgres.dsn())
        runners.append(
            ProjectionRunner(settings, serde, projection, batch_size=batch_size, after_commit=hook)
        )
    return runners


@app.command("run")
@clear_errors
def run_cmd(
    names: Annotated[list[str] | None, typer.Argument(help="Projections to run (default: all).")] = None,
    until_caught_up: Annotated[bool, typer.Option(help="Exit once every projection has caught up.")] = False,
    batch_size: Annotated[
        int, typer.Option(help="Most records per transaction.", envvar="BACKBONE_BATCH_SIZE")
    ] = PROJECTION_BATCH_SIZE,
    read_models: Annotated[
        bool, typer.Option(help="Keep the Redis read models.", envvar="BACKBONE_READ_MODELS")
    ] = True,
    metrics_port: Annotated[
        int, typer.Option(help="Port of /metrics and /healthz (0: any).", envvar="BACKBONE_METRICS_PORT")
    ] = 0,
    topic: Annotated[
        list[str] | None,
        typer.Option(
            "--topic",
            help="Read this topic instead of the projections' own (repeatable; e.g. the archive of topics "
            "outside the catalogue).",
        ),
    ] = None,
) -> None:
    """Run several projections in one process (a thread each), with /metrics and /healthz."""
    from core.observability import serve_metrics
    from projections.registry import PROJECTIONS

    settings, serde = context()
    selected = names or list(PROJECTIONS)
    runners = make_runners(
        settings, serde, selected, batch_size=batch_size, read_models=read_models, topics=topic
    )
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}

    def target(r: Any) -> None:
        try:
            results[r.projection.name] = r.run(until_caught_up=until_caught_up)
        except Exception as exc:  # noqa: BLE001 - reported by /healthz and at exit
            errors[r.projection.name] = repr(exc)

    def health() -> dict[str, Any]:
        return {
            "ok": not errors and all(t.is_alive() or r.projection.name in results for t, r in zip(threads, runners, strict=True)),
            "projections": {
                r.projection.name: {"caught_up": r.caught_up(), "applied": r.stats.applied, "error": errors.get(r.projection.name)}
                for r in runners
            },
        }  # fmt: skip

    threads = [
        threading.Thread(target=target, args=(r,), name=r.projection.name, daemon=True) for r in runners
    ]
    server = serve_metrics(metrics_port, health=health)
    err.print(
        f"running {', '.join(selected)}; metrics on http://127.0.0.1:{server.server_address[1]}/metrics"
    )
    stopping = stop_on_signals(*(r.stop for r in runners))  # each runner commits its batch, then returns
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads) and not stopping.wait(0.2):
            pass
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_SECONDS
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        server.shutdown()
    hung = [t.name for t in threads if t.is_alive()]
    if hung:
        errors.update({n: f"still stopping after {SHUTDOWN_TIMEOUT_SECONDS} s" for n in hung})
    for r in runners:
        s = r.stats
        out.print(f"{r.projection.name}: applied {s.applied:,}, skipped {s.duplicates:,} duplicate(s), "
                  f"dead-lettered {s.dead_lettered}"
                  + (f"; topic(s) not on the broker: {', '.join(s.absent_topics)}" if s.absent_topics else ""))  # fmt: skip
    if errors:
        for n, e in errors.items():
            err.print(f"[red]{n} failed:[/red] {e}", highlight=False)
        raise typer.Exit(1)


@clear_errors
def audit(
    entity: Annotated[
        str,
        typer.Argument(
            help="run:<run_id>, config:<key>, agent:<name>, service:<name>, request:<id> (a routed request, "
            "from the routing view), incident:<id> (from the incidents view), or a key."
        ),
    ],
    from_: Annotated[
        str | None,
        typer.Option("--from", help="First event time (ISO 8601, inclusive).", envvar="BACKBONE_FROM"),
    ] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="Last event time (ISO 8601, exclusive).", envvar="BACKBONE_TO")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every archived event about one entity, in event-time order, with its causation chain.

    ``request:<id>`` is the routing audit of a request instead (from the ``routing`` projection): its
    decisions with every candidate's score and reasons, config and learner versions, fallbacks and outcomes.
    ``incident:<id>`` is the incident's chain from its first anomaly to its ranked causes (from the
    ``incidents`` projection, :func:`backbone.cli.incidents.audit_incident`; no --from/--to).
    """
    import psycopg

    if entity.strip().startswith("incident:"):
        from backbone.cli.incidents import audit_incident

        if from_ or to:
            raise ValueError("--from/--to do not apply to incident:<id> (the chain is the whole incident)")
        audit_incident(entity, as_json=as_json)
        return

    from projections.audit import audit_trail
    from streams.envelope import parse_time

    kind, sep, request_id = entity.strip().partition(":")
    if sep and kind == "request":
        from backbone.cli.routing_views import print_request_audit

        if not request_id:
            raise ValueError(f"{entity!r}: the request id is missing after the colon")
        print_request_audit(request_id, as_json=as_json)
        return
    settings, serde = context()
    start: datetime | None = parse_time(from_) if from_ else None
    end: datetime | None = parse_time(to) if to else None
    with psycopg.connect(settings.postgres.dsn()) as conn:
        entries = audit_trail(conn, entity, start=start, end=end, serde=serde)
    if as_json:
        out.print_json(json.dumps([e.as_json() for e in entries], default=str))
        return
    if not entries:
        err.print(f"no archived event about {entity!r}")
        raise typer.Exit(1)
    tree = Tree(f"[bold]{escape(entity)}[/bold]: {len(entries)} event(s)")
    nodes: dict[str, Any] = {}
    for e in entries:
        parent = nodes.get(e.caused_by) if e.caused_by else None
        label = (f"{fmt(e.time)} [bold]{escape(e.type or 'undecodable')}[/bold] "
                 f"[dim]{escape(f'{e.topic}[{e.partition}]@{e.offset} id={e.event_id}')}[/dim]")  # fmt: skip
        node = (parent or tree).add(label)
        if e.event_id:
            nodes[e.event_id] = node
    out.print(tree)


def replay_into(
    settings: Any,
    serde: Any,
    topic: str,
    *,
    start: int | datetime | None,
    end: int | datetime | None,
    name: str,
) -> dict[str, Any]:
    """Apply a bounded range of ``topic`` to projection ``name`` in its own schema ``proj_<name>_replay``
    (dropped and made afresh; the live projection is not touched): the view as that range alone builds it.

    Args:
        settings: Kafka and PostgreSQL settings.
        serde: the Avro serde.
        topic: the topic to read.
        start: first offset or event time (inclusive), None = the start.
        end: last offset or event time (exclusive), None = the end.
        name: a projection of :data:`projections.registry.PROJECTIONS`.

    Returns:
        ``{"projection", "schema", "topic", "records", "applied"}``.

    Raises:
        KeyError: an unknown projection or topic.
    """
    import psycopg

    from projections.registry import PROJECTIONS
    from projections.runner import ProjectionRunner, schema_name
    from streams.consumer import RawRecord
    from streams.replay import read_range

    if name not in PROJECTIONS:
        raise KeyError(f"unknown projection {name!r}; known: {', '.join(sorted(PROJECTIONS))}")
    schema = schema_name(name, "replay")
    with psycopg.connect(settings.postgres.dsn(), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    projection = PROJECTIONS[name]()
    projection.topics = (topic,)
    runner = ProjectionRunner(settings, serde, projection, schema=schema, group_id=f"replay-{name}")
    runner.setup()
    nxt: dict[tuple[str, int], int] = {}
    records, chunk = 0, []

    def flush() -> None:
        runner.apply_records(chunk, first={tp: o for tp, o in nxt.items()})
        for r in chunk:
            nxt[(r.topic, r.partition)] = r.offset + 1
        chunk.clear()

    decode = getattr(projection, "decode", None)  # a reader of JSON topics decodes them itself
    for r in read_range(settings.kafka, serde, topic, start=start, end=end):
        chunk.append(r if decode is None else decode(RawRecord.of(r)))
        records += 1
        if len(chunk) >= 2000:
            flush()
    if chunk:
        flush()
    runner.dlq.producer.flush()
    return {
        "projection": name,
        "schema": schema,
        "topic": topic,
        "records": records,
        "applied": runner.stats.applied,
    }

"""The core ``backbone`` commands: produce, subscribe, replay, topics, schemas, import agent-runs, project,
query. Mounted on :data:`backbone.cli.app` by :func:`backbone.cli.mount`."""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from backbone.cli.helpers import (
    PROJECTION_BATCH_SIZE,
    JsonOpt,
    clear_errors,
    context,
    emit_json,
    err,
    fmt,
    out,
    print_rows,
    stop_on_signals,
)
from streams.catalogue import DLQ_TOPIC

__all__ = ["import_app", "import_runs", "query_app", "schemas_app", "topics_app"]

topics_app = typer.Typer(help="The topic catalogue.", no_args_is_help=True)
query_app = typer.Typer(help="Read the projections.", no_args_is_help=True)
import_app = typer.Typer(help="Import history from source systems as events.", no_args_is_help=True)
schemas_app = typer.Typer(help="The Avro contracts and their pinned ids.", no_args_is_help=True)


# -- produce ----------------------------------------------------------------------------------------------------


@clear_errors
def produce(
    topic: Annotated[str, typer.Argument(help="Topic to produce to.")],
    type_: Annotated[str, typer.Option("--type", help="Avro full name, e.g. sophia.agent.LlmCall.")],
    file: Annotated[str, typer.Argument(help="JSON-lines file, or - for standard input.")] = "-",
    key_field: Annotated[
        str | None,
        typer.Option(
            help="Field whose value is the key (default: the topic's key).", envvar="BACKBONE_KEY_FIELD"
        ),
    ] = None,
    source: Annotated[
        str, typer.Option(help="CloudEvents source.", envvar="BACKBONE_SOURCE")
    ] = "/cli/produce",
    id_field: Annotated[
        str | None, typer.Option(help="Field holding a stable event id (default: a new UUID per line).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate JSON lines against the Avro schema and produce them; if any line is invalid, each bad
    line is reported with its line number and field, and nothing is sent."""
    from backbone.client import Client
    from streams.errors import SchemaValidationError

    settings, serde = context()
    client = Client(settings, serde)
    stream = sys.stdin if file == "-" else open(file, encoding="utf-8")  # noqa: SIM115
    data: list[dict[str, Any]] = []
    lines: list[int] = []
    problems: list[dict[str, Any]] = []
    with stream:
        for lineno, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                if not isinstance(raw, dict):
                    raise ValueError("a JSON object is expected")
                data.append(client.validate(type_, raw))
                lines.append(lineno)
            except (ValueError, SchemaValidationError) as exc:
                problems.append({"line": lineno, "field": getattr(exc, "field", None), "error": str(exc)})
    ids = [str(d[id_field]) if id_field and d.get(id_field) is not None else str(uuid.uuid4()) for d in data]
    events = client.events(type_, data, topic=topic, key_field=key_field, source=source, ids=ids,
                           keys=[str(n) for n in lines])  # fmt: skip
    if problems:
        if as_json:
            emit_json({"produced": 0, "invalid": problems})
        for p in problems if not as_json else []:
            err.print(f"[red]line {p['line']}[/red]: {escape(p['error'])}", highlight=False)
        err.print(f"{len(problems)} invalid line(s); nothing was sent")
        raise typer.Exit(1)
    n = client.send(topic, events)
    client.close()
    if as_json:
        emit_json({"produced": n, "topic": topic, "ids": [e.attributes.id for e in events]})
    else:
        out.print(f"produced {n} event(s) to {topic}")


# -- subscribe / replay ---------------------------------------------------------------------------------------------


def _parse_bound(v: str | None) -> int | datetime | None:
    from streams.envelope import parse_time

    if v is None:
        return None
    if v.isdigit():
        return int(v)
    try:
        return parse_time(v)
    except ValueError:
        raise ValueError(f"{v!r} is neither an offset nor an ISO-8601 time") from None


def _print_record(r: Any, as_json: bool) -> None:
    from streams.consumer import DecodeFailure

    if isinstance(r, DecodeFailure):
        err.print(f"[red]{escape(f'{r.topic}[{r.partition}]@{r.offset}')} undecodable:[/red] {escape(r.reason)}",
                  highlight=False)  # fmt: skip
        return
    if as_json:
        sys.stdout.write(json.dumps(r.as_json(), default=str) + "\n")
        return
    a = r.attributes
    data = json.dumps(r.as_json()["data"], default=str)
    out.print(  # what comes from the record is escaped: "[/usr]" in a command is text, not markup
        f"[dim]{escape(f'{r.topic}[{r.partition}]@{r.offset}')}[/dim] {fmt(a.time)} [bold]{escape(a.type)}[/bold] "
        f"{escape(f'subject={a.subject} id={a.id}')}\n  {escape(data[:300])}",
        highlight=False,
    )


@clear_errors
def subscribe(
    topics: Annotated[list[str], typer.Argument(help="Topics to subscribe to.")],
    group: Annotated[
        str | None,
        typer.Option(
            help="Consumer group (commits offsets); default: a private group.", envvar="BACKBONE_GROUP"
        ),
    ] = None,
    from_: Annotated[
        str,
        typer.Option(
            "--from", help="beginning | latest | committed | ISO-8601 event time.", envvar="BACKBONE_FROM"
        ),
    ] = "beginning",
    follow: Annotated[
        bool, typer.Option(help="Keep waiting for new events.", envvar="BACKBONE_FOLLOW")
    ] = False,
    limit: Annotated[int, typer.Option(help="Stop after this many events (0 = no limit).")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Print decoded events with their CloudEvents attributes, partition and offset."""
    from streams.consumer import Subscriber
    from streams.envelope import parse_time

    settings, serde = context()
    start: Any = from_ if from_ in ("beginning", "latest", "committed") else parse_time(from_)
    sub = Subscriber(settings.kafka, serde, topics, group_id=group, start=start)
    n = 0
    deadline = time.monotonic() + 30
    try:
        while True:
            batch = sub.poll_batch(500, 0.5)
            for r in batch:
                _print_record(r, as_json)
                n += 1
                if limit and n >= limit:
                    sub.commit_batch(batch)
                    return
            sub.commit_batch(batch)
            if not follow and sub.caught_up():
                return
            if not follow and not sub.assigned and time.monotonic() > deadline:
                raise TimeoutError("no partition was assigned within 30 s (does the topic exist?)")
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()


@clear_errors
def replay(
    topic: Annotated[str, typer.Option("--topic", help="Topic to read.")],
    from_: Annotated[
        str | None, typer.Option("--from", help="Offset or ISO-8601 event time (inclusive).")
    ] = None,
    to: Annotated[str | None, typer.Option("--to", help="Offset or ISO-8601 event time (exclusive).")] = None,
    into: Annotated[
        str | None,
        typer.Option(
            "--into", help="Apply the range to a fresh copy of this projection (proj_<NAME>_replay)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Read a bounded range of history, in order per partition; print it, or project it with --into."""
    from streams.replay import read_range

    settings, serde = context()
    if into:
        from backbone.cli.projections import replay_into

        result = replay_into(
            settings, serde, topic, start=_parse_bound(from_), end=_parse_bound(to), name=into
        )
        if as_json:
            emit_json(result)
        else:
            out.print(f"replayed {result['records']:,} record(s) of {topic} into schema {result['schema']} "
                      f"({result['applied']:,} applied)")  # fmt: skip
        return
    n = 0
    for r in read_range(settings.kafka, serde, topic, start=_parse_bound(from_), end=_parse_bound(to)):
        _print_record(r, as_json)
        n += 1
    if not as_json:
        err.print(f"{n} record(s)")


# -- topics / schemas --------------------------------------------------------------------------------------------


@topics_app.command("list")
@clear_errors
def topics_list(as_json: JsonOpt = False) -> None:
    """The catalogue: topic, partitions, key, schemas, retention; and whether the broker has it."""
    from confluent_kafka.admin import AdminClient

    from streams.catalogue import CATALOGUE

    settings, _ = context(kafka=False)
    try:
        live = AdminClient(settings.kafka.librdkafka()).list_topics(timeout=5).topics
    except Exception:  # noqa: BLE001 - the catalogue is still worth printing
        live = None
    rows = [
        {
            "topic": t.name,
            "partitions": t.partitions,
            "key": t.key,
            "schemas": list(t.schemas),
            "retention": "forever" if t.retention_ms < 0 else f"{t.retention_ms // 86_400_000} d",
            "on_broker": None if live is None else (t.name in live),
            "doc": t.doc,
        }
        for t in CATALOGUE.values()
    ]
    print_rows(rows, ["topic", "partitions", "key", "schemas", "retention", "on_broker"], "topics", as_json)


@topics_app.command("create")
@clear_errors
def topics_create() -> None:
    """Create the catalogue's topics that the broker lacks."""
    from confluent_kafka.admin import AdminClient

    from streams.catalogue import ensure_topics

    settings, _ = context()
    created = ensure_topics(AdminClient(settings.kafka.librdkafka()))
    out.print(f"created: {', '.join(created) or 'nothing (all exist)'}")


@schemas_app.command("list")
@clear_errors
def schemas_list(as_json: JsonOpt = False) -> None:
    """Every subject with its versions and ids."""
    from streams.registry import EmbeddedRegistry

    reg = EmbeddedRegistry(strict=False)
    unpinned = set(reg.unpinned())
    rows = [
        {"subject": s, "versions": len(vs), "latest_id": vs[-1]["id"], "pinned": s not in unpinned}
        for s, vs in sorted(reg.subjects().items())
    ]
    print_rows(rows, ["subject", "versions", "latest_id", "pinned"], "schemas", as_json)


@schemas_app.command("pin")
@clear_errors
def schemas_pin() -> None:
    """Check every changed .avsc against its latest version (the compatibility gate) and pin it."""
    from streams.registry import EmbeddedRegistry

    new = EmbeddedRegistry(strict=False).pin()
    out.print("\n".join(f"pinned {s} as id {i}" for s, i in new.items()) or "nothing changed")


# -- import / project / query -----------------------------------------------------------------------------------


def import_runs(
    settings: Any, serde: Any, directory: Path, topic: str, *, progress: bool = True
) -> dict[str, Any]:
    """Parse trajectories under ``directory`` and produce their events; return the import report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from connectors.agent_runs import ImportProblem, iter_runs
    from streams.producer import EventProducer

    files = sorted((directory / "trajs").glob("*.traj.json")) or sorted(directory.glob("*.traj.json"))
    if not files and not directory.exists():
        raise ValueError(f"{directory}: no such directory")
    producer = EventProducer(settings.kafka, serde)
    report: dict[str, Any] = {"runs": 0, "events": 0, "problems": [], "odd_records": 0}
    start = time.perf_counter()
    with Progress(
        TextColumn("importing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[events]} events"),
        TimeRemainingColumn(), console=err, disable=not progress or not err.is_terminal,
    ) as bar:  # fmt: skip
        task = bar.add_task("import", total=len(files), events=0)
        for item in iter_runs(directory):
            if isinstance(item, ImportProblem):
                report["problems"].append({"path": str(item.path), "reason": item.reason})
            else:
                for e in item.events:
                    producer.produce(topic, e)
                report["runs"] += 1
                report["events"] += len(item.events)
                report["odd_records"] += len(item.problems)
            bar.update(task, advance=1, events=report["events"])
    producer.close()  # not left to the collector: a producer outliving its broker logs "Connection refused"
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


@import_app.command("agent-runs")
@clear_errors
def import_agent_runs(
    directory: Annotated[
        Path, typer.Argument(help="Folder with mini-swe-agent *.traj.json (or trajs/) and results.csv.")
    ],
    topic: Annotated[
        str, typer.Option(help="Topic to produce to.", envvar="BACKBONE_AGENT_TOPIC")
    ] = "agent.events",
    as_json: JsonOpt = False,
) -> None:
    """Turn mini-swe-agent trajectories into events on the log (deterministic ids: importing twice
    changes no projection)."""
    from confluent_kafka.admin import AdminClient

    from streams.catalogue import CATALOGUE, ensure_topics

    settings, serde = context()
    if topic in CATALOGUE:
        ensure_topics(AdminClient(settings.kafka.librdkafka()), [topic])
    report = import_runs(settings, serde, directory, topic)
    if as_json:
        emit_json(report)
        return
    out.print(
        f"imported {report['runs']} run(s), {report['events']:,} events to {topic} in {report['seconds']} s"
    )
    for p in report["problems"]:
        err.print(
            f"[yellow]skipped[/yellow] {escape(str(p['path']))}: {escape(str(p['reason']))}", highlight=False
        )


@clear_errors
def project(
    until_caught_up: Annotated[
        bool, typer.Option(help="Exit once the views have caught up with the log.")
    ] = False,
    topic: Annotated[
        str, typer.Option(help="Topic of agent events.", envvar="BACKBONE_AGENT_TOPIC")
    ] = "agent.events",
    group: Annotated[
        str | None,
        typer.Option(help="Consumer group (default projection-agent_runs).", envvar="BACKBONE_GROUP"),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Most records per transaction.", envvar="BACKBONE_BATCH_SIZE")
    ] = PROJECTION_BATCH_SIZE,
    dlq_topic: Annotated[
        str, typer.Option(help="Dead-letter topic.", envvar="BACKBONE_DLQ_TOPIC")
    ] = DLQ_TOPIC,
    metrics_port: Annotated[
        int, typer.Option(help="Port of /metrics and /healthz (0: any).", envvar="BACKBONE_METRICS_PORT")
    ] = 0,
) -> None:
    """Run the projection runner (agent-run views) until interrupted."""
    from core.observability import serve_metrics
    from projections.agent_runs import AgentRunsProjection
    from projections.runner import ProjectionRunner

    settings, serde = context()
    runner = ProjectionRunner(
        settings,
        serde,
        AgentRunsProjection([topic]),
        group_id=group,
        batch_size=batch_size,
        dlq_topic=dlq_topic,
    )
    server = serve_metrics(metrics_port, health=lambda: {"ok": True, "caught_up": runner.caught_up()})
    err.print(f"metrics on http://127.0.0.1:{server.server_address[1]}/metrics")
    stop_on_signals(runner.stop)  # SIGTERM/SIGINT: the runner commits its batch and returns
    try:
        stats = runner.run(until_caught_up=until_caught_up)
    finally:
        server.shutdown()
    out.print(f"applied {stats.applied:,} event(s), skipped {stats.duplicates:,} duplicate(s), "
              f"dead-lettered {stats.dead_lettered}")  # fmt: skip


@query_app.command("agent-runs")
@clear_errors
def query_agent_runs(
    limit: Annotated[int, typer.Option(help="Most rows.")] = 1000,
    outcome: Annotated[str | None, typer.Option(help="RESOLVED, UNRESOLVED or UNKNOWN.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Per-run view: steps, calls, tokens, cost (USD) and outcome."""
    import psycopg

    from projections import queries

    settings, _ = context(kafka=False)
    with psycopg.connect(settings.postgres.dsn(), connect_timeout=5) as conn:
        rows = queries.agent_runs(conn, limit=limit, outcome=outcome)
    cols = [
        "run_id",
        "outcome",
        "steps",
        "llm_calls",
        "tool_calls",
        "failing_tool_calls",
        "prompt_tokens",
        "cost_usd",
    ]
    print_rows(rows, cols, "agent runs", as_json)


@query_app.command("models")
@clear_errors
def query_models(as_json: JsonOpt = False) -> None:
    """Per-model view: runs, resolved runs, calls, tokens, cost (USD)."""
    import psycopg

    from projections import queries

    settings, _ = context(kafka=False)
    with psycopg.connect(settings.postgres.dsn(), connect_timeout=5) as conn:
        rows = queries.model_usage(conn)
    cols = [
        "model",
        "providers",
        "runs",
        "resolved_runs",
        "llm_calls",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
    ]
    print_rows(rows, cols, "models", as_json)

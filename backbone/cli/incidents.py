"""``backbone import nezha DIR``, ``backbone eval incidents --data DIR``, ``backbone query
incidents|anomalies|correlations`` and ``backbone audit incident:<id>``.

The queries and the audit read the ``incidents`` projection (:mod:`projections.incidents`, PostgreSQL
schema ``proj_incidents``; ``backbone projections run incidents`` fills it), not the log.

Mounting (done by the integrator in the CLI package): register :func:`import_nezha` as
``import nezha``, :func:`eval_incidents` as ``eval incidents``, :func:`query_incidents`,
:func:`query_anomalies` and :func:`query_correlations` under ``query``; ``backbone audit`` hands an
``incident:<id>`` entity to :func:`audit_incident`. :data:`app` groups them under ``import`` / ``eval`` /
``query`` for tests.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from backbone.cli.helpers import clear_errors, emit_json, print_cells

__all__ = [
    "app",
    "audit_incident",
    "eval_incidents",
    "import_nezha",
    "incident_lines",
    "query_anomalies",
    "query_correlations",
    "query_incidents",
    "run_import",
]

out = Console()
err = Console(stderr=True)

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print JSON instead of a table.", envvar="BACKBONE_JSON")
]

app = typer.Typer(help="Incidents on telemetry: import Nezha days, evaluate, query.", no_args_is_help=True)
import_app = typer.Typer(help="Import history as events.", no_args_is_help=True)
eval_app = typer.Typer(help="Scores on labelled data.", no_args_is_help=True)
query_app = typer.Typer(help="Read insights.", no_args_is_help=True)
processors_incidents_app = typer.Typer(help="Run the incident processor.", no_args_is_help=True)
app.add_typer(import_app, name="import")
app.add_typer(eval_app, name="eval")
app.add_typer(query_app, name="query")

_IMPORTER = "import-nezha"


def run_import(settings: Any, serde: Any, directory: Path, *, progress: bool = True) -> dict[str, Any]:
    """Parse the Nezha day(s) under ``directory``, produce every event to its telemetry topic and every
    bad record to the dead-letter topic; return the import report (counts, ``seconds``, ``by_topic``).

    Raises:
        connectors.nezha.NezhaImportError: ``directory`` holds no Nezha day.
        streams.errors.DeliveryError / BrokerUnavailableError: records were not acknowledged.
    """
    from confluent_kafka.admin import AdminClient

    from connectors.nezha import TOPIC_LOGS, TOPIC_METRICS, TOPIC_SPANS, ImportReport, day_folders, iter_day
    from streams.catalogue import ensure_topics
    from streams.consumer import DLQ_TOPIC, DeadLetterPublisher
    from streams.producer import EventProducer

    day_folders(directory)  # fail before touching the broker
    ensure_topics(
        AdminClient(settings.kafka.librdkafka()), [TOPIC_METRICS, TOPIC_LOGS, TOPIC_SPANS, DLQ_TOPIC]
    )
    producer = EventProducer(settings.kafka, serde)
    dlq = DeadLetterPublisher(producer, _IMPORTER, DLQ_TOPIC)
    report = ImportReport()
    by_topic: Counter[str] = Counter()
    start = time.perf_counter()
    with Progress(
        TextColumn("importing Nezha"), BarColumn(), TextColumn("{task.completed:,} events"), TimeElapsedColumn(),
        console=err, disable=not progress or not err.is_terminal,
    ) as bar:  # fmt: skip
        task = bar.add_task("import", total=None)
        for topic, event in iter_day(directory, report):
            producer.produce(topic, event)
            by_topic[topic] += 1
            if by_topic.total() % 1000 == 0:
                bar.update(task, completed=by_topic.total())
        bar.update(task, completed=by_topic.total())
    for b in report.bad:
        dlq.publish(
            source_topic=f"file:{b.path}", partition=-1, offset=b.line, key=None, value=b.raw, headers=[],
            reason=b.reason, error_type=f"Nezha{b.kind.capitalize()}RecordError",
        )  # fmt: skip
    producer.close()  # not left to the collector: a producer outliving its broker logs "Connection refused"
    result = report.as_dict()
    result["by_topic"] = dict(sorted(by_topic.items()))
    result["dead_letter_topic"] = DLQ_TOPIC
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


@import_app.command("nezha")
@clear_errors
def import_nezha(
    directory: Annotated[
        Path, typer.Argument(help="A Nezha day folder (metric/, log/, trace/) or a folder of them.")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Import Nezha TrainTicket telemetry (metrics, logs, spans) with deterministic ids; fault_list.json
    is ground truth and is not imported."""
    from backbone.cli.helpers import context as _ctx
    from connectors.nezha import day_folders

    day_folders(directory)  # a wrong folder is one clear line, before any broker is looked for
    settings, serde = _ctx()
    report = run_import(settings, serde, directory, progress=not as_json)
    if as_json:
        emit_json(report)
        return
    out.print(
        f"imported {report['metric_samples']:,} metric samples, {report['log_lines']:,} log lines and "
        f"{report['spans']:,} spans of {', '.join(report['days'])} in {report['seconds']} s "
        f"({report['duplicates']:,} repeated records skipped, {report['dead_lettered']} dead-lettered)"
    )
    for b in report["bad_records"]:
        err.print(f"[yellow]dead-lettered[/yellow] {b['path']}:{b['line']}: {b['reason']}", highlight=False)


@eval_app.command("incidents")
@clear_errors
def eval_incidents(
    data: Annotated[
        Path, typer.Option("--data", help="A Nezha day folder or a folder of them (with fault_list.json).")
    ],
    per_fault: Annotated[bool, typer.Option(help="Also list every fault (JSON: always included).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Score incident detection and root-cause ranking against the injected faults (no broker needed)."""
    from processors.incidents.eval_nezha import evaluate

    result = evaluate(data)
    if as_json:
        emit_json(result)
        return
    cols = ["set", "faults", "detected", "within 180 s", "median s", "top1", "top3", "top1 svc", "top3 svc"]
    cells = []
    for name, s in (("all", result), ("with logs/traces", result["with_logs_or_traces"]),
                    ("metrics only", result["metrics_only"])):  # fmt: skip
        med = s["median_detection_seconds"]
        cells.append([
            name, str(s["faults"]), f"{s['detected']:.1%}", f"{s['detected_within_180s']:.1%}",
            "-" if med is None else f"{med:g}", f"{s['top1']:.1%}", f"{s['top3']:.1%}",
            f"{s['top1_service']:.1%}", f"{s['top3_service']:.1%}",
        ])  # fmt: skip
    print_cells(cells, cols, f"incidents on {data}", right=set(cols[1:]))
    out.print(
        f"{result['incidents']} incidents, {result['false_incidents']} matched no fault "
        f"({result['false_incidents_per_hour']} per hour over {result['telemetry_hours']} h); "
        "anchor (Nezha paper, TrainTicket): top-1 86.67 %, top-3 97.78 %"
    )
    ch = result["chance"]
    out.print(
        f"chance (fault times moved by {', '.join(f'{s:+d}' for s in ch['shifts_minutes'])} min): "
        f"detected {ch['detected']:.1%}, within 180 s {ch['detected_within_180s']:.1%}, "
        f"top1 {ch['top1']:.1%}, top3 {ch['top3']:.1%}"
    )
    if per_fault:
        cols = ["injected", "pod", "type", "logs/traces", "detected s", "rank pod", "top-1 pod"]
        print_cells([[r["inject_time"], r["pod"], r["kind"], "yes" if r["logs_or_traces"] else "",
                      "-" if r["detection_seconds"] is None else f"{r['detection_seconds']:g}",
                      str(r["rank_pod"] or "-"), r["top1_pod"] or "-"] for r in result["per_fault"]],
                    cols, "faults", right={"detected s", "rank pod"})  # fmt: skip


def _view(read: Any) -> Any:
    """Run ``read(conn)`` on the incident projection's tables (PostgreSQL only, no broker).

    Raises:
        ValueError: the ``incidents`` projection has not run yet (no tables).
    """
    import psycopg

    from backbone.cli.helpers import context as _ctx

    settings, _ = _ctx(kafka=False)
    with psycopg.connect(settings.postgres.dsn(), connect_timeout=5) as conn:
        try:
            return read(conn)
        except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
            raise ValueError(
                "the incidents projection has not run yet: `backbone projections run incidents`"
            ) from None


@query_app.command("incidents")
@clear_errors
def query_incidents(
    status: Annotated[str | None, typer.Option(help="open or closed (default: both).")] = None,
    limit: Annotated[int, typer.Option(help="Most incidents shown.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Incidents from the ``incidents`` projection, newest first: when opened and closed (event time),
    priority, services, and the ranked root-cause candidates with their score and evidence (JSON: the
    whole row, see :func:`projections.incidents.list_incidents`)."""
    from projections.incidents import list_incidents

    rows = _view(lambda conn: list_incidents(conn, status=status, limit=limit))
    if as_json:
        emit_json(rows)
        return
    for line in incident_lines(rows):
        out.print(line, markup=False, highlight=False, soft_wrap=True)


def _utc(iso: str | None) -> str:
    """``2023-01-29T08:59:00.000Z`` as ``2023-01-29 08:59:00`` (the views' UTC times, to the second)."""
    return iso[:19].replace("T", " ") if iso else "-"


def incident_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The text ``backbone query incidents`` prints for ``rows`` (:func:`projections.incidents.list_incidents`
    rows): per incident a block, like ``git log``'s, not a table, so the whole incident id (what ``backbone
    audit incident:<id>`` takes) and the pod names survive a terminal of 80 columns: the id, status,
    priority, anomalies and services; the first anomaly's window and the close (event time, UTC, to the
    second); the three top root-cause candidates (rank, pod, service, score)."""

    def when(iso: str) -> str:
        return f"{_utc(iso)} UTC"

    if not rows:
        return ["no incidents"]
    lines = [f"{len(rows)} incident(s), newest first; `backbone audit incident:<id>` shows one's chain"]
    for r in rows:
        closed = f"closed {when(r['closed_at'])}" if r["closed_at"] else "not closed yet"
        lines += [
            "",
            f"{r['incident_id']}  {r['status']}  {r['priority']}  {r['anomalies_count']} anomalies, "
            f"{len(r['services'])} service(s)",
            f"  first anomaly in the window of {when(r['first_anomaly_at'])}, {closed}",
        ]
        causes = [
            f"  {c['rank']}. {c['pod']} ({c['service']}), score {c['score']}" for c in r["candidates"][:3]
        ]
        lines += causes or ["  no root-cause candidates"]
    return lines


@query_app.command("anomalies")
@clear_errors
def query_anomalies(
    series: Annotated[str | None, typer.Option(help="Only this series, e.g. pod:<pod>/<metric>.")] = None,
    limit: Annotated[int, typer.Option(help="Most alerts shown.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Anomaly alerts (``anomaly.detected``) from the ``incidents`` projection, newest first: series, event
    time, score (0..1), value, the window it summarises and the detector version."""
    from projections.incidents import list_anomalies

    rows = _view(lambda conn: list_anomalies(conn, series=series, limit=limit))
    if as_json:
        emit_json(rows)
        return
    if not rows:
        out.print("no anomalies")
        return
    table = Table(title="anomalies (times UTC)")
    for name in ("series", "event time", "score", "value", "window start", "detector"):
        table.add_column(name, overflow="fold")  # folded, not cut: a series name is what --series takes
    for r in rows:
        table.add_row(escape(r["series"]), _utc(r["event_time"]), f"{r['score']:.6f}", f"{r['value']:g}", _utc(r["window_start"]),
                      r["detector_version"])  # fmt: skip
    out.print(table)


@query_app.command("correlations")
@clear_errors
def query_correlations(
    entity: Annotated[str | None, typer.Option(help="Only links of this commit or message entity.")] = None,
    limit: Annotated[int, typer.Option(help="Most links shown.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Correlation links (``correlation.link``) from the ``incidents`` projection, newest first: the commit
    (entity), the message, the method, the sources and the lag in seconds (message minus commit)."""
    from projections.incidents import list_correlations

    rows = _view(lambda conn: list_correlations(conn, entity=entity, limit=limit))
    if as_json:
        emit_json(rows)
        return
    if not rows:
        out.print("no correlation links")
        return
    table = Table(title="correlations (times UTC)")
    for name in ("commit", "message", "method", "sources", "lag s", "event time"):
        table.add_column(name, overflow="fold")  # folded, not cut: an entity is what --entity takes
    for r in rows:
        table.add_row(escape(r["entity"]), escape(r["message_entity"]), r["method"], f"{r['source_a']} -> {r['source_b']}",
                      f"{r['lag_seconds']:g}", _utc(r["event_time"]))  # fmt: skip
    out.print(table)


def audit_incident(entity: str, *, as_json: bool = False) -> None:
    """``backbone audit incident:<id>``: the chain from the incident's first anomaly to its ranked causes
    (:func:`projections.incidents.incident_audit`), as a tree or JSON.

    Raises:
        ValueError: the projection has not run yet.
        typer.Exit: (code 1) no such incident.
    """
    from rich.tree import Tree

    from projections.incidents import incident_audit

    e = escape  # rich markup in data (e.g. a logger named "[dispatcherServlet]") is text, not style
    found = _view(lambda conn: incident_audit(conn, entity))
    if found is None:
        err.print(f"no incident {entity!r} in the incidents projection", markup=False)
        raise typer.Exit(1)
    if as_json:
        emit_json(found)
        return
    inc = found["incident"]
    tree = Tree(
        f"[bold]{e(inc['entity'])}[/bold] ({inc['status']}, {e(inc['priority'])}): {e(inc['summary'])}\n"
        f"first anomaly {inc['first_anomaly_at']}, opened {inc['opened_at'] or '-'}, closed {inc['closed_at'] or '-'}"
    )
    steps = found["chain"]
    anomalies = tree.add(
        f"anomalies that joined it ({sum(s['step'] == 'anomaly' for s in steps)}, in event time)"
    )
    alerts = tree.add("anomaly-processor alerts on its pods")
    causes = tree.add("ranked root-cause candidates")
    changes = tree.add("suspect changes")
    for s in steps:
        if s["step"] == "anomaly":
            detail = f" ({s['detail']})" if s["detail"] else ""
            anomalies.add(e(f"{s['window_start']} {s['pod']} {s['signal']} score {s['score']:.1f}: "
                            f"{s['value']:g} vs median {s['baseline']:g}{detail}")
                          + f" [dim]joined {s['joined_at']}[/dim]")  # fmt: skip
        elif s["step"] == "alert":
            alerts.add(e(f"{s['event_time']} {s['series']} score {s['score']:.6f} value {s['value']:g}"))
        elif s["step"] == "candidate":
            node = causes.add(
                f"{s['rank']}. [bold]{e(s['pod'])}[/bold] ({e(s['service'])}) score {s['score']}"
            )
            for line in s["evidence"]:
                node.add(e(line))
        else:
            rank = s.get("candidate_rank")
            changes.add(
                e(f"{s.get('changed_at', '?')} {s.get('change_kind', '?')}: {s.get('summary', '')}")
                + f" [dim]{s.get('lead_seconds', '?')} s before the first anomaly; services "
                + e(", ".join(s.get("services") or []))
                + (f"; candidate rank {rank}" if rank is not None else "")
                + f"; event {e(str(s.get('change_id', '?')))}[/dim]"
            )
    for node, empty in (
        (alerts, "none"),
        (causes, "none"),
        (changes, "none carried by the incident insights"),
    ):
        if not node.children:
            node.add(f"[dim]{empty}[/dim]")
    out.print(tree)


@processors_incidents_app.command("incidents")
@clear_errors
def run_incidents(
    stop_after_idle: Annotated[
        float | None,
        typer.Option(
            help="Stop once started and idle this many seconds.",
            envvar="BACKBONE_INCIDENTS_STOP_AFTER_IDLE_SECONDS",
        ),
    ] = None,
    close_at_end: Annotated[
        bool,
        typer.Option(
            "--close-at-end",
            help="With --stop-after-idle: at the idle stop, process the windows the watermark has not passed "
            "and close the open incident, as at the end of event time (a replay of a finished history, not a "
            "live group).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the incident processor (telemetry topics -> ``insights.incidents``) until stopped or idle; print
    its counters (with ``--json`` also ``first_record_monotonic`` / ``last_record_monotonic``,
    ``time.monotonic()`` of the first and last record handled by either agent)."""
    import dataclasses

    from processors.incidents.app import run_incidents_worker

    if close_at_end and stop_after_idle is None:
        raise typer.BadParameter(
            "--close-at-end needs --stop-after-idle: the end of the input is the idle stop"
        )
    stats = run_incidents_worker(stop_after_idle_seconds=stop_after_idle, close_at_end=close_at_end)
    result = dataclasses.asdict(stats)
    if as_json:
        emit_json(result)
    else:
        out.print({k: v for k, v in result.items() if not k.endswith("_record_monotonic")})

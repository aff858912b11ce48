"""``backbone import nezha DIR``, ``backbone eval incidents --data DIR`` and ``backbone query incidents``.

Mounting (done by the integrator in the CLI package): register :func:`import_nezha` as
``import nezha``, :func:`eval_incidents` as ``eval incidents`` and :func:`query_incidents` as
``query incidents``. :data:`app` groups the three under ``import`` / ``eval`` / ``query`` for tests.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from backbone.cli.helpers import clear_errors, emit_json

__all__ = ["app", "eval_incidents", "import_nezha", "query_incidents", "run_import"]

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
    producer.flush()
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
    table = Table(title=f"incidents on {data}")
    for col in (
        "set",
        "faults",
        "detected",
        "within 180 s",
        "median s",
        "top1",
        "top3",
        "top1 svc",
        "top3 svc",
    ):
        table.add_column(col, justify="left" if col == "set" else "right")
    for name, s in (("all", result), ("with logs/traces", result["with_logs_or_traces"]),
                    ("metrics only", result["metrics_only"])):  # fmt: skip
        med = s["median_detection_seconds"]
        table.add_row(
            name, str(s["faults"]), f"{s['detected']:.1%}", f"{s['detected_within_180s']:.1%}",
            "-" if med is None else f"{med:g}", f"{s['top1']:.1%}", f"{s['top3']:.1%}",
            f"{s['top1_service']:.1%}", f"{s['top3_service']:.1%}",
        )  # fmt: skip
    out.print(table)
    out.print(
        f"{result['incidents']} incidents, {result['false_incidents']} matched no fault "
        f"({result['false_incidents_per_hour']} per hour over {result['telemetry_hours']} h); "
        "anchor (Nezha paper, TrainTicket): top-1 86.67 %, top-3 97.78 %"
    )
    if per_fault:
        rows = Table("injected", "pod", "type", "logs/traces", "detected s", "rank pod", "top-1 pod")
        for r in result["per_fault"]:
            rows.add_row(r["inject_time"], r["pod"], r["kind"], "yes" if r["logs_or_traces"] else "",
                         "-" if r["detection_seconds"] is None else f"{r['detection_seconds']:g}",
                         str(r["rank_pod"] or "-"), r["top1_pod"] or "-")  # fmt: skip
        out.print(rows)


@query_app.command("incidents")
@clear_errors
def query_incidents(
    topic: Annotated[str, typer.Option(help="Insight topic to read.")] = "insights.incidents",
    limit: Annotated[int, typer.Option(help="Most incidents shown.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """The closed incidents on the insight topic with their ranked causes (read from the log; there is no
    incident projection yet)."""
    from backbone.cli.helpers import context as _ctx
    from streams.replay import read_range

    settings, serde = _ctx()
    rows = []
    for r in read_range(settings.kafka, serde, topic):
        data = getattr(r, "data", None)
        if not isinstance(data, dict) or data.get("kind") != "incident.closed":
            continue
        cands = json.loads(data["labels"].get("candidates", "[]"))
        rows.append({
            "incident": data["entity"], "event_time": data["event_time"], "summary": data["summary"],
            "candidates": [f"{c['rank']}. {c['pod']} ({c['score']})" for c in cands[:3]],
        })  # fmt: skip
    rows = rows[-limit:]
    if as_json:
        emit_json(rows)
        return
    table = Table("incident", "closed at", "ranked causes", title=f"incidents on {topic}")
    for row in rows:
        table.add_row(row["incident"], str(row["event_time"]), "\n".join(row["candidates"]))
    out.print(table)


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
    as_json: JsonOpt = False,
) -> None:
    """Run the incident processor (telemetry topics -> ``insights.incidents``) until stopped or idle."""
    import dataclasses

    from processors.incidents.app import run_incidents_worker

    stats = run_incidents_worker(stop_after_idle_seconds=stop_after_idle)
    if as_json:
        emit_json(dataclasses.asdict(stats))

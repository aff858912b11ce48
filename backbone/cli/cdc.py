"""The CDC commands, mounted by :mod:`backbone.cli`: ``backbone import debezium FILE``,
``backbone query cdc [SCHEMA.TABLE]`` and the process that keeps the CDC view current,
``run_cdc`` (suggested: ``backbone cdc run``).

The path of a change: Debezium (or ``import debezium``) → raw topic ``<topic.prefix>.<schema>.<table>``
(Kafka Connect JSON) → :class:`connectors.cdc.CdcNormaliser` → ``cdc.changes``
(``sophia.cdc.RowChanged``) → :class:`projections.cdc.CdcProjection` → ``proj_cdc.cdc_rows``.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from backbone.cli.helpers import (
    SHUTDOWN_TIMEOUT_SECONDS,
    JsonOpt,
    clear_errors,
    context,
    err,
    out,
    print_cells,
    stop_on_signals,
)
from streams.catalogue import DLQ_TOPIC

# connectors.cdc (psycopg, the projection) is imported by the commands that use it, not by every ``backbone``
# call; these mirror connectors.cdc.CHANGES_TOPIC and DEFAULT_TOPIC_PREFIX (a unit test checks)
CHANGES_TOPIC = "cdc.changes"
DEFAULT_TOPIC_PREFIX = "cdc"

__all__ = ["import_debezium", "query_cdc", "run_cdc"]


PrefixOpt = Annotated[
    str,
    typer.Option(
        help="Debezium's topic.prefix: raw topics are <prefix>.<schema>.<table>.",
        envvar="BACKBONE_CDC_TOPIC_PREFIX",
    ),
]
KeyColumnsOpt = Annotated[
    list[str] | None,
    typer.Option("--key-column", help="Primary-key column, in key order; repeat for a composite key (default: id).",
                 envvar="BACKBONE_CDC_KEY_COLUMNS"),
]  # fmt: skip


@clear_errors
def import_debezium(
    file: Annotated[
        Path,
        typer.Argument(
            help="JSON lines of Debezium change event values (with or without the Connect schema wrapper)."
        ),
    ],
    topic: Annotated[
        str | None,
        typer.Option(
            help="One topic for every record (default: <prefix>.<schema>.<table>).",
            envvar="BACKBONE_CDC_TOPIC",
        ),
    ] = None,
    topic_prefix: PrefixOpt = DEFAULT_TOPIC_PREFIX,
    key_columns: KeyColumnsOpt = None,
    partitions: Annotated[
        int, typer.Option(help="Partitions of raw topics this creates.", envvar="BACKBONE_CDC_PARTITIONS")
    ] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Put recorded Debezium change events on the raw CDC topics exactly as Kafka Connect's JsonConverter
    would: the value unchanged, the primary-key struct as the key, a tombstone after each delete."""
    from connectors.cdc import import_debezium_file

    settings, _ = context(kafka=False)
    report = import_debezium_file(
        settings, file, topic_prefix=topic_prefix, topic=topic, key_columns=tuple(key_columns or ("id",)),
        partitions=partitions,
    )  # fmt: skip
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
        return
    where = ", ".join(f"{t} ({n})" for t, n in sorted(report.topics.items())) or "no topic"
    out.print(f"imported {report.records} record(s) ({report.tombstones} tombstone(s)) from {report.lines} line(s) "
              f"to {where} in {report.seconds} s")  # fmt: skip
    for p in report.problems:
        what = "sent as is" if p.sent else "skipped"
        err.print(f"[yellow]line {p.line} {what}:[/yellow] {p.reason}", highlight=False)


def fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, dict | list):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


@clear_errors
def query_cdc(
    table: Annotated[
        str | None,
        typer.Argument(help="SCHEMA.TABLE as captured, e.g. inventory.products; none lists the tables."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The current rows of a table captured by Debezium (deletes applied), from the cdc projection."""
    import psycopg

    from projections.cdc import table_rows, tables

    settings, _ = context(kafka=False)
    try:
        with psycopg.connect(settings.postgres.dsn()) as conn:
            if table is None:
                listing = tables(conn)
                if as_json:
                    out.print_json(json.dumps(listing))
                    return
                cells = [[r["table"], str(r["rows"]), ", ".join(r["columns"])] for r in listing]
                print_cells(cells, ["table", "rows", "columns"], "captured tables", right={"rows"})
                return
            columns, rows = table_rows(conn, table)
    except psycopg.errors.UndefinedTable as exc:
        raise ValueError(
            "the cdc projection has not run yet: run the CDC normaliser and projection first"
        ) from exc
    if as_json:
        out.print_json(json.dumps(rows, ensure_ascii=False))
        return
    numeric = {c for c in columns
               if rows and all(isinstance(r.get(c), int | float) for r in rows if r.get(c) is not None)}  # fmt: skip
    print_cells([[fmt(r.get(c)) for c in columns] for r in rows], columns, f"{table} ({len(rows)} row(s))",
                right=numeric)  # fmt: skip


@clear_errors
def run_cdc(
    until_caught_up: Annotated[
        bool, typer.Option(help="Exit once the view has caught up with the raw topics.")
    ] = False,
    topics: Annotated[
        list[str] | None,
        typer.Option(
            "--topic",
            help="Raw topic to read (repeat); default: every <prefix>.<schema>.<table>.",
            envvar="BACKBONE_CDC_TOPICS",
        ),
    ] = None,
    topic_prefix: PrefixOpt = DEFAULT_TOPIC_PREFIX,
    changes_topic: Annotated[
        str, typer.Option(help="Topic of the typed RowChanged events.", envvar="BACKBONE_CDC_CHANGES_TOPIC")
    ] = CHANGES_TOPIC,
    key_columns: KeyColumnsOpt = None,
    group: Annotated[
        str, typer.Option(help="Consumer group of the normaliser.", envvar="BACKBONE_CDC_GROUP")
    ] = "cdc-normaliser",
    projection_group: Annotated[
        str | None,
        typer.Option(
            help="Consumer group of the projection (default projection-cdc).",
            envvar="BACKBONE_CDC_PROJECTION_GROUP",
        ),
    ] = None,
    dlq_topic: Annotated[
        str, typer.Option(help="Dead-letter topic.", envvar="BACKBONE_DLQ_TOPIC")
    ] = DLQ_TOPIC,
    max_wait_seconds: Annotated[
        float,
        typer.Option(
            help="With --until-caught-up: give up after this many seconds.",
            envvar="BACKBONE_CDC_MAX_WAIT_SECONDS",
        ),
    ] = 120.0,
) -> None:
    """Normalise raw Debezium topics to RowChanged events and keep the cdc table-state view current."""
    from connectors.cdc import CdcNormaliser, ensure_changes_topic, raw_topic_pattern
    from projections.cdc import CdcProjection
    from projections.runner import ProjectionRunner

    settings, serde = context(kafka=False)
    ensure_changes_topic(settings, changes_topic)
    normaliser = CdcNormaliser(
        settings, serde, topics=topics or None, pattern=raw_topic_pattern(topic_prefix), output_topic=changes_topic,
        group_id=group, dlq_topic=dlq_topic, key_columns=tuple(key_columns or ("id",)),
    )  # fmt: skip
    runner = ProjectionRunner(
        settings, serde, CdcProjection([changes_topic]), group_id=projection_group, dlq_topic=dlq_topic
    )
    wait = max_wait_seconds if until_caught_up else None
    if until_caught_up:
        n = normaliser.run(until_caught_up=True, max_wait_seconds=wait)
        p = runner.run(until_caught_up=True, max_wait_seconds=wait)
    else:
        thread = threading.Thread(target=normaliser.run, name="cdc-normaliser", daemon=True)
        stop_on_signals(runner.stop, normaliser.stop)  # SIGTERM/SIGINT: both commit their batch and return
        thread.start()
        try:
            p = runner.run()
        finally:
            normaliser.stop()
            thread.join(timeout=SHUTDOWN_TIMEOUT_SECONDS)
        n = normaliser.stats
    out.print(f"normalised {n.produced} change(s) ({n.tombstones} tombstone(s), {n.dead_lettered} dead-lettered); "
              f"view applied {p.applied}, skipped {p.duplicates} duplicate(s), dead-lettered {p.dead_lettered}")  # fmt: skip

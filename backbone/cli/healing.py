"""CLI of healing: ``healing status``, ``healing ack``, ``eval healing`` and ``eval outage``.

Mount (see the report): ``app`` as ``backbone healing``; :func:`eval_healing` as ``backbone eval
healing`` and :func:`eval_outage` as ``backbone eval outage``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from backbone.cli.helpers import JsonOpt, clear_errors, emit_json, print_cells

__all__ = [
    "app",
    "eval_app",
    "eval_healing",
    "eval_outage",
    "heal_app",
    "healing_ack",
    "healing_audit",
    "healing_status",
    "processors_heal",
]

app = typer.Typer(help="Healing: circuits, warnings and escalations.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluations of healing on real agent runs.", no_args_is_help=True)
heal_app = typer.Typer(help="The healer worker.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

DataOpt = Annotated[
    Path,
    typer.Option(
        "--data", help="mini-swe-agent results folder with results.csv (e.g. ../shared/data/agent_runs)."
    ),
]


def _read_model() -> Any:
    import redis

    from backbone.cli.helpers import settings_only
    from processors.healing.read_model import HealingReadModel

    settings = settings_only()
    try:
        client = redis.Redis.from_url(settings.redis.dsn(), socket_timeout=0.5, socket_connect_timeout=0.5)
    except ValueError:
        client = None  # no Redis configured: PostgreSQL only
    model = HealingReadModel(settings.postgres.dsn(), client)
    model.ensure_schema()
    return model


def _require_dir(data: Path) -> None:
    if not data.is_dir():
        raise ValueError(
            f"--data {data}: no such directory (a mini-swe-agent results folder with results.csv)"
        )


def _table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    print_cells([["" if r.get(c) is None else str(r.get(c)) for c in columns] for r in rows], columns, title)


@app.command("status")
@clear_errors
def healing_status(as_json: JsonOpt = False) -> None:
    """Every circuit and its state, open warnings and pending escalations (from the read model)."""
    status = _read_model().status()
    if as_json:
        emit_json(status)
        return
    _table("circuits", status["circuits"], ["circuit", "state", "changed_at", "config_version"])
    _table("open warnings", status["warnings"], ["run_id", "signal", "level", "step", "raised_at"])
    _table("pending escalations", status["escalations"], ["id", "subject", "raised_at", "reason"])


@app.command("ack")
@clear_errors
def healing_ack(
    escalation_id: Annotated[str, typer.Argument(help="The escalation's id (healing status).")],
    by: Annotated[str, typer.Option("--by", help="Who takes it.")],
    note: Annotated[str, typer.Option("--note", help="What they will do.")],
    acks_topic: Annotated[str, typer.Option(help="Topic the healer reads acks from.")] = "healing.acks",
    as_json: JsonOpt = False,
) -> None:
    """A person takes an escalation: records ``escalation_acked`` in the read model's audit trail and
    publishes it on the acks topic, where the healer worker reads it and releases what waited for it
    (the rollback of an approval-mode escalation, carried out and audited like an automatic one).

    Raises (exit 2): unknown id, an escalation already acked, or empty --by / --note; exit 1 when the
    ack was recorded but could not be published (the message says so).
    """
    from backbone.cli.helpers import settings_only
    from processors.healing.decisions import Decision
    from streams.producer import EventProducer
    from streams.serde import serde_from_settings

    if not by.strip() or not note.strip():
        raise ValueError("--by and --note must not be empty")
    model = _read_model()
    row = model.escalation(escalation_id)
    if row is None:
        raise KeyError(f"no escalation {escalation_id!r}; see `backbone healing status`")
    if row["acked_at"] is not None:
        raise ValueError(
            f"escalation {escalation_id} was already acked by {row['acked_by']} at {row['acked_at']}"
        )
    now = datetime.now(UTC)  # a person's act: its event time is when they did it
    d = Decision(
        kind="escalation_acked",
        subject=row["subject"],
        event_time=now.replace(microsecond=now.microsecond // 1000 * 1000),  # Avro timestamp-millis
        config_version=0,
        causation_id=escalation_id,
        details={"escalation_id": escalation_id, "by": by, "note": note},
    )
    # recorded first, so the audit lists the ack before what the healer does on reading it
    model.apply([d])
    settings = settings_only()
    try:
        with EventProducer(settings.kafka, serde_from_settings(settings)) as producer:
            producer.produce(acks_topic, d.to_event())
            producer.flush()
    except Exception as exc:  # noqa: BLE001 - whatever failed, the person must know the healer did not get it
        err.print(
            f"[red]error:[/red] escalation {escalation_id} is recorded as acked but the ack did not reach "
            f"{acks_topic} ({exc}); the healer will not act on it",
            highlight=False,
        )
        raise typer.Exit(1) from None
    if as_json:
        emit_json(d.as_json())
    else:
        out.print(f"escalation {escalation_id} acked by {by}; sent to the healer on {acks_topic}")


@app.command("audit")
@clear_errors
def healing_audit(
    subject: Annotated[
        str, typer.Argument(help="circuit:provider:P, circuit:model:P/M, config:KEY, run:ID or request:ID.")
    ],
    as_json: JsonOpt = False,
) -> None:
    """The chain of decisions about one subject, in event-time order (failures -> opened -> half-open -> closed;
    change -> evidence -> rollback)."""
    rows = _read_model().audit(subject)
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        r["reason"] = r["details"].get("reason") or (r["details"].get("evidence") or {}).get("why") or ""
    _table(f"audit {subject}", rows, ["event_time", "kind", "id", "causation_id", "config_version", "reason"])


@eval_app.command("healing")
@clear_errors
def eval_healing(
    data: DataOpt,
    min_level: Annotated[str, typer.Option(help="Lowest warning level that flags a run.")] = "warn",
    split: Annotated[
        str | None,
        typer.Option(
            help="Also score two folds, each replayed alone: 'time' (by start time) or 'id' (run-id hash)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Early warnings on real agent runs (replayed in event-time order) versus a step-count baseline."""
    from processors.healing.evaluation import evaluate_early_warnings

    _require_dir(data)
    r = evaluate_early_warnings(data, min_level=min_level, split=split)
    if as_json:
        emit_json(r)
        return
    rows = []
    parts = [("all", r), *((f"{split} {i + 1}", f) for i, f in enumerate(r.get("folds", [])))]
    for runs, table in parts:
        for name, part in (("healer", table), ("baseline", table["baseline"])):
            rows.append({"runs": runs, "policy": name, "point": "before last step", "flagged": part["flagged"],
                         "precision": part["precision"], "recall": part["recall"], "f1": part["f1"],
                         "median_lead_steps": part["median_lead_steps"],
                         "median_lead_seconds": part["median_lead_seconds"]})  # fmt: skip
            m = part["midpoint"]
            rows.append({"runs": runs, "policy": name, "point": "by midpoint", "flagged": m["flagged"],
                         "precision": m["precision"], "recall": m["recall"], "f1": m["f1"]})  # fmt: skip
    _table(f"early warnings: {r['runs']} runs, {r['unresolved']} unresolved", rows,
           ["runs", "policy", "point", "flagged", "precision", "recall", "f1", "median_lead_steps",
            "median_lead_seconds"])  # fmt: skip


@eval_app.command("outage")
@clear_errors
def eval_outage(
    data: DataOpt,
    provider: Annotated[str | None, typer.Option(help="Provider that fails (default: the busiest).")] = None,
    failure_rate: Annotated[float, typer.Option(help="Probability an attempt fails while down.")] = 0.8,
    start_offset_seconds: Annotated[
        float, typer.Option(help="Outage start after the provider's first call.")
    ] = 600.0,
    duration_seconds: Annotated[float, typer.Option(help="Outage length.")] = 900.0,
    seed: Annotated[int, typer.Option(help="Seed of the failure draws.")] = 11,
    as_json: JsonOpt = False,
) -> None:
    """An injected provider outage on the real LLM-call stream: healer breaker versus LiteLLM cooldown."""
    from processors.healing.evaluation import evaluate_outage

    _require_dir(data)
    if not 0 <= failure_rate <= 1:
        raise ValueError("--failure-rate is between 0 and 1")
    r = evaluate_outage(data, provider=provider, failure_rate=failure_rate, start_offset_seconds=start_offset_seconds,
                        duration_seconds=duration_seconds, seed=seed)  # fmt: skip
    if as_json:
        emit_json(r)
        return
    cols = ["calls_to_failing_provider_while_down", "time_to_open_seconds", "time_to_close_after_recovery_seconds",
            "requests_failed_to_caller", "served_by_fallback", "attempts"]  # fmt: skip
    o = r["outage"]
    _table(f"outage of {o['provider']} {o['from']} .. {o['until']} at {o['failure_rate']:.0%}",
           [{**r[k], "policy": k} for k in ("healer", "baseline")], ["policy", *cols])  # fmt: skip


@heal_app.command("heal")
@clear_errors
def processors_heal(
    app_id: Annotated[str, typer.Option(help="Faust app id (consumer group).")] = "backbone-healing",
    events_topic: Annotated[str, typer.Option(help="Agent events topic.")] = "agent.events",
    config_topic: Annotated[str, typer.Option(help="Config changes topic.")] = "config.changes",
    decisions_topic: Annotated[str, typer.Option(help="Where decisions go.")] = "healing.decisions",
    acks_topic: Annotated[
        str, typer.Option(help="People's acks of escalations (healing ack).")
    ] = "healing.acks",
    dlq_topic: Annotated[str, typer.Option(help="Dead-letter topic.")] = "backbone.dlq",
    thresholds: Annotated[
        str | None, typer.Option(help="Initial HealingThresholds as JSON (validated).")
    ] = None,
    rollback: Annotated[bool, typer.Option(help="Carry out rollbacks through the config store.")] = True,
    webhook_kind: Annotated[str | None, typer.Option(help="slack or pagerduty.")] = None,
    webhook_url: Annotated[str | None, typer.Option(help="Webhook URL (PagerDuty: the enqueue URL).")] = None,
    routing_key: Annotated[
        str | None, typer.Option(help="PagerDuty integration key.", envvar="BACKBONE_PAGERDUTY_ROUTING_KEY")
    ] = None,
    stop_after_idle: Annotated[float | None, typer.Option(help="Stop after this many idle seconds.")] = None,
    idle_partitions: Annotated[
        str,
        typer.Option(
            help="hold: a partition's runs are judged on its own time only (decisions replay the same); "
            "follow: a partition read to its end is judged on the other partitions' time (quiet runs found "
            "sooner; a replay may decide otherwise)."
        ),
    ] = "hold",
    as_json: JsonOpt = False,
) -> None:
    """The healer worker: agent events and config changes in, decisions out (topic, read model, webhook, rollbacks)."""
    import json

    from configuration.schemas import HealingThresholds
    from processors.healing.app import IDLE_PARTITIONS, HealingTopics, run_healing_worker
    from processors.healing.healer import HealingConfig
    from processors.healing.notify import PAGERDUTY_URL, Notifier, NotifierConfig

    if idle_partitions not in IDLE_PARTITIONS:
        raise ValueError(f"--idle-partitions is one of {', '.join(IDLE_PARTITIONS)}, not {idle_partitions!r}")
    config = (
        HealingConfig(HealingThresholds.model_validate(json.loads(thresholds)), 0) if thresholds else None
    )
    notifier = None
    if webhook_kind:
        notifier = Notifier(
            NotifierConfig(kind=webhook_kind, url=webhook_url or PAGERDUTY_URL, routing_key=routing_key)
        )  # type: ignore[arg-type]
    model = _read_model()
    from backbone.cli.helpers import settings_only

    settings = settings_only()
    store = None
    if rollback:
        from configuration.store import ConfigStore

        store = ConfigStore(settings)
    topics = HealingTopics(
        events=events_topic,
        config=config_topic,
        decisions=decisions_topic,
        acks=acks_topic,
        dead_letters=dlq_topic,
    )
    stats, _healer = run_healing_worker(settings, app_id=app_id, topics=topics, config=config, read_model=model,
                                       notifier=notifier, config_store=store, stop_after_idle_seconds=stop_after_idle,
                                       idle_partitions=idle_partitions)  # type: ignore[arg-type]  # fmt: skip
    if store is not None:
        store.close()
    summary = {"records": stats.records_count, "decisions": stats.decisions_count,
               "dead_letters": stats.dead_letters_count, "rollbacks_done": stats.rollbacks_done,
               "replayed": stats.replayed_count, "state_restored": stats.restored,
               "state_writes": stats.state_writes_count, "state_bytes_max": stats.state_bytes_max,
               "batches": stats.batches_count,
               "first_record_monotonic": stats.first_record_monotonic,
               "last_record_monotonic": stats.last_record_monotonic,
               "first_record_cpu": stats.first_record_cpu, "last_record_cpu": stats.last_record_cpu}  # fmt: skip
    if as_json:
        emit_json(summary)
    else:
        out.print(summary)

"""``backbone processors worker|correlate|route``: run the processors' Faust workers.

Every option has an environment twin (shown in ``--help``); broker settings come from
``BACKBONE_KAFKA__*`` (:class:`core.settings.Settings`).
"""

from __future__ import annotations

import json
from dataclasses import asdict

import typer

from backbone.cli.correlation import correlate
from backbone.cli.routing import route_command
from streams.catalogue import DLQ_TOPIC

__all__ = ["cli"]

cli = typer.Typer(add_completion=False, help="Sophia backbone processors (Faust).")
cli.command("correlate")(correlate)


@cli.callback()
def _main() -> None:
    """Sophia backbone processors (Faust)."""


@cli.command()
def worker(
    app_id: str = typer.Option(
        "backbone-processors", envvar="BACKBONE_PROCESSORS_APP_ID", help="Faust app id / group."
    ),
    events_topic: str = typer.Option("agent.events", envvar="BACKBONE_PROCESSORS_EVENTS_TOPIC"),
    insights_topic: str = typer.Option("insights.runs", envvar="BACKBONE_PROCESSORS_INSIGHTS_TOPIC"),
    dlq_topic: str = typer.Option(DLQ_TOPIC, envvar="BACKBONE_PROCESSORS_DLQ_TOPIC"),
    partitions: int = typer.Option(
        6, envvar="BACKBONE_PROCESSORS_PARTITIONS", help="Partitions of the input topic."
    ),
    stop_after_idle: float | None = typer.Option(
        None,
        envvar="BACKBONE_PROCESSORS_STOP_AFTER_IDLE_SECONDS",
        help="Stop once started and no record arrived for this many seconds (caught up).",
    ),
    web_port: int | None = typer.Option(
        None,
        envvar="BACKBONE_PROCESSORS_WEB_PORT",
        help="Deprecated: a port other than 0 serves /metrics, /healthz and /readyz there; use BACKBONE_METRICS_PORT (0, as deployments set it, changes nothing).",
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the final counters as JSON on exit."),
) -> None:
    """Run the run-summary processor until stopped (SIGTERM/SIGINT) or idle."""
    from processors.run_summary.app import ProcessorTopics, run_worker  # Faust: only for this command

    stats = run_worker(
        app_id=app_id,
        topics=ProcessorTopics(
            events=events_topic, insights=insights_topic, dead_letters=dlq_topic, partitions=partitions
        ),
        stop_after_idle_seconds=stop_after_idle,
        web_port=web_port,
    )
    if json_output:
        typer.echo(json.dumps(asdict(stats)))


cli.command("route")(route_command)  # the routing processor (processors.routing)

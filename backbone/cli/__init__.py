"""The ``backbone`` command line (typer).

Every option has an environment twin (shown in ``--help``); every command that prints data has
``--json``. Each group lives in its own module of this package and is mounted by :func:`mount`;
:mod:`backbone.cli.helpers` holds what they share.
"""

from __future__ import annotations

import inspect
import re

import typer

__all__ = ["app", "help_text", "main", "mount", "mounted_app", "plain_help"]

app = typer.Typer(
    name="backbone",
    help="Sophia backbone: event-sourced streaming backbone for an AI-agent platform.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _setup(ctx: typer.Context) -> None:
    """Configure structlog once (to stderr) from the settings, and tracing when the ``OTEL_*`` variables
    ask for it (service ``backbone-<command>``, e.g. ``backbone-processors``; see docs/PRODUCTION.md)."""
    import structlog

    from core.observability import configure_logging
    from core.settings import get_settings
    from core.tracing import configure_tracing

    try:
        s = get_settings()
        configure_logging(s.log_level, s.log_format)
    except Exception:  # noqa: BLE001 - a bad setting is reported by the command that needs it
        configure_logging()
    try:
        configure_tracing(f"backbone-{ctx.invoked_subcommand or 'cli'}")
    except ValueError as exc:  # a bad OTEL_* value turns tracing off, not the command
        structlog.get_logger(__name__).warning("tracing_not_configured", error=str(exc))


def mount(root: typer.Typer) -> None:
    """Add every command and group of the CLI package to ``root`` (each module holds one group)."""
    from backbone.cli import (
        anomalies,
        api,
        cdc,
        chaos,
        chat_code,
        config,
        connectors,
        core,
        demo,
        dev,
        healing,
        incidents,
        inference,
        processors,
        projections,
        routing,
        routing_policy,
        routing_views,
    )

    root.add_typer(dev.app, name="dev", help="The embedded dev stack: Tansu, PostgreSQL, Redis.")
    root.command()(core.produce)
    root.command()(core.subscribe)
    root.command()(core.replay)
    root.command()(core.project)
    root.command()(demo.demo)
    root.command("chaos")(chaos.chaos)
    root.add_typer(core.topics_app, name="topics")
    root.add_typer(core.query_app, name="query")
    root.add_typer(core.import_app, name="import")
    root.add_typer(core.schemas_app, name="schemas")

    core.import_app.command("debezium")(cdc.import_debezium)
    core.import_app.command("slack")(chat_code.import_slack)
    core.import_app.command("commits")(chat_code.import_commits)
    core.query_app.command("cdc")(cdc.query_cdc)
    cdc_app = typer.Typer(help="Change data capture: normalise Debezium events and project table state.")
    cdc_app.command("run")(cdc.run_cdc)
    root.add_typer(cdc_app, name="cdc")

    root.add_typer(
        processors.cli,
        name="processors",
        help="The Faust processors: run summary, correlation, routing, healing, incidents, anomaly detection.",
    )
    root.add_typer(routing.app, name="routing", help="Model routing: fit, evaluate, request.")
    root.add_typer(projections.app, name="projections")
    root.command("audit")(projections.audit)
    root.add_typer(connectors.app, name="connectors", help="Kafka Connect / Debezium connectors.")
    root.add_typer(config.app, name="config", help="Configuration as event-sourced aggregates.")
    root.add_typer(api.app, name="api", help="The HTTP API: serve it, manage its tokens.")
    root.add_typer(inference.app, name="inference", help="Inference on Ray: embedding actors.")

    # healing, incidents and anomalies, routing policies
    root.add_typer(healing.app, name="healing", help="Healing: circuits, warnings, escalations.")
    processors.cli.command("heal")(healing.processors_heal)
    processors.cli.command("incidents")(incidents.run_incidents)
    processors.cli.command("anomalies")(anomalies.run_anomalies)
    core.import_app.command("nezha")(incidents.import_nezha)
    core.import_app.command("nab")(anomalies.import_nab)
    core.import_app.command("github-events")(anomalies.import_github_events)
    core.query_app.command("incidents")(incidents.query_incidents)
    core.query_app.command("anomalies")(incidents.query_anomalies)
    core.query_app.command("correlations")(incidents.query_correlations)
    eval_app = typer.Typer(
        help="Scores on real labelled data, one table per capability (--json).", no_args_is_help=True
    )
    eval_app.command("healing")(healing.eval_healing)
    eval_app.command("outage")(healing.eval_outage)
    eval_app.command("incidents")(incidents.eval_incidents)
    eval_app.command("anomalies")(anomalies.eval_anomalies)
    eval_app.command("links")(anomalies.eval_links)
    root.add_typer(eval_app, name="eval")
    routing.app.command("fit-learner")(routing_policy.fit_command)
    routing.app.command("eval-learner")(routing_policy.eval_command)
    routing.app.command("simulate")(routing_policy.simulate_command)
    routing.app.command("ab")(routing_policy.ab_command)
    routing.app.command("policy-worker")(routing_policy.policy_worker_command)
    core.query_app.command("routing")(routing_views.query_routing)
    plain_help(root)


_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")
_LIST_ITEM = re.compile(r"^\s*(?:[*-]|\d+\.)\s")


def help_text(doc: str) -> str:
    """A docstring as ``--help`` shows it: Sphinx roles (``:func:`~a.b.c``` → ```c```) and double
    backticks (````x```` → ```x```) as plain backticks, and each paragraph's wrapped lines joined (typer's
    rich mode would print the docstring's line breaks); list items and blank lines are kept."""
    text = _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", doc)
    text = _LITERAL.sub(r"`\1`", text)
    paragraphs = []
    for para in inspect.cleandoc(text).split("\n\n"):
        lines: list[str] = []
        for line in para.splitlines():
            if lines and not _LIST_ITEM.match(line):
                lines[-1] = f"{lines[-1]} {line.strip()}"
            else:
                lines.append(line.rstrip())
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def plain_help(group: typer.Typer) -> None:
    """Give every command and group under ``group`` its :func:`help_text` (set once, at mount)."""
    if group.info.help:
        group.info.help = help_text(str(group.info.help))
    for command in group.registered_commands:
        doc = command.help or (command.callback.__doc__ if command.callback else None)
        if doc:
            command.help = help_text(str(doc))
    for sub in group.registered_groups:
        if sub.help:
            sub.help = help_text(str(sub.help))
        if sub.typer_instance is not None:
            plain_help(sub.typer_instance)


_mounted = False


def mounted_app() -> typer.Typer:
    """:data:`app` with every command (:func:`mount` runs once per process)."""
    global _mounted
    if not _mounted:
        mount(app)
        _mounted = True
    return app


def main() -> None:
    """Entry point of the ``backbone`` console script."""
    mounted_app()()


if __name__ == "__main__":
    main()

"""``backbone processors correlate``: run the correlation processor (mounted by :mod:`backbone.cli.processors`).

Every option has an environment twin (shown in ``--help``); broker settings come from
``BACKBONE_KAFKA__*`` (:class:`core.settings.Settings`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import timedelta
from typing import Annotated

import typer

from streams.catalogue import DLQ_TOPIC

__all__ = ["correlate"]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def correlate(
    embeddings: Annotated[bool, typer.Option(
        "--embeddings/--no-embeddings", envvar="BACKBONE_CORRELATION_EMBEDDINGS",
        help="Read inference results and draw embedding links (and request embeddings, see below).")] = True,
    request_embeddings: Annotated[bool, typer.Option(
        "--request-embeddings/--no-request-embeddings", envvar="BACKBONE_CORRELATION_REQUEST_EMBEDDINGS",
        help="With --embeddings: produce an embedding request per message and commit.")] = True,
    window_hours: Annotated[float, typer.Option(
        envvar="BACKBONE_CORRELATION_WINDOW_HOURS",
        help="Largest event-time distance (hours) of an embedding link; keep it above the ±14 h of Slack's unknown offset.",
    )] = 48.0,
    min_cosine: Annotated[float, typer.Option(
        envvar="BACKBONE_CORRELATION_MIN_COSINE", help="Smallest cosine of an embedding link.")] = 0.6,
    scope: Annotated[list[str] | None, typer.Option(
        "--scope", envvar="BACKBONE_CORRELATION_SCOPES",
        help="ENTITY_PREFIX=SCOPE override of the correlation scope (repeat), e.g. slack:lisp/=racket.")] = None,
    app_id: Annotated[str, typer.Option(envvar="BACKBONE_CORRELATION_APP_ID", help="Faust app id / group.")] = "backbone-correlation",
    events_topic: Annotated[str, typer.Option(envvar="BACKBONE_CORRELATION_EVENTS_TOPIC")] = "external.events",
    results_topic: Annotated[str, typer.Option(envvar="BACKBONE_CORRELATION_RESULTS_TOPIC")] = "inference.results",
    requests_topic: Annotated[str, typer.Option(envvar="BACKBONE_CORRELATION_REQUESTS_TOPIC")] = "inference.requests",
    insights_topic: Annotated[str, typer.Option(envvar="BACKBONE_CORRELATION_INSIGHTS_TOPIC")] = "insights.correlations",
    dlq_topic: Annotated[str, typer.Option(envvar="BACKBONE_CORRELATION_DLQ_TOPIC")] = DLQ_TOPIC,
    scope_partitions: Annotated[int, typer.Option(
        envvar="BACKBONE_CORRELATION_SCOPE_PARTITIONS", help="Partitions of the repartition topic.")] = 3,
    stop_after_idle: Annotated[float | None, typer.Option(
        envvar="BACKBONE_CORRELATION_STOP_AFTER_IDLE_SECONDS",
        help="Stop once started and no record arrived for this many seconds (caught up).")] = None,
    close_at_end: Annotated[bool, typer.Option(
        "--close-at-end", envvar="BACKBONE_CORRELATION_CLOSE_AT_END",
        help="With --stop-after-idle: at the stop, decide the messages still waiting for their discussion "
             "window, as at the end of event time (a replay of a finished history, e.g. an audit; later "
             "events of this group older than the window are late).")] = False,
    discussion: Annotated[bool, typer.Option(
        "--discussion/--no-discussion", envvar="BACKBONE_CORRELATION_DISCUSSION",
        help="Draw discussion links: the masked linker (text, timing, pending merges, author affinity) for "
             "messages without a reference, decided once the scope's event time passes their window "
             "(8 days by default).")] = True,
    discussion_min_history: Annotated[int, typer.Option(
        envvar="BACKBONE_CORRELATION_DISCUSSION_MIN_HISTORY",
        help="Commits a scope must have (up to a message's window end) before a discussion link is drawn: "
             "the TF-IDF's document frequencies come from them.")] = 200,
    retention_days: Annotated[float, typer.Option(
        envvar="BACKBONE_CORRELATION_RETENTION_DAYS",
        help="Days of event time of messages a scope holds behind its watermark (older ones are dropped and "
             "their table items deleted; a reference further apart is not linked); 0 = hold everything.",
    )] = 90.0,
    commit_retention_days: Annotated[float, typer.Option(
        envvar="BACKBONE_CORRELATION_COMMIT_RETENTION_DAYS",
        help="The same for commits (a message may name an old commit); at least --retention-days.",
    )] = 365.0,
    web_port: Annotated[int, typer.Option(envvar="BACKBONE_CORRELATION_WEB_PORT", help="Faust web port; 0 = off.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the final counters as JSON on exit.")] = False,
) -> None:  # fmt: skip
    """Link Slack messages and commits (by reference, by embedding when present, and by discussion: the
    masked linker for messages without a reference) into insights.correlations."""
    # the worker's modules (Faust, numpy) are imported by this command only, not by every ``backbone`` call
    from processors.correlation.app import CorrelationTopics, run_correlation_worker
    from processors.correlation.logic import CorrelationConfig
    from processors.correlation.masked import MaskedConfig

    scopes: dict[str, str] = {}
    for item in scope or []:
        prefix, sep, name = item.partition("=")
        if not sep or not prefix or not name:
            _fail(f"--scope wants ENTITY_PREFIX=SCOPE, got {item!r}")
        scopes[prefix] = name
    if window_hours < 0:
        _fail(f"--window-hours must not be negative, got {window_hours}")
    if discussion_min_history < 0:
        _fail(f"--discussion-min-history must not be negative, got {discussion_min_history}")
    if close_at_end and stop_after_idle is None:
        _fail("--close-at-end needs --stop-after-idle: the end of the input is the idle stop")
    if scope_partitions < 1:
        _fail(f"--scope-partitions must be at least 1, got {scope_partitions}")
    if retention_days < 0 or commit_retention_days < 0:
        _fail("--retention-days and --commit-retention-days must not be negative")
    retention = timedelta(days=retention_days) if retention_days else None
    try:
        config = CorrelationConfig(window=timedelta(hours=window_hours), min_cosine=min_cosine, scopes=scopes,
                                   discussion=MaskedConfig(min_history=discussion_min_history) if discussion else None,
                                   retention=retention, commit_retention=timedelta(days=commit_retention_days))  # fmt: skip
    except ValueError as exc:
        _fail(str(exc))
    topics = CorrelationTopics(
        events=events_topic, results=results_topic, requests=requests_topic, insights=insights_topic,
        dead_letters=dlq_topic, scope_partitions=scope_partitions,
    )  # fmt: skip
    try:
        stats = run_correlation_worker(
            app_id=app_id, topics=topics, config=config, embeddings=embeddings,
            request_embeddings=request_embeddings, stop_after_idle_seconds=stop_after_idle, web_port=web_port,
            close_at_end=close_at_end,
        )  # fmt: skip
    except ValueError as exc:
        _fail(str(exc))
    if json_output:
        typer.echo(json.dumps(asdict(stats)))
    else:
        typer.echo(
            f"links: {stats.reference_links_count} by reference, {stats.embedding_links_count} by embedding, "
            f"{stats.discussion_links_count} by discussion ({stats.discussion_late_count} events late); "
            f"{stats.expired_count} dropped by the retention ({stats.too_old_count} older than it on arrival); "
            f"{stats.events_count} events, {stats.vectors_count} embeddings, {stats.dead_letters_count} dead-lettered"
        )

"""``backbone import slack FILE [--commits TSV]`` and ``backbone import commits FILE`` (mounted by
:mod:`backbone.cli`).

Both parse with :mod:`connectors.chat_code` and produce ``sophia.external.ExternalEvent`` records with
deterministic ids to ``external.events`` (importing twice adds duplicates that consumers skip).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from backbone.cli.helpers import JsonOpt, clear_errors, emit_json, err, out

__all__ = ["import_commits", "import_slack"]


TopicOpt = Annotated[str, typer.Option(help="Topic to produce to.", envvar="BACKBONE_EXTERNAL_TOPIC")]
RepoOpt = Annotated[str, typer.Option(help="owner/name of the repository.", envvar="BACKBONE_IMPORT_REPO")]


def _run(events: Iterator[Any], topic: str, as_json: bool, what: str) -> None:
    from confluent_kafka.admin import AdminClient

    from backbone.cli.helpers import context
    from connectors.chat_code import import_events
    from streams.catalogue import CATALOGUE, ensure_topics

    settings, serde = context()
    if topic in CATALOGUE:
        ensure_topics(AdminClient(settings.kafka.librdkafka()), [topic])
    with Progress(TextColumn(f"importing {what}"), BarColumn(), MofNCompleteColumn(), console=err,
                  disable=as_json or not err.is_terminal) as bar:  # fmt: skip
        task = bar.add_task("import", total=None)
        report = import_events(settings, serde, events, topic=topic, on_event=lambda _: bar.advance(task))
    if as_json:
        emit_json(report.as_dict())
        return
    kinds = ", ".join(f"{n:,} {k}" for k, n in sorted(report.by_kind.items())) or "nothing"
    out.print(f"imported {kinds} to {topic} ({report.with_refs:,} with references) in {report.seconds} s")


@clear_errors
def import_slack(
    file: Annotated[Path, typer.Argument(help="Slack channel export (XML of the disentangled-Slack corpus).")],
    channel: Annotated[str | None, typer.Option(help="Channel name (default: the export's).",
                                                envvar="BACKBONE_IMPORT_CHANNEL")] = None,
    repo: RepoOpt = "racket/racket",
    commits: Annotated[Path | None, typer.Option(
        help="Also import this commit TSV, merged with the messages in event-time order: the correlator's "
             "discussion links follow event time, and commits imported after a year of messages arrive late.",
    )] = None,
    topic: TopicOpt = "external.events",
    as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """Import Slack messages as slack.message events (ts is the collector's local time, taken as UTC),
    with ``--commits`` merged in event-time order with a repository's commits."""
    from connectors.chat_code import ChatCodeImportError, parse_git_commits_tsv, parse_slack_export

    for path in (file, commits):
        if path is not None and not path.is_file():
            raise ChatCodeImportError(path, "no such file")
    events: Iterator[Any] = parse_slack_export(file, repo=repo, channel=channel)
    what = "messages"
    if commits is not None:
        merged = [*events, *parse_git_commits_tsv(commits, repo=repo)]
        events = iter(sorted(merged, key=lambda e: (e.data["occurred_at"], e.key)))
        what = "messages and commits"
    _run(events, topic, as_json, what)


@clear_errors
def import_commits(
    file: Annotated[Path, typer.Argument(help="TSV: sha, author_time, commit_time, author, subject.")],
    repo: RepoOpt = "racket/racket",
    topic: TopicOpt = "external.events",
    as_json: JsonOpt = False,
) -> None:
    """Import commits as git.commit events (commit time converted to UTC)."""
    from connectors.chat_code import ChatCodeImportError, parse_git_commits_tsv

    if not file.is_file():
        raise ChatCodeImportError(file, "no such file")
    _run(parse_git_commits_tsv(file, repo=repo), topic, as_json, "commits")

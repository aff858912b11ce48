"""Import chat history and commit history as ``sophia.external.ExternalEvent`` records.

Two parsers, plain Python (no Kafka), and one importer that produces their events to ``external.events``:

* :func:`parse_slack_export` reads a Slack channel export in the XML form of the disentangled-Slack
  research corpus (preethac/Software-related-Slack-Chats-with-Disentangled-Conversations @ 8804415 :
  ``data/racket/2018/merged-racket-general.xml``; a copy sits in the shared data folder as
  ``chat_and_code/racket/slack_racket_general_2018.xml``)::

      <slack><team_domain>racket</team_domain><channel_name>general</channel_name>...
        <message conversation_id="1"><ts>2017-12-31T11:38:10.000028</ts><user>Marnie</user>
          <text>&lt;@Carlyn&gt; hackett is so fun</text></message> ...

  After XML unescaping, ``text`` is in Slack's own markup: ``<https://url|label>`` and ``<https://url>``
  links, ``<@User>`` mentions, and ``&amp;`` ``&lt;`` ``&gt;`` for literal ``&`` ``<`` ``>``.
* :func:`parse_git_commits_tsv` reads ``sha  author_time  commit_time  author  subject`` (tab separated,
  one header line; times ISO 8601 with their UTC offset), e.g. ``chat_and_code/racket/racket_commits_2018.tsv``
  (racket/racket's history).

One event per message and per commit (``EXTERNAL_SCHEMA``, CloudEvents source ``/connectors/slack-export``
and ``/connectors/git-log``). Entities (the Kafka key):

* a message: ``slack:<workspace>/<channel>/<ts>`` with ``ts`` as written in the export (it is unique in
  a channel; a repeated ``ts`` gets ``#2``, ``#3`` ... in file order); kind ``slack.message``; its
  ``thread`` is ``slack:<workspace>/<channel>/conversation/<start_date>/<conversation_id>``, the corpus's
  disentangled conversation (numbered per export file, hence the file's ``<start_date>``; the export has
  no Slack threads; the discussion linker reads a thread as context).
* a commit: ``git:<owner>/<repo>@<full sha>``; kind ``git.commit``.

``refs`` are taken from the text with :func:`connectors.webhooks.extract_github_refs`: GitHub URLs of
commits, issues and pull requests (``github:owner/repo@sha``, ``github:owner/repo#N``), ``owner/repo#N``,
and bare ``#N`` and commit SHAs (7 to 40 hex digits) resolved against the channel's or commit's
repository. Event ids are deterministic (:func:`streams.envelope.deterministic_id` of the entity), so a
second import puts the same ids on the log and consumers de-duplicate.
"""

from __future__ import annotations

import csv
import html
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from connectors.errors import ConnectorError
from connectors.webhooks import extract_github_refs
from core.settings import Settings
from streams.envelope import Event, deterministic_id
from streams.producer import EventProducer
from streams.serde import AvroSerde

__all__ = [
    "COMMIT_KIND",
    "EXTERNAL_SCHEMA",
    "GIT_SOURCE",
    "MESSAGE_KIND",
    "SLACK_SOURCE",
    "ChatCodeImportError",
    "ImportReport",
    "commit_event",
    "import_events",
    "parse_git_commits_tsv",
    "parse_slack_export",
    "render_slack_text",
    "slack_event",
]

log = structlog.get_logger(__name__)

EXTERNAL_SCHEMA = "sophia.external.ExternalEvent"
MESSAGE_KIND = "slack.message"
COMMIT_KIND = "git.commit"
SLACK_SOURCE = "/connectors/slack-export"
GIT_SOURCE = "/connectors/git-log"
_EXCERPT_CHARS = 280
_TSV_COLUMNS = ("sha", "author_time", "commit_time", "author", "subject")
_SLACK_LINK = re.compile(r"<([^<>|]*)(?:\|([^<>]*))?>")
_FULL_SHA = re.compile(r"[0-9a-f]{40}")


class ChatCodeImportError(ConnectorError, ValueError):
    """A chat export or commit list that cannot be read at all (missing file, not XML, wrong columns).

    Attributes:
        path: the file.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


def render_slack_text(text: str) -> str:
    """Slack markup as a person reads it: ``<url|label>`` → ``label``, ``<url>`` → ``url``,
    ``<@User>`` → ``@User``, ``<#C1|name>`` → ``#name``, then ``&lt;`` ``&gt;`` ``&amp;`` unescaped.

    Args:
        text: a message text in Slack's markup (after the XML of the export was unescaped).

    Returns:
        The readable text (whitespace kept as is).
    """

    def link(m: re.Match[str]) -> str:
        target, label = m.group(1), m.group(2)
        if label:
            return f"#{label}" if target.startswith("#") else label
        if target.startswith("@"):
            return target
        return target

    return html.unescape(_SLACK_LINK.sub(link, text))


def _excerpt(text: str | None) -> str | None:
    if not text or not text.split():
        return None
    collapsed = " ".join(text.split())
    return collapsed if len(collapsed) <= _EXCERPT_CHARS else collapsed[: _EXCERPT_CHARS - 1].rstrip() + "…"


def slack_event(
    *,
    workspace: str,
    channel: str,
    ts: str,
    user: str | None,
    text: str,
    repo: str,
    duplicate: int = 1,
    conversation: str | None = None,
) -> Event:
    """The ``slack.message`` event of one exported message.

    Args:
        workspace: Slack team domain, e.g. ``racket``.
        channel: channel name, e.g. ``general``.
        ts: the message's ``ts`` as exported: ISO 8601 **without offset, in the collector's local time**
            (the offset is unknown; see :func:`parse_slack_export`). It is stored as if it were UTC.
        user: the (pseudonymised) user name.
        text: the text in Slack markup (XML already unescaped).
        repo: ``owner/name`` that bare ``#N`` and SHAs in the text refer to.
        duplicate: 1 for the first message with this ``ts``, 2 for the second ...
        conversation: the export's disentangled conversation, unique within the channel (see
            :func:`parse_slack_export`), stored as ``thread`` = ``slack:<workspace>/<channel>/conversation/
            <conversation>``; None: no thread.

    Returns:
        The event (key = entity, id deterministic in the entity).

    Raises:
        ValueError: ``ts`` is not an ISO 8601 time.
    """
    local = datetime.fromisoformat(ts)
    occurred_at = local.replace(tzinfo=UTC) if local.tzinfo is None else local.astimezone(UTC)
    suffix = "" if duplicate == 1 else f"#{duplicate}"
    entity = f"slack:{workspace}/{channel}/{ts}{suffix}"
    refs = tuple(r for r in extract_github_refs(_unlinked(text), repo) if r != entity)
    data: dict[str, Any] = {
        "platform": "slack",
        "kind": MESSAGE_KIND,
        "entity": entity,
        "actor": user or None,
        "occurred_at": occurred_at,
        "url": None,
        "title": None,
        "body_excerpt": _excerpt(render_slack_text(text)),
        "refs": list(refs),
        "source_id": entity,
        "thread": f"slack:{workspace}/{channel}/conversation/{conversation}" if conversation else None,
    }
    return Event.create(
        EXTERNAL_SCHEMA, entity, data, source=SLACK_SOURCE, time=occurred_at,
        id=deterministic_id("slack-export", entity),
    )  # fmt: skip


def _unlinked(text: str) -> str:
    """Slack text with each ``<url|label>`` reduced to ``url label`` so URL and label are both scanned."""
    return html.unescape(_SLACK_LINK.sub(lambda m: f" {m.group(1)} {m.group(2) or ''} ", text))


def parse_slack_export(
    path: Path, *, repo: str = "racket/racket", channel: str | None = None
) -> Iterator[Event]:
    """Yield one ``slack.message`` :class:`~streams.envelope.Event` per ``<message>`` of an XML export.

    Source: the disentangled-Slack research corpus (see the module docstring), e.g. the Racket
    workspace's ``#general`` of 2018 (9,709 messages, user names pseudonymised).

    **Time zone.** ``<ts>`` carries no offset: it is the collector's *local* time, whose offset is not
    recorded. It is taken as UTC as written (never shifted), so ``occurred_at`` may be off by up to
    ±14 hours; a processor that joins these messages with other sources must use a window at least that
    wide (the correlation processor's default does).

    Odd records are kept, never fixed: a message without ``<text>`` has an empty text (no excerpt), one
    without ``<user>`` has no actor; a message whose ``<ts>`` repeats an earlier one gets the entity
    suffix ``#2``, ``#3`` ... A message without a ``<ts>`` that parses is skipped and logged
    (``slack_message_skipped``).

    Args:
        path: the XML file.
        repo: ``owner/name`` that bare ``#N`` and SHAs in messages refer to.
        channel: override the channel name (default: the export's ``<channel_name>``).

    Yields:
        Events in file order; key and entity ``slack:<team_domain>/<channel>/<ts>``.

    Raises:
        ChatCodeImportError: the file is missing or is not well-formed XML.
    """
    if not path.is_file():
        raise ChatCodeImportError(path, "no such file")
    workspace, channel_name, start = "slack", channel, ""
    seen: dict[str, int] = {}
    try:
        for _, elem in ET.iterparse(path, events=("end",)):
            if elem.tag == "team_domain" and elem.text:
                workspace = elem.text.strip()
            elif elem.tag == "channel_name" and elem.text and channel is None:
                channel_name = elem.text.strip()
            elif elem.tag == "start_date" and elem.text:
                start = elem.text.strip()
            elif elem.tag == "message":
                ts = (elem.findtext("ts") or "").strip()
                user = (elem.findtext("user") or "").strip() or None
                text = elem.findtext("text") or ""
                conv_id = (elem.get("conversation_id") or "").strip()
                conversation = (f"{start}/{conv_id}" if start else conv_id) if conv_id else None
                elem.clear()
                seen[ts] = seen.get(ts, 0) + 1
                try:
                    yield slack_event(
                        workspace=workspace, channel=channel_name or "unknown", ts=ts, user=user, text=text,
                        repo=repo, duplicate=seen[ts], conversation=conversation,
                    )  # fmt: skip
                except ValueError as exc:
                    log.warning("slack_message_skipped", path=str(path), ts=ts, reason=str(exc))
    except ET.ParseError as exc:
        raise ChatCodeImportError(path, f"not well-formed XML: {exc}") from exc


def commit_event(*, repo: str, sha: str, commit_time: str, author: str | None, subject: str) -> Event:
    """The ``git.commit`` event of one commit.

    Args:
        repo: ``owner/name``.
        sha: the full 40-digit SHA (lower-cased here).
        commit_time: ISO 8601 with its UTC offset (the committer date, which is when the commit reached
            the branch; the author date is older for rebased commits); converted to UTC.
        author: the author's name.
        subject: the first line of the message.

    Returns:
        The event (key = entity ``git:<repo>@<sha>``, id deterministic in the entity).

    Raises:
        ValueError: a SHA that is not 40 hex digits, or a time without a parseable offset.
    """
    sha = sha.strip().lower()
    if not _FULL_SHA.fullmatch(sha):
        raise ValueError(f"not a 40-digit commit SHA: {sha!r}")
    t = datetime.fromisoformat(commit_time.strip())
    if t.tzinfo is None:
        raise ValueError(f"commit time without UTC offset: {commit_time!r}")
    occurred_at = t.astimezone(UTC)
    entity = f"git:{repo}@{sha}"
    data: dict[str, Any] = {
        "platform": "git",
        "kind": COMMIT_KIND,
        "entity": entity,
        "actor": author or None,
        "occurred_at": occurred_at,
        "url": f"https://github.com/{repo}/commit/{sha}",
        "title": subject,
        "body_excerpt": _excerpt(subject),
        "refs": [r for r in extract_github_refs(subject, repo) if r != f"github:{repo}@{sha}"],
        "source_id": sha,
    }
    return Event.create(
        EXTERNAL_SCHEMA,
        entity,
        data,
        source=GIT_SOURCE,
        time=occurred_at,
        id=deterministic_id("git-log", entity),
    )


def parse_git_commits_tsv(path: Path, repo: str = "racket/racket") -> Iterator[Event]:
    """Yield one ``git.commit`` :class:`~streams.envelope.Event` per row of a commit list.

    Source: ``git log`` of a repository written as TSV with the header
    ``sha author_time commit_time author subject``, e.g. ``chat_and_code/racket/racket_commits_2018.tsv``
    (racket/racket, 2018; newest first). ``occurred_at`` is ``commit_time`` converted from its own UTC
    offset to UTC. A row that does not parse (short row, bad SHA or time) is skipped and logged
    (``commit_row_skipped``).

    Args:
        path: the TSV file.
        repo: ``owner/name`` of the repository.

    Yields:
        Events in file order.

    Raises:
        ChatCodeImportError: the file is missing or its header is not the expected one.
    """
    if not path.is_file():
        raise ChatCodeImportError(path, "no such file")
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header is None or tuple(h.strip() for h in header[:5]) != _TSV_COLUMNS:
            raise ChatCodeImportError(path, f"expected the header {' '.join(_TSV_COLUMNS)!r}, got {header!r}")
        for line, row in enumerate(rows, start=2):
            try:
                sha, _, commit_time, author, subject = row[:5]
                yield commit_event(
                    repo=repo, sha=sha, commit_time=commit_time, author=author, subject=subject
                )
            except ValueError as exc:  # short rows raise ValueError on unpacking too
                log.warning("commit_row_skipped", path=str(path), line=line, reason=str(exc))


@dataclass(slots=True)
class ImportReport:
    """What :func:`import_events` did.

    Attributes:
        topic: where the events went.
        events: events produced and acknowledged.
        by_kind: events per ``kind``.
        with_refs: events whose ``refs`` are not empty.
        seconds: wall time of the import.
    """

    topic: str
    events: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    with_refs: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "topic": self.topic, "events": self.events, "by_kind": dict(self.by_kind),
            "with_refs": self.with_refs, "seconds": self.seconds,
        }  # fmt: skip


def import_events(
    settings: Settings,
    serde: AvroSerde,
    events: Iterable[Event],
    *,
    topic: str = "external.events",
    on_event: Callable[[Event], None] | None = None,
) -> ImportReport:
    """Produce ``events`` to ``topic`` (CloudEvents headers, Avro body, acks=all) and wait for them all.

    Re-importing the same file is idempotent in effect: the events carry the same deterministic ids,
    and consumers (the correlation processor, projections) de-duplicate by id or entity.

    Args:
        settings: broker settings (``settings.kafka``).
        serde: the Avro serde.
        events: from :func:`parse_slack_export` or :func:`parse_git_commits_tsv`.
        topic: the target topic.
        on_event: called after each event is enqueued (a progress bar).

    Returns:
        The counts.

    Raises:
        streams.errors.DeliveryError: a record was not acknowledged.
        streams.errors.BrokerUnavailableError: no broker answered.
        ChatCodeImportError: the source file cannot be read (raised by the parser while iterating).
    """
    report = ImportReport(topic=topic)
    start = time.perf_counter()
    producer = EventProducer(settings.kafka, serde, linger_ms=20)
    for event in events:
        producer.produce(topic, event)
        report.events += 1
        kind = str(event.data["kind"])
        report.by_kind[kind] = report.by_kind.get(kind, 0) + 1
        report.with_refs += bool(event.data["refs"])
        if on_event is not None:
            on_event(event)
    producer.flush()
    report.seconds = round(time.perf_counter() - start, 3)
    return report

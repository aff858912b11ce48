"""Import GitHub Events API objects as ``sophia.external.ExternalEvent`` records, pushes as commits.

Source: a JSON array of GitHub Events API / GH Archive objects (``{"id", "type", "actor", "repo",
"payload", "created_at"}``), e.g. ``github_events/duckdb_events_2023-04.json`` in the shared data folder
(dlt-hub/dlt @ 58d66fc, 100 duckdb/duckdb events of April 2023). Each object is mapped by
:func:`connectors.webhooks.map_github_event` (pull requests, reviews, review comments, issue comments,
issues, stars, forks; entity ``github:owner/repo#N`` or ``github:owner/repo``). A **push** becomes, besides
its ``github.push`` event, one ``git.commit`` event per pushed commit (:func:`commits_of_push`), with the
same entity and kind as the commit importer (``git:owner/repo@sha``, :func:`connectors.chat_code.commit_event`),
so the correlation processor joins them with Slack messages and pull requests whatever their source.

Events API push commits carry no time of their own: a commit's ``occurred_at`` is the push's
``created_at`` (the moment it reached the branch, which is also what the commit importer uses, the
committer date). Ids are deterministic: ``deterministic_id("github-events", id)`` for mapped events and the
commit importer's ``deterministic_id("git-log", entity)`` for commits, so a commit seen in a push and in
a ``git log`` import has one id and consumers keep it once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.chat_code import EXTERNAL_SCHEMA, commit_event
from connectors.errors import ConnectorError
from connectors.webhooks import ExternalEvent, WebhookPayloadError, extract_github_refs, map_github_event
from streams.envelope import Event, deterministic_id

__all__ = [
    "GITHUB_EVENTS_SOURCE",
    "GitHubEventsImportError",
    "commits_of_push",
    "events_of_github_object",
    "read_github_events",
    "slack_message_refs",
]

GITHUB_EVENTS_SOURCE = "/connectors/github-events"


class GitHubEventsImportError(ConnectorError, ValueError):
    """A file that is not a JSON array of objects (missing, not JSON, another shape).

    Attributes:
        path: the file.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


def _to_event(mapped: ExternalEvent, *, source: str, event_id: str) -> Event:
    data = {
        "platform": mapped.platform, "kind": mapped.kind, "entity": mapped.entity, "actor": mapped.actor,
        "occurred_at": mapped.occurred_at, "url": mapped.url, "title": mapped.title,
        "body_excerpt": mapped.body_excerpt, "refs": list(mapped.refs), "source_id": mapped.source_id,
    }  # fmt: skip
    return Event.create(
        EXTERNAL_SCHEMA, mapped.entity, data, source=source, time=mapped.occurred_at, id=event_id
    )


def commits_of_push(
    payload: Mapping[str, Any], *, repo: str, pushed_at: datetime, pusher: str | None
) -> list[Event]:
    """One ``git.commit`` event per commit of a push (Events API or webhook payload).

    Args:
        payload: the push payload: ``commits`` of ``{"sha"|"id", "message", "author": {"name"}}`` (a webhook
            commit also has ``timestamp``, its author date; the push time is used for both, see the module
            docstring).
        repo: ``owner/name``.
        pushed_at: aware time of the push.
        pusher: login of who pushed (used when a commit names no author).

    Returns:
        The commit events, in push order; a commit without a 40-digit SHA is skipped.
    """
    out: list[Event] = []
    for c in payload.get("commits") or []:
        if not isinstance(c, Mapping):
            continue
        sha = c.get("sha") or c.get("id")
        message = c.get("message") if isinstance(c.get("message"), str) else ""
        author = c.get("author") if isinstance(c.get("author"), Mapping) else {}
        try:
            out.append(commit_event(
                repo=repo, sha=str(sha or ""), commit_time=pushed_at.astimezone(UTC).isoformat(),
                author=author.get("name") or pusher, subject=message.splitlines()[0] if message else "",
            ))  # fmt: skip
        except ValueError:
            continue
    return out


def events_of_github_object(obj: Mapping[str, Any]) -> list[Event]:
    """The events of one Events API object: the mapped event, then a push's commits.

    Raises:
        WebhookPayloadError: an object :func:`connectors.webhooks.map_github_event` refuses.
    """
    mapped = map_github_event(obj)
    events = [
        _to_event(
            mapped, source=GITHUB_EVENTS_SOURCE, event_id=deterministic_id("github-events", mapped.source_id)
        )
    ]
    if obj.get("type") == "PushEvent":
        events += commits_of_push(
            obj["payload"], repo=obj["repo"]["name"], pushed_at=mapped.occurred_at, pusher=mapped.actor
        )
    return events


def read_github_events(path: Path) -> tuple[list[Event], list[str]]:
    """Map a JSON array of Events API objects.

    Args:
        path: the JSON file.

    Returns:
        ``(events, rejected)``: the events in file order, and ``"<index>: <reason>"`` of each object that
        could not be mapped (the import goes on without it).

    Raises:
        GitHubEventsImportError: the file is missing, not JSON, or not an array.
    """
    if not path.is_file():
        raise GitHubEventsImportError(path, "no such file")
    try:
        objs = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GitHubEventsImportError(path, f"not JSON: {exc}") from exc
    if not isinstance(objs, list):
        raise GitHubEventsImportError(path, f"expected a JSON array of events, got {type(objs).__name__}")
    events: list[Event] = []
    rejected: list[str] = []
    for i, obj in enumerate(objs):
        if not isinstance(obj, Mapping):
            rejected.append(f"{i}: not a JSON object")
            continue
        try:
            events += events_of_github_object(obj)
        except WebhookPayloadError as exc:
            rejected.append(f"{i}: {exc}")
    return events, rejected


def slack_message_refs(text: str | None, repos: Sequence[str]) -> tuple[str, ...]:
    """GitHub references in a live Slack message's text (Slack markup ``<url|label>`` unwrapped first).

    Full URLs and ``owner/repo#N`` are always read; bare ``#N`` and SHAs resolve against the first of
    ``repos`` (the workspace's default repository), and are skipped when ``repos`` is empty.
    """
    if not text:
        return ()
    import html
    import re

    unwrapped = html.unescape(
        re.sub(r"<([^<>|]*)(?:\|([^<>]*))?>", lambda m: f" {m.group(1)} {m.group(2) or ''} ", text)
    )
    if repos:
        return extract_github_refs(unwrapped, repos[0])
    return tuple(r for r in extract_github_refs(unwrapped, "_/_") if not r.startswith("github:_/_"))

"""GitHub Events API import: pushes become git.commit events like the commit importer's."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connectors.chat_code import commit_event
from connectors.github_events import (
    GitHubEventsImportError,
    commits_of_push,
    read_github_events,
    slack_message_refs,
)

SHARED = (
    Path(__file__).resolve().parents[2]
    / ".."
    / "shared"
    / "data"
    / "github_events"
    / "duckdb_events_2023-04.json"
)
PUSH = {
    "id": "1", "type": "PushEvent", "actor": {"login": "ann"}, "repo": {"name": "o/r"},
    "created_at": "2023-04-01T10:00:00Z",
    "payload": {"ref": "refs/heads/main", "head": "a" * 40,
                "commits": [{"sha": "a" * 40, "message": "Fix it (#12)\n\nbody", "author": {"name": "Ann"}},
                            {"sha": "short", "message": "bad"}]},
}  # fmt: skip


def test_push_maps_to_push_and_commit_events(tmp_path: Path) -> None:
    """A push yields github.push plus one git.commit per valid commit, with the commit importer's id."""
    f = tmp_path / "e.json"
    f.write_text(json.dumps([PUSH, {"type": "Nope"}, 3]))
    events, rejected = read_github_events(f)
    assert [e.data["kind"] for e in events] == ["github.push", "git.commit"]
    commit = events[1]
    assert commit.key == "git:o/r@" + "a" * 40 and commit.data["title"] == "Fix it (#12)"
    same = commit_event(
        repo="o/r", sha="a" * 40, commit_time="2023-04-01T10:00:00+00:00", author="Ann", subject="x"
    )
    assert commit.attributes.id == same.attributes.id
    assert len(rejected) == 2


def test_webhook_push_payload_gives_commits() -> None:
    """The webhook payload's commits (``id`` instead of ``sha``) map the same way."""
    payload = {"commits": [{"id": "b" * 40, "message": "m", "author": {"name": "Bo"}}]}
    (e,) = commits_of_push(payload, repo="o/r", pushed_at=datetime(2023, 4, 1, tzinfo=UTC), pusher="bo")
    assert e.data["kind"] == "git.commit" and e.data["actor"] == "Bo"


def test_slack_refs_of_live_messages() -> None:
    """Slack-wrapped URLs are read; bare #N only with a default repository."""
    text = "see <https://github.com/o/r/pull/7|the PR> and #9"
    assert slack_message_refs(text, ()) == ("github:o/r#7",)
    assert slack_message_refs(text, ("o/r",)) == ("github:o/r#7", "github:o/r#9")


def test_not_an_array_is_a_clear_error(tmp_path: Path) -> None:
    """A JSON object instead of an array raises GitHubEventsImportError."""
    f = tmp_path / "e.json"
    f.write_text("{}")
    with pytest.raises(GitHubEventsImportError):
        read_github_events(f)


@pytest.mark.skipif(not SHARED.is_file(), reason="../shared/data/github_events is absent")
def test_shared_duckdb_events() -> None:
    """100 objects: 8 pushes carrying 77 commits, nothing rejected."""
    events, rejected = read_github_events(SHARED)
    kinds = [e.data["kind"] for e in events]
    assert (kinds.count("github.push"), kinds.count("git.commit"), rejected) == (8, 77, [])

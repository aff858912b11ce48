"""Webhook signature checks (GitHub, Slack, Linear) and the mapping of real GitHub events."""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from connectors.webhooks import (
    ExternalEvent,
    StaleWebhookError,
    WebhookPayloadError,
    WebhookSignatureError,
    extract_github_refs,
    github_signature,
    linear_signature,
    map_github_event,
    map_github_events,
    map_github_webhook,
    slack_signature,
    verify_github_signature,
    verify_linear_signature,
    verify_slack_signature,
)

EVENTS_FILE = (
    Path(__file__).resolve().parents[3] / "shared" / "data" / "github_events" / "duckdb_events_2023-04.json"
)

# GitHub's documented test vector ("Validating webhook deliveries").
GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_BODY = b"Hello, World!"
GITHUB_EXPECTED = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"

# Slack's documented example ("Verifying requests from Slack").
SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
SLACK_TIMESTAMP = "1531420618"
SLACK_BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
    b"&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
    b"&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
    b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)
SLACK_EXPECTED = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
SLACK_SENT_AT = datetime.fromtimestamp(1531420618, tz=UTC)


# ------------------------------------------------------------------------------------------------ GitHub


def test_github_documented_vector() -> None:
    """GitHub's documented secret and payload give the documented X-Hub-Signature-256."""
    assert github_signature(GITHUB_SECRET, GITHUB_BODY) == GITHUB_EXPECTED
    verify_github_signature(secret=GITHUB_SECRET, body=GITHUB_BODY, signature_header=GITHUB_EXPECTED)


@pytest.mark.parametrize(
    ("body", "header", "reason"),
    [
        (b"Hello, World?", GITHUB_EXPECTED, "does not match"),
        (GITHUB_BODY, "sha256=" + "0" * 64, "does not match"),
        (GITHUB_BODY, GITHUB_EXPECTED.replace("sha256=", "sha1="), "not of the form"),
        (GITHUB_BODY, None, "no X-Hub-Signature-256"),
    ],
)
def test_github_forged_or_missing_signature_is_refused(body: bytes, header: str | None, reason: str) -> None:
    """A changed body, a forged or wrong-algorithm signature, or no header is refused with the reason."""
    with pytest.raises(WebhookSignatureError, match=reason):
        verify_github_signature(secret=GITHUB_SECRET, body=body, signature_header=header)


def test_github_wrong_secret_is_refused() -> None:
    """The right signature computed with another secret is refused."""
    forged = github_signature("not the secret", GITHUB_BODY)
    with pytest.raises(WebhookSignatureError):
        verify_github_signature(secret=GITHUB_SECRET, body=GITHUB_BODY, signature_header=forged)


# ------------------------------------------------------------------------------------------------ Slack


def test_slack_documented_example() -> None:
    """Slack's documented signing example verifies when `now` is within five minutes of its timestamp."""
    assert slack_signature(SLACK_SECRET, SLACK_TIMESTAMP, SLACK_BODY) == SLACK_EXPECTED
    verify_slack_signature(
        secret=SLACK_SECRET,
        body=SLACK_BODY,
        signature_header=SLACK_EXPECTED,
        timestamp_header=SLACK_TIMESTAMP,
        now=SLACK_SENT_AT + timedelta(minutes=4, seconds=59),
    )


@pytest.mark.parametrize(
    "offset", [timedelta(minutes=5, seconds=1), -timedelta(minutes=6), timedelta(days=1)]
)
def test_slack_stale_timestamp_is_refused(offset: timedelta) -> None:
    """A correctly signed Slack request more than five minutes from `now` (either way) is refused as stale."""
    with pytest.raises(StaleWebhookError) as info:
        verify_slack_signature(
            secret=SLACK_SECRET,
            body=SLACK_BODY,
            signature_header=SLACK_EXPECTED,
            timestamp_header=SLACK_TIMESTAMP,
            now=SLACK_SENT_AT + offset,
        )
    assert info.value.skew == offset


def test_slack_forged_signature_and_replayed_timestamp_are_refused() -> None:
    """A Slack signature reused with another timestamp or body does not verify."""
    later = str(int(SLACK_TIMESTAMP) + 60)
    with pytest.raises(WebhookSignatureError, match="does not match"):
        verify_slack_signature(
            secret=SLACK_SECRET,
            body=SLACK_BODY,
            signature_header=SLACK_EXPECTED,
            timestamp_header=later,
            now=SLACK_SENT_AT,
        )
    with pytest.raises(WebhookSignatureError, match="does not match"):
        verify_slack_signature(
            secret=SLACK_SECRET,
            body=SLACK_BODY + b"&x=1",
            signature_header=SLACK_EXPECTED,
            timestamp_header=SLACK_TIMESTAMP,
            now=SLACK_SENT_AT,
        )
    with pytest.raises(WebhookSignatureError, match="X-Slack-Request-Timestamp"):
        verify_slack_signature(
            secret=SLACK_SECRET,
            body=SLACK_BODY,
            signature_header=SLACK_EXPECTED,
            timestamp_header="soon",
            now=SLACK_SENT_AT,
        )


# ------------------------------------------------------------------------------------------------ Linear


def _linear_body(ts_ms: int) -> bytes:
    return json.dumps(
        {
            "action": "create",
            "type": "Issue",
            "data": {"id": "h3-issue", "title": "Flaky test"},
            "webhookTimestamp": ts_ms,
        }
    ).encode()


def test_linear_signature_and_timestamp_verify() -> None:
    """A Linear body signed with hex HMAC-SHA256 and a fresh webhookTimestamp verifies and is returned parsed."""
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    body = _linear_body(int(now.timestamp() * 1000) - 20_000)
    header = hmac.new(b"h3-linear-secret", body, hashlib.sha256).hexdigest()
    assert linear_signature("h3-linear-secret", body) == header
    payload = verify_linear_signature(secret="h3-linear-secret", body=body, signature_header=header, now=now)
    assert payload["data"]["title"] == "Flaky test"


def test_linear_stale_or_forged_is_refused() -> None:
    """A Linear delivery with an old webhookTimestamp, a forged signature, or no timestamp is refused."""
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    old = _linear_body(int((now - timedelta(minutes=2)).timestamp() * 1000))
    with pytest.raises(StaleWebhookError):
        verify_linear_signature(secret="s", body=old, signature_header=linear_signature("s", old), now=now)
    fresh = _linear_body(int(now.timestamp() * 1000))
    with pytest.raises(WebhookSignatureError, match="does not match"):
        verify_linear_signature(
            secret="s", body=fresh, signature_header=linear_signature("t", fresh), now=now
        )
    untimed = b'{"action": "create"}'
    with pytest.raises(WebhookSignatureError, match="webhookTimestamp"):
        verify_linear_signature(
            secret="s", body=untimed, signature_header=linear_signature("s", untimed), now=now
        )


# ------------------------------------------------------------------------------------------------ mapping


@pytest.fixture(scope="module")
def github_events() -> list[dict[str, Any]]:
    if not EVENTS_FILE.exists():
        pytest.skip(f"real GitHub events absent: {EVENTS_FILE} (../shared/data is not in a fresh clone)")
    return json.loads(EVENTS_FILE.read_text(encoding="utf-8"))


def test_all_100_real_events_map_with_counts_by_kind(github_events: list[dict[str, Any]]) -> None:
    """The 100 duckdb/duckdb Events API objects all map, with the counts by kind read from the file."""
    mapped = map_github_events(github_events)
    assert len(mapped) == 100
    assert collections.Counter(e.kind for e in mapped) == {
        "github.pull_request_review.created": 23,
        "github.pull_request_review_comment.created": 23,
        "github.issue_comment.created": 20,
        "github.pull_request.closed": 9,
        "github.watch.started": 8,
        "github.push": 8,
        "github.issues.opened": 3,
        "github.pull_request.opened": 3,
        "github.issues.closed": 2,
        "github.fork": 1,
    }
    assert all(e.occurred_at.tzinfo is not None and e.platform == "github" for e in mapped)
    assert len({e.source_id for e in mapped}) == 100
    assert all(e.entity.startswith("github:duckdb/duckdb") for e in mapped)


def test_merged_pull_request_and_its_push_reference_each_other(github_events: list[dict[str, Any]]) -> None:
    """PR #6995's close carries its merge commit, and the push of that merge references #6995."""
    mapped = map_github_events(github_events)
    closed = next(e for e in mapped if e.kind == "github.pull_request.closed" and e.entity.endswith("#6995"))
    assert closed.title == "LIST aggregate performance improvements"
    assert closed.url == "https://github.com/duckdb/duckdb/pull/6995"
    merge_ref = "github:duckdb/duckdb@30d444e45d4f6ad691baba9a173042892ed4547a"
    assert closed.refs == (merge_ref,)
    push = next(e for e in mapped if e.kind == "github.push" and merge_ref in e.refs)
    assert push.entity == "github:duckdb/duckdb:refs/heads/master"
    assert "github:duckdb/duckdb#6995" in push.refs
    assert push.title == "Merge pull request #6995 from Mytherin/listimprovements"


def test_issue_comment_mapping_fields(github_events: list[dict[str, Any]]) -> None:
    """An issue comment maps to the issue's entity, the commenter, the comment URL and an excerpt."""
    event = next(e for e in github_events if e["id"] == "28279019220")
    mapped = map_github_event(event)
    assert mapped == ExternalEvent(
        platform="github",
        kind="github.issue_comment.created",
        entity="github:duckdb/duckdb#7003",
        actor="Tishj",
        occurred_at=datetime(2023, 4, 7, 21, 48, 30, tzinfo=UTC),
        url="https://github.com/duckdb/duckdb/issues/7003#issuecomment-1500674065",
        title="duckdb.connect is adding the working directory",
        body_excerpt=mapped.body_excerpt,
        refs=("github:duckdb/duckdb#5852",),
        source_id="28279019220",
    )
    assert mapped.body_excerpt is not None and mapped.body_excerpt.startswith("Thanks for raising the issue")
    assert len(mapped.body_excerpt) <= 280


def test_webhook_delivery_form_maps_like_the_events_api() -> None:
    """A pull_request webhook delivery (X-GitHub-Event + body) maps to the same kind and entity."""
    body = json.dumps(
        {
            "action": "opened",
            "number": 7001,
            "pull_request": {
                "number": 7001,
                "title": "Fix #6990 again",
                "body": "Follow-up to duckdb/duckdb#6992, see https://github.com/duckdb/duckdb/commit/5cf2270",
                "html_url": "https://github.com/duckdb/duckdb/pull/7001",
                "created_at": "2023-04-08T10:00:00Z",
                "updated_at": "2023-04-08T10:00:00Z",
            },
            "repository": {"full_name": "duckdb/duckdb"},
            "sender": {"login": "h3-user"},
        }
    ).encode()
    verify_github_signature(secret="h3", body=body, signature_header=github_signature("h3", body))
    event = map_github_webhook(
        event_name="pull_request",
        body=body,
        delivery_id="h3-delivery-1",
        received_at=datetime(2023, 4, 8, 10, 0, 3, tzinfo=UTC),
    )
    assert (event.kind, event.entity, event.actor) == (
        "github.pull_request.opened",
        "github:duckdb/duckdb#7001",
        "h3-user",
    )
    assert event.occurred_at == datetime(2023, 4, 8, 10, 0, tzinfo=UTC)
    assert event.refs == ("github:duckdb/duckdb#6992", "github:duckdb/duckdb@5cf2270")
    assert event.source_id == "h3-delivery-1"


def test_refs_extraction_forms() -> None:
    """Refs come from #N, GH-N, owner/repo#N, issue/pull/commit URLs and bare SHAs, not from plain numbers."""
    text = (
        "Fixes #12 and GH-13, like apache/arrow#5; see https://github.com/duckdb/duckdb/pull/14 "
        "and commit a1b2c3d4e5. Not refs: 1234567, deadbeef, color #ff0000x."
    )
    assert extract_github_refs(text, "duckdb/duckdb") == (
        "github:duckdb/duckdb#12",
        "github:duckdb/duckdb#13",
        "github:apache/arrow#5",
        "github:duckdb/duckdb#14",
        "github:duckdb/duckdb@a1b2c3d4e5",
    )


def test_malformed_events_are_refused_clearly() -> None:
    """An event without type, repo, or with a bad time raises WebhookPayloadError naming the field."""
    with pytest.raises(WebhookPayloadError, match="type"):
        map_github_event({"id": "1", "payload": {}})
    with pytest.raises(WebhookPayloadError, match="repo.name"):
        map_github_event({"id": "1", "type": "WatchEvent", "payload": {}})
    with pytest.raises(WebhookPayloadError, match="created_at"):
        map_github_event(
            {"id": "1", "type": "WatchEvent", "repo": {"name": "a/b"}, "payload": {}, "created_at": "x"}
        )
    with pytest.raises(WebhookPayloadError, match="not JSON"):
        map_github_webhook(event_name="push", body=b"{", delivery_id="d", received_at=datetime.now(UTC))

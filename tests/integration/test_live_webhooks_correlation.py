"""Live GitHub and Slack webhooks feed the correlation like the importers: a push yields git.commit events,
a Slack message keeps its own entity and references, and the correlator links them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
from psycopg import sql
from pydantic import SecretStr

from backbone.devstack import StackInfo
from backbone.http.app import ApiSettings, ServerThread, create_app
from connectors.webhooks import github_signature, slack_signature
from core.settings import PostgresSettings, Settings
from processors.correlation.logic import Correlator, observe
from streams.consumer import ConsumedEvent
from streams.replay import read_range
from streams.serde import serde_from_settings

GITHUB_SECRET = "gh-secret-for-tests"
SLACK_SECRET = "slack-secret-for-tests"
SHA = "4f1c2b3a" + "0" * 32


@pytest.fixture(scope="module")
def server(stack: StackInfo, settings: Settings) -> Iterator[tuple[ServerThread, str]]:
    name = f"test_hooks_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(stack.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    db = urlunsplit(urlsplit(stack.postgres_url)._replace(path=f"/{name}"))
    topic = f"external-hooks-{uuid.uuid4().hex[:8]}"
    api = ApiSettings(github_secret=SecretStr(GITHUB_SECRET), slack_secret=SecretStr(SLACK_SECRET),
                      rate_per_second=1000, burst=1000, external_topic=topic)  # fmt: skip
    app_settings = settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(db))})
    with ServerThread(create_app(app_settings, api)) as srv:
        yield srv, topic
    with psycopg.connect(stack.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def test_push_and_slack_message_webhooks_are_linked(
    server: tuple[ServerThread, str], settings: Settings
) -> None:
    """A push delivery produces github.push and git.commit; two Slack messages of one channel are two
    entities; the one that links the commit's URL gets a reference link from the correlator."""
    srv, topic = server
    push = {"ref": "refs/heads/main", "after": SHA, "repository": {"full_name": "acme/widgets"},
            "sender": {"login": "ann"}, "head_commit": {"timestamp": "2024-05-01T10:00:00Z"},
            "commits": [{"id": SHA, "message": "Fix the frobnicator", "author": {"name": "Ann"}}]}  # fmt: skip
    body = json.dumps(push).encode()
    ts = str(int(time.time()))
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/webhooks/github", content=body, headers={
            "X-Hub-Signature-256": github_signature(GITHUB_SECRET, body), "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()), "Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 202, r.text
        assert r.json()["count"] == 2
        for i, text in enumerate(
            ["hello all", f"broke it: <https://github.com/acme/widgets/commit/{SHA}|commit>"]
        ):
            msg = json.dumps({"type": "event_callback", "team_id": "acme", "event_id": f"Ev{uuid.uuid4().hex}",
                              "event": {"type": "message", "channel": "C1", "user": "U1", "text": text,
                                        "ts": f"171455{i}000.000100", "event_ts": f"171455{i}000.000100"}}).encode()  # fmt: skip
            h = {"X-Slack-Signature": slack_signature(SLACK_SECRET, ts, msg), "X-Slack-Request-Timestamp": ts,
                 "Content-Type": "application/json"}  # fmt: skip
            assert c.post("/webhooks/slack", content=msg, headers=h).status_code == 202
    records = [
        r
        for r in read_range(settings.kafka, serde_from_settings(settings), topic)
        if isinstance(r, ConsumedEvent)
    ]
    kinds = sorted(r.data["kind"] for r in records)
    assert kinds == ["git.commit", "github.push", "slack.message", "slack.message"]
    assert len({r.key for r in records if r.data["kind"] == "slack.message"}) == 2
    corr = Correlator()
    links = [link for r in records if (o := observe(r.data, r.attributes.id)) for link in corr.add(o)]
    assert [(link.method, link.commit.entity) for link in links] == [("reference", f"git:acme/widgets@{SHA}")]

"""GET /subscribe/{topic} as Server-Sent Events against real Tansu, PostgreSQL and Redis."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
from psycopg import sql
from psycopg_pool import ConnectionPool
from pydantic import SecretStr

from backbone.devstack import StackInfo
from backbone.http.app import ApiSettings, ServerThread, create_app
from backbone.http.auth import TokenStore
from core.settings import PostgresSettings, Settings
from streams.envelope import Event
from streams.producer import EventProducer
from streams.serde import serde_from_settings

pytestmark = pytest.mark.integration

BUFFER = 200


@pytest.fixture(scope="module")
def sse_db(stack: StackInfo) -> Iterator[str]:
    name = f"test_sse_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(stack.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    yield urlunsplit(urlsplit(stack.postgres_url)._replace(path=f"/{name}"))
    with psycopg.connect(stack.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def app(settings: Settings, sse_db: str) -> Any:
    api = ApiSettings(
        sse_buffer_events=BUFFER, sse_heartbeat_seconds=1, external_topic=f"sse-ext-{uuid.uuid4().hex[:6]}"
    )
    return create_app(settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(sse_db))}), api)


@pytest.fixture(scope="module")
def server(app: Any) -> Iterator[ServerThread]:
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def token(sse_db: str, server: ServerThread) -> str:
    pool = ConnectionPool(sse_db, min_size=1, max_size=1, open=True)
    try:
        return TokenStore(pool).create("sse", ["subscribe:*"])[0]
    finally:
        pool.close()


def _produce(settings: Settings, topic: str, n: int, summary: str = "") -> list[str]:
    t0 = datetime(2025, 3, 1, tzinfo=UTC)
    events = [
        Event.create("sophia.insight.Insight", f"e{i % 7}", {"insight_id": f"i{i}", "kind": "test", "entity": f"e{i % 7}",
                     "event_time": t0 + timedelta(seconds=i), "summary": summary}, source="/tests", time=t0 + timedelta(seconds=i))
        for i in range(n)
    ]  # fmt: skip
    EventProducer(settings.kafka, serde_from_settings(settings)).produce_many(topic, events)
    return [e.attributes.id for e in events]


def _read_sse(resp: httpx.Response, n: int) -> list[dict[str, str]]:
    """Parse SSE messages from a streaming response until ``n`` events were read."""
    out: list[dict[str, str]] = []
    msg: dict[str, str] = {}
    for line in resp.iter_lines():
        if line == "":
            if "data" in msg:
                out.append(msg)
                if len(out) == n:
                    return out
            msg = {}
        elif not line.startswith(":"):
            k, _, v = line.partition(": ")
            msg[k] = v
    return out


def test_resume_with_last_event_id_has_no_gap_or_duplicate(
    server: ServerThread,
    token: str,
    settings: Settings,
    create_topic: Callable[..., str],
    unique_name: Callable[[str], str],
) -> None:
    """Read 10 of 30 events, disconnect, reconnect with Last-Event-ID: the other 20 arrive, none twice, none missing."""
    import json

    topic = create_topic(unique_name("sse"), 3)
    ids = _produce(settings, topic, 30)
    h = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("GET", f"/subscribe/{topic}", headers=h) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            first = _read_sse(r, 10)
        with c.stream("GET", f"/subscribe/{topic}", params={"limit": 20},
                      headers={**h, "Last-Event-ID": first[-1]["id"]}) as r:  # fmt: skip
            rest = _read_sse(r, 21)
    assert len(first) == 10 and len(rest) == 20
    got = [json.loads(m["data"]) for m in first + rest]
    assert sorted(g["id"] for g in got) == sorted(ids)
    assert len({(g["partition"], g["offset"]) for g in got}) == 30
    assert all(m["event"] == "sophia.insight.Insight" for m in first + rest)


def test_errors_before_streaming(
    server: ServerThread, token: str, create_topic: Callable[..., str], unique_name: Callable[[str], str]
) -> None:
    """No token is 401, an unknown topic 404, a malformed Last-Event-ID or from 400."""
    topic = create_topic(unique_name("sse"), 1)
    h = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get(f"/subscribe/{topic}").status_code == 401
        assert c.get("/subscribe/no-such-topic-here", headers=h).status_code == 404
        assert c.get(f"/subscribe/{topic}", headers={**h, "Last-Event-ID": "zz"}).status_code == 400
        assert c.get(f"/subscribe/{topic}", params={"from": "yesterday"}, headers=h).status_code == 400


def test_slow_client_pauses_consumer_and_buffer_stays_bounded(
    app: Any, server: ServerThread, token: str, settings: Settings, create_topic: Callable[..., str],
    unique_name: Callable[[str], str],
) -> None:  # fmt: skip
    """A client that stops reading makes the consumer pause with at most the buffer size held; all events still arrive in the end."""
    topic = create_topic(unique_name("sse-slow"), 1)
    n = 2500
    _produce(settings, topic, n, summary="x" * 2000)
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    sock.sendall(
        f"GET /subscribe/{topic}?limit={n} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    try:
        head = sock.recv(1024)
        assert b"200" in head.split(b"\r\n")[0]
        deadline = time.monotonic() + 30
        streams = []
        while time.monotonic() < deadline:
            streams = [s for s in app.state.sse_streams if s.topic == topic]
            if streams and streams[0].paused:
                break
            time.sleep(0.2)
        assert streams and streams[0].paused, "the consumer never paused"
        st = streams[0]
        time.sleep(1.0)
        assert st.buffered <= st.capacity == BUFFER
        assert st.sent < n
        data = bytearray(head)
        sock.settimeout(30)
        while data.count(b"\nevent: sophia.insight.Insight") < n:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        assert data.count(b"\nevent: sophia.insight.Insight") == n
        assert st.pauses >= 1
    finally:
        sock.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_reads_the_stream(server: ServerThread, token: str, settings: Settings, create_topic: Callable[..., str],
                               unique_name: Callable[[str], str]) -> None:  # fmt: skip
    """`curl -N` prints the events with id, event and data lines."""
    topic = create_topic(unique_name("sse-curl"), 2)
    _produce(settings, topic, 5)
    out = subprocess.run(
        ["curl", "-N", "-s", "--max-time", "20", "-H", f"Authorization: Bearer {token}",
         f"{server.url}/subscribe/{topic}?limit=5"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.stdout.count("\nid: ") + out.stdout.startswith("id: ") == 5
    assert out.stdout.count("event: sophia.insight.Insight") == 5

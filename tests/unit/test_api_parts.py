"""Pure parts of the HTTP API: scopes, SSE cursors, JSON-to-Avro coercion, Slack and Linear mapping, settings."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlencode

import pytest

from backbone.http.app import ApiSettings, create_app
from backbone.http.auth import AuthError, hash_token, scope_allows, validate_scope
from backbone.http.sse import format_cursor, parse_cursor
from connectors.mappers import external_event_to_avro, map_linear_webhook, map_slack_webhook
from core.settings import Settings
from streams.serde import coerce_json_datum

SCHEMA = {"fields": [{"name": "t", "type": {"type": "long", "logicalType": "timestamp-millis"}},
                     {"name": "u", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}]},
                     {"name": "s", "type": "string"}]}  # fmt: skip


def test_scopes_match_with_wildcards() -> None:
    """produce:<topic> matches exactly or by wildcard, admin and * cover everything, nothing else leaks."""
    assert scope_allows(["produce:agent.events"], "produce:agent.events")
    assert scope_allows(["produce:agent.*"], "produce:agent.events")
    assert not scope_allows(["produce:agent.*"], "subscribe:agent.events")
    assert scope_allows(["admin"], "replay") and scope_allows(["*"], "subscribe:x")
    assert not scope_allows(["subscribe:x"], "subscribe:xy")


def test_malformed_scopes_are_refused() -> None:
    """A scope that is not produce:/subscribe:<topic>, replay, admin or * raises AuthError."""
    for good in ("produce:t", "subscribe:*", "replay", "admin", "*"):
        assert validate_scope(good) == good
    for bad in ("produce", "produce:", "write:t", ""):
        with pytest.raises(AuthError):
            validate_scope(bad)


def test_token_hash_is_sha256() -> None:
    """The stored form of a token is its 32-byte SHA-256."""
    assert hash_token("abc").hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_cursor_round_trip_and_errors() -> None:
    """A cursor lists partition:next-offset pairs sorted by partition and parses back; garbage raises ValueError."""
    assert format_cursor({2: 9, 0: 17, 1: 4}) == "0:17,1:4,2:9"
    assert parse_cursor("0:17,1:4,2:9") == {0: 17, 1: 4, 2: 9}
    for bad in ("", "a:1", "0:-1", "0;1"):
        with pytest.raises(ValueError):
            parse_cursor(bad)


def test_coerce_takes_rfc3339_and_epoch_ms() -> None:
    """Timestamp fields accept RFC 3339 strings and epoch ms; bools, bad strings and other fields are left alone."""
    out = coerce_json_datum(
        SCHEMA, {"t": "2025-03-01T12:00:00+01:00", "u": 1_740_830_400_000, "s": "2025-03-01"}
    )
    assert out["t"] == datetime(2025, 3, 1, 11, tzinfo=UTC)
    assert out["u"] == datetime.fromtimestamp(1_740_830_400, UTC)
    assert out["s"] == "2025-03-01"
    assert coerce_json_datum(SCHEMA, {"t": True})["t"] is True
    assert coerce_json_datum(SCHEMA, {"t": "not a time"})["t"] == "not a time"


def test_slack_mapping() -> None:
    """Slash commands, event callbacks and url_verification map to the expected kinds, entities and ids."""
    now = datetime(2025, 1, 1, tzinfo=UTC)
    form = urlencode(
        {"command": "/deploy", "team_id": "T1", "channel_id": "C2", "user_name": "ann", "trigger_id": "tr"}
    ).encode()
    e = map_slack_webhook(form, "application/x-www-form-urlencoded", now)
    assert not isinstance(e, dict)
    assert (e.kind, e.entity, e.actor, e.source_id, e.occurred_at) == (
        "slack.command.deploy",
        "slack:T1/C2",
        "ann",
        "tr",
        now,
    )
    cb = b'{"type":"event_callback","team_id":"T1","event_id":"Ev1","event":{"type":"message","channel":"C2","user":"U1","text":"hi","event_ts":"1700000000.000100"}}'
    e = map_slack_webhook(cb, "application/json", now)
    assert not isinstance(e, dict)
    assert (e.kind, e.source_id, e.body_excerpt) == ("slack.message", "Ev1", "hi")
    assert e.occurred_at == datetime.fromtimestamp(1_700_000_000.0001, UTC)
    # a top-level message is its own thread; a reply's thread is its parent message's entity (thread_ts)
    parent = b'{"type":"event_callback","team_id":"T1","event_id":"Ev2","event":{"type":"message","channel":"C2","ts":"1700000000.000100","text":"x"}}'
    reply = b'{"type":"event_callback","team_id":"T1","event_id":"Ev3","event":{"type":"message","channel":"C2","ts":"1700000060.000200","thread_ts":"1700000000.000100","text":"y"}}'
    p, r = (
        map_slack_webhook(parent, "application/json", now),
        map_slack_webhook(reply, "application/json", now),
    )
    assert not isinstance(p, dict) and not isinstance(r, dict)
    assert p.thread == r.thread == p.entity == "slack:T1/C2/1700000000.000100"
    assert e.thread is None and external_event_to_avro(r)["thread"] == p.entity
    assert map_slack_webhook(b'{"type":"url_verification","challenge":"c"}', "application/json", now) == {
        "challenge": "c"
    }


def test_linear_mapping() -> None:
    """A Linear comment maps to linear.comment.create about its issue, at createdAt."""
    e = map_linear_webhook({"action": "create", "type": "Comment", "createdAt": "2025-03-01T10:00:00.000Z",
                            "data": {"id": "c1", "body": "see duckdb/duckdb#7", "issue": {"identifier": "ENG-7"}},
                            "actor": {"name": "Bo"}}, "d1")  # fmt: skip
    assert (e.kind, e.entity, e.actor, e.source_id) == ("linear.comment.create", "linear:ENG-7", "Bo", "d1")
    assert e.refs == ("github:duckdb/duckdb#7",)
    assert e.occurred_at == datetime(2025, 3, 1, 10, tzinfo=UTC)


def test_openapi_document_lists_the_routes() -> None:
    """The app builds without servers and its OpenAPI document has the ingest, webhook and SSE routes."""
    paths = create_app(Settings(), ApiSettings()).openapi()["paths"]
    for p in (
        "/events/{type}",
        "/webhooks/github",
        "/webhooks/slack",
        "/webhooks/linear",
        "/subscribe/{topic}",
    ):
        assert p in paths


def test_ingest_route_documents_bearer_and_parameters_as_fastapi_would_derive_them() -> None:
    """``POST /events/{type}`` authenticates and reads its parameters in its body (no dependency solving per
    request), yet its OpenAPI operation keeps the ``HTTPBearer`` requirement and the ``type``, ``topic`` and
    ``key_field`` parameters exactly as FastAPI derives them from the dependency signature, and the scheme
    is in the document's components."""
    from fastapi import Depends, FastAPI, Query

    from backbone.http.auth import authenticate_request
    from backbone.http.ingest import _KEY_FIELD_DOC, _TOPIC_DOC

    doc = create_app(Settings(), ApiSettings()).openapi()
    op = doc["paths"]["/events/{type}"]["post"]
    reference = FastAPI()

    @reference.post("/events/{type}")
    async def ingest_events(
        type: str,
        topic: str | None = Query(None, description=_TOPIC_DOC),
        key_field: str | None = Query(None, description=_KEY_FIELD_DOC),
        principal: object = Depends(authenticate_request),
    ) -> None:
        return None

    ref = reference.openapi()
    ref_op = ref["paths"]["/events/{type}"]["post"]
    assert op["security"] == ref_op["security"] == [{"HTTPBearer": []}]
    assert op["parameters"] == ref_op["parameters"]
    scheme = doc["components"]["securitySchemes"]["HTTPBearer"]
    assert scheme == ref["components"]["securitySchemes"]["HTTPBearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert "requestBody" in op and set(op["responses"]) >= {"202", "401", "403", "422", "429", "503"}


def test_api_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """BACKBONE_API_* variables set the API settings."""
    monkeypatch.setenv("BACKBONE_API_MAX_BODY_BYTES", "123")
    monkeypatch.setenv("BACKBONE_API_GITHUB_SECRET", "s3")
    s = ApiSettings()
    assert (
        s.max_body_bytes == 123 and s.github_secret is not None and s.github_secret.get_secret_value() == "s3"
    )


def test_a_pending_idempotency_claim_must_outlive_the_ack_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """``idempotency_pending_ttl_seconds`` at or below ``ack_timeout_seconds`` is refused, naming both."""
    from pydantic import ValidationError

    assert ApiSettings().idempotency_pending_ttl_seconds == 120
    with pytest.raises(
        ValidationError, match="idempotency_pending_ttl_seconds .10. must exceed ack_timeout_seconds"
    ):
        ApiSettings(idempotency_pending_ttl_seconds=10, ack_timeout_seconds=10)
    monkeypatch.setenv("BACKBONE_API_IDEMPOTENCY_PENDING_TTL_SECONDS", "15")
    assert ApiSettings().idempotency_pending_ttl_seconds == 15


def test_default_key_field_follows_the_catalogue_then_the_type() -> None:
    """The topic's key in the catalogue; outside it, the key of the catalogue topic that carries the type; else none."""
    from backbone.http.ingest import default_key_field

    agent = {"run_id", "phase", "event_time"}
    assert default_key_field("agent.events", "sophia.agent.RunLifecycle", agent) == "run_id"
    assert default_key_field("my-team.events", "sophia.agent.RunLifecycle", agent) == "run_id"
    assert default_key_field("my-team.events", "sophia.agent.RunLifecycle", {"phase"}) is None
    assert default_key_field("my-team.events", "no.such.Type", agent) is None

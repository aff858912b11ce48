"""The escalation notifier against a local HTTP server that checks the documented Slack / PagerDuty formats."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from processors.healing.decisions import Decision
from processors.healing.notify import Notifier, NotifierConfig

ESC = Decision(
    kind="escalation",
    subject="request:q-17",
    event_time=datetime(2025, 11, 18, 23, 50, tzinfo=UTC),
    config_version=3,
    details={
        "request_id": "q-17",
        "tried": ["Google", "Google AI Studio"],
        "reason": "fallback chain exhausted",
    },
)


def pagerduty_errors(body: Any) -> list[str]:
    """The Events API v2 rules for a trigger event (developer.pagerduty.com, Send an Alert Event)."""
    errs = []
    if not isinstance(body, dict):
        return ["body is not an object"]
    if not isinstance(body.get("routing_key"), str) or not body["routing_key"]:
        errs.append("routing_key missing")
    if body.get("event_action") not in ("trigger", "acknowledge", "resolve"):
        errs.append("event_action invalid")
    p = body.get("payload")
    if not isinstance(p, dict):
        return [*errs, "payload missing"]
    if not isinstance(p.get("summary"), str) or not 0 < len(p["summary"]) <= 1024:
        errs.append("summary invalid")
    if not isinstance(p.get("source"), str) or not p["source"]:
        errs.append("source missing")
    if p.get("severity") not in ("critical", "error", "warning", "info"):
        errs.append("severity invalid")
    if "timestamp" in p:
        datetime.fromisoformat(p["timestamp"])
    if "dedup_key" in body and len(body["dedup_key"]) > 255:
        errs.append("dedup_key too long")
    return errs


def slack_errors(body: Any) -> list[str]:
    """Slack incoming webhooks: a JSON object with text, and blocks (when present) a list of typed blocks."""
    if not isinstance(body, dict) or not isinstance(body.get("text"), str) or not body["text"]:
        return ["no_text"]
    blocks = body.get("blocks", [])
    if not isinstance(blocks, list) or not all(isinstance(b, dict) and "type" in b for b in blocks):
        return ["invalid_blocks"]
    return []


class Server:
    def __init__(self) -> None:
        self.fail_first = 0
        self.received: list[tuple[str, dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                assert self.headers["Content-Type"].startswith("application/json")
                body = json.loads(raw)
                outer.received.append((self.path, body))
                if outer.fail_first > 0:
                    outer.fail_first -= 1
                    self._send(503, b"upstream unavailable", "text/plain")
                elif self.path == "/v2/enqueue":
                    errs = pagerduty_errors(body)
                    if errs:
                        self._send(
                            400,
                            json.dumps(
                                {
                                    "status": "invalid event",
                                    "message": "Event object is invalid",
                                    "errors": errs,
                                }
                            ).encode(),
                        )
                    else:
                        self._send(
                            202,
                            json.dumps(
                                {
                                    "status": "success",
                                    "message": "Event processed",
                                    "dedup_key": body.get("dedup_key"),
                                }
                            ).encode(),
                        )
                else:
                    errs = slack_errors(body)
                    self._send(400, errs[0].encode(), "text/plain") if errs else self._send(
                        200, b"ok", "text/plain"
                    )

            def _send(self, status: int, data: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


async def test_slack_message_is_accepted(server: Server) -> None:
    n = Notifier(NotifierConfig(kind="slack", url=server.url + "/services/T000/B000/XXXX"))
    out = await n.notify(ESC)
    assert out.kind == "escalation_notified" and out.details["status"] == 200 and out.causation_id == ESC.id
    [(_path, body)] = server.received
    assert "q-17" in body["text"] and ESC.id in json.dumps(body["blocks"])


async def test_pagerduty_event_is_accepted_after_retries(server: Server) -> None:
    server.fail_first = 2
    cfg = NotifierConfig(
        kind="pagerduty", url=server.url + "/v2/enqueue", routing_key="R" * 32, backoff_max_seconds=0.05
    )
    out = await Notifier(cfg).notify(ESC)
    assert out.kind == "escalation_notified" and out.details == {**out.details, "attempts": 3, "status": 202}
    body = server.received[-1][1]
    assert body["dedup_key"] == ESC.id and body["payload"]["severity"] == "critical"
    assert body["payload"]["custom_details"]["details"]["tried"] == ["Google", "Google AI Studio"]


async def test_webhook_down_is_an_event_not_a_crash(server: Server) -> None:
    server.fail_first = 100
    cfg = NotifierConfig(kind="slack", url=server.url + "/hook", max_attempts=3, backoff_max_seconds=0.05)
    out = await Notifier(cfg).notify(ESC)
    assert (
        out.kind == "escalation_notify_failed"
        and out.details["attempts"] == 3
        and "503" in out.details["reason"]
    )
    dead = NotifierConfig(
        kind="slack", url="http://127.0.0.1:9/hook", max_attempts=2, backoff_max_seconds=0.05
    )
    out2 = await Notifier(dead).notify(ESC)
    assert out2.kind == "escalation_notify_failed" and out2.details["attempts"] == 2


async def test_a_refused_body_is_not_retried(server: Server) -> None:
    cfg = NotifierConfig(kind="pagerduty", url=server.url + "/v2/enqueue", routing_key="k")
    n = Notifier(cfg)
    n.body = lambda d: {"routing_key": "k", "event_action": "trigger", "payload": {"summary": "x"}}  # type: ignore[method-assign]
    out = await n.notify(ESC)
    assert (
        out.kind == "escalation_notify_failed"
        and out.details["attempts"] == 1
        and "400" in out.details["reason"]
    )


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="routing_key"):
        NotifierConfig(kind="pagerduty")
    with pytest.raises(ValueError, match="slack or pagerduty"):
        NotifierConfig(kind="email")  # type: ignore[arg-type]

"""`backbone demo` end to end: embedded stack, import, Faust processor, projection, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
FULL = ROOT.parent / "shared" / "data" / "agent_runs"


def _demo(data: Path, tmp_path: Path, *options: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKBONE_")}
    env["BACKBONE_STATE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-m", "backbone", "demo", "--data", str(data), "--json", *options], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=400)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # no client outlives the stack it talked to (librdkafka logs "Connection refused" when one does)
    assert "Connection refused" not in r.stderr, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_demo_on_the_copied_runs(tmp_path: Path) -> None:
    """The demo on datasets/agent_runs reports the copy's totals and one run summary per run."""
    doc = _demo(ROOT / "datasets" / "agent_runs", tmp_path)
    t = doc["totals"]
    assert (t["runs"], t["resolved"], t["llm_calls"], t["tool_calls"]) == (25, 13, 856, 824)
    assert round(t["cost_usd"], 6) == 7.799117 and doc["insights"] == 25
    _check_live(doc["live"])
    # the Nezha slice through the import, the incident worker and the projection: the replay's incidents
    inc = doc["incidents_live"]
    assert inc["same_as_replay"] and inc["replay_incidents"] == len(inc["incidents"]) == 2, inc
    assert inc["worker"]["late_count"] == inc["worker"]["dead_letters_count"] == 0, inc["worker"]
    assert inc["import"]["events"] == 15_819, inc["import"]
    first = inc["incidents"][0]  # the 08:43:04 fault on ts-contacts-service, seen in its logs
    assert first["candidates"][0]["pod"] == "ts-contacts-service-866bd68c97-xcqfx", first


def _check_live(live: dict) -> None:
    """Routing and healing live: the outage opens the provider's circuit, the router and the client route
    around it, a probe closes it after the cool-down, and the router goes back to the cheapest model."""
    assert live["prompts"] == 25
    chain = [
        (c["subject"], c["kind"]) for c in live["circuit_chain"] if c["subject"] == "circuit:provider:Google"
    ]
    kinds = [k for _, k in chain]
    assert kinds[0] == "circuit_opened" and kinds[-1] == "circuit_closed" and "circuit_half_open" in kinds, (
        chain
    )
    opened = next(c for c in live["circuit_chain"] if c["kind"] == "circuit_opened")
    assert opened["details"]["consecutive_failures"] >= 5, opened
    before, outage, after = live["phases"]["before"], live["phases"]["outage"], live["phases"]["after"]
    assert before["router_chose"] == {"google/gemini-2.5-flash-lite": 6} and before["client_fallbacks"] == 0
    # nothing reached the caller as a failure: every request in the outage was served by OpenAI
    assert outage["served_by"] == {"openai/gpt-5-mini": 6}, outage
    # the first outage request was routed before the circuit opened: the client fell back along its chain
    assert outage["client_fallbacks"] >= 1 and outage["router_chose"].get("openai/gpt-5-mini", 0) >= 4, outage
    assert after["router_chose"].get("google/gemini-2.5-flash-lite", 0) >= 8, after
    assert live["final_circuit"] == "closed" and live["router_fallback_decisions"] >= 1
    cost = sum(p["cost_usd"] for p in live["phases"].values())
    strong = sum(p["always_strong_usd"] for p in live["phases"].values())
    assert 0 < cost < strong / 5, (cost, strong)
    assert sum(w["n"] for w in live["warnings_live"]) > 0


@pytest.mark.skipif(not FULL.exists(), reason="../shared/data/agent_runs is absent")
def test_demo_on_all_runs_reproduces_the_data_facts(tmp_path: Path) -> None:
    """On all 120 runs the report equals the data README's facts: 120 runs, 89 resolved, 4,623 calls, 51.433 USD
    (``--runs-only``: the live and Nezha parts are checked on the copied runs above)."""
    doc = _demo(FULL, tmp_path, "--runs-only")
    assert doc["live"] is doc["healing"] is doc["incidents"] is None and "incidents_live" not in doc
    t = doc["totals"]
    assert (t["runs"], t["resolved"], t["llm_calls"]) == (120, 89, 4623)
    assert round(t["cost_usd"], 3) == 51.433 and doc["insights"] == 120
    assert t["first_event_at"].startswith("2025-11-18 22:55") and t["last_event_at"].startswith(
        "2025-11-19 00:45"
    )

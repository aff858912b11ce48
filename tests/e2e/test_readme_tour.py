"""The README's tour, run line by line as a user would, against a detached embedded stack."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
HOUR = (datetime(2025, 11, 18, 23, tzinfo=UTC), datetime(2025, 11, 19, tzinfo=UTC))


def _events() -> list:
    from connectors.agent_runs import ParsedRun, iter_runs

    return [
        e for r in iter_runs(ROOT / "datasets" / "agent_runs") if isinstance(r, ParsedRun) for e in r.events
    ]


def tour_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```sh tour\n(.*?)```", text, re.DOTALL)
    assert block, "README has no ```sh tour block"
    joined = block.group(1).replace("\\\n", "")  # shell line continuations
    return [line for line in joined.splitlines() if line.strip()]


def test_readme_tour_runs(tmp_path: Path) -> None:
    """Every line of the README's tour exits 0, and the outputs say what the README says they do."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKBONE_")}
    env.update(BACKBONE_STATE_DIR=str(tmp_path / "state"), BACKBONE_LOG_LEVEL="WARNING",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", COLUMNS="200")  # fmt: skip
    outputs: dict[str, subprocess.CompletedProcess[str]] = {}
    lines = tour_lines()
    assert lines[0] == "backbone dev up --detach" and lines[-1] == "backbone dev down"
    try:
        for line in lines:
            r = subprocess.run(
                ["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
            )
            assert r.returncode == 0, f"{line}\n{r.stdout}\n{r.stderr}"
            outputs[line] = r
    finally:
        subprocess.run(
            ["bash", "-c", "backbone dev down"], cwd=ROOT, env=env, capture_output=True, timeout=60
        )
    by_start = lambda prefix: next(r for line, r in outputs.items() if line.startswith(prefix))
    assert "imported 25 run(s), 1,730 events" in by_start("backbone import").stdout
    assert "applied 1,730 event(s)" in by_start("backbone project").stdout
    models = json.loads(by_start("backbone query models").stdout)
    assert sum(m["llm_calls"] for m in models) == 856
    assert "produced 1 event(s)" in outputs[lines[8]].stdout
    bad = outputs[lines[9]]
    assert "step" in bad.stderr and "nothing was sent" in bad.stderr
    sub = by_start("backbone subscribe").stdout
    assert sub.count("agent.events[") == 3 and "ce_" not in sub
    cdc = by_start("backbone query cdc").stdout
    assert "18oz carpenter hammer" in cdc and "111" not in cdc.split("inventory.products", 1)[-1].split()
    history = by_start("backbone config history").stdout
    assert "v3 ROLLED_BACK" in history and "alice" in history and "bob" in history
    changes = [json.loads(x) for x in by_start("backbone subscribe config.changes").stdout.splitlines()]
    assert [c["data"]["version"] for c in changes] == [1, 2, 3]
    assert "verified" in by_start("backbone projections rebuild").stdout.lower()
    audit = by_start("backbone audit").stdout
    assert "sophia.agent.RunLifecycle" in audit and "sophia.insight.Insight" in audit
    sse = by_start("TOKEN=").stdout
    assert sse.count("data: ") >= 1 and "id: " in sse
    replayed = [json.loads(x) for x in by_start("backbone replay").stdout.splitlines() if x.startswith("{")]
    assert replayed and all("2025-11-18T23:00:00" <= e["time"] < "2025-11-18T23:01:00" for e in replayed)
    # the run-summary worker read every event on the log (the 1,730 imported and demo-1's one) and summed
    # up the 25 finished runs; nothing was dead-lettered
    w = by_start("backbone processors worker")
    assert w.stdout.strip(), w.stderr[-2000:]
    worker = json.loads(w.stdout.strip().splitlines()[-1])
    assert worker["records_count"] == 1_731 and worker["insights_count"] == 25
    assert worker["dead_letters_count"] == 0
    # replay --into projected exactly the events of that hour, every one of them applied
    within = sum(1 for e in _events() if HOUR[0] <= e.attributes.time < HOUR[1])
    assert within == 1_090
    into = by_start(
        "backbone replay --topic agent.events --from 2025-11-18T23:00:00Z --to 2025-11-19T00:00:00Z --into"
    )
    assert (
        f"replayed {within:,} record(s) of agent.events into schema proj_agent_runs_replay ({within:,} applied)"
        in into.stdout
    )

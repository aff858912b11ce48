"""The healing eval commands through typer's CliRunner (real data; skipped when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from backbone.cli.healing import eval_app

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "agent_runs"
needs_data = pytest.mark.skipif(
    not (DATA / "results.csv").is_file(), reason=f"real agent runs not found at {DATA}"
)


@needs_data
def test_eval_healing_json() -> None:
    r = CliRunner().invoke(eval_app, ["healing", "--data", str(DATA), "--json"])
    assert r.exit_code == 0, r.output
    body = json.loads(r.output)
    assert body["runs"] == 120 and set(body["baseline"]) >= {"precision", "recall"}


@needs_data
def test_eval_outage_json_and_table() -> None:
    r = CliRunner().invoke(eval_app, ["outage", "--data", str(DATA), "--json", "--failure-rate", "1.0"])
    assert r.exit_code == 0, r.output
    body = json.loads(r.output)
    assert body["outage"]["failure_rate"] == 1.0 and set(body) == {"healer", "baseline", "outage"}
    t = CliRunner().invoke(eval_app, ["outage", "--data", str(DATA)])
    assert t.exit_code == 0 and "healer" in t.output and "baseline" in t.output


def test_eval_errors_are_one_line() -> None:
    r = CliRunner().invoke(eval_app, ["outage", "--data", "/no/such/dir", "--json"])
    assert r.exit_code == 2 and "no such directory" in r.output
    r = CliRunner().invoke(eval_app, ["outage", "--data", "/tmp", "--failure-rate", "2"])
    assert r.exit_code == 2 and "between 0 and 1" in r.output

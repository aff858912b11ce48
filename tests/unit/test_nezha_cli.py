"""``eval incidents`` and ``import nezha`` through typer's CliRunner (no broker needed)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from backbone.cli.incidents import app

SLICE = Path(__file__).resolve().parents[2] / "datasets" / "nezha"


def test_eval_incidents_json_on_the_slice() -> None:
    result = CliRunner().invoke(app, ["eval", "incidents", "--data", str(SLICE), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for key in (
        "faults",
        "detected",
        "median_detection_seconds",
        "top1",
        "top3",
        "top1_service",
        "top3_service",
    ):
        assert key in out
    assert out["faults"] == 4
    first = out["per_fault"][0]
    assert first["inject_time"] == "2023-01-29 08:43:04" and first["logs_or_traces"]
    assert first["detected"] and first["rank_pod"] == 1 and first["detection_seconds"] <= 180
    assert out["import"]["faults_ground_truth_not_imported"] == 4
    # the chance baseline: the same insights against fault times moved by a few minutes
    chance = out["chance"]
    assert chance["shifts_minutes"] == [-8, -4, 4, 8] and set(chance["per_shift"]) == {"-8", "-4", "4", "8"}
    assert all(0.0 <= chance[k] <= 1.0 for k in ("detected", "detected_within_180s", "top1", "top3"))
    # on the slice the real fault times are matched more often than the moved ones
    assert chance["detected"] < out["detected"]


def test_eval_incidents_table() -> None:
    result = CliRunner().invoke(app, ["eval", "incidents", "--data", str(SLICE)])
    assert result.exit_code == 0 and "86.67" in result.stdout and "chance (fault times moved" in result.stdout


def test_import_of_a_wrong_folder_is_one_clear_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["import", "nezha", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "no such directory" in " ".join(result.output.split())

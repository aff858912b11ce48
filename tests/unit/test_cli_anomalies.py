"""The issue-12 CLI commands on small inputs (no broker needed for the evaluations)."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from pathlib import Path

from typer.testing import CliRunner

from backbone.cli_anomalies import eval_app, import_app

runner = CliRunner()


def nab_folder(tmp_path: Path) -> Path:
    cat = tmp_path / "realKnownCause"
    cat.mkdir()
    t0 = datetime(2014, 1, 1)
    rows = ["timestamp,value"]
    for i in range(2000):
        v = 10 + math.sin(i / 15) + (40 if i == 1500 else 0)
        rows.append(f"{(t0 + timedelta(minutes=5 * i)):%Y-%m-%d %H:%M:%S},{v}")
    (cat / "s.csv").write_text("\n".join(rows) + "\n")
    start, end = t0 + timedelta(minutes=5 * 1450), t0 + timedelta(minutes=5 * 1550)
    (tmp_path / "combined_windows.json").write_text(
        json.dumps(
            {
                "realKnownCause/s.csv": [
                    [f"{start:%Y-%m-%d %H:%M:%S}.000000", f"{end:%Y-%m-%d %H:%M:%S}.000000"]
                ]
            }
        )
    )
    return tmp_path


def test_eval_anomalies_json(tmp_path: Path) -> None:
    """--json prints series, score_standard, precision and recall; the spike's window is detected."""
    res = runner.invoke(eval_app, ["anomalies", "--data", str(nab_folder(tmp_path)), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {"series", "score_standard", "precision", "recall"} <= set(out)
    assert out["series"] == 1 and out["recall"] == 1.0 and out["threshold_mode"] == "fixed"


def test_eval_anomalies_bad_folder_is_a_clear_error(tmp_path: Path) -> None:
    """A folder without labels exits non-zero with a message, not a traceback."""
    res = runner.invoke(eval_app, ["anomalies", "--data", str(tmp_path), "--json"])
    assert res.exit_code != 0
    assert "combined_windows.json" in res.output


def test_import_app_lists_both_importers() -> None:
    """import has nab and github-events."""
    res = runner.invoke(import_app, ["--help"])
    assert "nab" in res.stdout and "github-events" in res.stdout

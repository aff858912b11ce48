"""The issue-12 CLI commands on small inputs (no broker needed for the evaluations)."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from backbone.cli.anomalies import eval_app, import_app

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


def test_eval_anomalies_leave_one_out(tmp_path: Path) -> None:
    """--leave-one-out adds the held-out score and the (threshold, suppression) chosen for each series;
    one series is refused with a message."""
    folder = nab_folder(tmp_path)
    one = runner.invoke(eval_app, ["anomalies", "--data", str(folder), "--leave-one-out", "--json"])
    assert one.exit_code != 0 and "two series" in one.output
    csv = (folder / "realKnownCause" / "s.csv").read_text()
    (folder / "realKnownCause" / "t.csv").write_text(csv)
    labels = json.loads((folder / "combined_windows.json").read_text())
    labels["realKnownCause/t.csv"] = labels["realKnownCause/s.csv"]
    (folder / "combined_windows.json").write_text(json.dumps(labels))
    res = runner.invoke(eval_app, ["anomalies", "--data", str(folder), "--leave-one-out", "--json"])
    assert res.exit_code == 0, res.output
    loo = json.loads(res.stdout)["leave_one_out"]
    assert set(loo["chosen"]) == {"realKnownCause/s", "realKnownCause/t"}
    # twin series: the choice is the grid's best on the same data, so no worse than the default setting
    assert loo["score_standard"] >= json.loads(res.stdout)["score_standard"] > 0


def test_eval_anomalies_bad_folder_is_a_clear_error(tmp_path: Path) -> None:
    """A folder without labels exits non-zero with a message, not a traceback."""
    res = runner.invoke(eval_app, ["anomalies", "--data", str(tmp_path), "--json"])
    assert res.exit_code != 0
    assert "combined_windows.json" in res.output


def test_import_app_lists_both_importers() -> None:
    """import has nab and github-events."""
    res = runner.invoke(import_app, ["--help"])
    assert "nab" in res.stdout and "github-events" in res.stdout


def test_eval_links_json_on_a_tiny_channel(tmp_path: Path) -> None:
    """One message links a commit by URL inside a thread that names its subject: masked, it is still
    found by text; the reference extraction and the lag summary are reported beside it."""
    sha = "a" * 40
    xml = (
        "<slack><team_domain>acme</team_domain><channel_name>general</channel_name>"
        '<message conversation_id="1"><ts>2018-05-01T10:00:00.000001</ts><user>A</user>'
        "<text>the frobnicator crashes on empty widgets</text></message>"
        '<message conversation_id="1"><ts>2018-05-01T11:00:00.000001</ts><user>B</user>'
        f"<text>fixed in &lt;https://github.com/acme/w/commit/{sha}&gt;</text></message>"
        '<message conversation_id="2"><ts>2018-05-02T11:00:00.000001</ts><user>C</user>'
        "<text>lunch?</text></message></slack>"
    )
    (tmp_path / "s.xml").write_text(xml)
    (tmp_path / "c.tsv").write_text(
        "sha\tauthor_time\tcommit_time\tauthor\tsubject\n"
        f"{sha}\t2018-05-01T10:30:00+00:00\t2018-05-01T10:30:00+00:00\tB\tfrobnicator: no crash on empty widgets\n"
        f"{'b' * 40}\t2018-05-01T09:00:00+00:00\t2018-05-01T09:00:00+00:00\tD\tdocs: typo\n"
    )
    args = [
        "links",
        "--slack",
        str(tmp_path / "s.xml"),
        "--commits",
        str(tmp_path / "c.tsv"),
        "--repo",
        "acme/w",
        "--min-history",
        "0",
        "--json",
    ]
    res = runner.invoke(eval_app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (out["masked"], out["correct"], out["precision"], out["recall"]) == (1, 1, 1.0, 1.0)
    assert out["reference_extraction"]["links_unmasked"] == 1
    assert out["lags_reference_links"][0]["median_seconds"] == pytest.approx(1800.0, abs=0.01)
    # the live correlator reads the thread from the events too: "fixed in" alone shares no word with the
    # subject, its thread does
    proc = out["processor"]
    assert (proc["messages"], proc["linked"], proc["correct"], out["min_history"]) == (3, 1, 1, 0)
    bad = runner.invoke(eval_app, [*args[:-3], "--min-history", "-1", "--json"])
    assert bad.exit_code == 2 and "--min-history" in bad.output
    text = runner.invoke(eval_app, args[:-1], env={"COLUMNS": "80"})
    assert text.exit_code == 0, text.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in text.stdout.splitlines() if line.startswith("│")}  # fmt: skip
    assert rows["linker: text, time, affinity"] == ["1", "1", "1.000", "1.000"]
    assert rows["extraction, refs masked"] == ["0", "0", "", "0.000"] and rows["goal"] == [
        "",
        "",
        "0.800",
        "0.600",
    ]
    assert "lag slack after git (1 reference links): median +0.5 h" in text.stdout


def test_eval_anomalies_table_sits_beside_the_published_scoreboard(tmp_path: Path) -> None:
    """The text output is one table: this run's scores, then each detector of final_results.json, best first."""
    folder = nab_folder(tmp_path)
    (folder / "final_results.json").write_text(json.dumps({
        "numenta": {"standard": 70.1, "reward_low_FP_rate": 63.1, "reward_low_FN_rate": 74.3},
        "null": {"standard": 0.0, "reward_low_FP_rate": 0.0, "reward_low_FN_rate": 0.0},
    }))  # fmt: skip
    res = runner.invoke(eval_app, ["anomalies", "--data", str(folder)], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    figures = json.loads(runner.invoke(eval_app, ["anomalies", "--data", str(folder), "--json"]).stdout)
    rows = [
        [c.strip() for c in line.split("│")[1:-1]] for line in res.stdout.splitlines() if line.startswith("│")
    ]
    assert rows[0] == ["confirmed-likelihood/1, this run", f"{figures['score_standard']:.2f}",
                       f"{figures['score_reward_low_FP_rate']:.2f}", f"{figures['score_reward_low_FN_rate']:.2f}"]  # fmt: skip
    assert rows[1:] == [["numenta *", "70.10", "63.10", "74.30"], ["null *", "0.00", "0.00", "0.00"]]


def test_eval_links_measures_reference_extraction_on_the_masked_texts(tmp_path: Path) -> None:
    """The masked row of the reference extraction is measured, not assumed to be 0: a message naming a
    commit by URL and its squash-merged pull request as ``GH-7`` (which ``mask_references`` leaves) is
    still linked by plain extraction once masked; one naming it by URL only is not."""
    sha, other = "a" * 40, "c" * 40
    xml = (
        "<slack><team_domain>acme</team_domain><channel_name>general</channel_name>"
        '<message conversation_id="1"><ts>2018-05-01T11:00:00.000001</ts><user>B</user>'
        f"<text>merged &lt;https://github.com/acme/w/commit/{sha}&gt; (GH-7)</text></message>"
        '<message conversation_id="2"><ts>2018-05-01T12:00:00.000001</ts><user>C</user>'
        f"<text>see &lt;https://github.com/acme/w/commit/{other}&gt;</text></message></slack>"
    )
    (tmp_path / "s.xml").write_text(xml)
    (tmp_path / "c.tsv").write_text(
        "sha\tauthor_time\tcommit_time\tauthor\tsubject\n"
        f"{sha}\t2018-05-01T10:30:00+00:00\t2018-05-01T10:30:00+00:00\tB\tfrobnicator: no crash (#7)\n"
        f"{other}\t2018-05-01T10:00:00+00:00\t2018-05-01T10:00:00+00:00\tD\tdocs: typo\n"
    )
    res = runner.invoke(eval_app, ["links", "--slack", str(tmp_path / "s.xml"), "--commits", str(tmp_path / "c.tsv"),
                                   "--repo", "acme/w", "--min-history", "0", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    refs = json.loads(res.stdout)["reference_extraction"]
    assert (refs["links_unmasked"], refs["links_masked"], refs["recall_masked"]) == (2, 1, 0.5)

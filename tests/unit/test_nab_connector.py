"""The NAB reader and its events: deterministic ids, windows kept out of the events, bad rows counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from connectors.nab import NabImportError, read_nab, series_events

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "anomaly" / "nab"


def make_nab(tmp_path: Path) -> Path:
    (tmp_path / "realX").mkdir()
    (tmp_path / "realX" / "a.csv").write_text(
        "timestamp,value\n2014-01-01 00:00:00,1.5\n2014-01-01 00:05:00,oops\n2014-01-01 00:10:00,nan\n2014-01-01 00:15:00,2\n"
    )
    (tmp_path / "combined_windows.json").write_text(
        json.dumps({"realX/a.csv": [["2014-01-01 00:10:00.000000", "2014-01-01 00:15:00.000000"]]})
    )
    return tmp_path


def test_reads_series_windows_and_rejects_bad_rows(tmp_path: Path) -> None:
    """Two good rows, two rejected (not a number, NaN), one window; events carry no label."""
    (s,) = read_nab(make_nab(tmp_path))
    assert s.name == "realX/a" and s.values == [1.5, 2.0]
    assert [line for line, _ in s.rejected] == [3, 4]
    assert len(s.windows) == 1
    events = list(series_events(s))
    assert [e.key for e in events] == ["nab:realX/a"] * 2
    assert all("window" not in json.dumps(e.data, default=str) for e in events)
    assert [e.attributes.id for e in events] == [e.attributes.id for e in series_events(s)]


def test_missing_labels_is_a_clear_error(tmp_path: Path) -> None:
    """A folder without combined_windows.json raises NabImportError."""
    with pytest.raises(NabImportError):
        read_nab(tmp_path)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/anomaly/nab is absent")
def test_shared_realknowncause() -> None:
    """The shared copy: 7 series, 19 windows, 69,561 rows, none rejected."""
    series = read_nab(SHARED)
    assert len(series) == 7
    assert sum(len(s.windows) for s in series) == 19
    assert sum(len(s.values) for s in series) == 69561
    assert not any(s.rejected for s in series)


def test_a_numenta_nab_checkout_reads_like_the_flat_folder(tmp_path: Path) -> None:
    """``data/<category>/`` with ``labels/combined_windows.json`` (the layout of numenta/NAB) gives the same series."""
    (tmp_path / "flat").mkdir()
    flat = read_nab(make_nab(tmp_path / "flat"))
    checkout = tmp_path / "NAB"
    (checkout / "labels").mkdir(parents=True)
    (tmp_path / "flat" / "combined_windows.json").rename(checkout / "labels" / "combined_windows.json")
    (tmp_path / "flat").rename(checkout / "data")
    nested = read_nab(checkout)
    assert [(s.name, s.values, s.windows) for s in nested] == [(s.name, s.values, s.windows) for s in flat]


def test_eval_anomalies_scores_every_category_of_a_folder_without_realknowncause(tmp_path: Path) -> None:
    """The default category is realKnownCause when the folder has it, else every category it holds."""
    from typer.testing import CliRunner

    from backbone.cli import mounted_app

    folder = tmp_path / "nab"
    (folder / "realTraffic").mkdir(parents=True)
    times = [f"2015-09-01 {h:02d}:{m:02d}:00" for h in range(24) for m in range(0, 60, 5)]
    (folder / "realTraffic" / "speed.csv").write_text(
        "timestamp,value\n" + "".join(f"{t},{60 + (i % 7)}\n" for i, t in enumerate(times))
    )
    (folder / "combined_windows.json").write_text(
        json.dumps({"realTraffic/speed.csv": [[f"{times[200]}.000000", f"{times[230]}.000000"]]})
    )
    result = CliRunner().invoke(mounted_app(), ["eval", "anomalies", "--data", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert (figures["series"], figures["categories"], figures["windows"]) == (1, ["realTraffic"], 1)
    missing = CliRunner().invoke(
        mounted_app(), ["eval", "anomalies", "--data", str(folder), "--category", "realKnownCause"]
    )
    assert missing.exit_code == 2 and "no series" in missing.output

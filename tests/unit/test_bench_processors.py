"""The processor-throughput bench without a broker: a missing Quix Streams virtualenv is a skipped row with its
reason, not a crash, and the ratio columns leave such a row blank."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.bench_processors import QUIX_PLAIN, QUIX_STATE, RAW, _print, _quix


def test_quix_without_its_virtualenv_raises_file_not_found_naming_the_make_target(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make bench-quix-venv"):
        _quix("127.0.0.1:1", "t", 10, "state", tmp_path / "no-venv" / "bin" / "python")


def test_table_gives_ratios_to_raw_and_to_quix_and_dashes_for_a_row_not_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = [(RAW, 400_000.0, "records/s"), (QUIX_PLAIN, 100_000.0, "records/s"),
            (QUIX_STATE, 50_000.0, "records/s"), ("worker", 2_000.0, "records/s")]  # fmt: skip
    _print("t", rows)
    worker = next(line for line in capsys.readouterr().out.splitlines() if "worker" in line)
    cells = [c.strip() for c in worker.split("│") if c.strip()]
    assert cells[1:] == ["2,000", "records/s", "0.005", "0.04", "0.02"]

    _print("t", [(RAW, 400_000.0, "records/s"), (QUIX_STATE, math.nan, "not run: no venv"), rows[-1]])
    out = capsys.readouterr().out
    quix = next(line for line in out.splitlines() if "Quix Streams, count" in line)
    assert [c.strip() for c in quix.split("│") if c.strip()][1:] == ["-", "not run: no venv", "-", "-", "-"]
    worker = next(line for line in out.splitlines() if "worker" in line)
    assert [c.strip() for c in worker.split("│") if c.strip()][-3:] == ["0.005", "-", "-"]

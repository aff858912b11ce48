"""Start-up time of the ``backbone`` CLI, against the interpreter alone and the CLI libraries alone.

Every ``backbone`` call mounts all its commands before it runs one, and the test suite, the README tour and
users' scripts start many of them. This times, in one run, rounds of child processes alternating between:

* ``python -c pass``: the interpreter's own start-up (the floor);
* ``python -c "import typer, rich, pydantic_settings"``: the libraries the CLI is built on (what any
  typer CLI of this shape pays);
* ``backbone --help``, ``backbone schemas --help`` and ``backbone processors --help``: the CLI mounting
  every command and printing its help (no server is contacted).

Prints the median and the best of the rounds per command, in seconds, and each median as a multiple of
the interpreter's and of the libraries'. Figures are wall-clock seconds of the child process, from spawn
to exit; the machine is shared and noisy, hence the alternation and the medians.

Usage::

    python -m bench.bench_cli [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT

__all__ = ["COMMANDS", "main", "time_commands"]

COMMANDS: dict[str, list[str]] = {
    "python -c pass (interpreter)": [sys.executable, "-c", "pass"],
    "import typer, rich, pydantic_settings (libraries)": [
        sys.executable, "-c", "import typer, rich, pydantic_settings",
    ],
    "backbone --help": [sys.executable, "-m", "backbone", "--help"],
    "backbone schemas --help": [sys.executable, "-m", "backbone", "schemas", "--help"],
    "backbone processors --help": [sys.executable, "-m", "backbone", "processors", "--help"],
}  # fmt: skip
"""The commands timed, by the name printed; the first two are the baselines."""


def time_commands(rounds: int) -> dict[str, list[float]]:
    """Run every command of :data:`COMMANDS` once per round (in the same order each round, so that a slow
    spell of the machine falls on all of them) and return the wall-clock seconds of each run by name.

    Raises:
        RuntimeError: a command exited non-zero.
    """
    seconds: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(rounds):
        for name, cmd in COMMANDS.items():
            started = time.perf_counter()
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
            elapsed = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(f"{name} exited {done.returncode}: {done.stderr[-2000:]}")
            seconds[name].append(elapsed)
    return seconds


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    """Time the commands and print the table; return the seconds by command."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="runs of each command, alternating (7)")
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    seconds = time_commands(args.rounds)
    names = list(COMMANDS)
    floor, libraries = (statistics.median(seconds[n]) for n in names[:2])
    table = Table(title=f"CLI start-up, {args.rounds} alternating rounds (wall-clock seconds, spawn to exit)")
    for column in ("command", "median s", "best s", "x interpreter", "x libraries"):
        table.add_column(column, justify="left" if column == "command" else "right")
    for name in names:
        median = statistics.median(seconds[name])
        table.add_row(name, f"{median:.3f}", f"{min(seconds[name]):.3f}", f"{median / floor:.1f}",
                      f"{median / libraries:.2f}")  # fmt: skip
    Console().print(table)
    return seconds


if __name__ == "__main__":
    main()

"""``backbone chaos``'s own checks of its options, through typer's CliRunner: a wrong ``--fault``, ``--sabotage``
or ``--profile`` is a one-line error with exit code 2, before anything is started."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from backbone.cli.chaos import chaos

app = typer.Typer()
app.command()(chaos)  # the one command: invoked without its name


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--fault", "nope=1"], "--fault 'nope=1': write KIND=N"),
        (["--fault", "rebalance_storm"], "--fault 'rebalance_storm': write KIND=N"),
        (["--fault", "rebalance_storm=-1"], "--fault 'rebalance_storm=-1': write KIND=N"),
        (["--sabotage", "drop-everything"], "unknown sabotage 'drop-everything'"),
        (["--profile", "gentle"], "unknown profile 'gentle'"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], says: str) -> None:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert says in " ".join(r.output.split()), r.output


def test_run_chaos_refuses_unknown_kinds_before_it_starts_anything() -> None:
    from backbone.chaos import run_chaos
    from core.settings import Settings

    with pytest.raises(ValueError, match="at most once"):
        run_chaos(Settings(), profile="quiet", sabotage=("dropped-record", "dropped-record"))
    with pytest.raises(ValueError, match="counts of"):
        run_chaos(Settings(), profile="quiet", fault_counts={"meteor_strike": 1})

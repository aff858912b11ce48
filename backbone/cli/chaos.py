"""``backbone chaos``: the chaos harness (:mod:`backbone.chaos`) and its report."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from backbone.cli.helpers import JsonOpt, clear_errors, emit_json, err, out, settings_only

__all__ = ["chaos"]


@clear_errors
def chaos(
    profile: Annotated[
        str,
        typer.Option(
            help="short (about 1.5 min, 17 faults), full (about 5 min, 48 faults, the inference worker too) or quiet (no fault, "
            "about 1 min).",
            envvar="BACKBONE_CHAOS_PROFILE",
        ),
    ] = "short",
    seed: Annotated[
        int, typer.Option(help="Seed of every random choice (fault times, kinds, interleaving).")
    ] = 1,
    keep_work_dir: Annotated[
        bool, typer.Option(help="Keep the logs and data dirs even when nothing went wrong.")
    ] = False,
    sabotage: Annotated[
        list[str] | None,
        typer.Option(
            help="Break the run on purpose, to see the checker catch it (repeatable): dropped-record (the "
            "projection's checkpoint moved past 5 records it never applied) or skipped-commit (40 records' "
            "checkpoint and de-duplication ids rolled back, so they are applied twice) or lost-record (a broker "
            "restart whose archive lost an acknowledged event). Exit code 1 expected.",
        ),
    ] = None,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            help="KIND=N (repeatable): inject exactly these faults instead of the profile's, e.g. "
            "--profile quiet --fault rebalance_storm=2 for storms alone; the profile still sets the length.",
        ),
    ] = None,
    inference: Annotated[
        bool | None,
        typer.Option(
            "--inference/--no-inference",
            help="Run the inference worker (Ray, all-MiniLM-L6-v2 on the CPU) on embedding requests, with its "
            "SIGKILL and SIGSTOP faults; default: the full profile does, short and quiet do not.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Produce the agent runs (through the producer and HTTP ingest) under SIGKILL, SIGSTOP and PostgreSQL
    restarts, then check the history.

    Exit code 1 when a guarantee was violated.
    """
    from backbone.chaos import FAULT_KINDS, GUARANTEE_TITLES, GUARANTEES, PROFILES, SABOTAGE_KINDS, run_chaos

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    kinds = tuple(sabotage or ())
    for kind in kinds:
        if kind not in SABOTAGE_KINDS:
            raise ValueError(f"unknown sabotage {kind!r}; choose among {', '.join(SABOTAGE_KINDS)}")
    fault_counts: dict[str, int] | None = None
    if fault:
        fault_counts = {}
        for spec in fault:
            kind, _, n = spec.partition("=")
            if kind not in FAULT_KINDS or not n.isdigit():
                raise ValueError(f"--fault {spec!r}: write KIND=N with KIND one of {', '.join(FAULT_KINDS)}")
            fault_counts[kind] = int(n)
    settings = settings_only()
    err.print(f"chaos: profile {profile}, seed {seed}" + (f", sabotage {', '.join(kinds)}" if kinds else ""))
    report = run_chaos(settings, profile=profile, seed=seed, keep_work_dir=keep_work_dir, sabotage=kinds,
                       fault_counts=fault_counts, inference=inference)  # fmt: skip
    if as_json:
        emit_json(report.as_json())
    else:
        n_faults = sum(report.faults.values())
        counts = report.violation_counts
        table = Table(title=f"chaos, profile {report.profile}, seed {report.seed}: "
                            f"{n_faults} faults ({', '.join(f'{k} {v}' for k, v in report.faults.items())})")  # fmt: skip
        for c in ("guarantee", "faults survived", "violations"):
            table.add_column(c, justify="left" if c == "guarantee" else "right")
        for g in GUARANTEES:
            table.add_row(GUARANTEE_TITLES[g], str(n_faults) if counts[g] == 0 else "-",
                          f"[red]{counts[g]}[/red]" if counts[g] else "0")  # fmt: skip
        out.print(table)
        for v in report.violations[:50]:
            out.print(f"[red]{v.guarantee}[/red]: {v.detail}", highlight=False)
        out.print(f"events: {report.events}")
        ev = report.events
        out.print(
            f"over HTTP ingest: {ev.get('http_events', 0):,} of {ev.get('dataset', 0):,} events acknowledged "
            f"({ev.get('acknowledged_ids_http', 0):,} ids checked on the topic), {ev.get('http_requests', 0):,} "
            f"requests, {ev.get('http_failed_requests', 0):,} failed ({report.http_errors or 'none'}), "
            f"{ev.get('http_retried_events', 0):,} events sent again after a failure, "
            f"{ev.get('http_replayed_requests', 0):,} answers replayed from the idempotency store",
            highlight=False,
        )
        if report.events.get("broker_restarts"):
            out.print(
                f"broker restarts: {report.events['broker_restarts']}, "
                f"{report.events.get('restored_from_archive', 0):,} records re-seeded from the event archive; "
                f"acknowledged events lost in the documented window (not yet archived when the broker went down): "
                f"{report.events.get('lost_in_window', 0)}",
                highlight=False,
            )
        for s in report.sabotage:
            out.print(
                f"[yellow]sabotage {s['kind']}[/yellow] at {s['at_seconds']:.1f} s: partition {s['partition']}, "
                f"offsets {s['from_offset']}-{s['to_offset'] - 1}, runs {', '.join(s['keys']) or 'none'}",
                highlight=False,
            )
        hits = [f"{f.kind} at {f.at_seconds:.1f} s: {f.detail}" for f in report.fault_log if f.detail]
        if hits:
            out.print("what the faults hit: " + "; ".join(hits), highlight=False)
        for kind, why in report.skipped.items():
            out.print(f"[yellow]not injected: {kind}[/yellow] ({why})", highlight=False)
        out.print(f"durations (s): {report.durations_seconds}")
        if any(report.unexpected_exits.values()):
            out.print(
                f"[yellow]processes that exited on their own (restarted): {report.unexpected_exits}[/yellow]"
            )
        if report.work_dir:
            out.print(f"logs kept in {report.work_dir}")
    if not report.ok:
        raise typer.Exit(1)

"""``backbone demo``: the whole backbone end to end on real agent runs, then a report.

Starts the embedded stack (or uses configured servers), imports the mini-swe-agent runs as events,
runs the run-summary processor (Faust, in a subprocess) and the agent-run projection until both
have caught up, imports the same runs a second time to show that nothing is counted twice, replays the
healer on the runs, imports the Nezha TrainTicket slice (``datasets/nezha``) and runs the incident worker and
the ``incidents`` projection over it (checked against the engine replayed in process), routes the runs' task
prompts live through the policy router and the healer during an injected outage, prints the report, and
stops what it started.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr
from rich.table import Table

from backbone.cli.helpers import emit_json, err, out

__all__ = ["demo"]


def _start_processor(settings: Any, state_dir: Path) -> subprocess.Popen[bytes]:
    from backbone.cli.demo_live import worker_env

    env = worker_env(settings)
    log = open(state_dir / "processor.log", "wb")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(
        [sys.executable, "-m", "backbone", "processors", "worker"], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def demo(
    data: Annotated[
        Path, typer.Option(help="Folder of mini-swe-agent runs.", envvar="BACKBONE_DEMO_DATA")
    ] = Path("datasets/agent_runs"),
    timeout_seconds: Annotated[float, typer.Option(help="Give up after this long.")] = 600.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    runs_only: Annotated[
        bool,
        typer.Option(
            "--runs-only",
            help="Only import, project and summarise the runs: no healing and incident replays, no Nezha "
            "slice, no live routing and healing.",
        ),
    ] = False,
) -> None:
    """Run the backbone end to end on real agent runs and print a report.

    The report (``--json``): ``totals``, ``models``, ``insights`` (run summaries emitted), ``timings_s``,
    ``import``, ``skipped_files``; without ``--runs-only`` also ``healing``, ``incidents`` (the engine
    replayed on the Nezha slice), ``incidents_live`` (the slice through the incident worker) and ``live``
    (routing and healing on the live stack). Exits 1 when a check fails (a missing run summary, a
    re-import that moved the views, a circuit that did not open and close, incidents unlike the replay's),
    2 when the stack cannot start."""
    import psycopg
    from confluent_kafka.admin import AdminClient

    from backbone.cli.core import import_runs
    from backbone.cli.demo_live import (
        demo_start_time,
        run_live,
        set_routing_config,
        start_workers,
        worker_env,
    )
    from backbone.devstack import DevStack
    from core.errors import BackboneError
    from core.observability import configure_logging
    from core.settings import get_settings
    from processors.run_summary.app import wait_for_run_summaries
    from projections import queries
    from projections.agent_runs import AgentRunsProjection
    from projections.runner import ProjectionRunner
    from streams.catalogue import ensure_topics
    from streams.serde import serde_from_settings

    say = err.print if as_json else out.print
    base = get_settings()
    configure_logging("WARNING", base.log_format, force=True)
    state_dir = (base.state_dir / "demo").absolute()
    state_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        stack = DevStack(base, state_dir=state_dir, durable=False)  # a demo: commits need not survive a crash
        info = stack.start()
    except BackboneError as exc:
        say(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    processor = None
    workers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        settings = base.model_copy(
            update={
                "kafka": base.kafka.model_copy(update={"bootstrap_servers": info.kafka_bootstrap}),
                "postgres": base.postgres.model_copy(update={"url": SecretStr(info.postgres_url)}),
                "redis": base.redis.model_copy(update={"url": SecretStr(info.redis_url)}),
            }
        )
        timings["stack_start_s"] = time.perf_counter() - t0
        say(f"stack up in {timings['stack_start_s']:.1f} s: kafka {info.kafka_bootstrap}, "
                  f"postgres {info.postgres_url.split('@')[-1]}, redis {info.redis_url}")  # fmt: skip
        serde = serde_from_settings(settings)
        ensure_topics(AdminClient(settings.kafka.librdkafka()))
        routing_version = set_routing_config(settings)
        processor = _start_processor(settings, state_dir)
        if not runs_only:
            workers = start_workers(worker_env(settings), state_dir)

        t = time.perf_counter()
        report = import_runs(settings, serde, data, "agent.events")
        timings["import_s"] = time.perf_counter() - t
        say(f"imported {report['runs']} runs as {report['events']:,} events in {timings['import_s']:.1f} s"
                  f" ({report['events'] / max(timings['import_s'], 1e-9):,.0f} events/s)")  # fmt: skip
        for p in report["problems"]:
            say(f"[yellow]skipped[/yellow] {p['path']}: {p['reason']}")

        t = time.perf_counter()
        with ProjectionRunner(settings, serde, AgentRunsProjection()) as runner:
            stats = runner.run(until_caught_up=True, max_wait_seconds=timeout_seconds)
        timings["projection_s"] = time.perf_counter() - t
        say(f"projection caught up: {stats.applied:,} events applied in {timings['projection_s']:.1f} s")

        # the same runs again: deterministic event ids, so the views must not move
        report2 = import_runs(settings, serde, data, "agent.events", progress=False)
        with ProjectionRunner(settings, serde, AgentRunsProjection()) as runner:
            stats2 = runner.run(until_caught_up=True, max_wait_seconds=timeout_seconds)
        say(f"re-imported {report2['events']:,} events: {stats2.duplicates:,} skipped as duplicates, "
                  f"{stats2.applied} applied")  # fmt: skip

        with psycopg.connect(settings.postgres.dsn()) as conn:
            totals = queries.totals(conn)
            models = queries.model_usage(conn)
            runs = queries.agent_runs(conn, limit=max(totals["runs"], 1))
        t = time.perf_counter()
        finished = [r["run_id"] for r in runs if r["finished_at"] is not None]
        summaries: dict[str, Any] = {}
        while not summaries:  # wait in slices, so a processor that died ends the wait early
            try:
                summaries = wait_for_run_summaries(settings, finished, timeout_seconds=10.0, serde=serde)
            except TimeoutError:
                if processor.poll() is not None or time.perf_counter() - t > timeout_seconds:
                    break
        n_insights = len(summaries)
        insights = [r.data for r in summaries.values()]
        timings["insights_wait_s"] = time.perf_counter() - t
        if n_insights < totals["finished"]:
            say(f"[red]processor emitted {n_insights} of {totals['finished']} run summaries[/red] "
                      f"(log: {state_dir / 'processor.log'})")  # fmt: skip
        doc = {"totals": totals, "models": models, "insights": n_insights, "timings_s": timings,
               "import": {k: v for k, v in report.items() if k != "problems"}, "skipped_files": report["problems"]}  # fmt: skip
        doc.update(
            {"healing": None, "incidents": None, "live": None}
            if runs_only
            else _healing_and_incidents(data, say)
        )
        if doc["incidents"] is not None:
            t = time.perf_counter()
            doc["incidents_live"] = _live_incidents(
                settings, serde, state_dir, timeout_seconds, doc["incidents"]["ranked"]
            )
            timings["incidents_live_s"] = time.perf_counter() - t
            live_inc = doc["incidents_live"]
            say(f"Nezha slice imported ({live_inc['import']['events']:,} events), the incident worker's "
                f"{len(live_inc['incidents'])} incidents projected in {timings['incidents_live_s']:.1f} s, "
                f"the same as the replay's: {'yes' if live_inc['same_as_replay'] else 'NO'}")  # fmt: skip
        if not runs_only:
            try:
                doc["live"] = run_live(
                    settings, serde, data, workers, say, start=demo_start_time(totals["last_event_at"])
                )
                doc["live"]["routing_config_version"] = routing_version
            except TimeoutError as exc:
                say(f"[red]live routing and healing: {exc}[/red] (logs: {state_dir})")
                doc["live"] = None
        if doc["live"]:
            timings["live_s"] = doc["live"]["seconds"]
        timings["total_s"] = time.perf_counter() - t0
        _report(doc, runs, insights, as_json)
        live = doc["live"]
        live_ok = runs_only or (
            bool(live)
            and any(c["kind"] == "circuit_opened" for c in live["circuit_chain"])
            and live["final_circuit"] == "closed"
        )
        if live and not live_ok:
            say(f"[red]the injected outage did not open and close the circuit[/red] (logs: {state_dir})")
        incidents_ok = doc["incidents"] is None or doc["incidents_live"]["same_as_replay"]
        if not incidents_ok:
            say(
                f"[red]the incident worker's incidents differ from the replay's[/red] (log: {state_dir / 'incidents.log'})"
            )
        ok = n_insights >= totals["finished"] and stats2.applied == 0 and live_ok and incidents_ok
    finally:
        for proc in [p for p in (processor, *workers.values()) if p is not None]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [p for p in (processor, *workers.values()) if p is not None]:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        stack.stop()
    if not ok:
        raise typer.Exit(1)


NEZHA_SLICE = Path(__file__).resolve().parents[2] / "datasets" / "nezha"
"""The Nezha TrainTicket slice copied into the project (MIT, see its README) for the demo."""


def _live_incidents(
    settings: Any, serde: Any, state_dir: Path, timeout_seconds: float, replay: dict[str, list[str]]
) -> dict[str, Any]:
    """The Nezha slice through the backbone: imported to the telemetry topics (``backbone import nezha``),
    correlated by the incident worker (``backbone processors incidents --stop-after-idle 2 --close-at-end``,
    a replay of a finished history: its end decides the windows still open), its insights projected to
    PostgreSQL (the ``incidents`` projection) and read back as ``backbone query incidents`` reads them;
    compared with ``replay`` (``{incident entity: [pod, ...]}``, the ranked candidates of the incident engine
    replayed in process on the same slice, fed in event-time order then flushed: the ``ranked`` of
    :func:`processors.incidents.eval_nezha.evaluate`).

    Returns:
        ``{"import": {"events", "seconds", "dead_lettered"}, "worker": its counters (``--json``) or None when
        it failed or ran longer than ``timeout_seconds``, "incidents": [list_incidents rows, oldest first],
        "replay_incidents": int, "same_as_replay": bool}`` (the same incidents, each with the same ranked
        candidates, in order).
    """
    import json

    import psycopg

    from backbone.cli.demo_live import worker_env
    from backbone.cli.incidents import run_import
    from projections.incidents import IncidentsProjection, list_incidents
    from projections.runner import ProjectionRunner

    report = run_import(settings, serde, NEZHA_SLICE, progress=False)
    worker = None
    with open(state_dir / "incidents.log", "wb") as log:
        try:
            done = subprocess.run(
                [sys.executable, "-m", "backbone", "processors", "incidents", "--stop-after-idle", "2",
                 "--close-at-end", "--json"], env=worker_env(settings), stdout=subprocess.PIPE, stderr=log,
                timeout=timeout_seconds,
            )  # fmt: skip
        except subprocess.TimeoutExpired:  # killed by run(); reported as a worker that failed
            done = None
    if done is not None and done.returncode == 0:
        out = done.stdout.decode()  # the counters, indented JSON, after anything else the worker printed
        worker = json.loads(out[out.rfind("\n{") + 1 :])
    with ProjectionRunner(settings, serde, IncidentsProjection()) as runner:
        runner.run(until_caught_up=True, max_wait_seconds=timeout_seconds)
    with psycopg.connect(settings.postgres.dsn()) as conn:
        rows = list_incidents(conn, limit=1000)
    same = worker is not None and {r["entity"]: [c["pod"] for c in r["candidates"]] for r in rows} == replay
    return {"import": {"events": report["events"], "seconds": report["seconds"], "dead_lettered": report["dead_lettered"]},
            "worker": worker, "incidents": rows[::-1], "replay_incidents": len(replay), "same_as_replay": same}  # fmt: skip


def _healing_and_incidents(data: Path, say: Any) -> dict[str, Any]:
    """The healer's decisions replayed on the same runs (early warnings; an outage injected on their
    provider, healer against LiteLLM's cooldown) and the incident engine on the Nezha slice."""
    from processors.healing.evaluation import evaluate_early_warnings, evaluate_outage
    from processors.incidents.eval_nezha import evaluate as evaluate_incidents

    t = time.perf_counter()
    warnings = evaluate_early_warnings(data)
    outage = evaluate_outage(data)
    incidents = evaluate_incidents(NEZHA_SLICE) if NEZHA_SLICE.is_dir() else None
    say(f"healing and incidents replayed in {time.perf_counter() - t:.1f} s")
    return {"healing": {"early_warnings": warnings, "outage": outage}, "incidents": incidents}


def _n(v: Any) -> str:
    return "" if v is None else f"{v:,.0f}" if isinstance(v, (int, float)) else str(v)


def _report_healing_and_incidents(doc: dict[str, Any]) -> None:
    w = doc["healing"]["early_warnings"]
    table = Table(title="Healing on these runs: warnings before a run's last step (unresolved runs)")
    for c in ("policy", "flagged", "precision", "recall", "median lead (steps)", "median lead (s)"):
        table.add_column(c, justify="left" if c == "policy" else "right")
    for name, r in (("healer", w), ("baseline (median steps)", w["baseline"])):
        table.add_row(name, str(r["flagged"]), f"{r['precision']:.2f}", f"{r['recall']:.2f}",
                      _n(r["median_lead_steps"]), _n(r["median_lead_seconds"]))  # fmt: skip
    _show(table)
    o = doc["healing"]["outage"]
    table = Table(
        title=f"An outage injected on {o['outage']['provider']}: circuit breaker with fallback vs LiteLLM cooldown"
    )
    for c in (
        "policy",
        "calls to the failing provider",
        "open after (s)",
        "closed after recovery (s)",
        "served by fallback",
        "failed to caller",
    ):
        table.add_column(c, justify="left" if c == "policy" else "right")
    for name in ("healer", "baseline"):
        r = o[name]
        table.add_row(name, str(r["calls_to_failing_provider_while_down"]), _n(r["time_to_open_seconds"]),
                      _n(r["time_to_close_after_recovery_seconds"]), str(r["served_by_fallback"]),
                      str(r["requests_failed_to_caller"]))  # fmt: skip
    _show(table)
    inc = doc.get("incidents")
    if inc:
        table = Table(
            title=f"Incidents on the Nezha TrainTicket slice: {inc['faults']} injected faults, {inc['incidents']} incidents",
            caption="at: injection time, UTC; pods by deployment (the name less its ReplicaSet hash and pod suffix);"
            " found: seconds from the injection to the incident; rank: the faulty pod's rank among the candidates",
            pad_edge=False,
        )
        for c in ("at", "faulty pod", "kind", "found", "rank", "top-1 candidate"):
            table.add_column(c, overflow="fold", min_width=19 if "pod" in c or "top-1" in c else None)
        for f in inc["per_fault"]:
            table.add_row(str(f["inject_time"]).replace(" ", "\n"), _deployment(f["pod"]), f["kind"], _n(f.get("detection_seconds")),
                          _n(f.get("rank_pod")), _deployment(str(f.get("top1_pod") or "")))  # fmt: skip
        _show(table)
    live = doc.get("incidents_live")
    if live:
        table = Table(
            title=f"The same slice through the backbone: {live['import']['events']:,} events imported, "
            f"{len(live['incidents'])} incidents from the incident worker, as `backbone query incidents` shows them",
            caption="first anomaly: start of its one-minute window, UTC; causes: the ranked root-cause candidates (score);"
            " the worker ran with --close-at-end: the end of the slice decides the windows the watermark had not passed",
            pad_edge=False,
        )
        for c in ("first anomaly", "status", "priority", "anomalies", "ranked causes"):
            table.add_column(c, overflow="fold")
        for r in live["incidents"]:
            causes = [f"{c['rank']}. {_deployment(c['pod'])} ({c['score']:.1f})" for c in r["candidates"][:3]]
            table.add_row(str(r["first_anomaly_at"]).replace("T", "\n"), r["status"], r["priority"],
                          str(r["anomalies_count"]), "\n".join(causes))  # fmt: skip
        _show(table)


_POD_SUFFIX = re.compile(r"-[a-z0-9]{6,10}-[a-z0-9]{5}$")


def _deployment(pod: str) -> str:
    """A Kubernetes pod name without its ReplicaSet hash and pod suffix (``ts-contacts-service-866bd68c97-xcqfx``
    -> ``ts-contacts-service``); other names as they are."""
    return _POD_SUFFIX.sub("", pod)


def _show(table: Table) -> None:
    """Print a report table whose cells wrap instead of being cut (``gemini-2.5-f…`` at 80 columns)."""
    for column in table.columns:
        column.overflow = "fold"
    out.print(table)


def _report_live(live: dict[str, Any]) -> None:
    from backbone.cli.demo_live import short

    o = live["outage"]
    table = Table(
        title=f"Live: {live['prompts']} real task prompts routed (routing.config v{live['routing_config_version']}), "
        f"{o['provider']} down; the healer's circuits honoured by the router and the client"
    )
    for c in ("phase", "requests", "router chose", "served by", "client fallbacks", "cost USD"):
        table.add_column(c, justify="right" if c in ("requests", "client fallbacks", "cost USD") else "left")
    for name, p in live["phases"].items():
        table.add_row(name, str(p["requests"]),
                      "\n".join(f"{short(m)} {n}" for m, n in sorted(p["router_chose"].items())),
                      "\n".join(f"{short(m)} {n}" for m, n in sorted(p["served_by"].items())),
                      str(p["client_fallbacks"]), f"{p['cost_usd']:.4f}")  # fmt: skip
    _show(table)
    chain = Table(title=f"The circuits' chain (proj_healing.decisions); open in the read model "
                        f"{_n(live['opened_after_first_failure_ms'])} ms after the first failing call's ack")  # fmt: skip
    for c in ("event time", "circuit", "decision", "evidence"):
        chain.add_column(c)
    for r in live["circuit_chain"]:
        d = r["details"] or {}
        evidence = f"{d.get('reason', '')}; {d.get('window_failures', 0)}/{d.get('window_calls', 0)} failed in the window"
        chain.add_row(
            r["event_time"][11:19],
            r["subject"].removeprefix("circuit:"),
            r["kind"].removeprefix("circuit_"),
            evidence,
        )
    _show(chain)
    if live["warnings_live"]:
        w = Table(title="Warnings the live healer raised on the imported runs (proj_healing.warnings)")
        for c in ("signal", "warnings", "runs"):
            w.add_column(c, justify="left" if c == "signal" else "right")
        for r in live["warnings_live"]:
            w.add_row(r["signal"], str(r["n"]), str(r["runs"]))
        _show(w)
    spent = sum(p["cost_usd"] for p in live["phases"].values())
    strong = sum(p["always_strong_usd"] for p in live["phases"].values())
    out.print(f"routed cost {spent:.4f} USD; the same requests on gemini-3-pro-preview: {strong:.4f} USD. "
              f"Router fallback decisions after a failed outcome: {live['router_fallback_decisions']}; "
              f"{o['provider']} circuit at the end: {live['final_circuit']}; live part {live['seconds']:.1f} s")  # fmt: skip


def _report(
    doc: dict[str, Any], runs: list[dict[str, Any]], insights: list[dict[str, Any]], as_json: bool
) -> None:
    if as_json:
        emit_json(doc)
        return
    t = doc["totals"]
    table = Table(title="Sophia backbone demo: agent runs as events", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    for label, value in (
        ("runs", f"{t['runs']:,}"),
        ("resolved", f"{t['resolved']:,} ({t['resolved'] / max(t['runs'], 1):.1%})"),
        ("LLM calls", f"{t['llm_calls']:,} ({t['calls_without_cost']} without a cost)"),
        ("tool calls", f"{t['tool_calls']:,} ({t['failing_tool_calls']} failing)"),
        ("tokens (prompt / completion)", f"{t['prompt_tokens']:,} / {t['completion_tokens']:,}"),
        ("cost by response (USD)", f"{t['cost_usd']:.3f}"),
        ("event time", f"{t['first_event_at']:%Y-%m-%d %H:%M} .. {t['last_event_at']:%Y-%m-%d %H:%M} UTC"),
        ("run-summary insights", f"{doc['insights']:,}"),
        ("calls per run", f"{t['llm_calls'] / max(t['runs'], 1):.1f}"),
    ):
        table.add_row(label, value)
    _show(table)
    m = Table(title="per model")
    for c in ("model", "runs", "resolved", "calls", "cost USD"):
        m.add_column(c, justify="left" if c == "model" else "right")
    for r in doc["models"]:
        m.add_row(
            r["model"], str(r["runs"]), str(r["resolved_runs"]), f"{r['llm_calls']:,}", f"{r['cost_usd']:.3f}"
        )
    _show(m)
    streaks = sorted(insights, key=lambda i: -i.get("metrics", {}).get("longest_failing_streak_count", 0))[:3]
    if streaks:
        s = Table(title="longest failing-command streaks (from run-summary insights)")
        for c in ("run", "streak", "outcome", "cost USD"):
            s.add_column(c)
        for i in streaks:
            s.add_row(i["entity"], f"{i['metrics'].get('longest_failing_streak_count', 0):.0f}",
                      i["labels"].get("outcome", ""), f"{i['metrics'].get('cost_usd', 0):.3f}")  # fmt: skip
        _show(s)
    tm = doc["timings_s"]
    if doc.get("healing"):
        _report_healing_and_incidents(doc)
    if doc.get("live"):
        _report_live(doc["live"])
    live_s = f", live routing and healing {tm['live_s']:.1f} s" if tm.get("live_s") is not None else ""
    out.print(f"timings: stack {tm['stack_start_s']:.1f} s, import {tm['import_s']:.1f} s, "
              f"projection {tm['projection_s']:.1f} s{live_s}, total {tm['total_s']:.1f} s")  # fmt: skip

"""``backbone query routing`` and ``backbone audit request:ID``: read the ``routing`` projection
(:mod:`projections.routing`).

Mounted by :func:`backbone.cli.mount` (``query routing``); ``backbone audit`` hands an entity
``request:<id>`` to :func:`print_request_audit`.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from backbone.cli.helpers import (
    JsonOpt,
    clear_errors,
    context,
    emit_json,
    err,
    fmt,
    out,
    print_cells,
    print_rows,
)

__all__ = ["print_request_audit", "query_routing"]

_DECISION_COLS = ["decided_at", "request_id", "policy", "ab_arm", "model", "fallback_from", "config_version",
                  "learner_version"]  # fmt: skip
"""The text table's columns (``--json`` has every field, candidates and reason included)."""
_MODEL_COLS = ["model", "provider", "decisions", "fallbacks_taken", "fell_back_from", "outcomes", "success_rate",
               "latency_p50_ms", "latency_p95_ms", "cost_usd"]  # fmt: skip


def _missing_view(exc: Exception) -> typer.Exit:
    err.print(f"[red]error:[/red] the routing view does not exist yet (run `backbone projections run routing`): "
              f"{exc}", highlight=False)  # fmt: skip
    return typer.Exit(2)


@clear_errors
def query_routing(
    limit: Annotated[int, typer.Option(help="Most decisions.", min=1)] = 50,
    policy: Annotated[str | None, typer.Option(help="Only decisions of this policy.")] = None,
    model: Annotated[str | None, typer.Option(help="Only decisions that chose this model.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The policy router's decisions, latest first, and the per-model statistics (decisions, outcomes,
    success rate, latency p50/p95 in ms, cost in USD, fallbacks)."""
    import psycopg

    from projections import routing

    settings, _ = context(kafka=False)
    try:
        with psycopg.connect(settings.postgres.dsn(), connect_timeout=5) as conn:
            decisions = routing.decisions(conn, limit=limit, policy=policy, model=model)
            models = routing.model_stats(conn)
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName) as exc:
        raise _missing_view(exc) from None
    if as_json:
        emit_json({"decisions": decisions, "models": models})
        return
    print_rows(decisions, _DECISION_COLS, f"routing decisions (latest {len(decisions)})", False)
    print_rows(models, _MODEL_COLS, "routing per model", False)


def _print_decision(decision: dict[str, Any]) -> None:
    """A decision's header, its candidates (scores and estimates) as a table, then why each was or was not
    chosen, one line per candidate (lines wrap, so nothing is cut at any terminal width)."""
    fb = (
        f" fallback after {', '.join(decision['fallback_from'])} failed," if decision["fallback_from"] else ""
    )
    arm = f" (A/B arm {decision['ab_arm']})" if decision["ab_arm"] else ""
    out.print(
        f"[bold]decision[/bold] {decision['decision_id']} at {decision['decided_at']}:{fb} policy "
        f"{decision['policy']}{arm} -> [bold]{decision['model'] or 'no model'}[/bold] "
        f"({decision['provider'] or '-'}); config v{decision['config_version']}, learner "
        f"{decision['learner_version']}; fallbacks: {', '.join(decision['fallbacks']) or 'none'}",
        highlight=False,
    )
    out.print(f"  reason: {decision['reason']}", highlight=False)
    cols = ("model", "chosen", "eligible", "rank", "score", "est $", "est ms", "quality", "circuit")
    ordered = sorted(decision["candidates"], key=lambda c: (c["rank"] < 0, c["rank"], c["model"]))
    cells = [
        [c["model"], "yes" if c["chosen"] else "", "yes" if c["eligible"] else "no", str(c["rank"]),
         f"{c['score']:.6g}", f"{c['est_cost_usd']:.6f}", f"{c['est_latency_ms']:.0f}",
         f"{c['learned_quality']:.3f}", c["circuit_state"]]
        for c in ordered
    ]  # fmt: skip
    print_cells(cells, cols, "candidates", right={"rank", "score", "est $", "est ms", "quality"})
    for c in ordered:
        out.print(f"  {c['model']}: {'; '.join(c['reasons'])}", highlight=False, soft_wrap=True)


def print_request_audit(request_id: str, *, as_json: bool) -> None:
    """Print the routing audit of one request: each decision (the first, then the fallbacks) with every
    candidate, its score and why it was or was not chosen, the config and learner versions; then the
    outcomes. Without ``as_json``, exit 1 when the routing view knows nothing of the request."""
    import psycopg

    from projections import routing

    settings, _ = context(kafka=False)
    try:
        with psycopg.connect(settings.postgres.dsn(), connect_timeout=5) as conn:
            audit = routing.request_audit(conn, request_id)
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName) as exc:
        raise _missing_view(exc) from None
    if as_json:
        emit_json(audit.as_json())  # empty lists for an unknown request, like `audit --json` prints []
        return
    if not audit.decisions and not audit.outcomes:
        err.print(f"no routing decision or outcome for request {request_id!r}")
        raise typer.Exit(1)
    out.print(f"[bold]request:{request_id}[/bold]: {len(audit.decisions)} decision(s), "
              f"{len(audit.outcomes)} outcome(s)")  # fmt: skip
    for d in audit.decisions:
        _print_decision(d)
    cols = ("occurred_at", "model", "success", "correct", "latency_ms", "cost_usd", "after_fallback")
    print_cells([[fmt(o[c]) for c in cols] for o in audit.outcomes], cols, "outcomes")

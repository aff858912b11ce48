"""``backbone routing fit|eval|simulate|ab`` (typer): the router's offline tools.

Mount :data:`app` as ``backbone routing`` (it adds ``simulate`` and ``ab`` to the commands of
:mod:`processors.routing.cli`; ``fit`` and ``eval`` here replace theirs: they also read a RouteLLM
responses CSV and give the issue's eval figures). Every command that prints data has ``--json``; bad
input is one red line and exit code 2.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from backbone.cli.helpers import JsonOpt, clear_errors, emit_json, print_cells

__all__ = ["ab_command", "app", "eval_command", "fit_command", "policy_worker_command", "simulate_command"]

out = Console()
err = Console(stderr=True)

app = typer.Typer(
    help="Model routing: fit, evaluate, simulate policies, compare A/B arms.", no_args_is_help=True
)

DataOpt = Annotated[
    Path,
    typer.Option(
        "--data",
        help="Folder of RouteLLM mmlu_<subject>.csv, or one RouteLLM responses CSV (prompt, <model>, <model>_response).",
        envvar="BACKBONE_ROUTING_DATA",
    ),
]


def _prices(value: str | None) -> dict[str, tuple[float, float]]:
    from processors.routing.evaluation import DEFAULT_PRICES_USD_PER_MILLION

    prices = dict(DEFAULT_PRICES_USD_PER_MILLION)
    if value:
        raw = json.loads(Path(value).read_text(encoding="utf-8") if Path(value).is_file() else value)
        if not isinstance(raw, dict):
            raise ValueError("--prices: a JSON object {model: [input, output]} in USD per million tokens")
        for model, pair in raw.items():
            if not (isinstance(pair, list | tuple) and len(pair) == 2):
                raise ValueError(
                    f"--prices: {model}: expected [input_usd_per_million, output_usd_per_million]"
                )
            prices[model] = (float(pair[0]), float(pair[1]))
    return prices


@app.command("fit")
@clear_errors
def fit_command(
    data: DataOpt,
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the router (.npz and .json).")],
    strong: Annotated[
        str | None, typer.Option(help="Strong model column (default GPT-4-1106, else the most accurate).")
    ] = None,
    weak: Annotated[
        str | None, typer.Option(help="Weak model column (default Mixtral-8x7B, else the least accurate).")
    ] = None,
    test_percent: Annotated[
        int, typer.Option(help="Percent of prompts held out (by prompt hash).", min=1, max=90)
    ] = 20,
    split_by: Annotated[
        str, typer.Option("--split-by", help="prompt: hash of each prompt; subject: whole subjects held out.")
    ] = "prompt",
    as_json: JsonOpt = False,
) -> None:
    """Fit a features router (sklearn) and its N-model online learner on the train split; save it."""
    from processors.routing.artifact import fit_router
    from processors.routing.data import read_outcomes, split

    started = time.perf_counter()
    outcomes = read_outcomes(data)
    train_all, test_all = split(outcomes, test_percent, by=split_by)
    pair = train_all.pair(strong, weak)
    strong_name = strong or _pair_names(outcomes, strong, weak)[0]
    weak_name = weak or _pair_names(outcomes, strong, weak)[1]
    router = fit_router(
        pair, strong_model=strong_name, weak_model=weak_name, outcomes=train_all, test_percent=test_percent, split_by=split_by,
        source=f"{data} ({len(outcomes)} prompts, {outcomes.excluded_count} excluded)",
    )  # fmt: skip
    path = router.save(out_file)
    report = {
        "router": str(path),
        "version": router.version,
        "models": list(outcomes.models),
        "strong_model": strong_name,
        "weak_model": weak_name,
        "train_prompts": len(train_all),
        "test_prompts": len(test_all),
        "excluded_prompts": outcomes.excluded_count,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if as_json:
        emit_json(report)
    else:
        out.print(
            f"fitted router {router.version} ({strong_name} vs {weak_name}, {len(outcomes.models)} models learned) "
            f"on {len(train_all):,} prompts; {len(test_all):,} held out; wrote {path} in {report['seconds']} s"
        )


def _pair_names(outcomes: Any, strong: str | None, weak: str | None) -> tuple[str, str]:
    pair = outcomes.pair(strong, weak)
    names = {}
    for m in outcomes.models:
        col = outcomes.column(m)
        if strong is None and "s" not in names and (col == pair.strong_correct).all():
            names["s"] = m
        elif weak is None and "w" not in names and (col == pair.weak_correct).all():
            names["w"] = m
    return strong or names["s"], weak or names["w"]


@app.command("eval")
@clear_errors
def eval_command(
    router_file: Annotated[
        Path,
        typer.Option(
            "--router", help="Router artifact (.npz with its .json).", envvar="BACKBONE_ROUTING_ROUTER"
        ),
    ],
    data: DataOpt,
    online: Annotated[
        bool, typer.Option("--online", help="Stream the prompts, learning from each chosen model's outcome.")
    ] = False,
    all_prompts: Annotated[
        bool,
        typer.Option(
            "--all", help="Score every prompt (a set the router was not fitted on), not the hash test split."
        ),
    ] = False,
    strong: Annotated[str | None, typer.Option(help="Strong model column (default the router's).")] = None,
    weak: Annotated[str | None, typer.Option(help="Weak model column (default the router's).")] = None,
    prices: Annotated[
        str | None,
        typer.Option(help="JSON (or a JSON file) {model: [input, output]} USD per million tokens."),
    ] = None,
    output_tokens: Annotated[int, typer.Option(help="Output tokens assumed per call.", min=0)] = 64,
    as_json: JsonOpt = False,
) -> None:
    """APGR, CPT(50%), strong share at 95 % of strong accuracy, USD saved vs always-strong (offline or online)."""
    from processors.routing.artifact import Router
    from processors.routing.data import read_outcomes, split
    from processors.routing.evaluation import eval_offline, eval_online

    router = Router.load(router_file)
    outcomes = read_outcomes(data)
    strong = strong or (router.strong_model if router.strong_model in outcomes.models else None)
    weak = weak or (router.weak_model if router.weak_model in outcomes.models else None)
    strong, weak = _pair_names(outcomes, strong, weak)
    if all_prompts:  # a set the router was not fitted on: every prompt is scored, none calibrates
        import numpy as np

        train, test = outcomes.subset(np.zeros(len(outcomes), dtype=bool)), outcomes
    else:
        by = str(router.metadata.get("split_by", "prompt"))
        train, test = split(outcomes, int(router.metadata.get("test_percent", 20)), by=by)
    if len(test) == 0:
        raise ValueError(f"{data}: no prompt to evaluate on")
    price_table = _prices(prices)
    for m in (strong, weak):
        if m not in price_table:
            raise ValueError(f"no price for {m!r}; pass --prices '{{\"{m}\": [in, out]}}'")
    pair = test.pair(strong, weak)
    if online:
        report = eval_online(
            router, pair, strong_model=strong, weak_model=weak, strong_price=price_table[strong],
            weak_price=price_table[weak], output_tokens=output_tokens, train_prompts=train.prompts,
        )  # fmt: skip
    else:
        report = eval_offline(router, pair, strong_price=price_table[strong], weak_price=price_table[weak],
                              output_tokens=output_tokens)  # fmt: skip
    report |= {"router_version": router.version, "data": str(data), "strong_model": strong, "weak_model": weak,
               "split": "all prompts" if all_prompts else
               f"{router.metadata.get('split_by', 'prompt')} hash test split ({router.metadata.get('test_percent', 20)} %)",
               "prices_usd_per_million": {strong: price_table[strong], weak: price_table[weak]},
               "output_tokens_per_call": output_tokens}  # fmt: skip
    if as_json:
        emit_json(report)
        return
    cols = ["apgr", "cpt50", "strong_share_at_95pct", "usd_saved_at_95pct", "usd_always_strong"]
    print_cells([[str(report[c]) for c in cols]], cols,
                f"routing eval ({'online' if online else 'offline'}) on {report['prompts']:,} prompts", right=cols)  # fmt: skip
    out.print(f"protocol: {report['protocol']}")
    out.print(
        "anchors (RouteLLM, arXiv 2406.18665, trained offline on other data): MMLU APGR 0.603, CPT(50%) 35.4 %; GSM8K APGR 0.622"
    )


@app.command("simulate")
@clear_errors
def simulate_command(
    policy: Annotated[
        str,
        typer.Option(
            "--policy",
            help="A policy of the live routing.config, or a JSON file (a policy rule or a whole routing.config).",
        ),
    ],
    data: Annotated[
        Path,
        typer.Option("--data", help="History folder: events.jsonl, decisions.jsonl, optional router.npz."),
    ],
    as_json: JsonOpt = False,
) -> None:
    """Replay recorded requests and outcomes through a candidate policy next to the live rule (deterministic)."""
    from processors.routing.simulate import read_history, simulate

    report = simulate(read_history(data), policy)
    if as_json:
        emit_json(report)
        return
    cols = ["requests", "served", "unservable", "est_cost_usd", "quality", "estimated_quality_share",
            "est_latency_ms_p50", "models"]  # fmt: skip
    print_cells([[name, *(str(report[name][c]) for c in cols)] for name in ("live", "candidate")], ["", *cols],
                f"routing simulate: {report['policy']} vs live on {report['live']['requests']:,} requests",
                right=cols[:-1])  # fmt: skip
    out.print(f"live rule reproduces the recorded decisions: {report['identical']} ({report['mismatches']} mismatches); "
              f"{report['changed_decisions']} requests would go to another model")  # fmt: skip


@app.command("ab")
@clear_errors
def ab_command(
    report: Annotated[
        Path, typer.Argument(help="History folder (events.jsonl with outcomes, decisions.jsonl).")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Compare the outcomes of the two arms of an A/B split between policies."""
    from processors.routing.simulate import ab_report, read_history

    rows = ab_report(read_history(report))
    if not rows:
        raise ValueError(f"{report}: no decision with an A/B arm")
    if as_json:
        emit_json(rows)
        return
    print_cells(
        [[str(v) for v in r.values()] for r in rows], list(rows[0]), "routing A/B", right=list(rows[0])
    )


@app.command("policy-worker")
@clear_errors
def policy_worker_command(
    router_file: Annotated[
        Path | None,
        typer.Option(
            "--router",
            help="Router artifact whose online learner to start from (default: none, quality 0.5).",
        ),
    ] = None,
    app_id: Annotated[str, typer.Option(help="Faust app id (consumer group).")] = "backbone-routing-policy",
    requests_topic: Annotated[str, typer.Option(help="Route requests (JSON).")] = "routing.policy-requests",
    outcomes_topic: Annotated[str, typer.Option(help="Outcomes (JSON).")] = "routing.outcomes",
    config_topic: Annotated[
        str, typer.Option(help="Configuration changes (Avro ConfigChange).")
    ] = "config.changes",
    decisions_topic: Annotated[str, typer.Option(help="Decisions (JSON).")] = "routing.policy-decisions",
    dlq_topic: Annotated[str, typer.Option(help="Dead letters.")] = "backbone.dlq",
    history_dir: Annotated[
        Path | None, typer.Option(help="Folder of the history log (events.jsonl, decisions.jsonl).")
    ] = None,
    stop_after_idle: Annotated[float | None, typer.Option(help="Stop after this many idle seconds.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the N-model policy router (requests + outcomes + config changes -> decisions) until stopped or idle."""
    from dataclasses import asdict

    from processors.routing.artifact import Router
    from processors.routing.policy_app import PolicyTopics, run_policy_worker

    learner = Router.load(router_file).quality() if router_file else None
    if history_dir is not None and router_file is not None:
        history_dir.mkdir(parents=True, exist_ok=True)
        Router.load(router_file).save(history_dir / "router.npz")  # the learner's start, for simulate
    from configuration.errors import ConfigurationError
    from configuration.store import ConfigStore
    from core.stack import load_settings

    settings = load_settings()
    initial = None
    if settings.postgres.url:
        try:
            with ConfigStore(settings) as store:
                current = store.get("routing.config")
            initial = (dict(current.value), int(current.version))
        except ConfigurationError as exc:
            err.print(
                f"[yellow]no routing.config in the store yet ({exc}); waiting for config.changes[/yellow]"
            )
    stats = run_policy_worker(
        settings, learner=learner, initial_config=initial, app_id=app_id, history_dir=history_dir, stop_after_idle_seconds=stop_after_idle,
        topics=PolicyTopics(requests=requests_topic, outcomes=outcomes_topic, config=config_topic,
                            decisions=decisions_topic, dead_letters=dlq_topic),
    )  # fmt: skip
    if as_json:
        emit_json(asdict(stats))
    else:
        out.print(
            f"policy worker stopped: {stats.decisions_count} decisions, {stats.dead_letters_count} dead letters"
        )

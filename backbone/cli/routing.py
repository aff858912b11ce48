"""``backbone routing fit|eval|request`` and ``backbone processors route`` (typer).

Every option has an environment twin (shown in ``--help``); every command that prints data has
``--json``; bad input is one red line and exit code 2.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from backbone.cli.helpers import JsonOpt, clear_errors, context, emit_json, err, out, print_cells
from streams.catalogue import DLQ_TOPIC

__all__ = ["DEFAULT_ROUTER", "app", "eval_command", "fit_command", "request_command", "route_command"]

DEFAULT_ROUTER = Path(".backbone") / "routing" / "router.npz"

app = typer.Typer(help="Model routing: fit and evaluate routers, send route requests.", no_args_is_help=True)

RouterOpt = Annotated[
    Path,
    typer.Option("--router", help="Router artifact (.npz with its .json).", envvar="BACKBONE_ROUTING_ROUTER"),
]
SubjectsOpt = Annotated[
    str | None,
    typer.Option(
        "--subjects",
        help="Comma-separated MMLU subjects to read (default all).",
        envvar="BACKBONE_ROUTING_SUBJECTS",
    ),
]


def _subjects(value: str | None) -> list[str] | None:
    return [s.strip() for s in value.split(",") if s.strip()] if value else None


@app.command("fit")
@clear_errors
def fit_command(
    data: Annotated[
        Path,
        typer.Option("--data", help="Folder of mmlu_<subject>.csv outcomes.", envvar="BACKBONE_ROUTING_DATA"),
    ],
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the router (.npz and .json).")],
    embeddings: Annotated[
        bool,
        typer.Option(
            "--embeddings/--no-embeddings", help="Also fit the embedding (k-NN) scorer with MiniLM."
        ),
    ] = True,
    subjects: SubjectsOpt = None,
    test_percent: Annotated[
        int, typer.Option(help="Percent of prompts held out (by prompt hash).", min=1, max=90)
    ] = 20,
    k: Annotated[int, typer.Option(help="Neighbours of the embedding scorer.", min=1)] = 25,
    as_json: JsonOpt = False,
) -> None:
    """Fit a router on the training split of labelled outcomes and save it."""
    from processors.routing.router import fit_router, read_mmlu, split

    started = time.perf_counter()
    labelled = read_mmlu(data, subjects=_subjects(subjects))
    train, test = split(labelled, test_percent)
    vectors, model_name, model_version = None, None, None
    if embeddings:
        from processors.routing.embedding import embed_prompts

        vectors, model_name, model_version = embed_prompts(
            train.prompts, description="embedding training prompts"
        )
    router = fit_router(
        train, vectors=vectors, embedding_model=model_name, embedding_model_version=model_version, k=k,
        source=f"{data} ({len(labelled)} prompts, {labelled.excluded_count} excluded)", test_percent=test_percent,
    )  # fmt: skip
    path = router.save(out_file)
    report = {
        "router": str(path),
        "version": router.version,
        "train_prompts": len(train),
        "test_prompts": len(test),
        "excluded_prompts": labelled.excluded_count,
        "scorers": ["features", *(["embedding"] if router.knn is not None else [])],
        "embedding_model_version": model_version,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if as_json:
        emit_json(report)
    else:
        out.print(
            f"fitted router {router.version} on {len(train):,} prompts ({', '.join(report['scorers'])}); "
            f"{len(test):,} held out; wrote {path} in {report['seconds']} s"
        )


@app.command("eval")
@clear_errors
def eval_command(
    router_file: RouterOpt,
    data: Annotated[
        Path,
        typer.Option("--data", help="Folder of mmlu_<subject>.csv outcomes.", envvar="BACKBONE_ROUTING_DATA"),
    ],
    subjects: SubjectsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a router on the held-out split: strong-call share vs accuracy, APGR, CPT(50%), baselines."""
    from processors.routing.router import Router, evaluate, read_mmlu, split

    router = Router.load(router_file)
    labelled = read_mmlu(data, subjects=_subjects(subjects))
    _, test = split(labelled, int(router.metadata.get("test_percent", 20)))
    if len(test) == 0:
        raise ValueError(f"{data}: no held-out prompt to evaluate on")
    vectors = None
    if router.knn is not None:
        from processors.routing.embedding import embed_prompts

        vectors, _, version = embed_prompts(
            test.prompts,
            model_name=str(router.metadata["embedding_model"]),
            description="embedding test prompts",
        )
        if version != router.metadata.get("embedding_model_version"):
            err.print(
                f"[yellow]warning:[/yellow] embeddings by {version}, router fitted on {router.metadata.get('embedding_model_version')}"
            )
    report = evaluate(router, test, vectors=vectors)
    if as_json:
        emit_json(report)
        return
    _print_eval(report)


def _pct(v: Any) -> str:
    return "" if v is None else f"{100 * v:.1f} %"


def _print_eval(report: dict[str, Any]) -> None:
    scorers = [s for s in ("features", "embedding") if s in report["scorers"]]
    t = Table(
        title=f"router {report['router_version']} on {int(report['test']['prompts_count']):,} held-out prompts"
    )
    t.add_column("train share", justify="right")
    for s in scorers:
        t.add_column(f"{s} threshold", justify="right")
        t.add_column(f"{s} strong calls", justify="right")
        t.add_column(f"{s} accuracy", justify="right")
        t.add_column(f"random at {s} share", justify="right")
    t.add_column("oracle", justify="right")
    for r in report["rows"]:
        cells = [_pct(r["train_share"])]
        for s in scorers:
            cells += [f"{r[f'{s}_threshold']:+.4f}", _pct(r[f"{s}_share"]), _pct(r[f"{s}_accuracy"]),
                      _pct(r[f"{s}_random_accuracy"])]  # fmt: skip
        cells.append(_pct(r["oracle_accuracy"]))
        t.add_row(*cells)
    out.print(t)
    s = Table(title="scorers and baselines (held-out split)")
    for c in ("scorer", "APGR", "CPT(50%)", "accuracy at 50 % strong", "accuracy"):
        s.add_column(c, justify="left" if c == "scorer" else "right")
    for name, m in report["scorers"].items():
        s.add_row(
            name, f"{m['apgr']:.3f}", _pct(m["cpt50"]), _pct(m["accuracy_at_50"]), _pct(m.get("accuracy"))
        )
    out.print(s)


@app.command("request")
@clear_errors
def request_command(
    prompts: Annotated[list[str], typer.Argument(help="Prompts to route (one request each).")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the decisions and print them.")] = False,
    embed: Annotated[
        bool, typer.Option("--embed/--no-embed", help="Send an embedding request with each route request.")
    ] = True,
    policy: Annotated[
        str | None, typer.Option(help="cost, balanced or quality.", envvar="BACKBONE_ROUTING_POLICY")
    ] = None,
    requests_topic: Annotated[
        str, typer.Option(envvar="BACKBONE_ROUTING_REQUESTS_TOPIC")
    ] = "routing.requests",
    decisions_topic: Annotated[
        str, typer.Option(envvar="BACKBONE_ROUTING_DECISIONS_TOPIC")
    ] = "routing.decisions",
    embedding_topic: Annotated[
        str, typer.Option(envvar="BACKBONE_INFERENCE_REQUESTS_TOPIC")
    ] = "inference.requests",
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Send route requests (with embedding requests unless --no-embed); with --wait, print the decisions."""
    from confluent_kafka.admin import AdminClient

    from processors.routing.client import DecisionReader, send_route_requests
    from streams.catalogue import CATALOGUE, ensure_topics

    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("give one or more non-empty prompts")
    settings, serde = context()
    names = [
        t for t in (requests_topic, decisions_topic, embedding_topic if embed else None) if t in CATALOGUE
    ]
    ensure_topics(AdminClient(settings.kafka.librdkafka()), names)
    reader = DecisionReader(settings.kafka, serde, decisions_topic) if wait else None
    try:
        sent = send_route_requests(
            settings.kafka, serde, prompts, requests_topic=requests_topic,
            embedding_topic=embedding_topic if embed else None, policy=policy,
        )  # fmt: skip
        if reader is None:
            rows: list[dict[str, Any]] = [
                {"request_id": r.request_id, "embedding_request_id": r.embedding_request_id} for r in sent
            ]
        else:
            got = reader.collect([r.request_id for r in sent], timeout_seconds=timeout)
            rows = [
                {k: v for k, v in got[r.request_id].to_avro().items() if k not in ("features",)} for r in sent
            ]
    finally:
        if reader is not None:
            reader.close()
    if as_json:
        emit_json(rows)
        return
    if reader is None:
        out.print(f"sent {len(rows)} route request(s): {', '.join(r['request_id'] for r in rows)}")
        return
    cols = ("request_id", "model", "provider", "method", "score", "threshold", "policy", "router_version")
    cells = [[r["request_id"], r["model"], r["provider"], r["method"], f"{r['score']:+.4f}", f"{r['threshold']:+.4f}",
              r["policy"], r["router_version"]] for r in rows]  # fmt: skip
    print_cells(cells, cols, "route decisions", right={"score", "threshold"})


@clear_errors
def route_command(
    router_file: RouterOpt = DEFAULT_ROUTER,
    app_id: Annotated[
        str, typer.Option(help="Faust app id / consumer group.", envvar="BACKBONE_ROUTING_APP_ID")
    ] = "backbone-routing",
    requests_topic: Annotated[
        str, typer.Option(envvar="BACKBONE_ROUTING_REQUESTS_TOPIC")
    ] = "routing.requests",
    embeddings_topic: Annotated[
        str, typer.Option(envvar="BACKBONE_ROUTING_EMBEDDINGS_TOPIC")
    ] = "inference.results",
    decisions_topic: Annotated[
        str, typer.Option(envvar="BACKBONE_ROUTING_DECISIONS_TOPIC")
    ] = "routing.decisions",
    dlq_topic: Annotated[str, typer.Option(envvar="BACKBONE_ROUTING_DLQ_TOPIC")] = DLQ_TOPIC,
    join_topic: Annotated[
        str | None,
        typer.Option(
            help="Internal join topic (default <app id>-route-join).", envvar="BACKBONE_ROUTING_JOIN_TOPIC"
        ),
    ] = None,
    partitions: Annotated[
        int,
        typer.Option(
            help="Partitions of the requests and join topics.", envvar="BACKBONE_ROUTING_PARTITIONS"
        ),
    ] = 3,
    stop_after_idle: Annotated[
        float | None,
        typer.Option(
            "--stop-after-idle",
            help="Stop once started and no record arrived for this many seconds.",
            envvar="BACKBONE_ROUTING_STOP_AFTER_IDLE_SECONDS",
        ),
    ] = None,
    web_port: Annotated[
        int | None,
        typer.Option(
            help="Deprecated: a port other than 0 serves /metrics, /healthz and /readyz there; use BACKBONE_METRICS_PORT (0, as deployments set it, changes nothing).",
            envvar="BACKBONE_ROUTING_WEB_PORT",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the routing processor (route requests + embeddings -> route decisions) until stopped or idle."""
    from dataclasses import asdict

    from processors.routing.app import RoutingTopics, run_routing_worker
    from processors.routing.router import Router

    router = Router.load(router_file)  # a bad file is one line before the worker starts
    stats = run_routing_worker(
        router,
        app_id=app_id,
        topics=RoutingTopics(requests=requests_topic, embeddings=embeddings_topic, decisions=decisions_topic,
                             dead_letters=dlq_topic, join=join_topic, partitions=partitions),
        stop_after_idle_seconds=stop_after_idle,
        web_port=web_port,
    )  # fmt: skip
    if as_json:
        emit_json({**asdict(stats), "router_version": router.version})

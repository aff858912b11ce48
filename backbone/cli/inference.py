"""``backbone inference``: run the Ray actor pool, and embed texts through the topics.

Mounted by the lead under ``backbone inference``. Every option has an environment twin
(``BACKBONE_INFERENCE_*``, shown in ``--help``); Kafka comes from ``BACKBONE_KAFKA__*`` or the running
dev stack.
"""

from __future__ import annotations

import json
from typing import Annotated

import structlog
import typer
from rich.console import Console
from rich.markup import escape

from backbone.cli.helpers import SHUTDOWN_TIMEOUT_SECONDS, stop_on_signals
from core.settings import KafkaSettings, get_settings
from inference.config import InferenceSettings
from inference.errors import InferenceError

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False, help="Inference on Ray.")

_out = Console()
_err = Console(stderr=True)
log = structlog.get_logger(__name__)

ACTOR_STOP_TIMEOUT_SECONDS = 8.0
"""How long the actors get to answer, commit and leave their group at shutdown before they are killed."""


def _kafka() -> KafkaSettings:
    settings = get_settings()
    try:
        from core.stack import resolve_settings

        settings = resolve_settings(settings)
    except ImportError:  # pragma: no cover - devstack is part of the package
        pass
    return settings.kafka


def _settings(**overrides: object) -> InferenceSettings:
    base = InferenceSettings()
    update = {k: v for k, v in overrides.items() if v is not None}
    return base.model_copy(update=update)


@app.command()
def run(
    actors: int = typer.Option(
        None, "--actors", min=1, envvar="BACKBONE_INFERENCE_ACTORS", help="Actors to start."
    ),
    num_gpus: float = typer.Option(
        None, "--num-gpus", min=0, envvar="BACKBONE_INFERENCE_NUM_GPUS", help="GPUs per actor (0 = CPU)."
    ),
    num_cpus: float = typer.Option(
        None, "--num-cpus", min=0, envvar="BACKBONE_INFERENCE_NUM_CPUS", help="CPUs per actor."
    ),
    max_batch_size: int = typer.Option(
        None,
        "--max-batch-size",
        min=1,
        envvar="BACKBONE_INFERENCE_MAX_BATCH_SIZE",
        help="Most requests per model call.",
    ),
    max_wait_ms: int = typer.Option(
        None,
        "--max-wait-ms",
        min=0,
        envvar="BACKBONE_INFERENCE_MAX_WAIT_MS",
        help="Longest wait for a batch to fill.",
    ),
    min_actors: int = typer.Option(
        None, "--min-actors", min=1, envvar="BACKBONE_INFERENCE_MIN_ACTORS", help="Scaler floor."
    ),
    max_actors: int = typer.Option(
        None, "--max-actors", min=1, envvar="BACKBONE_INFERENCE_MAX_ACTORS", help="Scaler ceiling."
    ),
    autoscale: bool = typer.Option(
        True,
        "--autoscale/--no-autoscale",
        envvar="BACKBONE_INFERENCE_AUTOSCALE",
        help="Scale by consumer lag.",
    ),
    model: str = typer.Option(None, "--model", envvar="BACKBONE_INFERENCE_MODEL", help="Model to serve."),
    ray_address: str = typer.Option(
        None,
        "--ray-address",
        envvar="RAY_ADDRESS",
        help="Join this Ray cluster instead of starting a local one.",
    ),
    ray_num_cpus: float = typer.Option(
        None,
        "--ray-num-cpus",
        envvar="BACKBONE_INFERENCE_RAY_NUM_CPUS",
        help="CPUs of a local Ray (default: all).",
    ),
    metrics_port: int = typer.Option(
        None,
        "--metrics-port",
        envvar="BACKBONE_METRICS_PORT",
        help="Serve Prometheus /metrics here (0 = none).",
    ),
) -> None:
    """Start Ray (or join RAY_ADDRESS) and a pool of embedding actors; run until Ctrl-C or SIGTERM."""
    from core.observability import serve_metrics
    from inference.actors import InferencePool, init_ray
    from inference.client import ensure_inference_topics
    from inference.metrics import InferenceMetrics
    from inference.scaling import LagScaler, ScalingPolicy

    s = _settings(
        actors=actors,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        min_actors=min_actors,
        max_actors=max_actors,
        model=model,
    )
    kafka = _kafka()
    try:
        from confluent_kafka.admin import AdminClient

        ensure_inference_topics(AdminClient(kafka.librdkafka()), s)
        ray = init_ray(address=ray_address, num_cpus=ray_num_cpus)
        pool = InferencePool(kafka, s)
        metrics = InferenceMetrics()
        port = metrics_port if metrics_port is not None else get_settings().metrics_port
        if port:
            serve_metrics(port, host="0.0.0.0", registry=metrics.registry)
        # SIGTERM/SIGINT: leave the loop, stop the actors (each answers, commits, leaves its group) within
        # ACTOR_STOP_TIMEOUT_SECONDS, shut Ray down; past SHUTDOWN_TIMEOUT_SECONDS (a scaling step or a
        # client stuck on a broker that has gone) the process exits with code 70
        stop = stop_on_signals(exit_after_seconds=SHUTDOWN_TIMEOUT_SECONDS)
        pool.add(s.actors)
        _err.print(f"{pool.size} actor(s) serving {s.model} on {s.requests_topic} -> {s.results_topic}")
        scaler = LagScaler(
            pool,
            ScalingPolicy(
                min_actors=min(s.min_actors, s.actors),
                max_actors=max(s.max_actors, s.actors),
                scale_up_lag_per_actor=s.scale_up_lag_per_actor,
                scale_down_idle_seconds=s.scale_down_idle_seconds,
            ),
            metrics,
        )
        while not stop.wait(s.scale_interval_seconds):
            if autoscale:
                try:
                    scaler.step()
                except Exception as exc:  # noqa: BLE001 - a failed scaling step must not stop the serving actors
                    log.warning("scaling_step_failed", model=s.model, error=repr(exc))
        pool.shutdown(timeout_seconds=ACTOR_STOP_TIMEOUT_SECONDS)
        ray.shutdown()
    except InferenceError as exc:
        _err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from exc


@app.command()
def embed(
    texts: Annotated[list[str], typer.Argument(help="Texts to embed.")],
    as_json: bool = typer.Option(
        False, "--json", envvar="BACKBONE_JSON", help="Print JSON (vectors included)."
    ),
    timeout_seconds: float = typer.Option(
        60.0,
        "--timeout-seconds",
        envvar="BACKBONE_INFERENCE_TIMEOUT_SECONDS",
        help="How long to wait for answers.",
    ),
    model: str = typer.Option(None, "--model", envvar="BACKBONE_INFERENCE_MODEL", help="Model to ask."),
) -> None:
    """Send TEXT... as embedding requests and print the answers (needs `backbone inference run`)."""
    from inference.client import EmbeddingClient

    s = _settings(model=model)
    try:
        results = EmbeddingClient(_kafka(), s).embed(texts, timeout_seconds=timeout_seconds)
    except InferenceError as exc:
        _err.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from exc
    if as_json:
        rows = [
            {
                "text": t,
                "request_id": r.request_id,
                "model_name": r.model_name,
                "model_version": r.model_version,
                "dimension": r.dimension,
                "batch_id": r.batch_id,
                "batch_size": r.batch_size,
                "latency_ms": round(r.latency_ms, 3),
                "vector": [float(x) for x in r.vector],
            }
            for t, r in zip(texts, results, strict=True)
        ]
        typer.echo(json.dumps(rows))
        return
    for t, r in zip(texts, results, strict=True):
        head = ", ".join(f"{x:+.4f}" for x in r.vector[:4])
        _out.print(
            f"{t[:40]!r}: dim={r.dimension} [{head}, …] {r.model_name} {r.model_version} "
            f"batch={r.batch_id} ({r.batch_size}) {r.latency_ms:.1f} ms",
            highlight=False,
        )

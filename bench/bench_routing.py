"""Routing quality and decision rate on the real MMLU outcomes of lm-sys/RouteLLM (GPT-4-1106 vs Mixtral-8x7B).

Two parts, both on the fixed hash split of ``../shared/data/routing/mmlu`` (contaminated prompts
excluded; 80 % train, 20 % test):

* **Quality**: each scorer (features, embedding k-NN) is fitted on the train split and evaluated on
  the test split: APGR, CPT(50 %), accuracy at 50 % strong calls, against the random mix (APGR 0.5,
  CPT 0.5, the expected accuracy of calling the strong model for a random half) and the oracle.
  RouteLLM (arXiv 2406.18665) reports the same metrics for its routers on this data.
* **Decision rate**: decisions per second of the router logic, one request at a time as the worker
  makes them (:func:`processors.routing.router.decide`: features, score, threshold, decision record),
  for both methods, against a baseline of a bare numpy dot product and argmax of the same query vector
  over the same training matrix (the least any nearest-neighbour router must do).

All 14k prompts are embedded once with MiniLM loaded directly (:func:`processors.routing.embedding.embed_prompts`,
several minutes on a 2-core CPU); the vectors are cached under ``.backbone/cache/routing`` (gitignored).

Usage::

    python -m bench.bench_routing            # the table
    python -m bench.bench_routing --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from bench.common import ROOT

__all__ = ["main", "run_benchmark"]

DATA = ROOT.parent / "shared" / "data" / "routing" / "mmlu"


def _rate(fn: Any, n: int) -> float:
    """Calls of ``fn(i)`` per second over ``i`` in ``range(n)`` (best of two rounds: the machine is shared)."""
    best = 0.0
    for _ in range(2):
        started = time.perf_counter()
        for i in range(n):
            fn(i)
        best = max(best, n / (time.perf_counter() - started))
    return best


def run_benchmark(*, decisions: int = 2000, k: int = 25) -> dict[str, Any]:
    """Fit, evaluate and time the router on the real MMLU outcomes; return the figures.

    Args:
        decisions: requests decided (and baseline queries) per timing round.
        k: neighbours of the embedding scorer.

    Raises:
        FileNotFoundError: ``../shared/data/routing/mmlu`` is absent.
    """
    from processors.routing.embedding import embed_prompts
    from processors.routing.records import RouteRequest, embedding_request_id_for
    from processors.routing.router import EmbeddingInput, decide, evaluate, fit_router, read_mmlu, split

    if not DATA.is_dir():
        raise FileNotFoundError(f"{DATA} is absent (the shared real data set)")
    data = read_mmlu(DATA)
    train, test = split(data)
    started = time.perf_counter()
    vectors, model_name, model_version = embed_prompts(data.prompts, description="embedding MMLU prompts")
    embed_seconds = time.perf_counter() - started
    index = {p: i for i, p in enumerate(data.prompts)}
    train_vectors = vectors[[index[p] for p in train.prompts]]
    test_vectors = vectors[[index[p] for p in test.prompts]]
    started = time.perf_counter()
    router = fit_router(train, vectors=train_vectors, embedding_model=model_name, embedding_model_version=model_version, k=k)
    fit_seconds = time.perf_counter() - started
    report = evaluate(router, test, vectors=test_vectors)

    at = datetime(2025, 1, 1, tzinfo=UTC)
    m = len(test)
    requests = [RouteRequest(request_id=f"r{i}", prompt=test.prompts[i % m], requested_at=at,
                             embedding_request_id=embedding_request_id_for(f"r{i}")) for i in range(decisions)]  # fmt: skip
    plain = [RouteRequest(request_id=f"r{i}", prompt=test.prompts[i % m], requested_at=at) for i in range(decisions)]
    embeddings = [EmbeddingInput(model_name=model_name, model_version=model_version, vector=test_vectors[i % m])
                  for i in range(decisions)]  # fmt: skip
    train_matrix = router.knn.vectors  # type: ignore[union-attr]
    rates = {
        "numpy_dot_argmax": _rate(lambda i: int(np.argmax(train_matrix @ embeddings[i].vector)), decisions),
        "decide_embedding": _rate(lambda i: decide(router, requests[i], embeddings[i]), decisions),
        "decide_features": _rate(lambda i: decide(router, plain[i], None), decisions),
    }
    return {
        "data": {**data.summary(), "train_prompts": len(train), "test_prompts": len(test)},
        "router_version": router.version,
        "embedding_model_version": model_version,
        "embed_seconds": round(embed_seconds, 1),
        "fit_seconds": round(fit_seconds, 2),
        "k": k,
        "scorers": report["scorers"],
        "rows": report["rows"],
        "decisions_per_second": rates,
        "train_matrix_shape": list(train_matrix.shape),
    }


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.1f} %"


def _table(r: dict[str, Any]) -> str:
    d = r["data"]
    lines = [
        f"MMLU outcomes (lm-sys/RouteLLM): {int(d['prompts_count']):,} prompts ({int(d['excluded_count'])} contaminated "
        f"excluded), train {d['train_prompts']:,} / test {d['test_prompts']:,}; router {r['router_version']}, k={r['k']}",
        f"{'scorer (test split)':24} {'APGR':>7} {'CPT(50%)':>9} {'acc @50% strong':>16}",
    ]
    for name in ("features", "embedding", "random", "oracle"):
        s = r["scorers"][name]
        lines.append(f"{name:24} {s['apgr']:7.3f} {_pct(s['cpt50']):>9} {_pct(s['accuracy_at_50']):>16}")
    for name in ("always_strong", "always_weak"):
        s = r["scorers"][name]
        lines.append(f"{name:24} {s['apgr']:7.3f} {_pct(s['cpt50']):>9} {'acc ' + _pct(s['accuracy']):>16}")
    lines.append("")
    lines.append(f"{'train share':>11} {'feat share':>11} {'feat acc':>9} {'emb share':>10} {'emb acc':>9} {'random':>8} {'oracle':>8}")
    for row in r["rows"]:
        lines.append(
            f"{_pct(row['train_share']):>11} {_pct(row['features_share']):>11} {_pct(row['features_accuracy']):>9} "
            f"{_pct(row['embedding_share']):>10} {_pct(row['embedding_accuracy']):>9} {_pct(row['random_accuracy']):>8} "
            f"{_pct(row['oracle_accuracy']):>8}"
        )
    rates = r["decisions_per_second"]
    base = rates["numpy_dot_argmax"]
    lines.append("")
    lines.append(f"{'path (one request at a time)':40} {'decisions/s':>12} {'ratio to numpy dot+argmax':>26}")
    for name, label in (("numpy_dot_argmax", f"numpy dot+argmax over {r['train_matrix_shape']}"),
                        ("decide_embedding", "decide(), embedding k-NN"), ("decide_features", "decide(), features")):  # fmt: skip
        lines.append(f"{label:40} {rates[name]:12,.0f} {rates[name] / base:26.2f}")
    lines.append(f"embedding step: {r['embed_seconds']} s (model load, cache lookup, missing prompts); fit: {r['fit_seconds']} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the benchmark and print a table (or JSON)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decisions", type=int, default=2000, help="requests decided per timing round")
    p.add_argument("--k", type=int, default=25, help="neighbours of the embedding scorer")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        r = run_benchmark(decisions=a.decisions, k=a.k)
    except FileNotFoundError as exc:
        print(f"skipped: {exc}")
        return 0
    print(json.dumps(r) if a.json else _table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

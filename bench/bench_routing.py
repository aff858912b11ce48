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

__all__ = ["main", "run_benchmark", "run_policy_benchmark"]

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
    router = fit_router(
        train, vectors=train_vectors, embedding_model=model_name, embedding_model_version=model_version, k=k
    )
    fit_seconds = time.perf_counter() - started
    report = evaluate(router, test, vectors=test_vectors)

    at = datetime(2025, 1, 1, tzinfo=UTC)
    m = len(test)
    requests = [RouteRequest(request_id=f"r{i}", prompt=test.prompts[i % m], requested_at=at,
                             embedding_request_id=embedding_request_id_for(f"r{i}")) for i in range(decisions)]  # fmt: skip
    plain = [
        RouteRequest(request_id=f"r{i}", prompt=test.prompts[i % m], requested_at=at)
        for i in range(decisions)
    ]
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


def _latencies(fn: Any, n: int) -> tuple[float, float, float]:
    """(calls/s, p50 ms, p99 ms) of ``fn(i)`` for ``i`` in ``range(n)``, each call timed alone (best of two rounds by rate)."""
    best: tuple[float, float, float] = (0.0, 0.0, 0.0)
    for _ in range(2):
        times = np.empty(n)
        started = time.perf_counter()
        for i in range(n):
            t = time.perf_counter_ns()
            fn(i)
            times[i] = time.perf_counter_ns() - t
        rate = n / (time.perf_counter() - started)
        if rate > best[0]:
            p50, p99 = np.percentile(times, [50, 99]) / 1e6
            best = (rate, float(p50), float(p99))
    return best


def run_policy_benchmark(*, decisions: int = 5000, models: Sequence[int] = (2, 10)) -> list[dict[str, Any]]:
    """Decisions/s and per-decision latency of the N-model policy router in process, next to a bare baseline.

    For each N: a catalog of N models (prices and latencies spread over two orders of magnitude), the
    ``learned`` policy over all of them, an online learner with N models warm-started on the MMLU
    training split (GPT-4 and Mixtral columns, the other models their copies with flipped rows, so the
    coefficients differ), and :meth:`RoutingState.on_request` on MMLU test prompts one at a time (prompt
    features, N learned qualities, cost/latency estimates, constraints, ranking, the decision record
    with every candidate's reasons). Baseline, same prompts and run: the numpy scoring alone on
    precomputed features (standardise, one ``(N, f)`` matrix product, sigmoid, argmax).

    Raises:
        FileNotFoundError: ``../shared/data/routing/mmlu`` is absent.
    """
    from processors.routing.data import read_mmlu, split
    from processors.routing.features import feature_matrix
    from processors.routing.policy import PolicyRequest, RoutingState
    from processors.routing.scorers import OnlineQuality

    if not DATA.is_dir():
        raise FileNotFoundError(f"{DATA} is absent (the shared real data set)")
    train, test = split(read_mmlu(DATA))
    x_train = feature_matrix(list(train.prompts))
    at = datetime(2025, 1, 1, tzinfo=UTC)
    prompts = [test.prompts[i % len(test)] for i in range(decisions)]
    x_test = feature_matrix(prompts)
    out = []
    for n in models:
        names = [f"model-{j}" for j in range(n)]
        cols = []
        for j in range(n):
            base = train.strong_correct if j % 2 == 0 else train.weak_correct
            flip = np.arange(len(base)) % (j + 2) == 0 if j >= 2 else np.zeros(len(base), bool)
            cols.append(base ^ flip)
        learner = OnlineQuality.fit(x_train, np.stack(cols, axis=1), names, epochs=1)
        config = {
            "models": {
                m: {"provider": f"p{j % 3}", "context_window_tokens": 128000, "capabilities": ["chat"],
                    "usd_per_million_input_tokens": 0.1 * 3**(j % 5), "usd_per_million_output_tokens": 0.3 * 3**(j % 5),
                    "latency_prior_ms": 100.0 * (1 + j)}
                for j, m in enumerate(names)
            },
            "policies": {"learned": {"kind": "learned", "models": names, "cost_weight": 0.3}},
            "default_policy": "learned",
        }  # fmt: skip
        state = RoutingState(learner=learner, learn=False)
        state.on_config(config, 1)
        requests = [
            PolicyRequest(request_id=f"r{i}", requested_at=at, prompt=prompts[i]) for i in range(decisions)
        ]
        coef, mean, std = learner._coef, learner.mean, learner.std

        def baseline(
            i: int,
            x_test: np.ndarray = x_test,
            mean: np.ndarray = mean,
            std: np.ndarray = std,
            coef: np.ndarray = coef,
        ) -> int:
            z = np.clip((x_test[i] - mean) / std, -5.0, 5.0)
            return int(np.argmax(1.0 / (1.0 + np.exp(-(coef[:, 1:] @ z + coef[:, 0])))))

        b_rate, b50, b99 = _latencies(baseline, decisions)
        r_rate, r50, r99 = _latencies(lambda i, s=state, r=requests: s.on_request(r[i]), decisions)
        out.append({"models": n, "decisions": decisions, "router_per_second": round(r_rate), "router_p50_ms": round(r50, 4),
                    "router_p99_ms": round(r99, 4), "numpy_per_second": round(b_rate), "numpy_p50_ms": round(b50, 4),
                    "numpy_p99_ms": round(b99, 4)})  # fmt: skip
    return out


def _policy_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'N models':>8} {'router dec/s':>13} {'p50 ms':>8} {'p99 ms':>8} {'numpy dec/s':>12} {'p50 ms':>8} {'p99 ms':>8}"
    ]
    for r in rows:
        lines.append(f"{r['models']:>8} {r['router_per_second']:>13,} {r['router_p50_ms']:>8.3f} {r['router_p99_ms']:>8.3f} "
                     f"{r['numpy_per_second']:>12,} {r['numpy_p50_ms']:>8.3f} {r['numpy_p99_ms']:>8.3f}")  # fmt: skip
    return "\n".join(lines)


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
    lines.append(
        f"{'train share':>11} {'feat share':>11} {'feat acc':>9} {'emb share':>10} {'emb acc':>9} {'random':>8} {'oracle':>8}"
    )
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
    lines.append(
        f"embedding step: {r['embed_seconds']} s (model load, cache lookup, missing prompts); fit: {r['fit_seconds']} s"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the benchmark and print a table (or JSON)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decisions", type=int, default=2000, help="requests decided per timing round")
    p.add_argument("--k", type=int, default=25, help="neighbours of the embedding scorer")
    p.add_argument(
        "--policy-only", action="store_true", help="only the N-model policy router (no MiniLM embedding)"
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        policy = run_policy_benchmark(decisions=max(a.decisions, 2000))
        r = {} if a.policy_only else run_benchmark(decisions=a.decisions, k=a.k)
    except FileNotFoundError as exc:
        print(f"skipped: {exc}")
        return 0
    r["policy_router"] = policy
    if a.json:
        print(json.dumps(r))
    else:
        if not a.policy_only:
            print(_table(r))
        print(
            "N-model policy router, in process, one request at a time (RoutingState.on_request vs numpy scoring alone):"
        )
        print(_policy_table(policy))
    return 0


if __name__ == "__main__":
    sys.exit(main())

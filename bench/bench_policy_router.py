"""Decision speed of the N-model policy router (issue 13), in process, as the worker decides: each request
through :meth:`processors.routing.policy.RoutingState.on_request` (validation, prompt features, health of
every model, the policy's scores and reasons, the fallback chain, the decision record), with N = 2 and
N = 10 models, for each policy kind, next to a bare baseline in the same run: numpy scoring alone (the
same prompt features standardised, a dot product with the learned coefficients of the N models, argmax).
Two more rows per N follow the worker further: the ``learned`` policy with an outcome after each decision
(:meth:`~processors.routing.policy.RoutingState.on_outcome`: per-model stats and latency percentiles, read
back by the next decision), with the learner frozen and learning (one ``partial_fit`` per outcome); their
rate counts request + outcome pairs.

Prompts: the real MMLU prompts of ``../shared/data/routing/mmlu`` (the first ``--requests``; RouteLLM's
evaluation files); the learned policy's quality model has random coefficients (its cost is what is measured,
not its quality). Targets (issue 13): at least 5,000 decisions/s and p99 under 5 ms per worker.
Run: ``python bench/bench_policy_router.py [--requests N] [--data DIR]``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from rich.console import Console
from rich.table import Table

from processors.routing.features import FEATURE_NAMES, prompt_features
from processors.routing.policy import POLICY_KINDS, Outcome, PolicyRequest, RoutingState
from processors.routing.scorers import OnlineQuality

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "routing" / "mmlu"


def _prompts(data: Path, n: int) -> list[str]:
    out: list[str] = []
    csv.field_size_limit(10**7)
    for f in sorted(data.glob("mmlu_*.csv")):
        with f.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                out.append(row["prompt"])
                if len(out) >= n:
                    return out
    if not out:
        raise SystemExit(f"no mmlu_*.csv under {data}")
    return out


def _config(n_models: int) -> dict:
    models = {
        f"m{i}": {
            "provider": ("openai", "anthropic", "mistral", "google")[i % 4],
            "capabilities": ["chat"], "context_window_tokens": 128_000,
            "usd_per_million_input_tokens": 0.2 + 2.5 * i, "usd_per_million_output_tokens": 0.6 + 10.0 * i,
            "latency_prior_ms": 400.0 + 150.0 * i,
        }
        for i in range(n_models)
    }  # fmt: skip
    names = list(models)
    policies = {
        "cheapest": {"kind": "cheapest", "models": names, "quality_target": 0.5},
        "best_quality": {"kind": "best_quality", "models": names, "budget_usd": 0.05},
        "lowest_latency": {"kind": "lowest_latency", "models": names, "latency_target_ms": 2000},
        "learned": {"kind": "learned", "models": names, "cost_weight": 0.5},
    }
    return {"models": models, "policies": policies, "default_policy": "learned"}


def main(argv: list[str] | None = None) -> list[dict]:
    """Run and print the table; return its rows."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = ap.parse_args(argv)
    prompts = _prompts(args.data, args.requests)
    rng = np.random.default_rng(7)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    rows: list[dict] = []
    assert set(POLICY_KINDS) == {"cheapest", "best_quality", "lowest_latency", "learned"}
    for n_models in (2, 10):
        names = [f"m{i}" for i in range(n_models)]
        feats = np.array([list(prompt_features(p).values()) for p in prompts], dtype=np.float64)
        mean, std = feats.mean(axis=0), feats.std(axis=0) + 1e-9
        coef = rng.normal(0, 0.3, size=(n_models, len(FEATURE_NAMES) + 1))
        # baseline: features + standardise + dot + argmax per request
        lat: list[float] = []
        t0 = time.perf_counter()
        for p in prompts:
            s = time.perf_counter()
            x = np.fromiter(prompt_features(p).values(), dtype=np.float64, count=len(FEATURE_NAMES))
            z = (x - mean) / std
            int(np.argmax(coef[:, 1:] @ z + coef[:, 0]))
            lat.append(time.perf_counter() - s)
        base_rate = len(prompts) / (time.perf_counter() - t0)
        rows.append(_row(n_models, "baseline: features + numpy dot + argmax", base_rate, lat, base_rate))
        for kind in POLICY_KINDS:
            state = RoutingState(learner=OnlineQuality.from_arrays(names, mean, std, coef))
            state.on_config(_config(n_models), 1)
            lat = []
            t0 = time.perf_counter()
            for i, p in enumerate(prompts):
                req = PolicyRequest(request_id=f"r{i}", requested_at=at, prompt=p, policy=kind)
                s = time.perf_counter()
                state.on_request(req)
                lat.append(time.perf_counter() - s)
            rate = len(prompts) / (time.perf_counter() - t0)
            rows.append(_row(n_models, f"policy {kind}", rate, lat, base_rate))
        for learn in (False, True):
            state = RoutingState(learner=OnlineQuality.from_arrays(names, mean, std, coef), learn=learn)
            state.on_config(_config(n_models), 1)
            latency_rng = np.random.default_rng(11)
            lat = []
            t0 = time.perf_counter()
            for i, p in enumerate(prompts):
                req = PolicyRequest(request_id=f"r{i}", requested_at=at, prompt=p, policy="learned")
                ms = float(latency_rng.lognormal(6.0, 0.5))
                s = time.perf_counter()
                d = state.on_request(req)
                state.on_outcome(Outcome(request_id=req.request_id, model=d.model or "m0", success=True,
                                         correct=i % 3 != 0, latency_ms=ms, occurred_at=at))  # fmt: skip
                lat.append(time.perf_counter() - s)
            rate = len(prompts) / (time.perf_counter() - t0)
            path = f"learned + outcome, learner {'learning' if learn else 'frozen'}"
            rows.append(_row(n_models, path, rate, lat, base_rate))
    table = Table(title=f"policy router decisions in process, {len(prompts):,} MMLU prompts, one thread")
    for c in ("models", "path", "decisions/s", "p50 ms", "p99 ms", "ratio to baseline"):
        table.add_column(c, justify="left" if c == "path" else "right")
    for r in rows:
        table.add_row(str(r["models"]), r["path"], f"{r['rate']:,.0f}", f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
                      f"{r['ratio']:.2f}")  # fmt: skip
    Console().print(table)
    return rows


def _row(n: int, path: str, rate: float, lat: list[float], base: float) -> dict:
    q = statistics.quantiles(lat, n=100)
    return {"models": n, "path": path, "rate": rate, "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000,
            "ratio": rate / base}  # fmt: skip


if __name__ == "__main__":
    main()

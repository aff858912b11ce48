"""Evaluation of routers on labelled outcomes: the RouteLLM metrics (arXiv 2406.18665) and more.

* :func:`routing_curve` / :class:`RoutingCurve`: accuracy against strong-call share, APGR (average
  performance gap recovered), CPT(x %) (call-performance threshold: the strong share needed to recover
  x % of the gap), the strong share needed to reach 95 % of the strong model's accuracy.
* :func:`evaluate`: per scorer of a router on held-out prompts, with the baselines always-strong,
  always-weak, random mix (expected value) and oracle.
* :func:`eval_offline` / :func:`eval_online`: the figures of ``backbone routing eval`` (see there for
  the protocols), with USD saved against always-strong at 95 % quality (:func:`usd_saved`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from processors.routing.artifact import Router
from processors.routing.data import LabelledPrompts

__all__ = [
    "DEFAULT_OUTPUT_TOKENS",
    "DEFAULT_PRICES_USD_PER_MILLION",
    "RoutingCurve",
    "call_costs_usd",
    "estimate_tokens",
    "eval_offline",
    "eval_online",
    "evaluate",
    "routing_curve",
]


@dataclass(frozen=True, slots=True)
class RoutingCurve:
    """Accuracy against strong-call share of one scorer on labelled prompts.

    The achievable points: calling the strong model for the prompts with the top-j scores, for each j
    at a change of score (ties are taken together; between points, accuracy is linear, which is the
    expected value of breaking the ties at random).

    Attributes:
        shares: strong-call share of each point, ascending from 0 to 1, shape ``(p,)``.
        accuracies: accuracy at each point, shape ``(p,)``.
        strong_accuracy, weak_accuracy: the always-strong and always-weak accuracies.
    """

    shares: np.ndarray
    accuracies: np.ndarray
    strong_accuracy: float
    weak_accuracy: float
    costs_usd: np.ndarray | None = None

    def share_for_accuracy(self, target: float) -> float:
        """The smallest strong-call share whose accuracy reaches ``target`` (interpolated; 1.0 if none does)."""
        y, x = self.accuracies, self.shares
        hit = np.flatnonzero(y >= target - 1e-12)
        if len(hit) == 0:
            return 1.0
        i = int(hit[0])
        if i == 0:
            return float(x[0])
        return float(x[i - 1] + (target - y[i - 1]) * (x[i] - x[i - 1]) / (y[i] - y[i - 1]))

    def strong_share_at(self, quality: float = 0.95) -> float:
        """The strong-call share needed to reach ``quality`` x the strong model's accuracy."""
        return self.share_for_accuracy(quality * self.strong_accuracy)

    def cost_at(self, share: float) -> float:
        """Routed cost in USD at strong-call ``share`` (interpolated between points).

        Raises:
            ValueError: the curve was built without costs.
        """
        if self.costs_usd is None:
            raise ValueError("this curve has no costs (pass strong_cost_usd and weak_cost_usd)")
        return float(np.interp(share, self.shares, self.costs_usd))

    def accuracy_at(self, share: float) -> float:
        """Accuracy at strong-call ``share`` (interpolated between points)."""
        return float(np.interp(share, self.shares, self.accuracies))

    def pgr(self) -> np.ndarray:
        """Performance gap recovered at each point: (acc - weak) / (strong - weak)."""
        gap = self.strong_accuracy - self.weak_accuracy
        return (self.accuracies - self.weak_accuracy) / gap if gap else np.zeros_like(self.accuracies)

    def apgr(self) -> float:
        """Average PGR: the area under PGR against strong-call share over [0, 1] (trapezoids)."""
        y, x = self.pgr(), self.shares
        return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))

    def cpt(self, target_pgr: float = 0.5) -> float:
        """CPT: the smallest strong-call share whose PGR reaches ``target_pgr`` (1.0 if none does)."""
        y, x = self.pgr(), self.shares
        hit = np.flatnonzero(y >= target_pgr)
        if len(hit) == 0:
            return 1.0
        i = int(hit[0])
        if i == 0:
            return float(x[0])
        return float(x[i - 1] + (target_pgr - y[i - 1]) * (x[i] - x[i - 1]) / (y[i] - y[i - 1]))


def routing_curve(
    scores: np.ndarray,
    strong_correct: np.ndarray,
    weak_correct: np.ndarray,
    *,
    strong_cost_usd: np.ndarray | None = None,
    weak_cost_usd: np.ndarray | None = None,
) -> RoutingCurve:
    """The :class:`RoutingCurve` of ``scores`` (higher = call the strong model first), all shape ``(n,)``.

    With per-prompt call costs in USD (``(n,)`` each) the curve also carries the routed cost at each point.

    Raises:
        ValueError: no prompts, or arrays of different lengths.
    """
    n = len(scores)
    if n == 0 or len(strong_correct) != n or len(weak_correct) != n:
        raise ValueError(f"need equal, non-empty arrays; got {n}, {len(strong_correct)}, {len(weak_correct)}")
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    gain = strong_correct.astype(np.int64)[order] - weak_correct.astype(np.int64)[order]
    cum = np.cumsum(gain)
    s_sorted = scores[order]
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])  # last index of each tie group
    weak_acc = float(weak_correct.mean())
    shares = np.r_[0.0, (ends + 1) / n]
    accs = np.r_[weak_acc, weak_acc + cum[ends] / n]
    costs = None
    if strong_cost_usd is not None and weak_cost_usd is not None:
        extra = np.cumsum(
            np.asarray(strong_cost_usd, np.float64)[order] - np.asarray(weak_cost_usd, np.float64)[order]
        )
        base = float(np.sum(weak_cost_usd))
        costs = np.r_[base, base + extra[ends]]
    return RoutingCurve(shares, accs, float(strong_correct.mean()), weak_acc, costs)


def evaluate(
    router: Router,
    test: LabelledPrompts,
    *,
    vectors: np.ndarray | None = None,
    shares: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
) -> dict[str, Any]:
    """Evaluate ``router`` on held-out ``test`` prompts: per scorer and for the baselines.

    For each scorer: APGR, CPT(50 %), accuracy at 50 % strong calls (curve), and for each training
    share in ``shares`` the router's own threshold applied to the test prompts (the share of strong
    calls it really makes there, and the accuracy). Baselines: always-strong, always-weak, random mix
    (expected value: accuracy = weak + share * (strong - weak); APGR 0.5, CPT(50 %) 0.5) and oracle
    (strong only where it alone is right).

    Args:
        router: the fitted router.
        test: held-out prompts (not in its training split).
        vectors: the test prompts' embeddings ``(len(test), d)``; without them the embedding scorer is
            not evaluated.
        shares: training shares whose thresholds are applied (from :data:`SHARE_GRID`).

    Returns:
        JSON-ready ``{"test": summary, "scorers": {name: {...}}, "rows": [...]}``.
    """
    s, w = test.strong_correct, test.weak_correct
    acc_s, acc_w = float(s.mean()), float(w.mean())
    scores: dict[str, np.ndarray] = {"features": router.score_features(test.prompts)}
    if vectors is not None and router.knn is not None:
        scores["embedding"] = router.knn.score(vectors)
    curves = {name: routing_curve(sc, s, w) for name, sc in scores.items()}
    curves["oracle"] = routing_curve(test.gain.astype(np.float64), s, w)
    out: dict[str, Any] = {
        "test": test.summary(),
        "router_version": router.version,
        "scorers": {},
        "rows": [],
    }
    for name, curve in curves.items():
        out["scorers"][name] = {
            "apgr": curve.apgr(),
            "cpt50": curve.cpt(0.5),
            "accuracy_at_50": curve.accuracy_at(0.5),
        }
    out["scorers"]["random"] = {"apgr": 0.5, "cpt50": 0.5, "accuracy_at_50": acc_w + 0.5 * (acc_s - acc_w)}
    out["scorers"]["always_strong"] = {"apgr": 1.0, "cpt50": 1.0, "accuracy_at_50": None, "accuracy": acc_s}
    out["scorers"]["always_weak"] = {"apgr": 0.0, "cpt50": None, "accuracy_at_50": None, "accuracy": acc_w}
    for share in shares:
        row: dict[str, Any] = {"train_share": share}
        for name, sc in scores.items():
            t = router.threshold(name, share)
            strong = sc > t
            row[f"{name}_threshold"] = t
            row[f"{name}_share"] = float(strong.mean())
            row[f"{name}_accuracy"] = float(np.where(strong, s, w).mean())
            row[f"{name}_random_accuracy"] = acc_w + float(strong.mean()) * (acc_s - acc_w)
        row["random_accuracy"] = acc_w + share * (acc_s - acc_w)
        row["oracle_accuracy"] = curves["oracle"].accuracy_at(share)
        out["rows"].append(row)
    return out


# -- the figures of ``backbone routing eval`` ----------------------------------------------------------------------

DEFAULT_PRICES_USD_PER_MILLION = {
    "gpt-4-1106-preview": (10.0, 30.0),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": (0.6, 0.6),
}
"""(input, output) USD per million tokens assumed when no catalog is given: OpenAI's list price of
gpt-4-1106-preview and a typical hosted price of Mixtral-8x7B-Instruct (Together AI, 2024)."""
DEFAULT_OUTPUT_TOKENS = 64
"""Output tokens assumed per call (MMLU and GSM8K answers are short; the files hold no token counts)."""


def estimate_tokens(prompt: str) -> int:
    """Input tokens of ``prompt`` estimated as ``ceil(characters / 4)`` (at least 1): the usual rule of
    thumb for English with BPE tokenizers; the outcome files hold no token counts."""
    return max(1, -(-len(prompt) // 4))


def call_costs_usd(
    prompts: Sequence[str], price: tuple[float, float], output_tokens: int = DEFAULT_OUTPUT_TOKENS
) -> np.ndarray:
    """Per-prompt cost in USD of one call at ``price`` = (input, output) USD per million tokens, ``(n,)``."""
    tokens = np.fromiter((estimate_tokens(p) for p in prompts), dtype=np.float64, count=len(prompts))
    return (tokens * price[0] + output_tokens * price[1]) / 1e6


def _figures(curve: RoutingCurve, strong_cost: np.ndarray, prompts: int, protocol: str) -> dict[str, Any]:
    share95 = curve.strong_share_at(0.95)
    saved = float(np.sum(strong_cost)) - curve.cost_at(share95) if curve.costs_usd is not None else None
    return {
        "prompts": prompts,
        "apgr": round(curve.apgr(), 4),
        "cpt50": round(curve.cpt(0.5), 4),
        "strong_share_at_95pct": round(share95, 4),
        "usd_saved_at_95pct": None if saved is None else round(saved, 4),
        "usd_always_strong": round(float(np.sum(strong_cost)), 4),
        "strong_accuracy": round(curve.strong_accuracy, 4),
        "weak_accuracy": round(curve.weak_accuracy, 4),
        "protocol": protocol,
    }


def eval_offline(
    router: Router,
    test: LabelledPrompts,
    *,
    strong_price: tuple[float, float],
    weak_price: tuple[float, float],
    vectors: np.ndarray | None = None,
    output_tokens: int = DEFAULT_OUTPUT_TOKENS,
) -> dict[str, Any]:
    """Offline figures: the router, fitted beforehand, scores every test prompt; the curve sweeps the threshold.

    Uses the embedding scorer when ``vectors`` ``(n, d)`` are given and the router has one, else the
    features scorer (sklearn logistic regressions). Returns the ``routing eval`` JSON
    (``prompts, apgr, cpt50, strong_share_at_95pct, usd_saved_at_95pct`` and context fields).

    Raises:
        ValueError: no test prompt.
    """
    scores = (
        router.knn.score(vectors)
        if vectors is not None and router.knn is not None
        else router.score_features(test.prompts)
    )
    strong_cost = call_costs_usd(test.prompts, strong_price, output_tokens)
    weak_cost = call_costs_usd(test.prompts, weak_price, output_tokens)
    curve = routing_curve(
        scores, test.strong_correct, test.weak_correct, strong_cost_usd=strong_cost, weak_cost_usd=weak_cost
    )
    method = "embedding" if vectors is not None and router.knn is not None else "features"
    return _figures(curve, strong_cost, len(test), f"offline: {method} scorer fitted on the train split, "
                    "every test prompt scored once, threshold swept over all strong-call shares")  # fmt: skip


def eval_online(
    router: Router,
    test: LabelledPrompts,
    *,
    strong_model: str,
    weak_model: str,
    strong_price: tuple[float, float],
    weak_price: tuple[float, float],
    shares: Sequence[float] = tuple(round(0.05 * i, 2) for i in range(1, 20)),
    output_tokens: int = DEFAULT_OUTPUT_TOKENS,
    train_prompts: Sequence[str] = (),
) -> dict[str, Any]:
    """Online figures: the test prompts are streamed in file order, once per target strong share.

    For each share ``s``: a fresh copy of the router's online learner (:meth:`Router.quality`, the warm
    start fitted on the train split) scores each prompt as ``P(strong right) - P(weak right)``; the
    strong model is called when the score exceeds the threshold that gives share ``s`` on the training
    prompts (``train_prompts``; without them, on the test prompts' warm-start scores, which sees their
    features but no outcome); then only the chosen model's real outcome is learned (one
    ``partial_fit`` step). Each run gives one (strong share, accuracy, cost) point; with always-weak
    and always-strong the points make the curve (sorted by share) for APGR, CPT(50 %) and the share at
    95 %.

    Raises:
        RouterArtifactError: the router has no online learner.
        ValueError: no test prompt.
    """
    from processors.routing.features import feature_matrix

    if len(test) == 0:
        raise ValueError("no test prompt")
    base = router.quality()
    for m in (strong_model, weak_model):
        base.add_model(m)
    js, jw = base.models.index(strong_model), base.models.index(weak_model)
    feats = feature_matrix(list(test.prompts))
    calib = feature_matrix(list(train_prompts)) if train_prompts else feats
    p = base.predict(calib)
    calib_scores = p[:, js] - p[:, jw]
    strong_cost = call_costs_usd(test.prompts, strong_price, output_tokens)
    weak_cost = call_costs_usd(test.prompts, weak_price, output_tokens)
    s, w = test.strong_correct, test.weak_correct
    points = [
        (0.0, float(w.mean()), float(weak_cost.sum())),
        (1.0, float(s.mean()), float(strong_cost.sum())),
    ]
    for share in shares:
        from processors.routing.scorers import threshold_for_share

        t = threshold_for_share(calib_scores, share)
        learner = base.copy()
        strong_calls = right = 0
        cost = 0.0
        for i in range(len(test)):
            pr = learner.predict(feats[i])
            use_strong = bool(pr[js] - pr[jw] > t)
            ok = bool(s[i] if use_strong else w[i])
            strong_calls += use_strong
            right += ok
            cost += float(strong_cost[i] if use_strong else weak_cost[i])
            learner.update(strong_model if use_strong else weak_model, feats[i], ok)
        points.append((strong_calls / len(test), right / len(test), cost))
    points.sort(key=lambda q: (q[0], q[1]))
    curve = RoutingCurve(
        np.array([q[0] for q in points]), np.array([q[1] for q in points]), float(s.mean()), float(w.mean()),
        np.array([q[2] for q in points]),
    )  # fmt: skip
    out = _figures(curve, strong_cost, len(test), "online: learner warm-started on the train split, test prompts "
                   f"streamed in file order once per target share ({len(shares)} runs), only the chosen model's "
                   "outcome learned after each decision; curve through the runs' (share, accuracy) points")  # fmt: skip
    out["points"] = [
        {"strong_share": round(a, 4), "accuracy": round(b, 4), "usd": round(c, 4)} for a, b, c in points
    ]
    return out

"""The policy router's decisions, byte for byte, against a golden file recorded from main's code before the
decision path was optimised (issue 13).

A seeded, varied history (10 models with different capabilities, context windows, prices and latency
priors; every policy kind with and without budgets, latency targets and percentiles; an A/B split; three
config versions, one adding a model the learner does not know; circuits opening and half-opening; outcomes
with and without labels and latencies; failures answered by fallback decisions; reference-only requests,
caller token counts, budgets, latency targets, capabilities and policy overrides; prompts with options,
LaTeX, code, numbers and non-ASCII case-folding characters) runs through :class:`RoutingState` three ways
(learning learner, frozen learner, no learner). Every decision as published (``to_json``: what the
worker sends and ``routing simulate`` compares; its floats rounded, so a BLAS kernel of another CPU does
not change it) is hashed and compared with ``tests/unit/data/routing_policy_golden.json``; so are the exact
bytes of every prompt's feature vector.

Regenerate (only on purpose, on code whose decisions are known right):
``PYTHONPATH=$PWD python tests/unit/test_routing_policy_golden.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from processors.routing import features
from processors.routing.features import FEATURE_NAMES, feature_vector, prompt_features
from processors.routing.policy import (
    ModelHealth,
    ModelStats,
    Outcome,
    PolicyDecision,
    PolicyRequest,
    RoutingState,
    _linear_percentiles,
    next_fallback,
)
from processors.routing.scorers import OnlineQuality

GOLDEN = Path(__file__).parent / "data" / "routing_policy_golden.json"
T0 = datetime(2026, 3, 1, tzinfo=UTC)
SEED = 13
REQUESTS = 400

_WORDS = (
    "the", "of", "which", "following", "is", "NOT", "EXCEPT", "LEAST", "value", "calculate", "Compute",
    "find", "SOLVE", "evaluate", "how many", "how much", "What is the value", "determine the", "is called",
    "is known as", "refers to", "term for", "is defined as", "Statement 1 |", "statement 2 |", "def", "return",
    "print(x)", "int n = 3", "#include", "for (", "->", "++", "==", "!=", ";", "{", "}", "x^2", "10^6", "3.14",
    "2,500", "√2", "∫", "∑", "π", "≤", "≥", "×", "$5", "%", "|", "\\frac{1}{2}", "\\sqrt{x}", "?", "energy",
    "Kelvin \u212a", "\u017fhip", "\u0130stanbul", "stra\u00dfe", "\u03a3\u03c3\u03c2", "caf\u00e9", "\U0001f600",
    "Read the following", "This question refers to the following passage", "following passage",
)  # fmt: skip


def _prompt(rnd: random.Random) -> str:
    """A prompt: a question of random words, sometimes MMLU-style options, sometimes long."""
    n = rnd.choice((3, 8, 20, 60, 200, 900))
    text = " ".join(rnd.choice(_WORDS) for _ in range(n))
    if rnd.random() < 0.6:
        opts = []
        for letter in "ABCD"[: rnd.randint(2, 4)]:
            body = rnd.choice(
                ("12", "3.5 m/s", "x^2 + 1", "−4", "a cat", "None of these", "(2, 3)", "π/2", "")
            )
            opts.append(f"{rnd.choice(('', ' ', '('))}{letter}{rnd.choice('.)')} {body}")
        text += rnd.choice(("\n", "\r\n", "\n\n")) + "\n".join(opts)
    if rnd.random() < 0.1:
        text = text.upper()
    return text


def _models(rnd: random.Random, n: int) -> dict[str, dict[str, Any]]:
    caps = (["chat"], ["chat", "code"], ["chat", "vision"], ["chat", "code", "json"], ["chat", "json"])
    return {
        f"m{i}": {
            "provider": ("openai", "anthropic", "mistral", "google")[i % 4],
            "capabilities": caps[i % len(caps)],
            "context_window_tokens": (600, 2_000, 8_000, 128_000)[i % 4],
            "usd_per_million_input_tokens": round(rnd.uniform(0.05, 15.0), 3),
            "usd_per_million_output_tokens": round(rnd.uniform(0.1, 60.0), 3),
            "expected_output_tokens": rnd.choice((64, 256, 512)),
            "latency_prior_ms": float(rnd.choice((150, 400, 900, 1500, 3000))),
        }
        for i in range(n)
    }  # fmt: skip


def _config(rnd: random.Random, models: dict[str, dict[str, Any]], version: int) -> dict[str, Any]:
    names = list(models)
    some = names[1::2] if version % 2 else names[::-1]
    policies = {
        "cheap": {"kind": "cheapest", "models": names, "quality_target": 0.55},
        "cheap_strict": {"kind": "cheapest", "models": some, "quality_target": 0.8, "budget_usd": 0.01,
                         "max_fallbacks": 4},
        "best": {"kind": "best_quality", "models": names, "budget_usd": 0.02},
        "best_fast": {"kind": "best_quality", "models": some, "latency_target_ms": 1200.0,
                      "latency_percentile": "p50", "max_fallbacks": 0},
        "fast": {"kind": "lowest_latency", "models": names, "latency_target_ms": 2000.0},
        "fast_p99": {"kind": "lowest_latency", "models": some, "latency_percentile": "p99", "max_fallbacks": 1},
        "learned": {"kind": "learned", "models": names, "cost_weight": rnd.choice((0.0, 0.3, 0.5))},
        "learned_cost": {"kind": "learned", "models": some, "cost_weight": 1.0, "budget_usd": 0.005},
    }  # fmt: skip
    out: dict[str, Any] = {"models": models, "policies": policies, "default_policy": "learned"}
    if version != 2:
        out["ab"] = {"policy_a": "cheap", "policy_b": "learned", "weight_a": 0.3 if version == 1 else 0.7}
    return out


def _events() -> tuple[list[dict[str, Any]], OnlineQuality]:
    """The seeded history (configs, circuits, requests, with outcome plans) and the learner at its start."""
    rnd = random.Random(SEED)
    models = _models(rnd, 10)
    f = len(FEATURE_NAMES)
    learned = list(models)[:8]  # m8 and m9 unknown to the learner at the start (quality 0.5 until outcomes)
    coef = np.array([[rnd.gauss(0.0, 0.4) for _ in range(f + 1)] for _ in learned])
    mean = np.array([rnd.uniform(0.0, 3.0) for _ in range(f)])
    std = np.array([rnd.uniform(0.5, 2.0) for _ in range(f)])
    learner = OnlineQuality.from_arrays(learned, mean, std, coef)
    events: list[dict[str, Any]] = [{"type": "config", "version": 1, "value": _config(rnd, models, 1)}]
    for i in range(REQUESTS):
        if i in (150, 300):
            version = 2 if i == 150 else 3
            models = {**models, "m10": {**models["m3"], "usd_per_million_input_tokens": 0.02}} if version == 3 else {
                k: {**v, "usd_per_million_input_tokens": v["usd_per_million_input_tokens"] * 1.5}
                for k, v in models.items()
            }  # fmt: skip
            events.append({"type": "config", "version": version, "value": _config(rnd, models, version)})
        if rnd.random() < 0.08:
            state = rnd.choice(("open", "half_open", "closed", "closed"))
            events.append({"type": "circuit", "model": rnd.choice(list(models)), "state": state})
        u = rnd.random()
        req = PolicyRequest(
            request_id=f"g{i}",
            requested_at=T0 + timedelta(seconds=i),
            prompt=None if u < 0.08 else _prompt(rnd),
            reference=f"obj/{i}" if u < 0.12 else None,
            input_tokens=rnd.choice((5, 300, 1_500, 9_000)) if rnd.random() < 0.15 else None,
            budget_usd=rnd.choice((0.0005, 0.003, 0.05)) if rnd.random() < 0.1 else None,
            latency_target_ms=rnd.choice((300.0, 1000.0)) if rnd.random() < 0.1 else None,
            required_capabilities=rnd.choice(((), (), (), ("code",), ("vision",), ("chat", "json"))),
            policy=rnd.choice((None, None, None, "cheap", "cheap_strict", "best", "best_fast", "fast", "fast_p99",
                               "learned_cost", "nope")),
        )  # fmt: skip
        override = rnd.choice((None,) * 9 + ("fast",))
        # the outcome plan of this request: how many tries fail before one succeeds, and what is observed
        plan = {
            "fails": rnd.choice((0, 0, 0, 0, 1, 2)),
            "correct": rnd.choice((True, False, None)),
            "latency_ms": rnd.choice((None, math.nan, round(rnd.lognormvariate(6.0, 0.8), 2))),
        }
        events.append({"type": "request", "request": req, "override": override, "plan": plan})
    return events, learner


def _run(mode: str) -> list[PolicyDecision]:
    """Feed the history to a state as the worker does; return every decision (fallbacks included).

    ``mode``: ``learning`` (outcomes teach the learner), ``frozen`` (they do not), ``none`` (no learner).
    """
    events, learner = _events()
    state = RoutingState(learner=None if mode == "none" else learner, learn=mode == "learning")
    out: list[PolicyDecision] = []
    for e in events:
        if e["type"] == "config":
            state.on_config(e["value"], e["version"])
        elif e["type"] == "circuit":
            state.on_circuit(e["model"], e["state"])
        else:
            req, plan = e["request"], e["plan"]
            d = state.on_request(req, policy=e["override"])
            out.append(d)
            tries = 0
            while d.model is not None:
                ok = tries >= plan["fails"]
                state.on_outcome(Outcome(
                    request_id=req.request_id, model=d.model, success=ok,
                    occurred_at=req.requested_at + timedelta(milliseconds=100 * (tries + 1)),
                    correct=plan["correct"] if ok else None, latency_ms=plan["latency_ms"], cost_usd=0.001,
                ))  # fmt: skip
                if ok:
                    break
                tries += 1
                d = next_fallback(d, state.setup, req, state.health(), state.learner)  # type: ignore[arg-type]
                out.append(d)
    return out


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _features_digest() -> str:
    """SHA-256 of the exact float64 bytes of every prompt's features, and of their dict order."""
    h = hashlib.sha256()
    for e in _events()[0]:
        prompt = e["request"].prompt if e["type"] == "request" else None
        if prompt:
            h.update(feature_vector(prompt).tobytes())
            h.update("|".join(prompt_features(prompt)).encode())
    return h.hexdigest()[:16]


def _table() -> dict[str, Any]:
    runs = {mode: _run(mode) for mode in ("learning", "frozen", "none")}
    return {
        "features": _features_digest(),
        "runs": {
            k: [[d.request_id, d.model, _digest(json.dumps(d.to_json(), sort_keys=True))] for d in v]
            for k, v in runs.items()
        },
    }


def test_decisions_are_byte_identical_to_the_golden_file_recorded_before_the_optimisation() -> None:
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    now = _table()
    assert now["features"] == golden["features"], "prompt features differ from the recorded ones"
    for run, rows in golden["runs"].items():
        got = now["runs"][run]
        assert len(got) == len(rows), f"{run}: {len(got)} decisions, recorded {len(rows)}"
        for g, r in zip(got, rows, strict=True):
            assert g == r, f"{run}: decision of {r[0]} differs (model {g[1]}, recorded {r[1]})"


def test_the_history_is_varied_enough_to_mean_something() -> None:
    """Not a tautology: the golden history covers every policy kind's choices, fallbacks, refusals."""
    decisions = _run("learning")
    chosen = {d.model for d in decisions}
    assert len(chosen - {None}) >= 6 and None in chosen
    assert any(d.fallback_from for d in decisions) and any(d.ab_arm == "a" for d in decisions)
    assert {d.policy for d in decisions} >= {"cheap", "cheap_strict", "best", "best_fast", "fast", "fast_p99",
                                             "learned", "learned_cost", "nope"}  # fmt: skip
    reasons = " ".join(r for d in decisions for c in d.candidates for r in c.reasons)
    for phrase in ("missing capability", "context window", "circuit open", "over budget", "too slow",
                   "already tried", "below quality target", "circuit half-open", "ranked 2 of"):  # fmt: skip
        assert phrase in reasons, phrase
    assert len({d.learner_version for d in decisions}) > 100  # the learner moved along the history
    assert any(c.learned_quality == 0.5 for d in decisions for c in d.candidates)  # a model it does not know


PLAIN = {  # the regular expressions of processors.routing.features as first written (before the speed-ups)
    "_MATH_CHARS": re.compile(r"[=+*/^<>%|()\[\]√∫∑π≤≥×$]"),
    "_DIGIT": re.compile(r"[0-9]"),
    "_LATEX": re.compile(r"\\[a-zA-Z]+"),
    "_CODE": re.compile(
        r"\bdef\b|\breturn\b|;|\{|\}|==|!=|\bprint\s*\(|\bint\s+\w+\s*=|#include|\bfor\s*\(|->|\+\+"
    ),
    "_NUMBER": re.compile(r"(?<![A-Za-z])\d+(?:[.,]\d+)*(?:\s*\^\s*-?\d+)?"),
    "_OPTION": re.compile(r"^\s*\(?([A-J])[.)]\s*(.*)$"),
    "_NUMERIC_OPTION": re.compile(r"^[\s$\-+−]*[\d.,/^*×√πe\s()\-+−%]+[a-zA-Zµ°%/\s]{0,12}$"),
    "_COMPUTE": re.compile(
        r"\b(calculate|compute|find|solve|evaluate|simplify|how many|how much|what is the value|determine the)\b",
        re.IGNORECASE,
    ),
    "_STATEMENT": re.compile(r"statement\s*1\s*\|", re.IGNORECASE),
    "_NEGATION": re.compile(r"\b(NOT|EXCEPT|LEAST)\b"),
    "_PASSAGE": re.compile(
        r"refers to the following|this question refers|read the following|following passage", re.IGNORECASE
    ),
    "_WHICH": re.compile(r"which of the following", re.IGNORECASE),
    "_DEFINITION": re.compile(r"\b(is called|is known as|is defined as|term for|refers to)\b", re.IGNORECASE),
}


def _plain_features(prompt: str) -> tuple[float, ...]:
    """The reference: prompt_features as first written (plain patterns, no ASCII path)."""
    chars = len(prompt)
    denominator = max(chars, 1)
    lines = prompt.split("\n")
    options = [m.group(2).strip() for m in (PLAIN["_OPTION"].match(line) for line in lines) if m is not None]
    numeric_options = sum(1 for o in options if o and PLAIN["_NUMERIC_OPTION"].match(o))
    return (
        math.log1p(chars), math.log1p(len(prompt.split())), float(min(len(lines), 50)),
        len(PLAIN["_DIGIT"].findall(prompt)) / denominator, sum(map(str.isupper, prompt)) / denominator,
        len(PLAIN["_MATH_CHARS"].findall(prompt)) / denominator, float(min(len(PLAIN["_LATEX"].findall(prompt)), 20)),
        float(min(len(PLAIN["_CODE"].findall(prompt)), 20)), float(min(len(PLAIN["_NUMBER"].findall(prompt)), 50)),
        float(len(options)), numeric_options / len(options) if options else 0.0,
        sum(len(o.split()) for o in options) / len(options) if options else 0.0, float(min(prompt.count("?"), 10)),
        *(float(bool(PLAIN[k].search(prompt))) for k in ("_COMPUTE", "_STATEMENT", "_NEGATION", "_PASSAGE", "_WHICH",
                                                         "_DEFINITION")),
    )  # fmt: skip


_FUZZ_ASCII = (
    "def", "_def", "def_", "1def", "DEF", "Def", "return", "xreturn", "print (", "print(", "int x =", "int\t_y=",
    "for(", "for  (", "fork(", "NOT", "NOTE", "xNOT", "_NOT", "NOT_", "EXCEPT", "LEAST", "CALCULATE", "Solve",
    "HOW MANY", "how\nmany", "find", "Find", "is called", "TERM FOR", "REFERS TO", "refers to the following",
    "This Question Refers", "READ the following", "following passage", "Which Of The Following", "Statement 1 |",
    "STATEMENT1|", "statement 2 |", "a1", "a 1", "x12", "_12", "12a", "3.5", "3,5", "3.", "2 ^ -3", "2^x", "10^6",
    "\n", "\r\n", "\n A. 12", "\n(B) x^2 + 1", "\nC) a cat", "\t", " ", "", "(", ")", "-", "+", "=", "!", "#", "{",
    "}", ";", ".", ",", "^", "?", "a", "Z", "_", "\\frac{1}{2}", "$5",
)  # fmt: skip
_FUZZ_OTHER = (
    "édef", "ÉNOT", "\u017folve", "\u017fimplify", "f\u0130nd", "\u0130S CALLED", "r\u0435fers to", "é12", "Ⅻ", "٣",
    "١٢", "²", "\u212a", "\u0131", "\u00df", "\U0001f600", "√2", "π ≤ ×", "Σσς", "\u2028", "\x85",
)  # fmt: skip


def _fuzz_texts(seed: str, n: int) -> list[str]:
    """The golden prompts and ``n`` texts of random fragments (half pure ASCII), glued with or without spaces,
    each fragment in a random case."""
    rnd = random.Random(seed)
    texts = [e["request"].prompt or "" for e in _events()[0] if e["type"] == "request"]
    case = (str, str.lower, str.upper, str.title, str.swapcase)
    for i in range(n):
        pool = _FUZZ_ASCII if i % 2 else _FUZZ_ASCII + _FUZZ_OTHER + _WORDS
        sep = rnd.choice(("", " ", ""))
        texts.append(sep.join(rnd.choice(case)(rnd.choice(pool)) for _ in range(rnd.randint(1, 14))))
    return texts


@pytest.mark.parametrize(
    "name", ["_CODE", "_NUMBER", "_NEGATION", "_COMPUTE", "_STATEMENT", "_DEFINITION", "_PASSAGE"]
)
def test_fast_feature_patterns_match_exactly_what_the_plain_patterns_match(name: str) -> None:
    """The rewritten patterns of :mod:`processors.routing.features` (a literal first, a first-character
    lookahead; the case-sensitive twin of a case-insensitive cue on lower-cased ASCII text) give the plain
    patterns' match spans on the golden prompts and 3,000 fuzzed texts (word boundaries, digits after
    letters, case folding)."""
    fast, plain = getattr(features, name), PLAIN[name]
    lower = getattr(features, f"{name}_LOWER", None)
    matched = 0
    for t in _fuzz_texts(name, 3_000):
        want = [m.span() for m in plain.finditer(t)]
        assert [m.span() for m in fast.finditer(t)] == want, t
        if lower is not None and t.isascii():
            assert [m.span() for m in lower.finditer(t.lower())] == want, t
        matched += bool(want)
    assert 100 < matched < 3_000  # the texts exercise both outcomes


def test_prompt_features_equal_the_plain_implementation_bit_for_bit() -> None:
    """Every feature of :func:`prompt_features` (ASCII path and the other) against the plain reference."""
    texts = _fuzz_texts("features", 4_000)
    for t in texts:
        got = np.array(list(prompt_features(t).values()), dtype=np.float64)
        assert got.tobytes() == np.array(_plain_features(t), dtype=np.float64).tobytes(), t
    assert sum(t.isascii() for t in texts) > 1_500 and sum(not t.isascii() for t in texts) > 1_500
    cues = np.array([_plain_features(t)[13:] for t in texts])
    assert (cues.sum(axis=0) > 50).all()  # every cue is found in some texts


def test_linear_percentiles_are_numpys_bit_for_bit() -> None:
    """The percentiles of the latency window against ``np.percentile`` (linear) on 6,000 samples of 1 to 300
    values: log-normal latencies, small integers (ties), subnormals, huge magnitudes, zeros of both signs."""
    rng = np.random.default_rng(5)
    for trial in range(6_000):
        n = int(rng.choice([1, 2, 3, 4, 5, 19, 20, 21, 100, 255, 256, int(rng.integers(1, 300))]))
        v = [
            rng.lognormal(5.0, 1.0, n), rng.integers(0, 5, n).astype(np.float64), rng.normal(0.0, 1e-310, n),
            rng.uniform(-1e307, 1e307, n), np.choose(rng.integers(0, 3, n), [np.full(n, -0.0), np.zeros(n), np.full(n, 0.5)]),
        ][trial % 5]  # fmt: skip
        want = np.percentile(v, [50, 95, 99])
        got = _linear_percentiles(v.tolist())
        assert np.array([got["p50"], got["p95"], got["p99"]]).tobytes() == want.tobytes(), v


def _plain_health(state: RoutingState) -> dict[str, ModelHealth]:
    """RoutingState.health as first written: every ModelHealth built anew."""
    out = {}
    for m in sorted(set(state.circuits) | set(state.stats)):
        s = state.stats.get(m)
        out[m] = ModelHealth(
            circuit_state=state.circuits.get(m, "closed"), latency_ms=s.percentiles() if s else {},
            success_rate=(s.successes_count / s.outcomes_count) if s and s.outcomes_count else None,
            outcomes_count=s.outcomes_count if s else 0,
        )  # fmt: skip
    return out


def test_health_kept_between_calls_follows_outcomes_circuits_and_replaced_stats() -> None:
    state = RoutingState()
    rnd = random.Random(3)
    for i in range(400):
        step = rnd.random()
        model = rnd.choice(("a", "b", "c", "d"))
        if step < 0.6:
            state.on_outcome(Outcome(request_id=f"o{i}", model=model, success=rnd.random() < 0.8, occurred_at=T0,
                                     latency_ms=rnd.choice((None, rnd.uniform(50, 900)))))  # fmt: skip
        elif step < 0.8:
            state.on_circuit(model, rnd.choice(("closed", "half_open", "open")))
        elif model in state.stats:  # as the worker's recovery does: a new stats object, maybe the same count
            old = state.stats[model]
            new = ModelStats(
                outcomes_count=old.outcomes_count, successes_count=rnd.randint(0, old.outcomes_count)
            )
            new.latencies_ms.extend(rnd.uniform(50, 900) for _ in range(rnd.randint(0, 5)))
            state.stats[model] = new
        assert state.health() == _plain_health(state)


if __name__ == "__main__":
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    table = _table()
    runs = ",\n".join(
        f"{json.dumps(k)}: [\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]"
        for k, rows in table["runs"].items()
    )
    GOLDEN.write_text(
        f'{{"features": {json.dumps(table["features"])}, "runs": {{\n{runs}\n}}}}\n', encoding="utf-8"
    )
    sys.stdout.write(f"wrote {GOLDEN}\n")

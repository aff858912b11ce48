"""Unit tests of the routing processor's logic: features, router fit/score/threshold, artifact, decisions,
evaluation metrics, and (when ../shared/data is present) the real MMLU outcomes of lm-sys/RouteLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from processors.errors import UnprocessableEventError
from processors.routing.app import _request_from_json, _request_to_json
from processors.routing.errors import RouterArtifactError, RoutingDataError
from processors.routing.features import FEATURE_NAMES, feature_vector, prompt_features
from processors.routing.records import RouteDecision, RouteRequest, embedding_request_id_for
from processors.routing.router import (
    STRONG_MODEL,
    WEAK_MODEL,
    EmbeddingInput,
    KnnScorer,
    LabelledPrompts,
    Router,
    decide,
    evaluate,
    fit_router,
    is_test_prompt,
    read_mmlu,
    routing_curve,
    split,
    threshold_for_share,
)

ROOT = Path(__file__).resolve().parents[2]
MMLU = ROOT.parent / "shared" / "data" / "routing" / "mmlu"
T0 = datetime(2025, 11, 18, 22, 55, 1, 123000, tzinfo=UTC)

MATH = [
    "Calculate 17 * 23 + 4^3.\nA. 455\nB. 459\nC. 391\nD. 455.5",
    "Find the derivative of x^3 + 2x at x = 2.\nA. 14\nB. 12\nC. 10\nD. 8",
    "Compute the determinant of [[2, 1], [3, 4]].\nA. 5\nB. 11\nC. -5\nD. 8",
    "Solve for x: 3x + 7 = 22.\nA. 5\nB. 3\nC. 7\nD. 15",
    "How many primes are below 50?\nA. 15\nB. 14\nC. 16\nD. 13",
    "Evaluate the integral of 2x from 0 to 3.\nA. 9\nB. 6\nC. 3\nD. 12",
]
PLAIN = [
    "Which of the following is a mammal?\nA. shark\nB. whale\nC. trout\nD. eel",
    "Who wrote Hamlet?\nA. Shakespeare\nB. Dickens\nC. Austen\nD. Joyce",
    "Which of the following is the capital of France?\nA. Paris\nB. Rome\nC. Madrid\nD. Berlin",
    "The term for a word with the opposite meaning is\nA. antonym\nB. synonym\nC. homonym\nD. acronym",
    "Which organ pumps blood through the body?\nA. heart\nB. liver\nC. lung\nD. kidney",
    "Which colour do you get by mixing blue and yellow?\nA. green\nB. purple\nC. orange\nD. red",
]


def _hand_data() -> LabelledPrompts:
    """Math prompts: only the strong model right; plain ones: both right (and one where only the weak is)."""
    rows = (
        [(p, True, False) for p in MATH] + [(p, True, True) for p in PLAIN[:-1]] + [(PLAIN[-1], False, True)]
    )
    return LabelledPrompts.from_rows(rows, subject="hand")


def _hand_vectors(n_math: int, n_plain: int) -> np.ndarray:
    """Two well-separated clusters in 8 dimensions (math near e0, plain near e1), no randomness."""
    out = []
    for i in range(n_math):
        out.append([1.0, 0.0, 0.05 * i, 0, 0, 0, 0, 0])
    for i in range(n_plain):
        out.append([0.0, 1.0, 0, 0.05 * i, 0, 0, 0, 0])
    return np.asarray(out, dtype=np.float32)


@pytest.fixture(scope="module")
def hand_router() -> Router:
    """A router with both scorers, fitted on the hand-written outcomes and vectors."""
    data = _hand_data()
    return fit_router(
        data, vectors=_hand_vectors(6, 6), embedding_model="test-model", embedding_model_version="1", k=3
    )


def _request(prompt: str, request_id: str = "r1", **kw: object) -> RouteRequest:
    return RouteRequest(request_id=request_id, prompt=prompt, requested_at=T0, **kw)  # type: ignore[arg-type]


# -- features -------------------------------------------------------------------------------------------------


def test_features_of_a_multiple_choice_math_prompt() -> None:
    """Options, numeric options, digits, math symbols and the compute cue are read from the text."""
    f = prompt_features(MATH[0])
    assert list(f) == list(FEATURE_NAMES)
    assert f["options_count"] == 4
    assert f["numeric_options_share"] == 1.0
    assert f["lines_count"] == 5
    assert f["cue_compute"] == 1.0 and f["cue_which_following"] == 0.0
    assert f["digit_share"] == pytest.approx(sum(c.isdigit() for c in MATH[0]) / len(MATH[0]))
    assert f["math_symbol_share"] > 0
    g = prompt_features(
        "Statement 1 | Every group is abelian. Statement 2 | Which of the following is NOT true?"
    )
    assert g["cue_statement_pair"] == 1.0 and g["cue_negation"] == 1.0 and g["cue_which_following"] == 1.0
    assert g["options_count"] == 0 and g["numeric_options_share"] == 0.0
    assert feature_vector("").shape == (len(FEATURE_NAMES),)
    assert prompt_features("def f(x):\n    return x == 1;")["code_cue_count"] >= 3


# -- fit, score, threshold ----------------------------------------------------------------------------------------


def test_features_scorer_ranks_strong_wins_first(hand_router: Router) -> None:
    """On its own training data the features scorer scores every math prompt (strong wins) above every plain one."""
    math_scores = hand_router.score_features(MATH)
    plain_scores = hand_router.score_features(PLAIN)
    assert math_scores.min() > plain_scores.max()
    assert np.all((math_scores >= -1) & (math_scores <= 1))


def test_knn_scorer_follows_the_neighbours() -> None:
    """A query in the cluster of strong wins scores above one in the cluster of ties; self is left out in training."""
    knn = KnnScorer(_hand_vectors(4, 4) / np.linalg.norm(_hand_vectors(4, 4), axis=1, keepdims=True),
                    np.array([1, 1, 1, 1, 0, 0, 0, -1], dtype=np.int8), k=3)  # fmt: skip
    near_math, near_plain = knn.score(
        np.array([[1, 0.1, 0, 0, 0, 0, 0, 0], [0.1, 1, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
    )
    assert near_math > 0.7 and near_plain < 0.1
    loo = knn.score_training()
    assert loo.shape == (8,) and loo[:4].min() > loo[4:].max()
    with pytest.raises(ValueError, match="dimension"):
        knn.score(np.zeros((1, 5), dtype=np.float32))


def test_threshold_gives_the_asked_share() -> None:
    """The threshold for a share puts exactly that share of distinct scores above it."""
    scores = np.linspace(-1, 1, 200)
    for share in (0.05, 0.2, 0.5, 0.8, 0.95):
        assert (scores > threshold_for_share(scores, share)).mean() == pytest.approx(share)
    assert (scores > threshold_for_share(scores, 0.0)).sum() == 0
    assert (scores > threshold_for_share(scores, 1.0)).sum() == 200
    with pytest.raises(ValueError):
        threshold_for_share(scores, 1.5)


def test_split_is_by_prompt_hash() -> None:
    """The split is a fixed function of the prompt text: about the asked share, the same on every call."""
    prompts = [f"question number {i}" for i in range(2000)]
    flags = [is_test_prompt(p) for p in prompts]
    assert flags == [is_test_prompt(p) for p in prompts]
    assert 0.17 < sum(flags) / len(flags) < 0.23
    data = LabelledPrompts.from_rows([(p, True, False) for p in prompts])
    train, test = split(data)
    assert len(train) + len(test) == 2000 and not set(train.prompts) & set(test.prompts)


# -- artifact -------------------------------------------------------------------------------------------------


def test_artifact_round_trip_keeps_version_and_decisions(hand_router: Router, tmp_path: Path) -> None:
    """Saving and loading keeps the version and the decisions; fitting again gives the same version."""
    path = hand_router.save(tmp_path / "router")
    assert path.suffix == ".npz" and path.with_suffix(".json").is_file()
    loaded = Router.load(path)
    assert loaded.version == hand_router.version
    assert json.loads(path.with_suffix(".json").read_text())["version"] == hand_router.version
    req = _request(MATH[1], embedding_request_id=embedding_request_id_for("r1"))
    emb = EmbeddingInput(
        model_name="test-model", model_version="1", vector=np.array([1, 0, 0, 0, 0, 0, 0, 0], np.float32)
    )
    assert decide(loaded, req, emb) == decide(hand_router, req, emb)
    assert fit_router(_hand_data(), vectors=_hand_vectors(6, 6), embedding_model="test-model",
                      embedding_model_version="1", k=3).version == hand_router.version  # fmt: skip
    assert fit_router(_hand_data()).version != hand_router.version


def test_a_changed_artifact_is_refused(hand_router: Router, tmp_path: Path) -> None:
    """A JSON whose content no longer hashes to its version, or a missing file, is a RouterArtifactError."""
    path = hand_router.save(tmp_path / "router.npz")
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["thresholds"]["features"]["0.50"] = 0.123
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(RouterArtifactError, match="hashes to"):
        Router.load(path)
    with pytest.raises(RouterArtifactError, match="no such router"):
        Router.load(tmp_path / "absent.npz")


# -- decisions ------------------------------------------------------------------------------------------------


def test_decision_uses_the_embedding_when_present_and_features_otherwise(hand_router: Router) -> None:
    """With the embedding the k-NN scorer decides; without, or with another model's, the features scorer."""
    math_vec = EmbeddingInput(
        model_name="test-model", model_version="1", vector=np.array([1, 0, 0.1, 0, 0, 0, 0, 0], np.float32)
    )
    plain_vec = EmbeddingInput(
        model_name="test-model", model_version="1", vector=np.array([0, 1, 0, 0.1, 0, 0, 0, 0], np.float32)
    )
    named = _request("Tell me something.", embedding_request_id=embedding_request_id_for("r1"))
    d_math, d_plain = decide(hand_router, named, math_vec), decide(hand_router, named, plain_vec)
    assert (d_math.method, d_math.embedding_status, d_math.embedding_model_version) == (
        "embedding",
        "used",
        "1",
    )
    assert d_math.model == STRONG_MODEL and d_math.provider == "openai"
    assert d_plain.model == WEAK_MODEL and d_plain.provider == "mistralai"
    assert d_math.score > d_math.threshold >= d_plain.score
    assert d_math.threshold == hand_router.threshold("embedding", 0.5)
    other = EmbeddingInput(model_name="other", model_version="9", vector=math_vec.vector)
    d_other = decide(hand_router, named, other)
    assert (d_other.method, d_other.embedding_status) == ("features", "mismatch-model-other")
    bare = decide(hand_router, _request(MATH[2]))
    assert (bare.method, bare.embedding_status, bare.policy) == ("features", "none", "balanced")
    assert bare.model == STRONG_MODEL and bare.threshold == hand_router.threshold("features", 0.5)
    assert bare.decided_at == T0 and bare.features == prompt_features(MATH[2])
    assert decide(hand_router, _request(MATH[2], policy="quality")).threshold == hand_router.threshold(
        "features", 0.8
    )


def test_decision_is_a_pure_function_with_a_deterministic_id(hand_router: Router) -> None:
    """The same request and embedding give an equal decision and id; the id changes with the request or router."""
    vec = EmbeddingInput(
        model_name="test-model", model_version="1", vector=np.array([1, 0, 0, 0, 0, 0, 0, 0], np.float32)
    )
    req = _request(MATH[0], embedding_request_id=embedding_request_id_for("r1"))
    first = decide(hand_router, req, vec)
    assert decide(hand_router, req, vec) == first
    assert RouteDecision.from_avro(first.to_avro()) == first
    replayed = _request_from_json(json.loads(json.dumps(_request_to_json(req))))  # through the join table
    assert replayed == req and decide(hand_router, replayed, vec) == first
    assert (
        decide(
            hand_router, _request(MATH[0] + " ", embedding_request_id=req.embedding_request_id), vec
        ).decision_id
        != first.decision_id
    )
    features_only = fit_router(_hand_data())
    assert decide(features_only, req, vec).decision_id != first.decision_id
    assert decide(features_only, req, vec).embedding_status == "unused-no-embedding-scorer"


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"policy": "cheapest"}, "unknown policy"),
        ({"candidate_models": ("gpt-4-1106-preview",)}, "lack the router's"),
        ({"embedding_request_id": "someone-else:1"}, "does not start with"),
    ],
)
def test_requests_the_router_cannot_take_are_refused(hand_router: Router, kw: dict, reason: str) -> None:
    """An unknown policy, candidates without both models or a foreign embedding id raise UnprocessableEventError."""
    with pytest.raises(UnprocessableEventError, match=reason):
        decide(hand_router, _request("x", **kw))


# -- evaluation -----------------------------------------------------------------------------------------------


def test_curve_metrics_of_random_and_oracle() -> None:
    """Constant scores are the random mix (APGR 0.5, CPT 0.5); true gains give the oracle."""
    s = np.array([True, True, True, False, True, False, True, True])
    w = np.array([False, True, False, True, True, False, False, True])
    flat = routing_curve(np.zeros(8), s, w)
    assert flat.apgr() == pytest.approx(0.5) and flat.cpt(0.5) == pytest.approx(0.5)
    assert flat.accuracy_at(0.0) == w.mean() and flat.accuracy_at(1.0) == s.mean()
    oracle = routing_curve(s.astype(float) - w.astype(float), s, w)
    # gains: 3 wins, 1 loss, 4 ties -> gap 2/8; PGR 0.5 after one win = 1/8 of the calls
    assert oracle.cpt(0.5) == pytest.approx(1 / 8)
    assert oracle.accuracy_at(3 / 8) == pytest.approx((w.sum() + 3) / 8)
    assert oracle.apgr() > 1.0


def test_evaluate_reports_scorers_and_baselines(hand_router: Router) -> None:
    """evaluate() gives APGR, CPT(50%) and accuracy at the router's thresholds for each scorer and the baselines."""
    data = _hand_data()
    report = evaluate(hand_router, data, vectors=_hand_vectors(6, 6))
    assert {"features", "embedding", "oracle", "random", "always_strong", "always_weak"} <= set(
        report["scorers"]
    )
    assert report["scorers"]["random"]["apgr"] == 0.5
    assert report["rows"][0]["train_share"] == 0.1 and len(report["rows"]) == 9
    assert report["scorers"]["features"]["apgr"] > 0.5  # in-sample, on separable data


# -- reading outcomes -----------------------------------------------------------------------------------------


def _write_csv(path: Path, rows: list[tuple[str, str, str]]) -> None:
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", WEAK_MODEL, STRONG_MODEL])
        w.writerows(rows)


def test_read_mmlu_with_and_without_the_contaminated_list(tmp_path: Path) -> None:
    """Multi-line prompts parse; the contaminated list is applied when present and optional when absent."""
    d = tmp_path / "mmlu"
    d.mkdir()
    _write_csv(
        d / "mmlu_algebra.csv",
        [("What is 1+1?\nA. 2\nB. 3", "True", "True"), ("Hard one\nA. x", "False", "True")],
    )
    data = read_mmlu(d)
    assert data.prompts[0] == "What is 1+1?\nA. 2\nB. 3" and data.subjects == ("algebra", "algebra")
    assert list(data.weak_correct) == [True, False] and list(data.strong_correct) == [True, True]
    (tmp_path / "mmlu_contaminated_prompts.jsonl").write_text(
        json.dumps({"eval_prompt": "Hard one\nA. x"}) + "\n"
    )
    cleaned = read_mmlu(d)
    assert len(cleaned) == 1 and cleaned.excluded_count == 1
    assert len(read_mmlu(d, exclude_contaminated=False)) == 2
    _write_csv(d / "mmlu_bad.csv", [("q", "yes", "True")])
    with pytest.raises(RoutingDataError, match="mmlu_bad.csv:2: expected True or False"):
        read_mmlu(d)
    with pytest.raises(RoutingDataError, match="no file"):
        read_mmlu(d, subjects=["nothing"])


def _backbone(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKBONE_")}
    env["BACKBONE_STATE_DIR"] = str(tmp_path)
    return subprocess.run([sys.executable, "-m", "backbone", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_cli_reports_a_missing_router_in_one_line(tmp_path: Path) -> None:
    """`backbone routing eval` with a missing router file exits 2 with one error line, no traceback."""
    r = _backbone(
        "routing", "eval", "--router", str(tmp_path / "no.npz"), "--data", str(tmp_path), tmp_path=tmp_path
    )
    text = " ".join(r.stderr.split())  # rich wraps long lines
    assert r.returncode == 2, r.stdout + r.stderr
    assert (
        text.startswith("error:") and "no such router file" in text and "Traceback" not in r.stdout + r.stderr
    )


needs_mmlu = pytest.mark.skipif(not MMLU.is_dir(), reason=f"{MMLU} is absent (the shared real data set)")


@needs_mmlu
def test_mmlu_facts_are_reproduced() -> None:
    """The parser reads the published facts: 14,042 prompts, GPT-4 80.6 %, Mixtral 68.1 %, only Mixtral 5.3 %."""
    data = read_mmlu(MMLU, exclude_contaminated=False)
    facts = data.summary()
    assert len(data) == 14_042 and len(set(data.subjects)) == 57
    assert round(100 * facts["strong_accuracy"], 1) == 80.6
    assert round(100 * facts["weak_accuracy"], 1) == 68.1
    assert round(100 * facts["only_weak_share"], 1) == 5.3
    assert read_mmlu(MMLU).excluded_count == 5  # the contaminated list next to the CSV folder


@needs_mmlu
def test_features_router_beats_the_random_mix_on_held_out_prompts() -> None:
    """Fitted on the train split, the features scorer is more accurate than the random mix at 50 % strong calls
    on the test split, and its APGR is above 0.5 (the random mix's)."""
    train, test = split(read_mmlu(MMLU))
    router = fit_router(train)
    assert not set(train.prompts) & set(test.prompts)
    report = evaluate(router, test)
    features, random = report["scorers"]["features"], report["scorers"]["random"]
    assert features["accuracy_at_50"] > random["accuracy_at_50"] + 0.01
    assert features["apgr"] > 0.55 and features["cpt50"] < 0.45
    row = next(r for r in report["rows"] if r["train_share"] == 0.5)
    assert row["features_accuracy"] > row["features_random_accuracy"]


@needs_mmlu
def test_cli_fits_and_evaluates_a_features_router(tmp_path: Path) -> None:
    """`backbone routing fit --no-embeddings` then `eval --json` on three real subjects: a report with the baselines."""
    subjects = "high_school_mathematics,high_school_world_history,college_physics"
    out = tmp_path / "router.npz"
    fit = _backbone("routing", "fit", "--data", str(MMLU), "--out", str(out), "--no-embeddings", "--subjects", subjects,
                    "--json", tmp_path=tmp_path)  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    fitted = json.loads(fit.stdout)
    assert fitted["version"] == Router.load(out).version and fitted["scorers"] == ["features"]
    assert fitted["train_prompts"] + fitted["test_prompts"] == len(
        read_mmlu(MMLU, subjects=subjects.split(","))
    )
    ev = _backbone("routing", "eval", "--router", str(out), "--data", str(MMLU), "--subjects", subjects, "--json",
                   tmp_path=tmp_path)  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    report = json.loads(ev.stdout)
    assert report["router_version"] == fitted["version"]
    assert report["test"]["prompts_count"] == fitted["test_prompts"]
    assert {"features", "random", "oracle", "always_strong", "always_weak"} <= set(report["scorers"])

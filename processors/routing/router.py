"""The router: which of two models (strong, weak) serves a prompt, fitted from labelled outcomes.

Plain Python and numpy; no Kafka. The pieces:

* **Labelled outcomes** (:class:`LabelledPrompts`): prompts with, for each, whether the strong and the
  weak model answered right. :func:`read_mmlu` reads the real set of lm-sys/RouteLLM
  (``routellm/evals/mmlu/mmlu_<subject>.csv``: GPT-4-1106 and Mixtral-8x7B on the 14,042 MMLU prompts).
* **A fixed split** (:func:`is_test_prompt`): a prompt is in the test split when the first 8 bytes of
  its SHA-256, as an integer, modulo 100 are below ``test_percent`` (20). No randomness, and equal
  prompts (MMLU has 105 duplicates) always land on the same side.
* **Two scorers**, both estimating the gain of calling the strong model, ``P(strong right) - P(weak
  right)`` (the expected change in accuracy, in [-1, 1]):

  - :class:`FeatureScorer`: two L2-regularised logistic regressions on the standardised prompt
    features (:mod:`processors.routing.features`), one for ``strong right and weak wrong`` ("win") and
    one for ``weak right and strong wrong`` ("loss"); score = P(win) - P(loss). Fitted by Newton's
    method (deterministic, a fixed number of steps at most).
  - :class:`KnnScorer`: the k nearest training prompts by cosine of their MiniLM vectors; score = the
    similarity-weighted mean of their gains (+1 win, -1 loss, 0 otherwise), shrunk towards the
    training mean gain with a prior weight of 1. Ties in similarity break by training index.

* **Thresholds**: route to the strong model when ``score > threshold``. For each scorer the router
  keeps the thresholds that give strong-call shares of 5 %, 10 %, ..., 95 % on its training prompts
  (k-NN scores there leave the prompt itself out); the named policies pick one: ``cost`` 20 %,
  ``balanced`` 50 %, ``quality`` 80 %. A caller may also pass its own threshold to :meth:`Router.route`.
* **Decision** (:func:`decide`): a pure function of (request, embedding or None, router). It uses the
  embedding scorer when the request's embedding is present and the router has one, else features.
* **Artifact**: :meth:`Router.save` writes ``<name>.npz`` (the arrays) and ``<name>.json`` (metadata);
  the version is the SHA-256 prefix of the arrays (name, dtype, shape, bytes) and the canonical JSON of
  the metadata, checked again by :meth:`Router.load`.
* **Evaluation** (:func:`evaluate`): accuracy against strong-call share, APGR and CPT(50 %) as in
  RouteLLM (arXiv 2406.18665), with the baselines always-strong, always-weak, random mix (expected
  value) and oracle.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from processors.errors import UnprocessableEventError
from processors.routing.errors import RouterArtifactError, RoutingDataError
from processors.routing.features import FEATURE_NAMES, feature_matrix, prompt_features
from processors.routing.records import EMBEDDING_ID_PREFIX, RouteDecision, RouteRequest
from streams.envelope import deterministic_id

__all__ = [
    "ARTIFACT_FORMAT",
    "DEFAULT_TEST_PERCENT",
    "POLICIES",
    "PROVIDERS",
    "SHARE_GRID",
    "STRONG_MODEL",
    "WEAK_MODEL",
    "EmbeddingInput",
    "FeatureScorer",
    "KnnScorer",
    "LabelledPrompts",
    "Router",
    "RoutingCurve",
    "decide",
    "evaluate",
    "fit_router",
    "is_test_prompt",
    "needs_embedding",
    "read_mmlu",
    "request_digest",
    "routing_curve",
    "split",
    "threshold_for_share",
    "validate_request",
]

STRONG_MODEL = "gpt-4-1106-preview"
WEAK_MODEL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
PROVIDERS = {STRONG_MODEL: "openai", WEAK_MODEL: "mistralai"}
"""Provider of each model the MMLU outcomes name."""
POLICIES = {"cost": 0.2, "balanced": 0.5, "quality": 0.8}
"""Policy name -> the share of strong calls its threshold is calibrated for (on training prompts)."""
SHARE_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
"""Strong-call shares (0.05 ... 0.95) for which the router keeps a threshold per scorer."""
DEFAULT_TEST_PERCENT = 20
ARTIFACT_FORMAT = "sophia-router/1"
Z_CLIP = 5.0
"""Standardised features are clipped to [-Z_CLIP, Z_CLIP]: a prompt unlike every training prompt (two
options where MMLU always has four) must not push the logistic regressions to an extreme score."""
CONTAMINATED_FILE = "mmlu_contaminated_prompts.jsonl"


# -- labelled outcomes --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabelledPrompts:
    """Prompts with which model answered each right.

    Attributes:
        prompts: the prompt texts, shape ``(n,)``.
        strong_correct: bool array ``(n,)``, the strong model was right.
        weak_correct: bool array ``(n,)``, the weak model was right.
        subjects: where each prompt came from (MMLU subject, or any label), ``(n,)``.
        excluded_count: prompts dropped while reading (contaminated), not in the arrays.
    """

    prompts: tuple[str, ...]
    strong_correct: np.ndarray
    weak_correct: np.ndarray
    subjects: tuple[str, ...] = ()
    excluded_count: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, bool, bool]], subject: str = "") -> LabelledPrompts:
        """Build from ``(prompt, strong right, weak right)`` rows (hand-written data, tests)."""
        rows = list(rows)
        return cls(
            prompts=tuple(r[0] for r in rows),
            strong_correct=np.array([bool(r[1]) for r in rows], dtype=bool),
            weak_correct=np.array([bool(r[2]) for r in rows], dtype=bool),
            subjects=tuple(subject for _ in rows),
        )

    def subset(self, mask: np.ndarray) -> LabelledPrompts:
        """The prompts where the bool array ``mask`` (shape ``(n,)``) is true, in order."""
        idx = np.flatnonzero(mask)
        return LabelledPrompts(
            prompts=tuple(self.prompts[i] for i in idx),
            strong_correct=self.strong_correct[idx],
            weak_correct=self.weak_correct[idx],
            subjects=tuple(self.subjects[i] for i in idx) if self.subjects else (),
            excluded_count=0,
        )

    @property
    def gain(self) -> np.ndarray:
        """Per prompt, strong right minus weak right: int8 in {-1, 0, 1}, shape ``(n,)``."""
        return self.strong_correct.astype(np.int8) - self.weak_correct.astype(np.int8)

    def summary(self) -> dict[str, float]:
        """Counts and shares: prompts, strong/weak accuracy, only-strong and only-weak right shares."""
        n = max(len(self), 1)
        s, w = self.strong_correct, self.weak_correct
        return {
            "prompts_count": float(len(self)),
            "strong_accuracy": float(s.sum() / n),
            "weak_accuracy": float(w.sum() / n),
            "only_strong_share": float((s & ~w).sum() / n),
            "only_weak_share": float((w & ~s).sum() / n),
            "excluded_count": float(self.excluded_count),
        }


def _bool_cell(value: str, where: str) -> bool:
    if value == "True":
        return True
    if value == "False":
        return False
    raise RoutingDataError(f"{where}: expected True or False, got {value!r}")


def _contaminated(directory: Path) -> set[str] | None:
    """The ``eval_prompt`` texts of ``mmlu_contaminated_prompts.jsonl`` in ``directory`` or its parent."""
    for candidate in (directory / CONTAMINATED_FILE, directory.parent / CONTAMINATED_FILE):
        if candidate.is_file():
            out = set()
            for lineno, line in enumerate(candidate.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    out.add(item["eval_prompt"] if isinstance(item, dict) else str(item))
                except (ValueError, KeyError) as exc:
                    raise RoutingDataError(f"{candidate}:{lineno}: not a contaminated-prompt record: {exc}") from exc
            return out
    return None


def read_mmlu(
    directory: Path | str,
    *,
    subjects: Sequence[str] | None = None,
    exclude_contaminated: bool = True,
    strong_model: str = STRONG_MODEL,
    weak_model: str = WEAK_MODEL,
) -> LabelledPrompts:
    """Read RouteLLM's MMLU outcomes: ``mmlu_<subject>.csv`` with columns ``prompt,<weak>,<strong>``.

    Source: lm-sys/RouteLLM @ 0b64fda ``routellm/evals/mmlu/`` (Apache-2.0), copied under
    ``../shared/data/routing/mmlu``. Prompts are multi-line quoted CSV fields; the model columns hold
    ``True``/``False``. ``mmlu_contaminated_prompts.jsonl`` (in ``directory`` or its parent; each line a
    JSON object whose ``eval_prompt`` is a prompt to exclude) may be absent: then nothing is excluded.

    Args:
        directory: the folder of the CSV files.
        subjects: read only these subjects (``abstract_algebra``, ...); default all, sorted by file name.
        exclude_contaminated: drop the prompts listed as contaminated (when the file exists).
        strong_model, weak_model: the column names of the two models.

    Returns:
        The outcomes in file then row order (the real set: 14,042 prompts with nothing excluded; GPT-4
        right on 80.6 %, Mixtral on 68.1 %, only Mixtral on 5.3 %).

    Raises:
        RoutingDataError: no CSV file, a missing model column, or a cell other than True/False.
    """
    directory = Path(directory)
    files = sorted(directory.glob("mmlu_*.csv"))
    if subjects is not None:
        wanted = {f"mmlu_{s}.csv" for s in subjects}
        missing = wanted - {f.name for f in files}
        if missing:
            raise RoutingDataError(f"{directory}: no file {', '.join(sorted(missing))}")
        files = [f for f in files if f.name in wanted]
    if not files:
        raise RoutingDataError(f"{directory}: no mmlu_*.csv file")
    excluded = _contaminated(directory) if exclude_contaminated else None
    prompts: list[str] = []
    strong: list[bool] = []
    weak: list[bool] = []
    subject_of: list[str] = []
    excluded_count = 0
    for path in files:
        subject = path.stem.removeprefix("mmlu_")
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None) or []
            try:
                pi, si, wi = header.index("prompt"), header.index(strong_model), header.index(weak_model)
            except ValueError:
                raise RoutingDataError(
                    f"{path}: header {header!r} lacks prompt, {strong_model!r} or {weak_model!r}"
                ) from None
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if len(row) != len(header):
                    raise RoutingDataError(f"{where}: {len(row)} cells, expected {len(header)}")
                if excluded is not None and row[pi] in excluded:
                    excluded_count += 1
                    continue
                prompts.append(row[pi])
                strong.append(_bool_cell(row[si], where))
                weak.append(_bool_cell(row[wi], where))
                subject_of.append(subject)
    return LabelledPrompts(
        prompts=tuple(prompts),
        strong_correct=np.array(strong, dtype=bool),
        weak_correct=np.array(weak, dtype=bool),
        subjects=tuple(subject_of),
        excluded_count=excluded_count,
    )


def is_test_prompt(prompt: str, test_percent: int = DEFAULT_TEST_PERCENT) -> bool:
    """Whether ``prompt`` is in the test split: ``int(sha256(prompt)[:8]) % 100 < test_percent``."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % 100 < test_percent


def split(data: LabelledPrompts, test_percent: int = DEFAULT_TEST_PERCENT) -> tuple[LabelledPrompts, LabelledPrompts]:
    """The fixed (train, test) split of ``data`` by :func:`is_test_prompt`."""
    test = np.array([is_test_prompt(p, test_percent) for p in data.prompts], dtype=bool)
    return data.subset(~test), data.subset(test)


# -- scorers ----------------------------------------------------------------------------------------------------


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, steps: int = 30) -> np.ndarray:
    """Newton's method for L2-regularised logistic regression; ``x`` has a leading ones column.

    Returns the coefficients, shape ``(x.shape[1],)``. The intercept is not penalised.
    """
    _n, d = x.shape
    w = np.zeros(d)
    penalty = np.full(d, l2)
    penalty[0] = 0.0
    for _ in range(steps):
        p = _sigmoid(x @ w)
        grad = x.T @ (p - y) + penalty * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty) + 1e-9 * np.eye(d)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.max(np.abs(step))) < 1e-10:
            break
    return w


@dataclass(frozen=True, slots=True)
class FeatureScorer:
    """Gain = P(win) - P(loss) from two logistic regressions on standardised prompt features
    (clipped to [-:data:`Z_CLIP`, :data:`Z_CLIP`]).

    Attributes:
        mean, std: feature standardisation, shape ``(f,)`` each (std 1 where a feature is constant).
        coef_win, coef_loss: coefficients with the intercept first, shape ``(f + 1,)`` each.
    """

    mean: np.ndarray
    std: np.ndarray
    coef_win: np.ndarray
    coef_loss: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray, gain: np.ndarray, *, l2: float = 1.0) -> FeatureScorer:
        """Fit on features ``(n, f)`` and gains ``(n,)`` in {-1, 0, 1}.

        Raises:
            RoutingDataError: fewer than two prompts.
        """
        if features.shape[0] < 2:
            raise RoutingDataError(f"need at least 2 labelled prompts, got {features.shape[0]}")
        mean = features.mean(axis=0)
        std = features.std(axis=0)
        std = np.where(std > 1e-12, std, 1.0)
        x = np.hstack([np.ones((features.shape[0], 1)), np.clip((features - mean) / std, -Z_CLIP, Z_CLIP)])
        return cls(
            mean=mean,
            std=std,
            coef_win=_fit_logistic(x, (gain > 0).astype(np.float64), l2),
            coef_loss=_fit_logistic(x, (gain < 0).astype(np.float64), l2),
        )

    def score(self, features: np.ndarray) -> np.ndarray:
        """Scores of features ``(n, f)`` -> ``(n,)`` (or ``(f,)`` -> a 0-d array), in [-1, 1]."""
        z = np.clip((np.asarray(features, dtype=np.float64) - self.mean) / self.std, -Z_CLIP, Z_CLIP)
        return _sigmoid(z @ self.coef_win[1:] + self.coef_win[0]) - _sigmoid(z @ self.coef_loss[1:] + self.coef_loss[0])


def _unit_rows(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)


@dataclass(frozen=True, slots=True)
class KnnScorer:
    """Gain of the k nearest training prompts by cosine, similarity-weighted, shrunk to the mean.

    Attributes:
        vectors: unit-norm float32 training vectors, shape ``(n, d)``.
        gain: int8 training gains in {-1, 0, 1}, shape ``(n,)``.
        k: neighbours per query.
        prior_weight: weight of the training mean gain in the average (shrinkage).
    """

    vectors: np.ndarray
    gain: np.ndarray
    k: int = 25
    prior_weight: float = 1.0
    _prior: float = field(default=0.0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_prior", float(self.gain.mean()) if len(self.gain) else 0.0)

    @property
    def dimension(self) -> int:
        """Vector size ``d``."""
        return int(self.vectors.shape[1])

    def _from_similarities(self, sims: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        n = sims.shape[1]
        if exclude is not None:
            sims = sims.copy()
            sims[np.arange(sims.shape[0]), exclude] = -np.inf
        k = min(self.k, n - (1 if exclude is not None else 0))
        if k <= 0:
            return np.full(sims.shape[0], self._prior)
        part = np.argpartition(sims, n - k, axis=1)[:, n - k :]
        # exact top k, ordered by (-similarity, index): deterministic whatever argpartition returned
        part.sort(axis=1)
        part_sims = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-part_sims, axis=1, kind="stable")
        idx = np.take_along_axis(part, order, axis=1)
        w = np.clip(np.take_along_axis(part_sims, order, axis=1), 0.0, None).astype(np.float64)
        g = self.gain[idx].astype(np.float64)
        prior = self._prior
        return (np.sum(w * g, axis=1) + self.prior_weight * prior) / (np.sum(w, axis=1) + self.prior_weight)

    def score(self, vectors: np.ndarray, *, chunk_rows: int = 1024) -> np.ndarray:
        """Scores of query vectors ``(m, d)`` -> ``(m,)`` (a single ``(d,)`` gives shape ``(1,)``).

        Raises:
            ValueError: the query dimension differs from the training vectors'.
        """
        q = _unit_rows(np.atleast_2d(vectors))
        if q.shape[1] != self.dimension:
            raise ValueError(f"query vectors have dimension {q.shape[1]}, the router's {self.dimension}")
        return np.concatenate(
            [self._from_similarities(q[i : i + chunk_rows] @ self.vectors.T) for i in range(0, len(q), chunk_rows)]
            or [np.zeros(0)]
        )

    def score_training(self, *, chunk_rows: int = 1024) -> np.ndarray:
        """Leave-one-out scores of the training vectors themselves, shape ``(n,)``."""
        n = len(self.vectors)
        out = []
        for i in range(0, n, chunk_rows):
            sims = self.vectors[i : i + chunk_rows] @ self.vectors.T
            out.append(self._from_similarities(sims, exclude=np.arange(i, min(i + chunk_rows, n))))
        return np.concatenate(out) if out else np.zeros(0)


def threshold_for_share(scores: np.ndarray, share: float) -> float:
    """The threshold t such that a share ``share`` of ``scores`` is > t (as near as ties allow).

    Takes the midpoint between the m-th and (m+1)-th largest score, m = round(share * n).

    Raises:
        ValueError: no scores, or ``share`` outside [0, 1].
    """
    if len(scores) == 0 or not 0.0 <= share <= 1.0:
        raise ValueError(f"need scores and a share in [0, 1], got {len(scores)} scores and {share}")
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    m = round(share * len(s))
    if m <= 0:
        return float(s[0] + 1e-9)
    if m >= len(s):
        return float(s[-1] - 1e-9)
    return float((s[m - 1] + s[m]) / 2)


# -- the router ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbeddingInput:
    """The embedding of a request's prompt, as read from an ``EmbeddingResult``.

    Attributes:
        model_name, model_version: the model that produced it.
        vector: float32, shape ``(dimension,)``.
    """

    model_name: str
    model_version: str
    vector: np.ndarray


def _canonical(meta: Mapping[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True, slots=True)
class Router:
    """A fitted router: a features scorer, an optional embedding scorer, thresholds and metadata.

    Attributes:
        features: the features scorer.
        knn: the embedding scorer, or None for a router fitted without embeddings.
        metadata: JSON-ready: models, providers, embedding model, thresholds per scorer and share,
            training counts, format; see :func:`fit_router`.
    """

    features: FeatureScorer
    knn: KnnScorer | None
    metadata: dict[str, Any] = field(default_factory=dict)
    _version: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_version", self._content_hash())  # once: it hashes every array

    @property
    def strong_model(self) -> str:
        """The strong model's name."""
        return str(self.metadata["strong_model"])

    @property
    def weak_model(self) -> str:
        """The weak model's name."""
        return str(self.metadata["weak_model"])

    @property
    def embedding_model(self) -> str | None:
        """Name of the embedding model of the k-NN scorer, None without one."""
        return self.metadata.get("embedding_model") if self.knn is not None else None

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays of the artifact, by name."""
        out = {
            "feature_mean": self.features.mean,
            "feature_std": self.features.std,
            "coef_win": self.features.coef_win,
            "coef_loss": self.features.coef_loss,
        }
        if self.knn is not None:
            out["train_vectors"] = self.knn.vectors
            out["train_gain"] = self.knn.gain
        return out

    @property
    def version(self) -> str:
        """SHA-256 prefix (16 hex) of the arrays (name, dtype, shape, bytes) and the canonical metadata,
        computed when the router is built (a router is not changed afterwards)."""
        return self._version

    def _content_hash(self) -> str:
        h = hashlib.sha256()
        h.update(_canonical({k: v for k, v in self.metadata.items() if k != "version"}))
        for name, a in sorted(self.arrays().items()):
            a = np.ascontiguousarray(a)
            h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
        return h.hexdigest()[:16]

    def threshold(self, method: str, share: float) -> float:
        """The threshold of ``method`` (``features``/``embedding``) for strong-call ``share`` on training prompts.

        Raises:
            KeyError: no threshold for that method or share (shares are those of :data:`SHARE_GRID`).
        """
        table = self.metadata["thresholds"][method]
        key = f"{share:.2f}"
        if key not in table:
            raise KeyError(f"no {method} threshold for share {key}; known: {', '.join(sorted(table))}")
        return float(table[key])

    def score_features(self, prompts: Sequence[str]) -> np.ndarray:
        """Features-scorer scores of ``prompts``, shape ``(len(prompts),)``."""
        return self.features.score(feature_matrix(list(prompts))) if prompts else np.zeros(0)

    def route(self, score: float, threshold: float) -> str:
        """The model for ``score`` at ``threshold``: strong when ``score > threshold``, else weak."""
        return self.strong_model if score > threshold else self.weak_model

    def save(self, path: Path | str) -> Path:
        """Write ``<path stem>.npz`` and ``<path stem>.json``; return the ``.npz`` path.

        Raises:
            OSError: the folder is not writable.
        """
        npz = Path(path).with_suffix(".npz")
        npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(npz, **self.arrays())
        meta = {**self.metadata, "version": self.version}
        npz.with_suffix(".json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return npz

    @classmethod
    def load(cls, path: Path | str) -> Router:
        """Read a router written by :meth:`save` (``path`` may name the .npz or the .json).

        Raises:
            RouterArtifactError: a file is missing or unreadable, the format is unknown, or the content
                does not hash to the version recorded in the JSON (a changed or mixed-up file).
        """
        npz, meta_path = Path(path).with_suffix(".npz"), Path(path).with_suffix(".json")
        for p in (npz, meta_path):
            if not p.is_file():
                raise RouterArtifactError(f"{p}: no such router file (fit one with `backbone routing fit`)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            with np.load(npz, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise RouterArtifactError(f"{npz}: unreadable router: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != ARTIFACT_FORMAT:
            raise RouterArtifactError(f"{meta_path}: not a {ARTIFACT_FORMAT} router")
        try:
            features = FeatureScorer(arrays["feature_mean"], arrays["feature_std"], arrays["coef_win"], arrays["coef_loss"])
            knn = (
                KnnScorer(arrays["train_vectors"], arrays["train_gain"], k=int(meta["k"]), prior_weight=float(meta["prior_weight"]))
                if "train_vectors" in arrays
                else None
            )
        except KeyError as exc:
            raise RouterArtifactError(f"{npz}: missing {exc.args[0]!r}") from None
        recorded = meta.pop("version", None)
        router = cls(features=features, knn=knn, metadata=meta)
        if recorded != router.version:
            raise RouterArtifactError(f"{npz}: content hashes to {router.version}, but its JSON says {recorded}")
        return router


def fit_router(
    train: LabelledPrompts,
    *,
    vectors: np.ndarray | None = None,
    embedding_model: str | None = None,
    embedding_model_version: str | None = None,
    k: int = 25,
    prior_weight: float = 1.0,
    l2: float = 1.0,
    strong_model: str = STRONG_MODEL,
    weak_model: str = WEAK_MODEL,
    providers: Mapping[str, str] | None = None,
    source: str = "",
    test_percent: int = DEFAULT_TEST_PERCENT,
) -> Router:
    """Fit a router on labelled outcomes (deterministic: the same inputs give the same version).

    Args:
        train: the training prompts and outcomes.
        vectors: the training prompts' embeddings, shape ``(len(train), d)``, or None for a
            features-only router.
        embedding_model, embedding_model_version: the model that made ``vectors`` (required with them).
        k: neighbours of the k-NN scorer.
        prior_weight: shrinkage weight of the k-NN scorer.
        l2: L2 penalty of the logistic regressions (on standardised features).
        strong_model, weak_model: model names.
        providers: model -> provider; default :data:`PROVIDERS` (unknown models get ``unknown``).
        source: a line recorded in the metadata (where the outcomes came from).
        test_percent: the split rule the training prompts came from (recorded; ``eval`` uses it).

    Raises:
        RoutingDataError: fewer than 2 prompts, or vectors whose row count differs from the prompts'.
        ValueError: vectors without an embedding model name.
    """
    gain = train.gain
    train_features = feature_matrix(list(train.prompts))
    features = FeatureScorer.fit(train_features, gain, l2=l2)
    knn = None
    if vectors is not None:
        if vectors.shape[0] != len(train):
            raise RoutingDataError(f"{vectors.shape[0]} vectors for {len(train)} prompts")
        if not embedding_model:
            raise ValueError("vectors need the name of the embedding model that made them")
        knn = KnnScorer(_unit_rows(vectors), gain.astype(np.int8), k=k, prior_weight=prior_weight)
    providers = dict(providers or PROVIDERS)
    summary = train.summary()
    thresholds: dict[str, dict[str, float]] = {}
    scored = {"features": features.score(train_features)}
    if knn is not None:
        scored["embedding"] = knn.score_training()
    for method, scores in scored.items():
        thresholds[method] = {f"{s:.2f}": threshold_for_share(scores, s) for s in SHARE_GRID}
    meta: dict[str, Any] = {
        "format": ARTIFACT_FORMAT,
        "strong_model": strong_model,
        "weak_model": weak_model,
        "providers": {strong_model: providers.get(strong_model, "unknown"), weak_model: providers.get(weak_model, "unknown")},
        "feature_names": list(FEATURE_NAMES),
        "l2": l2,
        "k": k,
        "prior_weight": prior_weight,
        "embedding_model": embedding_model if knn is not None else None,
        "embedding_model_version": embedding_model_version if knn is not None else None,
        "embedding_dimension": knn.dimension if knn is not None else None,
        "policies": dict(POLICIES),
        "thresholds": thresholds,
        "train": {k_: round(v, 6) for k_, v in summary.items()},
        "source": source,
        "test_percent": test_percent,
    }
    return Router(features=features, knn=knn, metadata=meta)


# -- the decision -----------------------------------------------------------------------------------------------


def request_digest(request: RouteRequest) -> str:
    """SHA-256 prefix of the request's content (prompt, candidates, policy, embedding id, event time)."""
    body = json.dumps(
        [request.prompt, list(request.candidate_models), request.policy, request.embedding_request_id,
         request.requested_at.isoformat()],
        ensure_ascii=True,
    )  # fmt: skip
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def validate_request(router: Router, request: RouteRequest) -> str:
    """Check that ``router`` can take ``request``; return the policy name that applies.

    Raises:
        UnprocessableEventError: an unknown policy, candidates lacking the router's models, an empty
            request id, or an embedding request id without the ``routing:`` prefix.
    """
    if not request.request_id:
        raise UnprocessableEventError("empty request_id")
    policy = request.policy or "balanced"
    policies = router.metadata.get("policies", POLICIES)
    if policy not in policies:
        raise UnprocessableEventError(
            f"unknown policy {policy!r}; known: {', '.join(sorted(policies))}", event_id=request.request_id
        )
    if request.candidate_models:
        lacking = [m for m in (router.strong_model, router.weak_model) if m not in request.candidate_models]
        if lacking:
            raise UnprocessableEventError(
                f"candidate_models {list(request.candidate_models)} lack the router's {', '.join(lacking)}",
                event_id=request.request_id,
            )
    if request.embedding_request_id is not None and not request.embedding_request_id.startswith(EMBEDDING_ID_PREFIX):
        raise UnprocessableEventError(
            f"embedding_request_id {request.embedding_request_id!r} does not start with {EMBEDDING_ID_PREFIX!r}",
            event_id=request.request_id,
        )
    return policy


def needs_embedding(router: Router, request: RouteRequest) -> bool:
    """Whether the decision of ``request`` must wait for its embedding (it names one and the router can use it)."""
    return request.embedding_request_id is not None and router.knn is not None


def decide(router: Router, request: RouteRequest, embedding: EmbeddingInput | None = None) -> RouteDecision:
    """Choose the model for ``request``: a pure function of (request, embedding, router).

    The embedding scorer is used when ``embedding`` is given, the router has one, and the embedding's
    model name and dimension are the router's; otherwise the features scorer (the decision's
    ``embedding_status`` says why). The threshold is the router's for the method and the policy's
    share; the decision time is the request's event time; the id is
    ``deterministic_id("routing.decision", request_id, request_digest, router version)``.

    Raises:
        UnprocessableEventError: see :func:`validate_request`.
    """
    policy = validate_request(router, request)
    feats = prompt_features(request.prompt)
    method, status, score, used_version = "features", "none", None, None
    if request.embedding_request_id is not None:
        status = "unused-no-embedding-scorer" if router.knn is None else "missing"
    if embedding is not None and router.knn is not None:
        vec = np.asarray(embedding.vector, dtype=np.float32)
        if embedding.model_name != router.metadata.get("embedding_model"):
            status = f"mismatch-model-{embedding.model_name}"
        elif vec.shape != (router.knn.dimension,):
            status = f"mismatch-dimension-{vec.shape[0] if vec.ndim == 1 else 'not-1d'}"
        else:
            method, status, used_version = "embedding", "used", embedding.model_version
            score = float(router.knn.score(vec)[0])
    if score is None:
        score = float(router.features.score(np.fromiter(feats.values(), dtype=np.float64)))
    threshold = router.threshold(method, float(router.metadata.get("policies", POLICIES)[policy]))
    model = router.route(score, threshold)
    version = router.version
    return RouteDecision(
        decision_id=deterministic_id("routing.decision", request.request_id, request_digest(request), version),
        request_id=request.request_id,
        model=model,
        provider=str(router.metadata["providers"].get(model, "unknown")),
        strong_model=router.strong_model,
        weak_model=router.weak_model,
        score=score,
        threshold=threshold,
        policy=policy,
        method=method,
        router_version=version,
        decided_at=request.requested_at,
        embedding_request_id=request.embedding_request_id,
        embedding_model_version=used_version,
        embedding_status=status,
        features=feats,
    )


# -- evaluation -------------------------------------------------------------------------------------------------


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


def routing_curve(scores: np.ndarray, strong_correct: np.ndarray, weak_correct: np.ndarray) -> RoutingCurve:
    """The :class:`RoutingCurve` of ``scores`` (higher = call the strong model first), all shape ``(n,)``.

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
    return RoutingCurve(shares, accs, float(strong_correct.mean()), weak_acc)


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
    out: dict[str, Any] = {"test": test.summary(), "router_version": router.version, "scorers": {}, "rows": []}
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

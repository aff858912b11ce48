"""Scorers of the router: estimates of which model answers a prompt right, fitted with scikit-learn.

* :class:`FeatureScorer` (offline, two models): the gain of calling the strong model,
  ``P(strong right and weak wrong) - P(weak right and strong wrong)`` in [-1, 1], from two
  L2-regularised :class:`sklearn.linear_model.LogisticRegression` fits (lbfgs, ``C = 1 / l2``, the
  intercept not penalised) on the standardised prompt features (:mod:`processors.routing.features`),
  clipped to [-:data:`Z_CLIP`, :data:`Z_CLIP`]. Only the coefficients are kept (numpy arrays), so a saved
  router does not pickle sklearn objects and scoring is one dot product.
* :class:`KnnScorer` (offline, two models): the k nearest training prompts by cosine of their MiniLM
  vectors; score = the similarity-weighted mean of their gains, shrunk towards the training mean gain.
* :class:`OnlineQuality` (online, N models): per model, ``P(model right | prompt features)`` from a
  :class:`sklearn.linear_model.SGDClassifier` (log loss) warm-started by :meth:`OnlineQuality.fit`
  (``epochs`` passes of ``partial_fit`` over training outcomes in file order) and updated one outcome at
  a time by :meth:`OnlineQuality.update` (``partial_fit`` on one row: bandit feedback, only the model that
  served the request learns). Deterministic: no shuffling, fixed seed; its :attr:`OnlineQuality.version`
  hashes every coefficient and the update count, so a decision names the exact learner state it used.
* :func:`threshold_for_share`: the threshold giving a strong-call share on a set of scores.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier

from processors.routing.errors import RoutingDataError

__all__ = ["Z_CLIP", "FeatureScorer", "KnnScorer", "OnlineQuality", "threshold_for_share"]

Z_CLIP = 5.0
"""Standardised features are clipped to [-Z_CLIP, Z_CLIP]: a prompt unlike every training prompt (two
options where MMLU always has four) must not push a logistic regression to an extreme score."""


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _standardiser(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    return mean, np.where(std > 1e-12, std, 1.0)


def _logistic(z: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """sklearn LogisticRegression (lbfgs, C = 1/l2) on standardised ``z`` ``(n, f)``; coefficients with the
    intercept first, ``(f + 1,)``. One class only: zero weights and the intercept of its (clipped) rate."""
    if y.min() == y.max():
        rate = float(np.clip(y.mean(), 1e-4, 1 - 1e-4))
        return np.r_[np.log(rate / (1 - rate)), np.zeros(z.shape[1])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression(C=1.0 / l2, solver="lbfgs", max_iter=2000, tol=1e-8)
        model.fit(z, y)
    return np.r_[model.intercept_.astype(np.float64), model.coef_[0].astype(np.float64)]


@dataclass(frozen=True, slots=True)
class FeatureScorer:
    """Gain = P(win) - P(loss) from two logistic regressions on standardised prompt features.

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
        """Fit on features ``(n, f)`` and gains ``(n,)`` in {-1, 0, 1} with scikit-learn.

        Raises:
            RoutingDataError: fewer than two prompts.
        """
        if features.shape[0] < 2:
            raise RoutingDataError(f"need at least 2 labelled prompts, got {features.shape[0]}")
        mean, std = _standardiser(features)
        z = np.clip((features - mean) / std, -Z_CLIP, Z_CLIP)
        return cls(
            mean=mean,
            std=std,
            coef_win=_logistic(z, (gain > 0).astype(np.int8), l2),
            coef_loss=_logistic(z, (gain < 0).astype(np.int8), l2),
        )

    def score(self, features: np.ndarray) -> np.ndarray:
        """Scores of features ``(n, f)`` -> ``(n,)`` (or ``(f,)`` -> a 0-d array), in [-1, 1]."""
        z = np.clip((np.asarray(features, dtype=np.float64) - self.mean) / self.std, -Z_CLIP, Z_CLIP)
        return _sigmoid(z @ self.coef_win[1:] + self.coef_win[0]) - _sigmoid(
            z @ self.coef_loss[1:] + self.coef_loss[0]
        )


@dataclass(slots=True)
class OnlineQuality:
    """Per-model ``P(right | prompt features)``, learned online with ``SGDClassifier.partial_fit``.

    Build with :meth:`fit` (warm start on labelled outcomes) or :meth:`cold` (no data: every model at
    the prior ``P = 0.5`` until outcomes arrive). Mutable: :meth:`update` changes the state and
    :attr:`version`; :meth:`copy` gives an independent learner (for replays and what-ifs).

    Attributes:
        models: model names, ``(m,)``.
        mean, std: feature standardisation fixed at creation, ``(f,)`` each.
        learners: one ``SGDClassifier(loss="log_loss")`` per model (``None`` until it has seen one
            outcome of each class... or one update: see :meth:`update`).
        updates: outcomes learned since creation (the warm start counts as 0).
    """

    models: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    learners: dict[str, SGDClassifier]
    updates: int = 0
    alpha: float = 1e-4
    eta0: float = 0.02
    _coef: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)), repr=False)
    _weights: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)), repr=False)  # view: _coef[:, 1:].T
    _intercepts: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)  # view: _coef[:, 0]
    _version: str = field(default="", repr=False)

    @staticmethod
    def _new(alpha: float, eta0: float) -> SGDClassifier:
        return SGDClassifier(
            loss="log_loss", penalty="l2", alpha=alpha, learning_rate="constant", eta0=eta0,
            shuffle=False, random_state=0, average=False,
        )  # fmt: skip

    @classmethod
    def cold(cls, models: Sequence[str], n_features: int, **kw: float) -> OnlineQuality:
        """A learner with no data: standardisation identity, every model at P = 0.5."""
        out = cls(tuple(models), np.zeros(n_features), np.ones(n_features), {}, **kw)
        out._refresh()
        return out

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        correct: np.ndarray,
        models: Sequence[str],
        *,
        epochs: int = 5,
        alpha: float = 1e-4,
        eta0: float = 0.02,
        warm_start: str = "logistic",
        l2: float = 1.0,
    ) -> OnlineQuality:
        """Warm start on features ``(n, f)`` and outcomes ``correct`` ``(n, m)`` (column j = ``models[j]``).

        ``warm_start="logistic"`` (default): per model an sklearn ``LogisticRegression`` (lbfgs,
        ``C = 1 / l2``) whose coefficients seed the ``SGDClassifier``; ``"sgd"``: ``epochs`` calls of
        ``partial_fit`` over all rows in order. Online updates are ``partial_fit`` steps either way.

        Raises:
            RoutingDataError: fewer than 2 rows, or a column count other than ``len(models)``.
        """
        if features.shape[0] < 2 or correct.shape != (features.shape[0], len(models)):
            raise RoutingDataError(f"need >= 2 rows and {len(models)} outcome columns; got {correct.shape}")
        mean, std = _standardiser(features)
        out = cls(tuple(models), mean, std, {}, alpha=alpha, eta0=eta0)
        z = out._z(features)
        if warm_start == "logistic":
            coef = np.stack([_logistic(z, correct[:, j].astype(np.int8), l2) for j in range(len(models))])
            return cls.from_arrays(models, mean, std, coef, alpha=alpha, eta0=eta0)
        if warm_start != "sgd":
            raise ValueError(f"warm_start is logistic or sgd, not {warm_start!r}")
        for j, model in enumerate(models):
            clf = cls._new(alpha, eta0)
            y = correct[:, j].astype(np.int8)
            for _ in range(epochs):
                clf.partial_fit(z, y, classes=np.array([0, 1], dtype=np.int8))
            out.learners[model] = clf
        out._refresh()
        return out

    @classmethod
    def from_arrays(
        cls,
        models: Sequence[str],
        mean: np.ndarray,
        std: np.ndarray,
        coef: np.ndarray,
        *,
        updates: int = 0,
        alpha: float = 1e-4,
        eta0: float = 0.02,
    ) -> OnlineQuality:
        """Rebuild a learner from :meth:`arrays` (coefficients ``(m, f + 1)``, intercept first); it goes on
        learning from there exactly as the original would (same ``partial_fit`` steps).

        Raises:
            RoutingDataError: array shapes that do not fit ``models``.
        """
        coef = np.asarray(coef, dtype=np.float64)
        if coef.shape != (len(models), len(mean) + 1) or mean.shape != std.shape:
            raise RoutingDataError(
                f"quality coefficients {coef.shape} do not fit {len(models)} models, {mean.shape} features"
            )
        out = cls(tuple(models), np.asarray(mean, np.float64), np.asarray(std, np.float64), {}, updates=updates,
                  alpha=alpha, eta0=eta0)  # fmt: skip
        for j, m in enumerate(models):
            clf = cls._new(alpha, eta0)
            clf.coef_ = coef[j : j + 1, 1:].copy()
            clf.intercept_ = coef[j, :1].copy()
            clf.classes_ = np.array([0, 1], dtype=np.int8)
            clf.t_ = 1.0
            out.learners[m] = clf
        out._refresh()
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """``quality_mean``, ``quality_std``, ``quality_coef`` (``(m, f + 1)``, intercept first)."""
        return {"quality_mean": self.mean, "quality_std": self.std, "quality_coef": self._coef}

    def _z(self, features: np.ndarray) -> np.ndarray:
        # np.minimum(np.maximum(...)): np.clip's values (NaN kept) at half its call cost on one prompt
        return np.minimum(
            np.maximum((np.asarray(features, dtype=np.float64) - self.mean) / self.std, -Z_CLIP), Z_CLIP
        )

    def _refresh(self) -> None:
        f = len(self.mean)
        coef = np.zeros((len(self.models), f + 1))
        for j, m in enumerate(self.models):
            clf = self.learners.get(m)
            if clf is not None:
                coef[j, 0] = float(clf.intercept_[0])
                coef[j, 1:] = clf.coef_[0]
        self._coef = coef
        self._weights, self._intercepts = coef[:, 1:].T, coef[:, 0]
        h = hashlib.sha256()
        h.update("|".join(self.models).encode())
        for a in (self.mean, self.std, coef):
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        h.update(str(self.updates).encode())
        self._version = "sgd-" + h.hexdigest()[:12]

    @property
    def version(self) -> str:
        """``sgd-`` + SHA-256 prefix of the models, standardisation, coefficients and update count."""
        return self._version

    def add_model(self, model: str) -> None:
        """Start learning a model not seen before (cold: P = 0.5 until its first outcome)."""
        if model not in self.models:
            self.models = (*self.models, model)
            self._refresh()

    def predict(self, features: np.ndarray) -> np.ndarray:
        """``P(right)`` of every model: features ``(f,)`` -> ``(m,)``; ``(n, f)`` -> ``(n, m)``."""
        return _sigmoid(self._z(features) @ self._weights + self._intercepts)

    def predict_map(self, features: np.ndarray) -> dict[str, float]:
        """``{model: P(right)}`` for one prompt's features ``(f,)``."""
        return dict(zip(self.models, (float(p) for p in self.predict(features)), strict=True))

    def update(self, model: str, features: np.ndarray, correct: bool) -> None:
        """Learn one outcome of ``model`` on a prompt with ``features`` ``(f,)`` (one ``partial_fit`` step).

        A model not yet known is added first.
        """
        self.add_model(model)
        clf = self.learners.get(model)
        if clf is None:
            clf = self.learners[model] = self._new(self.alpha, self.eta0)
        clf.partial_fit(self._z(features).reshape(1, -1), np.array([int(correct)], dtype=np.int8),
                        classes=np.array([0, 1], dtype=np.int8))  # fmt: skip
        self.updates += 1
        self._refresh()

    def copy(self) -> OnlineQuality:
        """An independent learner in the same state (same version)."""
        import copy as _copy

        out = OnlineQuality(self.models, self.mean.copy(), self.std.copy(),
                            {m: _copy.deepcopy(c) for m, c in self.learners.items()},
                            updates=self.updates, alpha=self.alpha, eta0=self.eta0)  # fmt: skip
        out._refresh()
        return out

    def state(self) -> dict[str, object]:
        """JSON-ready state: models, standardisation, coefficients (intercept first), update count, version."""
        return {
            "models": list(self.models),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "coef": self._coef.tolist(),
            "updates": self.updates,
            "version": self.version,
        }

    def scores(self, features: Mapping[str, float]) -> dict[str, float]:
        """``{model: P(right)}`` from a features dict (in :data:`~processors.routing.features.FEATURE_NAMES` order)."""
        return self.predict_map(np.fromiter(features.values(), dtype=np.float64))


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
            [
                self._from_similarities(q[i : i + chunk_rows] @ self.vectors.T)
                for i in range(0, len(q), chunk_rows)
            ]
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

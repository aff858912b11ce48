"""The router artifact: the fitted scorers, thresholds and metadata, saved as ``.npz`` + ``.json``.

:meth:`Router.save` writes ``<name>.npz`` (the arrays) and ``<name>.json`` (metadata); the version is the
SHA-256 prefix of the arrays (name, dtype, shape, bytes) and the canonical JSON of the metadata, checked
again by :meth:`Router.load`. Thresholds: for each scorer the strong-call shares 5 %, 10 %, ..., 95 % on
its training prompts (k-NN scores there leave the prompt itself out); the named policies pick one:
``cost`` 20 %, ``balanced`` 50 %, ``quality`` 80 %.

Besides the two-model scorers the artifact holds the warm start of the N-model online learner
(:class:`~processors.routing.scorers.OnlineQuality`), as coefficient arrays: :meth:`Router.quality`
rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from processors.routing.data import (
    DEFAULT_TEST_PERCENT,
    PROVIDERS,
    STRONG_MODEL,
    WEAK_MODEL,
    LabelledPrompts,
    ModelOutcomes,
)
from processors.routing.errors import RouterArtifactError, RoutingDataError
from processors.routing.features import FEATURE_NAMES, feature_matrix
from processors.routing.scorers import (
    FeatureScorer,
    KnnScorer,
    OnlineQuality,
    _unit_rows,
    threshold_for_share,
)

__all__ = ["ARTIFACT_FORMAT", "POLICIES", "SHARE_GRID", "EmbeddingInput", "Router", "fit_router"]

POLICIES = {"cost": 0.2, "balanced": 0.5, "quality": 0.8}
"""Policy name -> the share of strong calls its threshold is calibrated for (on training prompts)."""
SHARE_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
"""Strong-call shares (0.05 ... 0.95) for which the router keeps a threshold per scorer."""
ARTIFACT_FORMAT = "sophia-router/1"


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
    quality_arrays: dict[str, np.ndarray] = field(default_factory=dict)
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
        out.update(self.quality_arrays)
        return out

    def quality(self) -> OnlineQuality:
        """A fresh online learner at the artifact's warm start (N models of ``metadata["quality_models"]``).

        Raises:
            RouterArtifactError: the artifact holds no learner (written before it had one).
        """
        if not self.quality_arrays:
            raise RouterArtifactError("this router has no online quality learner; fit it again")
        a = self.quality_arrays
        return OnlineQuality.from_arrays(
            list(self.metadata["quality_models"]),
            a["quality_mean"],
            a["quality_std"],
            a["quality_coef"],
            alpha=float(self.metadata.get("quality_alpha", 1e-4)),
            eta0=float(self.metadata.get("quality_eta0", 0.02)),
        )

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
        npz.with_suffix(".json").write_text(
            json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8"
        )
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
            features = FeatureScorer(
                arrays["feature_mean"], arrays["feature_std"], arrays["coef_win"], arrays["coef_loss"]
            )
            knn = (
                KnnScorer(
                    arrays["train_vectors"],
                    arrays["train_gain"],
                    k=int(meta["k"]),
                    prior_weight=float(meta["prior_weight"]),
                )
                if "train_vectors" in arrays
                else None
            )
        except KeyError as exc:
            raise RouterArtifactError(f"{npz}: missing {exc.args[0]!r}") from None
        recorded = meta.pop("version", None)
        quality = {k: arrays[k] for k in ("quality_mean", "quality_std", "quality_coef") if k in arrays}
        router = cls(features=features, knn=knn, metadata=meta, quality_arrays=quality)
        if recorded != router.version:
            raise RouterArtifactError(
                f"{npz}: content hashes to {router.version}, but its JSON says {recorded}"
            )
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
    outcomes: ModelOutcomes | None = None,
    quality_epochs: int = 5,
    split_by: str = "prompt",
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
        outcomes: N-model outcomes of the same training prompts for the online learner's warm start;
            default the strong/weak pair of ``train``.
        quality_epochs: unused with the default logistic warm start (kept for callers).

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
    outcomes = outcomes if outcomes is not None else ModelOutcomes.from_pair(train, strong_model, weak_model)
    if len(outcomes) != len(train):
        raise RoutingDataError(f"{len(outcomes)} N-model outcomes for {len(train)} training prompts")
    quality = OnlineQuality.fit(
        train_features, outcomes.correct, outcomes.models, epochs=quality_epochs, l2=l2
    )
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
        "providers": {
            strong_model: providers.get(strong_model, "unknown"),
            weak_model: providers.get(weak_model, "unknown"),
        },
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
        "split_by": split_by,
        "quality_models": list(outcomes.models),
        "quality_alpha": quality.alpha,
        "quality_eta0": quality.eta0,
        "quality_warm_start": "sklearn.linear_model.LogisticRegression per model",
        "offline_fit": "sklearn.linear_model.LogisticRegression(lbfgs, C=1/l2)",
        "online_fit": "sklearn.linear_model.SGDClassifier(log_loss, constant eta0).partial_fit",
    }
    return Router(features=features, knn=knn, metadata=meta, quality_arrays=quality.arrays())

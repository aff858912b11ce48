"""Embed prompts with the inference package's MiniLM for fitting and evaluating routers (offline, no Kafka).

The live path embeds a request's prompt through the Ray actors (``inference.requests`` ->
``inference.results``); fitting needs thousands of prompts at once, so it loads the same model
directly with :func:`inference.model.load_model` (same weights, same version string). Vectors are
cached in one ``.npz`` per model version under a cache folder (default ``.backbone/cache/routing``, gitignored), named by
the SHA-256 of the model name and version and keyed by each prompt's SHA-256, so a second fit or eval reads
the vectors of prompts it has seen back instead of running the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_CACHE_DIR", "embed_prompts"]

DEFAULT_CACHE_DIR = Path(".backbone") / "cache" / "routing"


def _digest(prompt: str) -> bytes:
    return hashlib.sha256(prompt.encode("utf-8")).digest()


def _cache_path(cache_dir: Path, model_name: str, model_version: str) -> Path:
    tag = hashlib.sha256(f"{model_name}|{model_version}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"vectors-{tag}.npz"


def _read_cache(path: Path, dimension: int) -> dict[bytes, np.ndarray]:
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            keys, vectors = z["keys"], z["vectors"]
    except (OSError, ValueError, KeyError):
        return {}  # a broken cache is rebuilt
    if vectors.ndim != 2 or vectors.shape[1] != dimension or keys.shape != (len(vectors), 32):
        return {}
    return {k.tobytes(): vectors[i] for i, k in enumerate(keys)}


def _write_cache(path: Path, cached: dict[bytes, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted(cached)
    tmp = path.with_name(path.name + ".tmp.npz")
    digests = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(
        len(keys), 32
    )  # not "S32": it drops trailing NULs
    np.savez(tmp, keys=digests, vectors=np.stack([cached[k] for k in keys]))
    tmp.replace(path)


def embed_prompts(
    prompts: Sequence[str],
    *,
    model: Any | None = None,
    model_name: str = "all-MiniLM-L6-v2",
    batch_size: int = 64,
    cache_dir: Path | None = DEFAULT_CACHE_DIR,
    progress: bool = True,
    description: str = "embedding prompts",
) -> tuple[np.ndarray, str, str]:
    """Embed ``prompts`` with MiniLM (loaded once if ``model`` is None), using the cache.

    Prompts are embedded in batches of similar length (sorted by length, then put back in order), with
    a rich progress bar on a terminal's standard error.

    Args:
        prompts: the texts, shape ``(n,)``.
        model: an :class:`inference.model.EmbeddingModel`; None loads ``model_name``.
        model_name: the model to load when ``model`` is None.
        batch_size: texts per forward pass.
        cache_dir: folder of the cache; None turns it off.
        progress: show the progress bar (on a terminal only).
        description: the progress bar's label.

    Returns:
        ``(vectors, model name, model version)``; vectors float32 of shape ``(n, dimension)``.

    Raises:
        inference.errors.ModelLoadError, inference.errors.InferenceDependencyError: the model does not load.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if model is None:
        from inference.model import load_model

        model = load_model(model_name)
    cached: dict[bytes, np.ndarray] = {}
    path = None
    if cache_dir is not None:
        path = _cache_path(cache_dir, model.name, model.version)
        cached = _read_cache(path, model.dimension)
    digests = [_digest(p) for p in prompts]
    todo = sorted({d: i for i, d in enumerate(digests) if d not in cached}.values())
    order = sorted(todo, key=lambda i: (len(prompts[i]), i))
    console = Console(stderr=True)
    with Progress(
        TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, disable=not progress or not console.is_terminal or not order,
    ) as bar:  # fmt: skip
        task = bar.add_task(description, total=len(order))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, v in zip(idx, model.embed([prompts[i] for i in idx]), strict=True):
                cached[digests[i]] = np.asarray(v, dtype=np.float32)
            bar.update(task, advance=len(idx))
            if path is not None and (start // batch_size) % 40 == 39:
                _write_cache(path, cached)  # keep the work of an interrupted run
    if path is not None and order:
        _write_cache(path, cached)
    out = np.zeros((len(prompts), model.dimension), dtype=np.float32)
    for i, d in enumerate(digests):
        out[i] = cached[d]
    return out, model.name, model.version

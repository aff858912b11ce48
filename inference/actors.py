"""Ray actors that run :class:`~inference.worker.InferenceWorker` loops, and the pool that manages them.

Each actor owns one Kafka consumer in the pool's consumer group, so Kafka spreads the request
partitions over the actors and rebalances when one is added or removed. An actor is created with
``max_restarts``: when its process dies (a crash, ``kill -9``, ``ray.kill(..., no_restart=False)``)
Ray starts it again with the same arguments, and its new consumer resumes from the committed offsets.
The loop runs in a thread of the actor so that ``stats()`` and ``stop()`` answer while it works; if
the loop fails, the actor process exits and Ray restarts it.

Ray is imported only when a pool is created: ``import inference`` works without the extra.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import structlog

from core.settings import KafkaSettings, SchemaRegistrySettings
from inference.config import InferenceSettings
from inference.errors import InferenceDependencyError
from inference.worker import CrashPoint, InferenceWorker, WorkerStats

__all__ = ["EmbeddingActor", "InferencePool", "init_ray", "require_ray"]

log = structlog.get_logger(__name__)

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def require_ray() -> Any:
    """Import and return the ``ray`` module.

    Raises:
        InferenceDependencyError: Ray is not installed.
    """
    try:
        import ray
    except ImportError as exc:
        raise InferenceDependencyError("ray is not installed: pip install -e '.[inference]'") from exc
    return ray


def init_ray(
    *, address: str | None = None, num_cpus: float | None = None, num_gpus: float | None = None
) -> Any:
    """Start a local Ray (or join the cluster at ``address`` / ``RAY_ADDRESS``) unless already up.

    Args:
        address: a Ray cluster address; None uses ``RAY_ADDRESS`` and otherwise starts a local one.
        num_cpus: CPUs of a local Ray (ignored when joining a cluster).
        num_gpus: GPUs of a local Ray (ignored when joining a cluster).

    Returns:
        the ``ray`` module.
    """
    ray = require_ray()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": True,
        "runtime_env": {"env_vars": OFFLINE_ENV},
    }
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)
    return ray


class EmbeddingActor:
    """The body of the Ray actor (wrapped by :meth:`InferencePool.actor_class`).

    Args:
        kafka: broker settings.
        settings: topics, group, batching, model.
        worker_id: stable id of this actor slot (kept across restarts).
        crash_point: fault injection for crash tests.
        registry: the schema registry of the serde (``Settings.schema_registry``); None: embedded.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: InferenceSettings,
        worker_id: str,
        crash_point: CrashPoint | None = None,
        registry: SchemaRegistrySettings | None = None,
    ) -> None:
        for k, v in OFFLINE_ENV.items():
            os.environ.setdefault(k, v)
        self._stop = threading.Event()
        self.worker = InferenceWorker(
            kafka, settings, worker_id=worker_id, crash_point=crash_point, registry=registry
        )
        self._thread = threading.Thread(target=self._run, name=f"inference-{worker_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.worker.run(self._stop)
        except BaseException as exc:  # noqa: BLE001 - let Ray restart a fresh process
            log.error("worker_failed_exiting", worker_id=self.worker.worker_id, error=repr(exc))
            os._exit(1)

    def ready(self) -> dict[str, Any]:
        """Model name, version and device, once the model is loaded (used to wait for start-up)."""
        m = self.worker.model
        return {"model": m.name, "version": m.version, "device": m.device, "pid": os.getpid()}

    def stats(self, drain: bool = True) -> WorkerStats:
        """The worker's :class:`~inference.worker.WorkerStats` (batch sizes drained unless ``drain=False``)."""
        return self.worker.drain_stats() if drain else self.worker.stats()

    def stop(self, timeout_seconds: float = 30.0) -> bool:
        """Answer what is pending, commit, leave the group; True when the loop ended in time."""
        self._stop.set()
        self._thread.join(timeout_seconds)
        return not self._thread.is_alive()


@dataclass(slots=True)
class _Slot:
    worker_id: str
    handle: Any


class InferencePool:
    """A pool of :class:`EmbeddingActor` for one model, sized by hand or by :class:`~inference.scaling.LagScaler`.

    Args:
        kafka: broker settings passed to each actor.
        settings: model, topics, batching, per-actor resources, ``max_restarts``.
        crash_point: fault injection given to the actors (tests only).
        registry: the schema registry every actor's serde uses (``Settings.schema_registry``).

    Raises:
        InferenceDependencyError: Ray is not installed.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: InferenceSettings,
        *,
        crash_point: CrashPoint | None = None,
        registry: SchemaRegistrySettings | None = None,
    ) -> None:
        self.ray = require_ray()
        self.kafka = kafka
        self.registry = registry
        self.settings = settings
        self.crash_point = crash_point
        self._slots: list[_Slot] = []
        self._capped: tuple[int, int, int] | None = None
        self._actor_class = self.ray.remote(EmbeddingActor).options(
            num_cpus=settings.num_cpus,
            num_gpus=settings.num_gpus,
            max_restarts=settings.max_restarts,
            max_task_retries=-1 if settings.max_restarts != 0 else 0,
        )

    @property
    def size(self) -> int:
        """Actors in the pool."""
        return len(self._slots)

    @property
    def handles(self) -> list[Any]:
        """The Ray actor handles, oldest first."""
        return [s.handle for s in self._slots]

    def add(self, n: int = 1, *, wait: bool = True, timeout_seconds: float = 300.0) -> list[Any]:
        """Start ``n`` actors; with ``wait``, return once each has loaded its model.

        Raises:
            ray.exceptions.GetTimeoutError: an actor was not ready within ``timeout_seconds``.
        """
        new = []
        for _ in range(n):
            worker_id = f"{self.settings.model}-{uuid.uuid4().hex[:6]}"
            handle = self._actor_class.remote(
                self.kafka, self.settings, worker_id, self.crash_point, self.registry
            )
            self._slots.append(_Slot(worker_id, handle))
            new.append(handle)
        if wait and new:
            self.ray.get([h.ready.remote() for h in new], timeout=timeout_seconds)
        log.info("actors_added", model=self.settings.model, added=n, size=self.size)
        return new

    def remove(self, n: int = 1, *, timeout_seconds: float = 30.0) -> int:
        """Stop the ``n`` newest actors gracefully (answer, commit, leave the group); return how many."""
        removed = 0
        while removed < n and self._slots:
            slot = self._slots.pop()
            try:
                self.ray.get(slot.handle.stop.remote(timeout_seconds), timeout=timeout_seconds + 10)
            except Exception as exc:  # noqa: BLE001 - a dead actor is removed all the same
                log.warning("actor_stop_failed", worker_id=slot.worker_id, error=repr(exc))
            self.ray.kill(slot.handle, no_restart=True)
            removed += 1
        log.info("actors_removed", model=self.settings.model, removed=removed, size=self.size)
        return removed

    def placeable(self) -> int:
        """How many more actors the Ray cluster has free resources for now (CPUs and GPUs per actor
        as configured; a resource an actor does not ask for places no limit)."""
        free = self.ray.available_resources()
        room = []
        if self.settings.num_cpus:
            room.append(int(free.get("CPU", 0.0) // self.settings.num_cpus))
        if self.settings.num_gpus:
            room.append(int(free.get("GPU", 0.0) // self.settings.num_gpus))
        return max(0, min(room)) if room else 1 << 30

    def scale_to(self, n: int, *, timeout_seconds: float = 120.0) -> int:
        """Add or remove actors until the pool has ``n``, or as many as the cluster can place; return
        the change.

        Never raises for lack of room: the pool grows only by what :meth:`placeable` allows (logged as
        ``scale_capped``), and an added actor that is still not ready after ``timeout_seconds`` is
        killed and left out (``actor_not_placed``), so a lag spike on a full cluster cannot stop the
        actors that are serving.
        """
        delta = n - self.size
        if delta > 0:
            room = self.placeable()
            if room < delta:
                if self._capped != (n, self.size, room):  # once per situation, not every scaling tick
                    log.warning(
                        "scale_capped", model=self.settings.model, wanted=n, size=self.size, placeable=room
                    )
                self._capped = (n, self.size, room)
                delta = room
            if delta <= 0:
                return 0
            before = len(self._slots)
            refs = [h.ready.remote() for h in self.add(delta, wait=False)]
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=timeout_seconds)
            ready_refs = set(ready)
            keep = []
            for slot, ref in zip(self._slots[before:], refs, strict=True):
                if ref in ready_refs:
                    keep.append(slot)
                else:
                    log.warning("actor_not_placed", worker_id=slot.worker_id, timeout_seconds=timeout_seconds)
                    self.ray.kill(slot.handle, no_restart=True)
            self._slots[before:] = keep
            delta = len(keep)
        elif delta < 0:
            self.remove(-delta)
        return delta

    def stats(self, *, timeout_seconds: float = 10.0, drain: bool = True) -> list[WorkerStats]:
        """Stats of the actors that answer within ``timeout_seconds`` (a restarting one is skipped)."""
        refs = [s.handle.stats.remote(drain) for s in self._slots]
        out: list[WorkerStats] = []
        if not refs:
            return out
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=timeout_seconds)
        for ref in ready:
            try:
                out.append(self.ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - an actor being restarted
                log.warning("actor_stats_failed", error=repr(exc))
        return out

    def kill(self, index: int = 0, *, restart: bool = True) -> None:
        """Kill actor ``index`` abruptly (as a crash would); with ``restart`` Ray restarts it."""
        self.ray.kill(self._slots[index].handle, no_restart=not restart)

    def shutdown(self, *, timeout_seconds: float = 30.0) -> None:
        """Stop every actor gracefully (answer what is pending, commit, leave the group), all at once, and
        kill those still stopping after ``timeout_seconds`` (a worker waiting on a broker that has gone):
        it returns within about ``timeout_seconds`` whatever the number of actors."""
        slots, self._slots = list(self._slots), []
        refs = [slot.handle.stop.remote(timeout_seconds) for slot in slots]
        if refs:
            done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=timeout_seconds + 2)
            late = len(refs) - len(done)
            if late:
                log.warning("actors_stop_timed_out", model=self.settings.model, actors=late,
                            timeout_seconds=timeout_seconds)  # fmt: skip
        for slot in slots:
            try:
                self.ray.kill(slot.handle, no_restart=True)
            except Exception as exc:  # noqa: BLE001 - a dead actor is removed all the same
                log.warning("actor_kill_failed", worker_id=slot.worker_id, error=repr(exc))
        log.info("actors_removed", model=self.settings.model, removed=len(slots), size=self.size)

    def wait_answered(self, n: int, *, timeout_seconds: float = 120.0, poll_seconds: float = 0.5) -> int:
        """Wait until the actors together answered or dead-lettered at least ``n`` (since they started).

        Returns:
            the count reached (may be below ``n`` at the timeout).
        """
        deadline = time.monotonic() + timeout_seconds
        done = 0
        while time.monotonic() < deadline:
            done = sum(s.answered + s.dead_lettered for s in self.stats(drain=False))
            if done >= n:
                break
            time.sleep(poll_seconds)
        return done

"""Integration tests of the configuration store on real PostgreSQL: concurrency, time travel, rollback, bad input, snapshots."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import SecretStr

from configuration.aggregate import ConfigurationItem, aggregate_id_for
from configuration.errors import (
    ConfigKeyError,
    ConfigNotFoundError,
    ConfigRetiredError,
    ConfigValueError,
    ConfigVersionNotFoundError,
    StaleVersionError,
)
from configuration.store import ConfigStore
from core.settings import PostgresSettings, Settings

pytestmark = pytest.mark.integration


def _settings(pg_url: str) -> Settings:
    return Settings(postgres=PostgresSettings(url=SecretStr(pg_url)))


@pytest.fixture
def store(pg_url: str) -> Iterator[ConfigStore]:
    """A configuration store on a fresh database."""
    s = ConfigStore(_settings(pg_url), snapshot_interval=100)
    try:
        yield s
    finally:
        s.close()


def _stored_count(store: ConfigStore) -> int:
    return store.app.recorder.max_notification_id() or 0


def test_concurrent_writers_with_expected_version_only_one_wins(pg_url: str) -> None:
    """Six writers in separate stores all expecting version 1: exactly one stores version 2, the others are refused."""
    stores = [ConfigStore(_settings(pg_url)) for _ in range(6)]
    try:
        stores[0].set(
            "routing.policy.default", {"strategy": "cheapest", "models": ["a"]}, author="t", reason="init"
        )
        barrier = threading.Barrier(len(stores))
        results: list[object] = [None] * len(stores)

        def write(i: int) -> None:
            barrier.wait()
            try:
                results[i] = stores[i].set(
                    "routing.policy.default",
                    {"strategy": "fastest", "models": [f"m{i}"]},
                    author=f"w{i}",
                    reason="race",
                    expected_version=1,
                )
            except StaleVersionError as exc:
                results[i] = exc

        threads = [threading.Thread(target=write, args=(i,)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [r for r in results if not isinstance(r, StaleVersionError)]
        losers = [r for r in results if isinstance(r, StaleVersionError)]
        assert len(winners) == 1 and len(losers) == len(stores) - 1
        assert all(e.current_version == 2 and e.expected_version == 1 for e in losers)
        current = stores[0].get("routing.policy.default")
        assert current.version == 2 and current.value == winners[0].value  # type: ignore[attr-defined]
        assert _stored_count(stores[0]) == 2
    finally:
        for s in stores:
            s.close()


def test_concurrent_writers_without_expected_version_all_land(pg_url: str) -> None:
    """Four last-writer-wins writers racing on one key each get their own version (retry on conflict)."""
    stores = [ConfigStore(_settings(pg_url)) for _ in range(4)]
    try:
        stores[0].set("misc.counter", {"n": 0}, author="t", reason="init")
        barrier = threading.Barrier(len(stores))
        errors: list[BaseException] = []

        def write(i: int) -> None:
            barrier.wait()
            try:
                for j in range(5):
                    stores[i].set("misc.counter", {"n": i * 10 + j}, author=f"w{i}", reason="race")
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert stores[0].get("misc.counter").version == 21
    finally:
        for s in stores:
            s.close()


def test_time_travel_returns_the_value_as_of_each_instant(store: ConfigStore) -> None:
    """For each recorded instant the value then is returned; before creation is refused; after the last, the current."""
    before = datetime.now(UTC)
    time.sleep(0.005)
    instants = []
    for i in range(1, 8):
        store.set("misc.flag", {"i": i}, author="t", reason=f"v{i}")
        time.sleep(0.005)
        instants.append(datetime.now(UTC))
        time.sleep(0.005)
    for i, at in enumerate(instants, start=1):
        got = store.get("misc.flag", at=at)
        assert (got.version, got.value, got.reason) == (i, {"i": i}, f"v{i}")
    assert store.get("misc.flag", version=3).value == {"i": 3}
    with pytest.raises(ConfigVersionNotFoundError):
        store.get("misc.flag", at=before)
    assert store.get("misc.flag", at=datetime.now(UTC) + timedelta(days=1)).version == 7


def test_rollback_restores_the_old_value_as_a_new_version(store: ConfigStore) -> None:
    """A rollback appends a version with the old value that records what it rolled back from; history is intact."""
    store.set("providers.openai", {"requests_per_minute": 60}, author="ann", reason="initial")
    store.set("providers.openai", {"requests_per_minute": 5}, author="bob", reason="throttle")
    mid = datetime.now(UTC)
    time.sleep(0.005)
    store.set("providers.openai", {"requests_per_minute": 1}, author="bob", reason="throttle more")
    rb = store.rollback(
        "providers.openai", to_version=1, author="ann", reason="too slow", causation_id="cmd-1"
    )
    assert (rb.version, rb.value["requests_per_minute"], rb.change) == (4, 60, "ROLLED_BACK")
    assert (rb.restored_version, rb.rolled_back_from_version, rb.causation_id) == (1, 3, "cmd-1")
    by_time = store.rollback("providers.openai", to_time=mid, author="ann", reason="back to throttle")
    assert (by_time.version, by_time.value["requests_per_minute"], by_time.restored_version) == (5, 5, 2)
    history = store.history("providers.openai")
    assert [h.value["requests_per_minute"] for h in history] == [60, 5, 1, 60, 5]
    assert history[3].diff == ({"path": "requests_per_minute", "op": "changed", "old": 1, "new": 60},)
    assert [k.key for k in store.keys()] == ["providers.openai"]  # noqa: SIM118 - ConfigStore.keys(), not a dict


def test_bad_input_is_refused_and_nothing_is_written(store: ConfigStore) -> None:
    """Schema failures, unknown keys and versions, stale versions and retired keys raise clearly and store nothing."""
    store.set("routing.policy.a", {"strategy": "cheapest", "models": ["m"]}, author="t", reason="init")
    n = _stored_count(store)
    with pytest.raises(ConfigValueError, match="strategy"):
        store.set("routing.policy.a", {"strategy": "random", "models": ["m"]}, author="t", reason="bad")
    with pytest.raises(ConfigValueError):
        store.set("routing.policy.b", {"models": []}, author="t", reason="bad new key")
    with pytest.raises(ConfigNotFoundError):
        store.get("routing.policy.nope")
    with pytest.raises(ConfigNotFoundError):
        store.rollback("routing.policy.nope", to_version=1, author="t", reason="x")
    with pytest.raises(ConfigVersionNotFoundError, match="1..1"):
        store.rollback("routing.policy.a", to_version=9, author="t", reason="x")
    with pytest.raises(StaleVersionError, match="at version 1"):
        store.set(
            "routing.policy.a",
            {"strategy": "fastest", "models": ["m"]},
            author="t",
            reason="x",
            expected_version=0,
        )
    with pytest.raises(ConfigKeyError):
        store.set("Bad Key", {}, author="t", reason="x")
    with pytest.raises(ValueError):
        store.set("misc.x", {}, author="", reason="x")
    assert _stored_count(store) == n
    store.retire("routing.policy.a", author="t", reason="done")
    with pytest.raises(ConfigRetiredError):
        store.set("routing.policy.a", {"strategy": "fastest", "models": ["m"]}, author="t", reason="x")
    assert _stored_count(store) == n + 1


@pytest.mark.slow
def test_reading_a_key_with_10000_versions_is_under_50_ms(store: ConfigStore) -> None:
    """With snapshots every 100 versions, the current value and a mid-history version of a 10,000-version key read in under 50 ms."""
    item = ConfigurationItem.create("perf.long", {"i": 0}, author="bench", reason="v1")
    store.app.save(item)
    for start in range(2, 10_001, 500):
        for i in range(start, min(start + 500, 10_001)):
            item.change_value({"i": i, "pad": "x" * 64}, author="bench", reason=f"v{i}")
        store.app.save(item)
    assert store.app.snapshots is not None
    assert len(list(store.app.snapshots.get(aggregate_id_for("perf.long")))) == 100
    timings = []
    for _ in range(15):
        t0 = time.perf_counter()
        current = store.get("perf.long")
        timings.append(time.perf_counter() - t0)
    assert current.version == 10_000 and current.value["i"] == 10_000
    t0 = time.perf_counter()
    mid = store.get("perf.long", version=5_555)
    mid_seconds = time.perf_counter() - t0
    assert mid.value["i"] == 5_555
    median = statistics.median(timings)
    print(
        f"\nread of a 10,000-version key: median {median * 1000:.2f} ms, max {max(timings) * 1000:.2f} ms, "
        f"version 5555 {mid_seconds * 1000:.2f} ms"
    )
    assert median < 0.050 and mid_seconds < 0.050


def _open_at_once(env: dict[str, str], openers: int) -> tuple[list[Any], list[BaseException]]:
    """``openers`` threads constructing the configuration application with ``env`` at the same moment."""
    from configuration.store import ConfigurationApplication

    barrier = threading.Barrier(openers)
    opened: list[Any] = []
    errors: list[BaseException] = []

    def open_store() -> None:
        barrier.wait()
        try:
            opened.append(ConfigurationApplication(env))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(openers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return opened, errors


def test_processes_opening_the_store_at_once_on_a_new_database_all_open_it(pg_url: str) -> None:
    """Eight openers at once, where the tables do not exist yet (the demo's healer and policy router start
    together): every one opens the store (without the lock PostgreSQL failed all but one or two of them, with
    "tuple concurrently updated" or a duplicate ``pg_type`` row of the table), and the tables work. Five
    rounds, each in a new schema."""
    import psycopg
    from psycopg import sql

    from configuration.store import eventsourcing_env

    settings = _settings(pg_url)
    for round_ in range(5):
        schema = f"opening_{round_}"
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(sql.SQL("create schema {}").format(sql.Identifier(schema)))
        opened, errors = _open_at_once(eventsourcing_env(settings.postgres, schema=schema), 8)
        try:
            assert errors == [] and len(opened) == 8, [repr(e) for e in errors]
            assert opened[0].recorder.max_notification_id() in (None, 0)
        finally:
            for app in opened:
                app.close()


def test_config_history_prints_reasons_and_values_holding_brackets_as_they_are(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``config history`` and ``config show`` print people's reasons and the values' diffs as text: a regex
    such as ``[a-z]+`` in a value, or a reason naming ``[/tmp]``, were Rich markup (dropped, or a
    MarkupError) before 2026-12-08."""
    from typer.testing import CliRunner

    from backbone.cli.config import app
    from core.settings import get_settings

    with ConfigStore(_settings(pg_url)) as s:
        s.set(
            "routing.policy.default",
            {"strategy": "cheapest", "models": ["m-[a-z]+"]},
            author="ann",
            reason="init",
        )
        s.set("routing.policy.default", {"strategy": "cheapest", "models": ["m-[/x]"]}, author="bob",
              reason="fix [/tmp] [bold]paths[/bold]")  # fmt: skip
    monkeypatch.setenv("BACKBONE_POSTGRES__URL", pg_url)
    get_settings.cache_clear()
    try:
        history = CliRunner().invoke(app, ["history", "routing.policy.default"], env={"COLUMNS": "200"})
        show = CliRunner().invoke(app, ["show", "routing.policy.default"], env={"COLUMNS": "200"})
    finally:
        get_settings.cache_clear()
    assert history.exit_code == 0 and show.exit_code == 0, (history.output, show.output)
    assert "bob: fix [/tmp] [bold]paths[/bold]" in history.stdout
    assert '"m-[a-z]+"' in history.stdout and '"m-[/x]"' in history.stdout
    assert "by bob at " in show.stdout and ": fix [/tmp] [bold]paths[/bold]" in show.stdout

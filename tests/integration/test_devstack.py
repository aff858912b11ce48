"""The embedded dev stack, its stack.json, ``backbone dev`` and the shared fixtures, on real servers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from pydantic import SecretStr

from backbone.devstack import DevStack, StackInfo, read_stack, resolve_settings, stack_file
from backbone.errors import StackError
from core.settings import KafkaSettings, PostgresSettings, RedisSettings, Settings

pytestmark = pytest.mark.integration

_SERVER_ENV = ("BACKBONE_KAFKA__BOOTSTRAP_SERVERS", "BACKBONE_POSTGRES__URL", "BACKBONE_REDIS__URL")


def _empty_settings(state_dir: Path, **servers: object) -> Settings:
    fields: dict[str, object] = {
        "kafka": KafkaSettings(),
        "postgres": PostgresSettings(),
        "redis": RedisSettings(),
    }
    fields.update(servers)
    return Settings(state_dir=state_dir, **fields)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevStack, StackInfo]]:
    """A DevStack of this module's own, all embedded."""
    state_dir = tmp_path_factory.mktemp("own-stack")
    devstack = DevStack(_empty_settings(state_dir))
    info = devstack.start()
    try:
        yield devstack, info
    finally:
        devstack.stop()


def test_embedded_stack_serves_kafka_postgres_redis(
    own_stack: tuple[DevStack, StackInfo], unique_name: Callable[[str], str]
) -> None:
    """Every embedded server answers: a record round-trips through Tansu, PostgreSQL selects, Redis pongs."""
    _, info = own_stack
    assert info.embedded == {"kafka": True, "postgres": True, "redis": True}
    assert set(info.pids) == {"kafka", "postgres", "redis"}

    topic = unique_name("devstack")
    producer = Producer(
        {"bootstrap.servers": info.kafka_bootstrap, "acks": "all", "enable.idempotence": True}
    )
    producer.produce(topic, key=b"k", value=b"hello tansu", partition=0)
    assert producer.flush(15) == 0
    consumer = Consumer(
        {"bootstrap.servers": info.kafka_bootstrap, "group.id": unique_name("g"), "enable.auto.commit": False}
    )
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        records = []
        for _ in range(30):
            records += [m for m in consumer.consume(10, timeout=0.5) if m.error() is None]
            if records:
                break
    finally:
        consumer.close()
    assert [(m.key(), m.value()) for m in records] == [(b"k", b"hello tansu")]

    with psycopg.connect(info.postgres_url) as conn:
        assert conn.execute("select 1, current_database()").fetchone() == (1, "backbone")

    client = redis.Redis.from_url(info.redis_url)
    try:
        assert client.ping() is True
    finally:
        client.close()


def test_read_stack_finds_the_running_stack(own_stack: tuple[DevStack, StackInfo]) -> None:
    """read_stack returns what start() wrote to stack.json while the servers run."""
    devstack, info = own_stack
    found = read_stack(devstack.state_dir)
    assert found == info
    assert json.loads(stack_file(devstack.state_dir).read_text())["pids"] == info.pids


def test_resolve_settings_fills_only_empty_urls(own_stack: tuple[DevStack, StackInfo]) -> None:
    """resolve_settings fills empty URLs from stack.json and keeps the ones configured."""
    devstack, info = own_stack
    resolved = resolve_settings(_empty_settings(devstack.state_dir))
    assert resolved.kafka.bootstrap_servers == info.kafka_bootstrap
    assert resolved.postgres.dsn() == info.postgres_url
    assert resolved.redis.dsn() == info.redis_url

    configured = _empty_settings(
        devstack.state_dir, redis=RedisSettings(url=SecretStr("redis://elsewhere:1/2"))
    )
    resolved = resolve_settings(configured)
    assert resolved.redis.dsn() == "redis://elsewhere:1/2"
    assert resolved.postgres.dsn() == info.postgres_url


def test_second_start_in_same_state_dir_is_refused(own_stack: tuple[DevStack, StackInfo]) -> None:
    """A second stack in the state directory of a running one raises StackError and starts nothing."""
    devstack, _ = own_stack
    with pytest.raises(StackError, match="already runs"):
        DevStack(_empty_settings(devstack.state_dir)).start()


def test_stop_leaves_no_process_and_no_stack_file(tmp_path: Path) -> None:
    """After stop() every embedded server has exited and stack.json is gone."""
    devstack = DevStack(_empty_settings(tmp_path))
    with devstack as info:
        assert all(psutil.pid_exists(pid) for pid in info.pids.values())
    assert all(_gone(pid) for pid in info.pids.values())
    assert not stack_file(tmp_path).exists()
    assert read_stack(tmp_path) is None


@pytest.mark.parametrize("component", ["kafka", "postgres", "redis"])
def test_unreachable_configured_server_raises_stack_error_naming_it(
    component: str, stack: StackInfo, tmp_path: Path
) -> None:
    """A configured server that does not answer gives a StackError naming it and its URL, and no stack."""
    port = _closed_port()
    servers: dict[str, object] = {
        "kafka": KafkaSettings(bootstrap_servers=stack.kafka_bootstrap),
        "postgres": PostgresSettings(url=SecretStr(stack.postgres_url)),
        "redis": RedisSettings(url=SecretStr(stack.redis_url)),
    }
    bad = {
        "kafka": (KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"), "Kafka", f"127.0.0.1:{port}"),
        "postgres": (
            PostgresSettings(url=SecretStr(f"postgresql://app:s3cret@127.0.0.1:{port}/x")),
            "PostgreSQL",
            f"postgresql://app:***@127.0.0.1:{port}/x",
        ),
        "redis": (
            RedisSettings(url=SecretStr(f"redis://127.0.0.1:{port}/0")),
            "Redis",
            f"redis://127.0.0.1:{port}/0",
        ),
    }[component]
    servers[component] = bad[0]
    with pytest.raises(StackError) as raised:
        DevStack(_empty_settings(tmp_path, **servers), connect_timeout_seconds=2.0).start()
    message = str(raised.value)
    assert message.startswith(f"{bad[1]} at {bad[2]} ")
    assert "not reachable" in message
    assert "s3cret" not in message
    assert not stack_file(tmp_path).exists()


def test_failed_start_stops_what_it_started(tmp_path: Path) -> None:
    """When a configured Kafka does not answer, the embedded PostgreSQL and Redis already started are stopped."""
    settings = _empty_settings(tmp_path, kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{_closed_port()}"))
    with pytest.raises(StackError, match="Kafka at"):
        DevStack(settings, connect_timeout_seconds=1.0).start()
    assert (tmp_path / "logs" / "postgres.log").exists()
    assert (tmp_path / "logs" / "redis.log").exists()
    leftovers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any(str(tmp_path) in arg for arg in p.info["cmdline"] or [])
    ]
    assert leftovers == []


def test_configured_servers_are_used_and_left_alone(stack: StackInfo, tmp_path: Path) -> None:
    """With every URL configured, start() starts nothing, records them, and stop() leaves them running."""
    settings = _empty_settings(
        tmp_path,
        kafka=KafkaSettings(bootstrap_servers=stack.kafka_bootstrap),
        postgres=PostgresSettings(url=SecretStr(stack.postgres_url)),
        redis=RedisSettings(url=SecretStr(stack.redis_url)),
    )
    with DevStack(settings) as info:
        assert info.pids == {}
        assert info.embedded == {"kafka": False, "postgres": False, "redis": False}
        assert read_stack(tmp_path) == info
    assert not stack_file(tmp_path).exists()
    with psycopg.connect(stack.postgres_url) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def _backbone(
    args: list[str], state_dir: Path, timeout_seconds: float = 90
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in _SERVER_ENV}
    env["BACKBONE_STATE_DIR"] = str(state_dir)
    env["COLUMNS"] = "200"
    executable = shutil.which("backbone", path=str(Path(sys.executable).parent))
    assert executable is not None
    return subprocess.run(
        [executable, "dev", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_seconds,
        check=False,
    )


def test_cli_up_detach_status_down(tmp_path: Path) -> None:
    """`backbone dev up --detach` leaves a stack running that `status --json` shows and `down` stops."""
    up = _backbone(["up", "--detach"], tmp_path)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        status = _backbone(["status", "--json"], tmp_path)
        assert status.returncode == 0, status.stdout + status.stderr
        shown = json.loads(status.stdout)
        assert shown["running"] is True
        assert shown["state_dir"] == str(tmp_path)
        info = StackInfo.from_dict(shown)
        assert all(psutil.pid_exists(pid) for pid in info.pids.values())
        with psycopg.connect(info.postgres_url) as conn:
            assert conn.execute("select current_database()").fetchone() == ("backbone",)
    finally:
        down = _backbone(["down"], tmp_path)
    assert down.returncode == 0, down.stdout + down.stderr
    assert all(_gone(pid) for pid in info.pids.values())
    after = _backbone(["status", "--json"], tmp_path)
    assert after.returncode == 1
    assert json.loads(after.stdout) == {"running": False, "state_dir": str(tmp_path)}


def test_pg_url_is_a_fresh_empty_database(pg_url: str, stack: StackInfo) -> None:
    """The pg_url fixture names a new database with no tables, other than the stack's own."""
    with psycopg.connect(pg_url) as conn:
        name = conn.execute("select current_database()").fetchone()
        tables = conn.execute("select count(*) from information_schema.tables where table_schema = 'public'")
        assert tables.fetchone() == (0,)
    assert name is not None and name[0].startswith("test_")
    assert pg_url != stack.postgres_url


def test_redis_url_is_flushed_before_the_test(redis_url: str) -> None:
    """The redis_url fixture hands over an empty database."""
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0
        client.set("devstack-test", "1")
    finally:
        client.close()


def test_create_topic_waits_until_metadata_shows_it(
    create_topic: Callable[..., str], unique_name: Callable[[str], str], kafka_admin: object
) -> None:
    """create_topic returns the name once the topic's partitions are in the metadata."""
    name = create_topic(unique_name("topic"), partitions=4)
    assert unique_name("topic") != unique_name("topic")
    metadata = kafka_admin.list_topics(topic=name, timeout=5)  # type: ignore[attr-defined]
    assert len(metadata.topics[name].partitions) == 4


def test_dev_up_postgres_is_durable_and_the_test_sessions_is_not(
    own_stack: tuple[DevStack, StackInfo], pg_url: str
) -> None:
    """``backbone dev up``'s embedded PostgreSQL keeps PostgreSQL's durable defaults; only the test session (as the
    demo, the chaos harness and the benchmarks) turns durability off, by ``DevStack(durable=False)``."""
    import psycopg

    _, info = own_stack
    show = "SELECT current_setting('fsync'), current_setting('synchronous_commit'), current_setting('full_page_writes')"
    with psycopg.connect(info.postgres_url) as conn:
        assert conn.execute(show).fetchone() == ("on", "on", "on")
    if os.environ.get("BACKBONE_TEST_EXTERNAL") != "1":
        with psycopg.connect(pg_url) as conn:
            assert conn.execute(show).fetchone() == ("off", "off", "off")

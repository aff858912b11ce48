"""Write the generated part of the Kubernetes base (deploy/k8s/base/generated/) from the sources of truth.

* ``kafka-topics.yaml``: a Strimzi ``KafkaTopic`` per topic of the catalogue (streams/catalogue.py);
* ``kafka-connector.yaml``: a Strimzi ``KafkaConnector`` per connector spec of deploy/connect/specs;
* ``backbone.yaml``: per backbone process (:data:`PROCESSES`: the long-running processes and commands of
  docker-compose.yml, all but the routing processor, which needs a fitted router file) a Deployment with
  liveness ``/healthz`` and readiness ``/readyz`` probes, resources, the Kafka cluster CA mounted,
  settings from the ``backbone-config`` ConfigMap and the ``backbone-env`` Secret (by reference), a
  Service and a PodDisruptionBudget; a KEDA ``ScaledObject`` on consumer-group lag for the processes that
  scale with partitions (not the healer and the incident correlator: one replica each);
* ``monitoring.yaml``: the ``ServiceMonitor`` and a ``PrometheusRule`` holding deploy/prometheus/rules.

Run from the repository root after changing any of them: ``python deploy/k8s/gen_base.py``;
tests/deploy/test_k8s.py fails when the files differ from this script's output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from streams.catalogue import CATALOGUE

OUT = ROOT / "deploy" / "k8s" / "base" / "generated"
CLUSTER = "backbone"  # the Strimzi Kafka cluster
CONNECT = "backbone-connect"  # the Strimzi KafkaConnect cluster
IMAGE = "sophia/backbone:0.1.0"
INFERENCE_IMAGE = "sophia/backbone-inference:0.1.0"
METRICS_PORT = 9100
PART_OF = {"app.kubernetes.io/part-of": "sophia-backbone"}

# name: (image, args, port, replicas, KEDA (consumer group, topic or None) or None, cpu request, memory)
PROCESSES: dict[str, tuple[str, list[str], int, int, tuple[str, str | None] | None, str, str]] = {
    "processor-run-summary": (IMAGE, ["processors", "worker"], METRICS_PORT, 2, ("backbone-processors", "agent.events"), "250m", "512Mi"),
    "processor-correlation": (IMAGE, ["processors", "correlate"], METRICS_PORT, 2, ("backbone-correlation", "external.events"), "250m", "1Gi"),
    # one replica, no scaling: the healer is one state machine over all its inputs (table healer_state)
    "processor-healing": (IMAGE, ["processors", "heal"], METRICS_PORT, 1, None, "250m", "512Mi"),
    # one replica does all the correlating (a second one would only share the input stage)
    "processor-incidents": (IMAGE, ["processors", "incidents"], METRICS_PORT, 1, None, "250m", "1Gi"),
    "processor-anomalies": (IMAGE, ["processors", "anomalies"], METRICS_PORT, 1, ("backbone-anomalies", "telemetry.metrics"), "250m", "1Gi"),
    "projections": (IMAGE, ["projections", "run"], METRICS_PORT, 1, ("projection-agent_runs", "agent.events"), "500m", "1Gi"),
    "config-relay": (IMAGE, ["config", "relay"], METRICS_PORT, 1, None, "100m", "256Mi"),
    "cdc-normaliser": (IMAGE, ["cdc", "run"], METRICS_PORT, 1, ("cdc-normaliser", None), "250m", "512Mi"),
    "api": (IMAGE, ["api"], 8000, 2, None, "250m", "512Mi"),
    "inference": (INFERENCE_IMAGE, ["backbone", "inference", "run", "--ray-address", "backbone-ray-head-svc:6379"], METRICS_PORT, 1, None, "500m", "2Gi"),
}  # fmt: skip
# Per-process settings on top of the ConfigMap (same as docker-compose.yml).
EXTRA_ENV = {
    "processor-run-summary": {"BACKBONE_PROCESSORS_WEB_PORT": "0"},
    "processor-correlation": {"BACKBONE_CORRELATION_WEB_PORT": "0"},
    "config-relay": {"BACKBONE_CONFIG_METRICS_PORT": str(METRICS_PORT)},
    "cdc-normaliser": {"BACKBONE_CDC_TOPIC_PREFIX": "cdc"},
    "api": {"BACKBONE_API_HOST": "0.0.0.0", "BACKBONE_API_PORT": "8000"},
}


def kafka_topics() -> list[dict]:
    return [
        {
            "apiVersion": "kafka.strimzi.io/v1",
            "kind": "KafkaTopic",
            "metadata": {
                "name": t.name.replace(".", "-").replace("_", "-"),
                "labels": {"strimzi.io/cluster": CLUSTER},
            },
            "spec": {
                "topicName": t.name,
                "partitions": t.partitions,
                "replicas": 3,
                "config": {
                    "retention.ms": str(t.retention_ms),
                    "cleanup.policy": t.cleanup_policy,
                    "min.insync.replicas": "2",
                },
            },
        }
        for t in CATALOGUE.values()
    ]


def kafka_connectors() -> list[dict]:
    out = []
    for path in sorted((ROOT / "deploy" / "connect" / "specs").glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        config = dict(spec["config"])
        cls, tasks = config.pop("connector.class"), int(config.pop("tasks.max", "1"))
        out.append({
            "apiVersion": "kafka.strimzi.io/v1",
            "kind": "KafkaConnector",
            "metadata": {"name": spec["name"], "labels": {"strimzi.io/cluster": CONNECT}},
            "spec": {"class": cls, "tasksMax": tasks, "config": config},
        })  # fmt: skip
    return out


def _deployment(name: str) -> list[dict]:
    image, args, port, replicas, scaler, cpu, memory = PROCESSES[name]
    labels = {"app.kubernetes.io/name": name, **PART_OF}
    container: dict = {
        "name": name,
        "image": image,
        "args": args,
        "ports": [{"name": "metrics", "containerPort": port}],
        "envFrom": [{"configMapRef": {"name": "backbone-config"}}, {"secretRef": {"name": "backbone-env"}}],
        "env": [{"name": k, "value": v} for k, v in EXTRA_ENV.get(name, {}).items()]
        + [{"name": "OTEL_SERVICE_NAME", "value": f"backbone-{name}"}],
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 15, "failureThreshold": 4},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 10, "failureThreshold": 3},
        "startupProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 5, "failureThreshold": 60},
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}},
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False},
        "volumeMounts": [{"name": "kafka-ca", "mountPath": "/etc/kafka-ca", "readOnly": True}, {"name": "state", "mountPath": "/var/lib/backbone"}],
    }  # fmt: skip
    if image != IMAGE:  # the backbone image's entrypoint is `backbone`; the inference image has none
        container["command"] = [args[0]]
        container["args"] = args[1:]
    docs: list[dict] = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532},
                        "terminationGracePeriodSeconds": 60,
                        "containers": [container],
                        "volumes": [
                            {"name": "kafka-ca", "secret": {"secretName": f"{CLUSTER}-cluster-ca-cert", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                            {"name": "state", "emptyDir": {}},
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "labels": {**labels, "sophia.io/metrics": "true"}},
            "spec": {"selector": {"app.kubernetes.io/name": name}, "ports": [{"name": "metrics", "port": port, "targetPort": "metrics"}]},
        },
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": name, "labels": labels},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": name}}},
        },
    ]  # fmt: skip
    if scaler is not None:
        group, topic = scaler
        metadata = {
            "bootstrapServers": f"{CLUSTER}-kafka-bootstrap:9093",
            "consumerGroup": group,
            "lagThreshold": "1000",
            "offsetResetPolicy": "earliest",
        }
        if topic:
            metadata["topic"] = topic
            # Never more consumers than partitions: the extra ones would sit idle.
            metadata["allowIdleConsumers"] = "false"
        docs.append({
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "scaleTargetRef": {"name": name},
                "minReplicaCount": 1,
                "maxReplicaCount": CATALOGUE[topic].partitions if topic else 3,
                "pollingInterval": 30,
                "cooldownPeriod": 300,
                "triggers": [{"type": "kafka", "metadata": metadata, "authenticationRef": {"name": "kafka-tls"}}],
            },
        })  # fmt: skip
    return docs


def backbone() -> list[dict]:
    return [doc for name in PROCESSES for doc in _deployment(name)]


def monitoring() -> list[dict]:
    groups = []
    for path in sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml")):
        groups += yaml.safe_load(path.read_text())["groups"]
    return [
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": {"name": "sophia-backbone", "labels": PART_OF},
            "spec": {
                "selector": {"matchLabels": {"sophia.io/metrics": "true"}},
                "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
            },
        },
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": "sophia-backbone", "labels": PART_OF},
            "spec": {"groups": groups},
        },
    ]


def render() -> dict[str, str]:
    """``{file name: YAML text}`` of the generated files."""
    header = "# Generated by deploy/k8s/gen_base.py; do not edit (tests/deploy/test_k8s.py compares).\n"
    files = {
        "kafka-topics.yaml": kafka_topics(),
        "kafka-connector.yaml": kafka_connectors(),
        "backbone.yaml": backbone(),
        "monitoring.yaml": monitoring(),
    }
    return {
        name: header + "".join("---\n" + yaml.safe_dump(d, sort_keys=False, width=120) for d in docs)
        for name, docs in files.items()
    }


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(OUT / name)

"""deploy/k8s renders (kustomize-style, deploy/k8s/render.py) into manifests that validate and agree
with the code.

No cluster runs here. Built-in kinds are validated with kubernetes-validate (strict: unknown fields are
errors) for Kubernetes 1.33; custom resources against the openAPIV3Schema of their CRD, stored in
deploy/schemas/crds (Strimzi, KubeRay, KEDA, Prometheus operator; provenance in deploy/schemas/README.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
sys.path.insert(0, str(K8S))
sys.path.insert(0, str(Path(__file__).parent))
from render import render

KUBERNETES_VERSION = "1.33"
CRDS = ROOT / "deploy" / "schemas" / "crds"
TARGETS = {
    "base": K8S / "base",
    "development": K8S / "overlays" / "development",
    "production": K8S / "overlays" / "production",
}


@pytest.fixture(scope="module", params=sorted(TARGETS))
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(TARGETS[request.param])


def _crd_schema(doc: dict) -> dict | None:
    group, _, version = doc["apiVersion"].rpartition("/")
    path = CRDS / f"{group}_{doc['kind']}_{version}.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_every_manifest_validates(rendered) -> None:
    name, docs = rendered
    assert len(docs) > 40
    problems = []
    for doc in docs:
        where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
        if "." in doc["apiVersion"].split("/")[0] and "/" in doc["apiVersion"]:  # a custom resource
            schema = _crd_schema(doc)
            assert schema is not None, f"{where}: no stored CRD schema for {doc['apiVersion']} {doc['kind']}"
            problems += [
                f"{where}: {'/'.join(map(str, e.path))}: {e.message}"
                for e in jsonschema.Draft7Validator(schema).iter_errors(doc)
            ]
        else:
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{where}: {'/'.join(map(str, exc.path))}: {exc.message}")
    assert not problems, "\n".join(problems[:20])


def test_validation_can_fail() -> None:
    """A misspelt probe field and a KafkaTopic without partitions' type are refused."""
    docs = render(TARGETS["base"])
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "api")
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {
        "httpGet": {"path": "/readyz", "port": 8000}
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, KUBERNETES_VERSION, strict=True)
    topic = next(d for d in docs if d["kind"] == "KafkaTopic")
    topic["spec"]["partitions"] = "six"
    assert list(jsonschema.Draft7Validator(_crd_schema(topic)).iter_errors(topic))


def test_backbone_deployments_have_probes_resources_service_pdb(rendered) -> None:
    _, docs = rendered
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    import gen_base

    assert set(gen_base.PROCESSES) <= set(by_kind["Deployment"])
    for name, dep in by_kind["Deployment"].items():
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert c.get("readinessProbe") and c.get("livenessProbe"), f"{name}: probes"
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], f"{name}: resources"
        selector = dep["spec"]["selector"]["matchLabels"]
        assert any(s["spec"]["selector"] == selector for s in by_kind["Service"].values()), (
            f"{name}: no Service"
        )
        assert any(
            p["spec"]["selector"]["matchLabels"] == selector for p in by_kind["PodDisruptionBudget"].values()
        ), f"{name}: no PDB"
    for name in gen_base.PROCESSES:
        c = by_kind["Deployment"][name]["spec"]["template"]["spec"]["containers"][0]
        assert (
            c["readinessProbe"]["httpGet"]["path"] == "/readyz"
            and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        )
        assert {"secretRef": {"name": "backbone-env"}} in c["envFrom"]
        assert any(m["mountPath"] == "/etc/kafka-ca" for m in c["volumeMounts"])
    cfg = by_kind["ConfigMap"]["backbone-config"]["data"]
    assert (
        cfg["BACKBONE_KAFKA__SECURITY_PROTOCOL"] == "SSL"
        and cfg["BACKBONE_KAFKA__SSL_CA_LOCATION"] == "/etc/kafka-ca/ca.crt"
    )
    # Secrets are referenced, never written here (the one Secret holds KEDA's `tls: enable` switch).
    assert {
        n: set(s.get("stringData", {})) | set(s.get("data", {})) for n, s in by_kind["Secret"].items()
    } == {"keda-kafka-tls": {"tls"}}
    # Scale on consumer lag, never past the partition count; a GPU worker group in base and production.
    for so in by_kind["ScaledObject"].values():
        assert so["spec"]["triggers"][0]["type"] == "kafka"
    assert {
        "ServiceMonitor",
        "PrometheusRule",
        "RayCluster",
        "Kafka",
        "KafkaNodePool",
        "KafkaConnect",
        "KafkaConnector",
    } <= set(by_kind)


def test_production_has_gpu_workers_and_registry_images() -> None:
    docs = render(TARGETS["production"])
    ray = next(d for d in docs if d["kind"] == "RayCluster")
    gpu = next(g for g in ray["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    images = {
        c["image"]
        for d in docs
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert "registry.example.com/sophia/backbone:0.1.0" in images
    assert not any(i.startswith("sophia/") for i in images)
    assert {d["metadata"].get("namespace") for d in docs} == {"sophia"}


def test_generated_files_are_current() -> None:
    import gen_base

    for name, text in gen_base.render().items():
        assert (K8S / "base" / "generated" / name).read_text() == text, (
            f"run python deploy/k8s/gen_base.py ({name})"
        )


def test_topics_connectors_and_rules_come_from_their_sources() -> None:
    from streams.catalogue import CATALOGUE

    docs = render(TARGETS["base"])
    topics = {d["spec"]["topicName"] for d in docs if d["kind"] == "KafkaTopic"}
    assert topics == set(CATALOGUE)
    spec = yaml.safe_load((ROOT / "deploy" / "connect" / "specs" / "platform-postgres.yaml").read_text())
    conn = next(d for d in docs if d["kind"] == "KafkaConnector")
    assert conn["spec"]["class"] == spec["config"]["connector.class"]
    assert conn["spec"]["config"]["topic.prefix"] == spec["config"]["topic.prefix"]
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert len(alerts) >= 8


def test_backbone_variables_are_settings() -> None:
    """Every BACKBONE_* name the manifests set is a setting of the code, or pending (test_compose.PENDING_SETTINGS)."""
    import test_compose

    real = test_compose._settings_env_names() | test_compose._cli_env_names()
    used = set()
    for d in render(TARGETS["base"]):
        if d["kind"] == "ConfigMap":
            used |= set(d["data"])
        if d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                used |= {e["name"] for e in c.get("env", [])}
    used = {u for u in used if u.startswith("BACKBONE_")}
    assert used and not (used - real - set(test_compose.PENDING_SETTINGS)), used - real


def test_the_long_running_processes_of_compose_are_deployments_with_the_same_command() -> None:
    """Each backbone process docker-compose.yml keeps running (not a job) is a Deployment of the base with
    the same arguments, but the routing processor (it needs a fitted router file, mounted in compose), so a
    processor added to one is not forgotten in the other."""
    import gen_base

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    backbone = {
        name: svc["command"]
        for name, svc in compose["services"].items()
        if "backbone" in str(svc.get("image", "")) and svc.get("restart") != "no"
        and "ray" not in svc["command"][0]
    }  # fmt: skip
    assert {"processor-healing", "processor-incidents", "processor-anomalies"} <= set(backbone)
    assert set(backbone) - set(gen_base.PROCESSES) == {"processor-routing"}

    def without_hosts(args: list[str]) -> list[str]:  # the Ray head's address is the platform's service name
        return [a for i, a in enumerate(args) if i == 0 or args[i - 1] != "--ray-address"]

    for name, command in backbone.items():
        if name in gen_base.PROCESSES:
            assert without_hosts(gen_base.PROCESSES[name][1]) == without_hosts(command), name
    # one replica and no lag scaling for the two that are one state machine each
    for name in ("processor-healing", "processor-incidents"):
        assert gen_base.PROCESSES[name][3] == 1 and gen_base.PROCESSES[name][4] is None, name

"""`promtool check config`, `promtool check rules` and `promtool test rules` on deploy/prometheus.

promtool comes from Debian's `prometheus` package (`make promtool` installs it with apt-get); without it
these tests skip and say so. The scrape jobs are also checked against the compose services.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`: run `make promtool`)"
)


def _promtool(*args: str, cwd: Path = PROM) -> str:
    proc = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@needs_promtool
def test_promtool_check_config(tmp_path: Path) -> None:
    """The compose Prometheus config is valid, with its rule files where the container mounts them."""
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    config["rule_files"] = [str(PROM / "rules" / "*.yml")]  # the same files, at their path here
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    out = _promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert "SUCCESS" in out and "2 rule files found" in out


@needs_promtool
def test_promtool_check_rules() -> None:
    out = _promtool("check", "rules", *[str(p) for p in sorted((PROM / "rules").glob("*.yml"))])
    assert "FAILED" not in out


@needs_promtool
def test_promtool_test_rules() -> None:
    """Each alert's unit test: it fires with the expected labels and annotations, and stays quiet otherwise."""
    out = _promtool("test", "rules", "tests/backbone.test.yml")
    assert "SUCCESS" in out


def test_every_alert_has_a_unit_test() -> None:
    rules = [
        r["alert"]
        for f in sorted((PROM / "rules").glob("*.yml"))
        for g in yaml.safe_load(f.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    ]
    tests = yaml.safe_load((PROM / "tests" / "backbone.test.yml").read_text())["tests"]
    tested = {a["alertname"] for t in tests for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
    assert len(rules) >= 8
    assert set(rules) <= tested, f"alerts without a firing test: {set(rules) - tested}"


def _targets(job: dict) -> list[str]:
    """``host:port`` of a scrape job's static targets, or of the names its DNS discovery looks up."""
    if "static_configs" in job:
        return job["static_configs"][0]["targets"]
    sd = job["dns_sd_configs"][0]
    return [f"{name}:{sd['port']}" for name in sd["names"]]


def test_scrape_jobs_are_the_compose_processes() -> None:
    """A scrape job per backbone process of docker-compose.yml, at the port its health check probes; the
    experimental profile's processes by DNS discovery (no target, so no `up == 0`, while they are not started)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    backbone = {
        name: svc
        for name, svc in compose["services"].items()
        if "readyz" in " ".join(map(str, svc.get("healthcheck", {}).get("test", [])))
    }
    assert set(backbone) <= set(jobs), f"not scraped: {set(backbone) - set(jobs)}"
    for name, svc in backbone.items():
        port = str(svc["healthcheck"]["test"][-1]).split(":")[2].split("/")[0]
        assert _targets(jobs[name]) == [f"{name}:{port}"]
        experimental = "experimental" in svc.get("profiles", [])
        assert ("dns_sd_configs" in jobs[name]) == experimental, name

"""docker-compose.yml and example.env agree with the Compose Specification and with the code.

No Docker engine runs here, so these checks stand in for `docker compose config` and `make up`:

* the file validates against the Compose Specification's JSON schema (deploy/schemas/compose-spec.json,
  provenance in deploy/schemas/README.md), after ${...} interpolation from example.env;
* every image tag is pinned (no ``latest``, no bare name);
* every service has a health check (one-shot jobs: restart "no" and a depends_on on them with
  ``service_completed_successfully``) and every depends_on uses a condition its target can meet;
* every ``BACKBONE_*`` variable it or example.env sets is a real setting: a field of one of the
  settings models (nested with ``__``) or the environment variable of a CLI option; and the settings
  models load from each service's environment;
* every backbone command it runs exists in the CLI;
* the CDC connector spec writes what the normaliser reads, and passes the connector linter.

Names that the deploy files assume but the code does not have yet are listed in PENDING_* below; a
test fails once one of them exists, so the list is emptied as the code catches up.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"

# Deploy files use these; the code does not have them yet (issue 14's health and TLS work).
PENDING_SETTINGS: dict[str, str] = {}
PENDING_COMMANDS: dict[tuple[str, str], str] = {}

_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def read_env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of an env file (comments and blank lines skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            out[name.strip()] = value
    return out


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} substitution, recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, arg = m.groups()
        if env.get(name):
            return env[name]
        if op in (":?", "?"):
            raise AssertionError(f"${{{name}}} is required ({arg}) and example.env does not set it")
        return arg or ""

    return _VAR.sub(sub, value)


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return read_env_file(ROOT / "example.env")


@pytest.fixture(scope="module")
def compose(example_env) -> dict:
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), example_env)


def test_validates_against_the_compose_spec_schema(compose) -> None:
    schema = json.loads((ROOT / "deploy" / "schemas" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:10])


def test_schema_rejects_a_broken_file(compose) -> None:
    """The schema check can fail: a misspelt key and a bad depends_on condition are refused."""
    schema = json.loads((ROOT / "deploy" / "schemas" / "compose-spec.json").read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["kafka"]["helthcheck"] = broken["services"]["kafka"].pop("healthcheck")
    broken["services"]["api"]["depends_on"]["kafka"]["condition"] = "service_ready"
    assert len(list(jsonschema.Draft7Validator(schema).iter_errors(broken))) >= 2


def test_every_service_and_the_stack_we_promise(compose) -> None:
    services = compose["services"]
    wanted = {
        "kafka", "schema-registry", "connect", "postgres", "redis", "topics", "connectors-apply",
        "processor-run-summary", "processor-correlation", "processor-routing", "processor-healing",
        "processor-incidents", "projections", "config-relay", "cdc-normaliser", "api", "ray-head",
        "ray-worker-gpu", "ray-worker-cpu", "inference", "prometheus", "grafana", "jaeger", "otel-collector",
    }  # fmt: skip
    assert wanted <= set(services), wanted - set(services)
    assert "wal_level=logical" in services["postgres"]["command"]
    assert "KAFKA_PROCESS_ROLES" in services["kafka"]["environment"]  # KRaft, no ZooKeeper
    gpu = services["ray-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert services["ray-worker-gpu"]["profiles"] == ["gpu"] and services["ray-worker-cpu"]["profiles"] == [
        "cpu"
    ]
    assert "profiles" not in services["processor-healing"]  # its state is durable (table healer_state)
    assert set(services["processor-incidents"]["profiles"]) == {"experimental"}


def test_image_tags_are_pinned(compose) -> None:
    for name, svc in compose["services"].items():
        image = svc.get("image")
        assert image, f"{name} has no image"
        repo, _, tag = image.rpartition(":")
        assert repo and tag and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned to a version"


def test_health_checks_and_depends_on_conditions(compose) -> None:
    services = compose["services"]
    jobs = {n for n, s in services.items() if s.get("restart") == "no"}
    for name, svc in services.items():
        check = svc.get("healthcheck", {})
        if name in jobs:
            assert check.get("disable") is True
        else:
            assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on without conditions"
        for target, cond in deps.items():
            assert target in services, f"{name} depends on unknown {target}"
            expected = "service_completed_successfully" if target in jobs else "service_healthy"
            assert cond["condition"] == expected, f"{name} -> {target}: {cond['condition']}"


def _settings_env_names(*, leaves_only: bool = False) -> set[str]:
    """Environment variable names of every field of the settings models (nested with __); with
    ``leaves_only``, a nested model's own name (its JSON form) is left out."""
    from pydantic import BaseModel

    try:
        from core.settings import Settings  # after the restructure
    except ImportError:
        from core.settings import Settings
    from inference.config import InferenceSettings

    sys.path.insert(0, str(Path(__file__).parent))
    from exported_metrics import first_module

    ApiSettings = first_module("backbone.http.app", "backbone.api").ApiSettings
    names = set()
    for model in (Settings, ApiSettings, InferenceSettings):
        prefix = model.model_config["env_prefix"]
        for field, info in model.model_fields.items():
            ann = info.annotation
            nested = isinstance(ann, type) and issubclass(ann, BaseModel)
            if not (nested and leaves_only):
                names.add(f"{prefix}{field}".upper())
            if nested:
                names |= {f"{prefix}{field}__{sub}".upper() for sub in ann.model_fields}
    return names


def _cli():
    sys.path.insert(0, str(Path(__file__).parent))
    from cli_tree import root_command

    return root_command()


def _cli_env_names() -> set[str]:
    names: set[str] = set()

    def walk(cmd) -> None:
        for p in cmd.params:
            env = getattr(p, "envvar", None)
            names.update([env] if isinstance(env, str) else env or [])
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(_cli())
    return names


def _service_env(svc: dict) -> dict[str, str]:
    env = svc.get("environment", {})
    return (
        {k: str(v) for k, v in env.items()} if isinstance(env, dict) else dict(e.split("=", 1) for e in env)
    )


def test_every_backbone_variable_is_a_real_setting(compose, example_env) -> None:
    real = _settings_env_names() | _cli_env_names()
    used = {k for k in example_env if k.startswith("BACKBONE_")}
    for svc in compose["services"].values():
        used |= {k for k in _service_env(svc) if k.startswith("BACKBONE_")}
    commented = set(re.findall(r"^#\s*(BACKBONE_\w+)=", (ROOT / "example.env").read_text(), re.M))
    unknown = (used | commented) - real - set(PENDING_SETTINGS)
    assert not unknown, f"not a setting of the code: {sorted(unknown)}"


def test_pending_settings_are_still_pending() -> None:
    """When the code gains one, drop it from PENDING_SETTINGS (the check above then covers it)."""
    real = _settings_env_names() | _cli_env_names()
    assert not (set(PENDING_SETTINGS) & real), set(PENDING_SETTINGS) & real


def test_example_env_lists_every_setting(example_env) -> None:
    text = (ROOT / "example.env").read_text()
    listed = set(example_env) | set(re.findall(r"^#\s*(BACKBONE_\w+)=", text, re.M))
    missing = _settings_env_names(leaves_only=True) - listed
    assert not missing, f"example.env lacks {sorted(missing)}"


def test_settings_load_from_each_service_environment(compose, example_env) -> None:
    """Each backbone container's environment (example.env, then the service's own) builds every
    settings model (``extra="forbid"``: a misspelt nested variable fails here)."""
    probe = (
        "import json, os, sys\n"
        "try:\n from core.settings import Settings\nexcept ImportError:\n from core.settings import Settings\n"
        "try:\n from backbone.http.app import ApiSettings\nexcept ImportError:\n from backbone.api import ApiSettings\n"
        "from inference.config import InferenceSettings\n"
        "out = {}\n"
        "for name, env in json.loads(sys.stdin.read()).items():\n"
        "    for k in [k for k in os.environ if k.startswith('BACKBONE_')]: del os.environ[k]\n"
        "    os.environ.update(env)\n"
        "    s = Settings(); ApiSettings(); InferenceSettings()\n"
        "    out[name] = [s.kafka.bootstrap_servers, s.metrics_port]\n"
        "print(json.dumps(out))"
    )
    envs = {}
    for name, svc in compose["services"].items():
        if "backbone" in svc["image"]:
            env = {**example_env, **_service_env(svc)}
            envs[name] = {
                k: v for k, v in env.items() if k.startswith("BACKBONE_") and k not in PENDING_SETTINGS
            }
    assert len(envs) >= 12
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        input=json.dumps(envs),
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {name: ["kafka:9092", 9100] for name in envs}


def _command_path(svc: dict) -> list[str]:
    cmd = list(svc["command"])
    if "backbone-inference" in svc["image"]:
        if cmd[0] != "backbone":
            return []  # ray start ...
        cmd = cmd[1:]
    return [w for w in cmd if not w.startswith("-") and not w.startswith("/")][:2]


def test_every_backbone_command_exists(compose) -> None:
    root = _cli()
    checked = 0
    for name, svc in compose["services"].items():
        if "backbone" not in svc["image"] or not (path := _command_path(svc)):
            continue
        cmd = root
        for word in path:
            sub = getattr(cmd, "commands", {}).get(word)
            if sub is None:
                break
            cmd = sub
        else:
            checked += 1
            continue
        assert tuple(path) in PENDING_COMMANDS, f"{name}: `backbone {' '.join(path)}` is not a command"
    assert checked >= 9


def test_pending_commands_are_still_pending() -> None:
    root = _cli()
    for group, command in PENDING_COMMANDS:
        assert command not in getattr(root.commands[group], "commands", {}), (
            f"`backbone {group} {command}` exists now: remove it from PENDING_COMMANDS"
        )


def test_cdc_spec_writes_what_the_normaliser_reads() -> None:
    from connectors.cdc import DEFAULT_TOPIC_PREFIX, raw_topic_pattern
    from connectors.lint import LintLevel, lint_spec, load_spec

    path = ROOT / "deploy" / "connect" / "specs" / "platform-postgres.yaml"
    spec = load_spec(path)
    cfg = spec.config
    assert cfg["topic.prefix"] == DEFAULT_TOPIC_PREFIX
    for side in ("key", "value"):
        assert cfg[f"{side}.converter"] == "org.apache.kafka.connect.json.JsonConverter"
    for table in cfg["table.include.list"].split(","):
        assert re.fullmatch(raw_topic_pattern(DEFAULT_TOPIC_PREFIX), f"{cfg['topic.prefix']}.{table}")
    errors = [f for f in lint_spec(spec) if f.level == LintLevel.ERROR]
    assert not errors, errors

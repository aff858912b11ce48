"""The images hold every package the CLI imports, and their locks hold every distribution it imports.

No Docker engine runs here, so this stands in for ``docker build`` + ``docker run backbone --help``:
it builds each image's file list the way Docker does (the ``COPY`` lines of the Dockerfile, relative
to ``WORKDIR``, with ``.dockerignore``'s ``__pycache__`` rule), then, in a fresh interpreter whose
first ``sys.path`` entry is that copy, imports the CLI and every command module (the backbone image)
or every module of every package (the inference image). It fails when

* a ``COPY`` source is missing (``docker build`` fails the same way),
* a first-party module is loaded from outside the copy (a package no ``COPY`` names),
* an imported third-party distribution is not pinned in the image's lock file.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = (
    "core",
    "backbone",
    "streams",
    "processors",
    "projections",
    "connectors",
    "configuration",
    "inference",
    "schemas",
)

IMAGES = {
    # Dockerfile: (lock file, what to import)
    "Dockerfile": ("deploy/requirements.lock", "cli"),
    "deploy/docker/inference.Dockerfile": ("deploy/requirements-inference.lock", "all"),
}


def copy_instructions(dockerfile: Path) -> list[tuple[list[str], str]]:
    """Return the ``(sources, destination)`` of each ``COPY`` from the build context (not ``--from``).

    Continuation lines are joined; flags (``--chown=...``) are dropped.
    """
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0].upper() != "COPY":
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if any(w.startswith("--from") for w in words[1:]):
            continue
        out.append((args[:-1], args[-1]))
    return out


def build_file_list(dockerfile: Path, dest: Path) -> None:
    """Copy what the Dockerfile's ``COPY`` lines copy into ``dest`` (standing in for ``WORKDIR /app``).

    Raises:
        FileNotFoundError: a ``COPY`` source is not in the build context.
    """
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for sources, target in copy_instructions(dockerfile):
        for src in sources:
            path = ROOT / src
            if not path.exists():
                raise FileNotFoundError(f"{dockerfile.name}: COPY {src}: not in the build context")
            into = dest / target / path.name if (target.endswith("/") or len(sources) > 1) else dest / target
            if target.startswith("/"):
                into = dest / "_abs" / target.lstrip("/")
            if path.is_dir():
                shutil.copytree(path, into, ignore=ignore, dirs_exist_ok=True)
            else:
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, into)


PROBE = r"""
import importlib, importlib.metadata as md, json, pkgutil, sys, os
from pathlib import Path
app_dir, mode, first_party = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
import typer.main
import backbone.cli as cli
cli.mount(cli.app) if hasattr(cli, "mount") else cli._mount()
app = cli.app
modules = set()
def walk(cmd):
    cb = getattr(cmd, "callback", None)
    while cb is not None and hasattr(cb, "__wrapped__"):
        cb = cb.__wrapped__
    if cb is not None and getattr(cb, "__module__", None):
        modules.add(cb.__module__)
    for sub in getattr(cmd, "commands", {}).values():
        walk(sub)
walk(typer.main.get_command(app))
for info in pkgutil.walk_packages([app_dir]):
    name = info.name
    if name.endswith("__main__"):  # runs the CLI when imported
        continue
    if name.split(".")[0] in first_party and (mode == "all" or "cli" in name.split(".")[-1] or name.startswith("backbone.cli")):
        modules.add(name)
failed = {}
for name in sorted(modules):
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
outside, dists = [], set()
owners = md.packages_distributions()
for name, mod in list(sys.modules.items()):
    top = name.split(".")[0]
    f = getattr(mod, "__file__", None)
    if top in first_party:
        if f and not os.path.abspath(f).startswith(app_dir):
            outside.append(f"{name}: {f}")
    elif f and "site-packages" in f and not top.startswith(("__editable__", "_distutils_hack")):
        if top in owners or not top.startswith("_"):  # scipy registers private extension modules at top level
            dists.update(owners.get(top, [top]))
print(json.dumps({"modules": sorted(modules), "failed": failed, "outside": sorted(outside), "dists": sorted(dists)}))
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(lock: Path) -> dict[str, str]:
    """The lock file's pins: canonical distribution name -> version."""
    return {
        canonical(m.group(1)): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", lock.read_text(), re.M)
    }


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_image_file_list_imports_every_cli_command(dockerfile: str, tmp_path: Path) -> None:
    """The CLI and its command modules import from the image's file list, with the image's lock."""
    lock, mode = IMAGES[dockerfile]
    app_dir = tmp_path / "app"
    build_file_list(ROOT / dockerfile, app_dir)
    copied = {p.name for p in app_dir.iterdir()}
    assert {"pyproject.toml", *FIRST_PARTY} <= copied, f"COPY lines miss {set(FIRST_PARTY) - copied}"
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(app_dir), mode, ",".join(FIRST_PARTY)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(app_dir), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["modules"]) >= 10, result["modules"]
    assert not [m for m in result["modules"] if m.startswith(("typer", "click"))], "callbacks not unwrapped"
    assert not result["failed"], result["failed"]
    assert not result["outside"], f"first-party modules loaded from outside the image: {result['outside']}"
    pins = locked(ROOT / lock)
    # Distributions of the interpreter itself or of the test tooling are not the image's concern.
    missing = sorted(
        d
        for d in result["dists"]
        if canonical(d) not in pins
        and canonical(d) not in {"pip", "setuptools", "charset-normalizer"}  # imported only when present
    )
    assert not missing, f"imported but not pinned in {lock}: {missing}"


def test_both_locks_pin_shared_packages_to_one_version() -> None:
    """A distribution in both images has the same version (the backbone lock is compiled against the other)."""
    base, inference = (
        locked(ROOT / "deploy/requirements.lock"),
        locked(ROOT / "deploy/requirements-inference.lock"),
    )
    assert base and set(base) <= set(inference)
    assert {k: (v, inference[k]) for k, v in base.items() if inference[k] != v} == {}
    assert "numpy" in base, "processors import numpy at module level: it must be in the backbone image"
    assert {"torch", "ray"} <= set(inference) and not ({"torch", "ray"} & set(base))


def test_the_tests_run_the_versions_the_images_pin() -> None:
    """Every distribution of the inference lock that this interpreter has is installed at the locked
    version (``make install`` installs with the lock as constraints; torch's local ``+cpu`` build counts
    as its version), so ``make test`` tests what the images run; it failed before 2026-12-07, when the
    install took the newest versions (confluent-kafka 2.16.2 against a lock of 2.16.1, and 11 more)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = locked(ROOT / "deploy/requirements-inference.lock")
    assert len(pins) > 100
    installed = {}
    for name in pins:
        try:
            installed[name] = version(name).split("+")[0]
        except PackageNotFoundError:  # a CUDA wheel of the image, or another platform's
            continue
    assert {"confluent-kafka", "faust-streaming", "torch", "numpy"} <= set(installed)
    assert {n: (v, pins[n]) for n, v in installed.items() if v != pins[n]} == {}

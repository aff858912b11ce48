"""The import graph of the project: no module imports itself through others (no cycle), and the layer
contract of ``pyproject.toml`` holds (``make lint`` runs it too, with import-linter's own report)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (
    "core",
    "schemas",
    "streams",
    "projections",
    "processors",
    "connectors",
    "configuration",
    "inference",
    "backbone",
)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        work = [(v, iter(sorted(edges.get(v, ()))))]
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _graph() -> dict[str, set[str]]:
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False)
    # a package's __init__ re-exports its modules: an edge into the package itself is not a cycle of code
    return {
        m: {i for i in graph.find_modules_directly_imported_by(m) if i not in PACKAGES and i != m}
        for m in graph.modules
    }


def test_cycle_finder_finds_a_cycle() -> None:
    """The checker itself: a -> b -> c -> a is one cycle; d -> a is not part of it."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    """No module of the project reaches itself through its imports (function-level imports included)."""
    assert _cycles(_graph()) == []


def test_layer_contract_holds() -> None:
    """import-linter's layers contract (pyproject.toml): each package imports only the floors below it."""
    r = subprocess.run(
        [sys.executable, "-m", "importlinter.cli", "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )
    if r.returncode != 0 and "No module named" in r.stderr:
        r = subprocess.run(
            [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]

"""Avro schema compatibility, per the Avro specification's schema-resolution rules.

``BACKWARD``: the new schema (reader) can read data written with the old one (writer), so consumers
upgraded first still read all history. ``FORWARD``: the old schema reads new data. ``FULL``: both.
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_compatibility", "reader_can_read"]

_PROMOTIONS = {
    "int": {"int", "long", "float", "double"},
    "long": {"long", "float", "double"},
    "float": {"float", "double"},
    "string": {"string", "bytes"},
    "bytes": {"bytes", "string"},
}


def _kind(s: Any) -> str:
    if isinstance(s, list):
        return "union"
    if isinstance(s, str):
        return s
    t = s["type"]
    return t if isinstance(t, str) else _kind(t)


def _name(s: Any) -> str | None:
    if isinstance(s, dict) and "name" in s:
        ns = s.get("namespace")
        n = s["name"]
        return n if "." in n or not ns else f"{ns}.{n}"
    return None


def _short(name: str | None) -> str | None:
    return name.rsplit(".", 1)[-1] if name else None


def _same_name(r: dict[str, Any], w: dict[str, Any]) -> bool:
    """Named types resolve when their unqualified names agree or a reader alias names the writer."""
    return _short(_name(r)) == _short(_name(w)) or _name(w) in r.get("aliases", [])


def _resolve(s: Any, named: dict[str, Any]) -> Any:
    if isinstance(s, str) and s in named:
        return named[s]
    if isinstance(s, dict) and isinstance(s.get("type"), (dict, list)):
        return s["type"] if "logicalType" not in s or isinstance(s["type"], list) else s
    if isinstance(s, dict) and isinstance(s.get("type"), str) and s["type"] in named:
        return named[s["type"]]
    return s


def _collect(s: Any, named: dict[str, Any], ns: str | None = None) -> None:
    if isinstance(s, list):
        for b in s:
            _collect(b, named, ns)
    elif isinstance(s, dict):
        t = s.get("type")
        if t in ("record", "enum", "fixed", "error"):
            ns = s.get("namespace", ns)
            n = s["name"]
            full = n if "." in n or not ns else f"{ns}.{n}"
            named[full] = s
            named.setdefault(n, s)
            for f in s.get("fields", []):
                _collect(f["type"], named, ns)
        elif t == "array":
            _collect(s["items"], named, ns)
        elif t == "map":
            _collect(s["values"], named, ns)
        elif isinstance(t, (dict, list)):
            _collect(t, named, ns)


def reader_can_read(reader: Any, writer: Any) -> list[str]:
    """Return the problems that stop ``reader`` from reading data written with ``writer``.

    Args:
        reader: the reader's schema as parsed JSON (dict, list or str).
        writer: the writer's schema as parsed JSON.

    Returns:
        One line per problem, naming the field path; empty when the reader can read everything.
    """
    rn: dict[str, Any] = {}
    wn: dict[str, Any] = {}
    _collect(reader, rn)
    _collect(writer, wn)
    problems: list[str] = []
    _check(reader, writer, rn, wn, "$", problems, set())
    return problems


def _check(
    r: Any, w: Any, rn: dict[str, Any], wn: dict[str, Any], path: str, out: list[str], seen: set[Any]
) -> None:
    r, w = _resolve(r, rn), _resolve(w, wn)
    rk, wk = _kind(r), _kind(w)
    if wk == "union":
        for branch in w:
            _check(r, branch, rn, wn, path, out, seen)
        return
    if rk == "union":
        sub_results = []
        for branch in r:
            trial: list[str] = []
            _check(branch, w, rn, wn, path, trial, set(seen))
            if not trial:
                return
            sub_results.append(trial)
        out.append(f"{path}: writer type {wk} matches no branch of the reader's union")
        return
    if (
        rk in _PROMOTIONS
        or wk in _PROMOTIONS
        or rk in ("null", "boolean", "double")
        or wk
        in (
            "null",
            "boolean",
            "double",
        )
    ):
        if rk != wk and rk not in _PROMOTIONS.get(wk, set()):
            out.append(f"{path}: writer type {wk} cannot be read as {rk}")
        return
    if rk != wk:
        out.append(f"{path}: writer type {wk} cannot be read as {rk}")
        return
    if rk == "array":
        _check(r["items"], w["items"], rn, wn, f"{path}[]", out, seen)
    elif rk == "map":
        _check(r["values"], w["values"], rn, wn, f"{path}{{}}", out, seen)
    elif rk in ("fixed", "enum", "record", "error") and not _same_name(r, w):
        out.append(f"{path}: {wk} {_name(w)} cannot be read as {_name(r)}")
    elif rk == "fixed":
        if r.get("size") != w.get("size"):
            out.append(f"{path}: fixed size {w.get('size')} changed to {r.get('size')}")
    elif rk == "enum":
        missing = [s for s in w["symbols"] if s not in r["symbols"]]
        if missing and "default" not in r:
            out.append(f"{path}: enum symbols {missing} removed with no enum default")
    elif rk in ("record", "error"):
        key = (id(r), id(w))
        if key in seen:
            return
        seen.add(key)
        wfields = {f["name"]: f for f in w.get("fields", [])}
        for f in r.get("fields", []):
            wf = wfields.get(f["name"]) or next(
                (wfields[a] for a in f.get("aliases", []) if a in wfields), None
            )
            fpath = f"{path}.{f['name']}"
            if wf is None:
                if "default" not in f:
                    out.append(f"{fpath}: new field has no default, so history cannot be read")
            else:
                _check(f["type"], wf["type"], rn, wn, fpath, out, seen)


def check_compatibility(new: Any, old: Any, level: str = "BACKWARD") -> list[str]:
    """Return the incompatibilities of a schema change at a Confluent compatibility ``level``.

    Args:
        new: the proposed schema (parsed JSON).
        old: the latest registered schema (parsed JSON).
        level: ``BACKWARD`` (new reads old), ``FORWARD`` (old reads new), ``FULL`` (both) or ``NONE``.

    Raises:
        ValueError: for an unknown level.
    """
    level = level.upper().removesuffix("_TRANSITIVE")
    if level == "NONE":
        return []
    if level == "BACKWARD":
        return reader_can_read(new, old)
    if level == "FORWARD":
        return reader_can_read(old, new)
    if level == "FULL":
        return reader_can_read(new, old) + reader_can_read(old, new)
    raise ValueError(f"unknown compatibility level {level!r}")

"""Render a kustomization the way ``kustomize build`` does, for the subset of kustomize this repository uses.

Supported fields of ``kustomization.yaml``: ``resources`` (files, or folders holding a kustomization),
``namespace`` (set on every resource), ``images`` (``name`` -> ``newName``/``newTag`` in every container of
Deployments and RayCluster groups) and ``patches`` with ``path`` (strategic-merge patches matched by
``apiVersion`` group, ``kind`` and ``metadata.name``). Merging follows strategic merge for the built-in kinds
this repository patches: maps merge key by key; lists of maps with a ``name`` (containers, env, ports,
volumes) merge by ``name``; other lists are replaced. Custom resources have no merge keys in kustomize
either, so their lists are replaced. Anything else in a kustomization raises ``ValueError``.

Usage: ``python deploy/k8s/render.py deploy/k8s/overlays/production`` prints the YAML stream.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
BUILTIN_GROUPS = {"v1", "apps/v1", "policy/v1", "batch/v1", "autoscaling/v2"}


def _merge(base: Any, patch: Any, *, builtin: bool) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v, builtin=builtin) if k in base else copy.deepcopy(v)
        return out
    if (
        builtin
        and isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        out = [copy.deepcopy(x) for x in base]
        index = {x["name"]: i for i, x in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = _merge(out[index[item["name"]]], item, builtin=True)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _key(doc: dict) -> tuple[str, str, str]:
    return (
        doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else "",
        doc["kind"],
        doc["metadata"]["name"],
    )


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    pods = []
    if doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        pods.append(spec["template"]["spec"])
    if doc["kind"] == "RayCluster":
        pods.append(spec["headGroupSpec"]["template"]["spec"])
        pods += [g["template"]["spec"] for g in spec.get("workerGroupSpecs", [])]
    return [c for p in pods for c in p.get("containers", []) + p.get("initContainers", [])]


def _load_yaml_stream(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(folder: Path) -> list[dict]:
    """The resources of the kustomization in ``folder``, in order, with its transformations applied.

    Raises:
        ValueError: an unsupported kustomization field, or a patch that matches no resource.
        FileNotFoundError: a resource or patch file that does not exist.
    """
    folder = Path(folder)
    kz = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kz) - SUPPORTED
    if unknown:
        raise ValueError(f"{folder}/kustomization.yaml: unsupported field(s) {sorted(unknown)}")
    docs: list[dict] = []
    for res in kz.get("resources", []):
        path = folder / res
        docs += render(path) if path.is_dir() else _load_yaml_stream(path)
    for patch_ref in kz.get("patches", []):
        if set(patch_ref) != {"path"}:
            raise ValueError(f"{folder}: only `patches: [{{path: ...}}]` is supported, not {patch_ref}")
        for patch in _load_yaml_stream(folder / patch_ref["path"]):
            matches = [i for i, d in enumerate(docs) if _key(d) == _key(patch)]
            if not matches:
                raise ValueError(f"{folder}: patch {_key(patch)} matches no resource")
            for i in matches:
                docs[i] = _merge(docs[i], patch, builtin=docs[i]["apiVersion"] in BUILTIN_GROUPS)
    for image in kz.get("images", []):
        for doc in docs:
            for c in _containers(doc):
                name, _, _tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image.get('newTag', _tag)}"
    if "namespace" in kz:
        for doc in docs:
            doc["metadata"]["namespace"] = kz["namespace"]
    return docs


if __name__ == "__main__":
    print("".join("---\n" + yaml.safe_dump(d, sort_keys=False) for d in render(Path(sys.argv[1]))), end="")

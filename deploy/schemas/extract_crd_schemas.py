"""Extract the ``openAPIV3Schema`` of each served version of CustomResourceDefinition files to
``deploy/schemas/crds/<group>_<Kind>_<version>.json`` (compact JSON), the form tests/deploy/test_k8s.py
validates custom resources with. Usage: ``python deploy/schemas/extract_crd_schemas.py CRD.yaml ...``
(the CRD files and their commits are listed in deploy/schemas/README.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parent / "crds"


def main(paths: list[str]) -> None:
    for path in paths:
        for doc in yaml.safe_load_all(Path(path).read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if not version.get("served"):
                    continue
                schema = version["schema"]["openAPIV3Schema"]
                out = OUT / f"{spec['group']}_{spec['names']['kind']}_{version['name']}.json"
                out.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
                print(out)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Extract the openAPIV3Schema of KServe's CRDs into kserve/*.json (what
tests/test_k8s_kit.py validates the KServe objects against).

    python deploy/k8s/schemas/vendor.py KSERVE_CHECKOUT

KSERVE_CHECKOUT: a checkout of github.com/kserve/kserve at the tag named in README.md;
its config/crd/full/ holds the CRDs as KServe publishes them (Apache-2.0)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

CRDS = {
    "serving.kserve.io_servingruntimes.yaml": "servingruntime",
    "serving.kserve.io_inferenceservices.yaml": "inferenceservice",
}


def main(checkout: Path) -> None:
    out = Path(__file__).resolve().parent / "kserve"
    for name, stem in CRDS.items():
        crd = yaml.safe_load((checkout / "config" / "crd" / "full" / name).read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = version["schema"]["openAPIV3Schema"]
            schema = {
                "x-kubernetes-group-version-kind": [
                    {"group": group, "version": version["name"], "kind": kind}
                ],
                **schema,
            }
            path = out / f"{stem}-{version['name']}.json"
            path.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
            print(path)


if __name__ == "__main__":
    main(Path(sys.argv[1]))

#!/usr/bin/env python3
"""Vendor one version of a CustomResourceDefinition's openAPIV3Schema, for tests/test_k8s_examples.py.

    python3 k8s-examples/kserve/schemas/vendor.py CRD.yaml VERSION OUT.json \\
        --repository kserve/kserve --commit SHA --path config/crd/full/serving.kserve.io_inferenceservices.yaml

CRD.yaml is the upstream file as it stands at that commit (``git show SHA:PATH > CRD.yaml``). What is kept
is the schema the API server validates that version against, changed in two ways that change nothing it
accepts or refuses:

- every ``description`` is dropped (they are most of the bytes);
- a subschema that appears more than once, and is large, is written once under ``$defs`` and referred to
  by ``$ref`` (KServe's InferenceService repeats the Container and PodSpec schemas for every framework).

The script checks the second by expanding every ``$ref`` again and comparing with the first. The output
names its source: repository, commit, path and the sha256 of the upstream file, so anyone can fetch that
file and run this again to get the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

SCHEMA_LISTS = ("anyOf", "allOf", "oneOf")
SHARED_AT_LEAST = 400  # characters of canonical JSON: smaller repeats stay where they are


def strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: strip(value) for key, value in node.items() if key != "description"}
    if isinstance(node, list):
        return [strip(value) for value in node]
    return node


def canonical(node: Any) -> str:
    return json.dumps(node, separators=(",", ":"), sort_keys=True)


def subschemas(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The schemas directly inside a schema (not maps of them, not enum values or defaults)."""
    found = list(schema.get("properties", {}).values())
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            found.append(schema[key])
    for key in SCHEMA_LISTS:
        found += schema.get(key, [])
    return found


def share(schema: dict[str, Any]) -> dict[str, Any]:
    counts: dict[str, int] = {}

    def count(node: dict[str, Any]) -> None:
        text = canonical(node)
        counts[text] = counts.get(text, 0) + 1
        for child in subschemas(node):
            count(child)

    count(schema)
    defs: dict[str, Any] = {}

    def rewrite(node: dict[str, Any], top: bool = False) -> dict[str, Any]:
        text = canonical(node)
        if not top and counts[text] > 1 and len(text) >= SHARED_AT_LEAST:
            name = hashlib.sha256(text.encode()).hexdigest()[:16]
            if name not in defs:
                defs[name] = children(node)
            return {"$ref": f"#/$defs/{name}"}
        return children(node)

    def children(node: dict[str, Any]) -> dict[str, Any]:
        out = dict(node)
        if "properties" in node:
            out["properties"] = {name: rewrite(value) for name, value in node["properties"].items()}
        for key in ("items", "additionalProperties", "not"):
            if isinstance(node.get(key), dict):
                out[key] = rewrite(node[key])
        for key in SCHEMA_LISTS:
            if key in node:
                out[key] = [rewrite(value) for value in node[key]]
        return out

    shared = rewrite(schema, top=True)
    if defs:
        shared["$defs"] = defs
    return shared


def expand(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if set(node) == {"$ref"}:
            return expand(defs[node["$ref"].removeprefix("#/$defs/")], defs)
        return {key: expand(value, defs) for key, value in node.items() if key != "$defs"}
    if isinstance(node, list):
        return [expand(value, defs) for value in node]
    return node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("crd", type=Path)
    parser.add_argument("version")
    parser.add_argument("out", type=Path)
    parser.add_argument("--repository", required=True)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--path", required=True)
    args = parser.parse_args()

    raw = args.crd.read_bytes()
    crd = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["kind"] == "CustomResourceDefinition", args.crd
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == args.version]
    stripped = strip(version["schema"]["openAPIV3Schema"])
    shared = share(stripped)
    assert expand(shared, shared.get("$defs", {})) == stripped, "sharing changed the schema"
    document = {
        "source": {
            "repository": args.repository,
            "commit": args.commit,
            "path": args.path,
            "sha256": hashlib.sha256(raw).hexdigest(),
            "transform": "k8s-examples/kserve/schemas/vendor.py: descriptions dropped, repeated subschemas in $defs",
        },
        "apiVersion": f"{crd['spec']['group']}/{args.version}",
        "kind": crd["spec"]["names"]["kind"],
        "served": version.get("served", False),
        "openAPIV3Schema": shared,
    }
    args.out.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    print(f"{args.out}: {args.out.stat().st_size} bytes, {len(shared.get('$defs', {}))} shared subschemas")


if __name__ == "__main__":
    main()

"""Derive ``ocsf-1.7.0-subset.schema.json`` (beside this file) from the published OCSF schema.

Not run by the tests (they have no network): run by hand to refresh the vendored file.

    git clone https://github.com/ocsf/ocsf-schema && git -C ocsf-schema checkout dc6359b4
    python tests/siem/derive_ocsf_schema.py ocsf-schema > tests/siem/ocsf-1.7.0-subset.schema.json

Commit ``dc6359b4`` of github.com/ocsf/ocsf-schema is "v1.7.0 Release Prep (#1533)": its
``version.json`` says ``1.7.0``. For the classes Ringfence emits (Network Activity 4001, API
Activity 6003, Detection Finding 2004) it resolves each class's ``extends`` chain (base_event →
category class → class), and for every attribute its requirement, its type (dictionary.json and the
type's base) and its enum (the class's own, else the dictionary's); objects are resolved the same
way (``extends``, ``constraints.at_least_one``) to a depth of three (below the class's own
objects, required and recommended attributes only). Of the profiles only ``security_control`` is
added, to Network Activity (its ``action_id``/``disposition_id``); the other profiles' attributes
are rejected like any unknown attribute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CLASSES = {
    "network_activity": "events/network",
    "api_activity": "events/application",
    "detection_finding": "events/findings",
}
DEPTH = 3
# the security_control profile carries action_id/disposition_id (allowed, blocked, …): Ringfence
# applies it to Network Activity (and says so in metadata.profiles)
PROFILES = {"network_activity": ["security_control"], "api_activity": [], "detection_finding": []}


def main(root: Path) -> dict[str, Any]:
    def load(rel: str) -> dict[str, Any]:
        return json.loads((root / rel).read_text())

    dictionary = load("dictionary.json")
    attrs = dictionary["attributes"]
    types = dictionary["types"]["attributes"]
    categories = load("categories.json")["attributes"]
    objects = {}
    for p in (root / "objects").glob("*.json"):
        d = json.loads(p.read_text())
        objects[d["name"]] = d

    def merged(d: dict[str, Any], find: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        chain = [d]
        while chain[-1].get("extends"):
            chain.append(find(chain[-1]["extends"]))
        out: dict[str, Any] = {}
        constraints: dict[str, Any] = {}
        for level in reversed(chain):
            for k, v in level.get("attributes", {}).items():
                if k == "$include":
                    continue
                out[k] = {**out.get(k, {}), **v}
            constraints.update(level.get("constraints", {}))
        return out, constraints

    def json_type(t: str) -> str:
        while t in types and types[t].get("type"):
            t = types[t]["type"]
        return {
            "string_t": "string",
            "integer_t": "integer",
            "long_t": "integer",
            "float_t": "number",
            "boolean_t": "boolean",
            "json_t": "",
        }.get(t, "object" if t == "object" else "")

    def schema_of(name: str, spec: dict[str, Any], depth: int) -> dict[str, Any]:
        base = attrs.get(name, {})
        t = spec.get("type") or base.get("type", "")
        enum = spec.get("enum") or base.get("enum")
        s: dict[str, Any] = {}
        if t in objects:
            s = object_schema(t, depth + 1) if depth < DEPTH else {"type": "object"}
        else:
            jt = json_type(t)
            if jt:
                s["type"] = jt
            if enum and jt == "integer":
                s["enum"] = sorted(int(k) for k in enum)
        if spec.get("is_array", base.get("is_array")):
            s = {"type": "array", "items": s}
        return s

    def object_schema(name: str, depth: int) -> dict[str, Any]:
        fields, constraints = merged(objects[name], lambda n: objects[n])
        # below the class's own objects only required and recommended attributes are described
        # (the rest stay allowed): the file stays small
        keep = {k: v for k, v in fields.items() if depth < 2 or v.get("requirement") in ("required", "recommended")}
        out: dict[str, Any] = {
            "type": "object",
            "properties": {k: schema_of(k, v, depth) for k, v in sorted(keep.items())},
        }
        req = sorted(k for k, v in fields.items() if v.get("requirement") == "required")
        if req:
            out["required"] = req
        if constraints.get("at_least_one"):
            out["anyOf"] = [{"required": [k]} for k in constraints["at_least_one"]]
        return out

    defs: dict[str, Any] = {}
    for cls, folder in CLASSES.items():
        d = load(f"{folder}/{cls}.json")
        parents = {"base_event": load("events/base_event.json")}
        for p in (root / folder).glob("*.json"):
            parents[json.loads(p.read_text())["name"]] = json.loads(p.read_text())
        fields, _ = merged(d, parents.__getitem__)
        for profile in PROFILES[cls]:
            for k, v in load(f"profiles/{profile}.json")["attributes"].items():
                fields[k] = {**fields.get(k, {}), **v}
        category = next(v.get("category") for v in (d, parents.get(d.get("extends", ""), {})) if v.get("category"))
        class_uid = categories[category]["uid"] * 1000 + d["uid"]
        props = {k: schema_of(k, v, 1) for k, v in sorted(fields.items())}
        props["class_uid"] = {"const": class_uid}
        props["category_uid"] = {"const": categories[category]["uid"]}
        acts = sorted(int(k) for k in fields["activity_id"]["enum"])
        props["activity_id"] = {"type": "integer", "enum": acts}
        props["type_uid"] = {"type": "integer", "enum": [class_uid * 100 + a for a in acts]}
        defs[cls] = {
            "title": f"{d['caption']} [{class_uid}]",
            "type": "object",
            "required": sorted(k for k, v in fields.items() if v.get("requirement") == "required"),
            "x-recommended": sorted(k for k, v in fields.items() if v.get("requirement") == "recommended"),
            "properties": props,
            "additionalProperties": False,
        }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "derived by tests/siem/derive_ocsf_schema.py from github.com/ocsf/ocsf-schema at dc6359b4 "
        "(v1.7.0 release); required attributes, types and enums of three classes, profiles left out",
        "ocsf_version": load("version.json")["version"],
        "$defs": defs,
    }


if __name__ == "__main__":
    json.dump(main(Path(sys.argv[1])), sys.stdout, indent=1, sort_keys=True)
    print()

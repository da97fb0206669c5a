"""docs/reference/api.md is generated from operator/keyroom/api and must not drift from it."""
from __future__ import annotations

from keyroom.api import docs, manifests
from tests.conftest import REPO


def test_the_api_reference_matches_the_python_source_of_truth():
    on_disk = (REPO / docs.PAGE).read_text()
    assert on_disk == docs.rendered(), "docs/reference/api.md is stale; run `make docs`"


def _walk(schema: dict, path: str):
    for name, child in schema.get("properties", {}).items():
        yield f"{path}.{name}", child
        yield from _walk(child, f"{path}.{name}")
    if schema.get("type") == "array":
        yield from _walk(schema["items"], f"{path}[]")


def test_every_kind_field_column_default_enum_and_rule_message_is_on_the_page():
    page = docs.rendered()
    for crd in manifests.crds():
        kind = crd["spec"]["names"]["kind"]
        assert f"\n## {kind}\n" in page
        section = page.split(f"\n## {kind}\n", 1)[1].split("\n## ", 1)[0]
        version = crd["spec"]["versions"][0]
        for column in version["additionalPrinterColumns"]:
            assert f"| {column['name']} | {column['type']} |" in section, (kind, column["name"])
        root = version["schema"]["openAPIV3Schema"]
        for part in ("spec", "status"):
            for path, schema in _walk(root["properties"][part], part):
                if path.endswith("[]"):
                    continue
                assert f"| `{path}`" in section, f"{kind} {path} is missing"
        for path, schema in [("", root), *_walk(root, "")]:
            for rule in schema.get("x-kubernetes-validations", []):
                assert rule["message"].rstrip(".") in section, f"{kind}{path}: rule {rule['message']!r} is missing"
            for value in schema.get("enum", []):
                assert f"`{value}`" in section, f"{kind}{path}: enum value {value} is missing"
            if "default" in schema and path:
                assert "Default: `" in section

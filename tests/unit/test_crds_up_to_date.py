"""crds/ is generated from operator/keyroom/api and must not drift from it."""
from __future__ import annotations

from keyroom.api import generate, manifests
from tests.conftest import REPO


def test_crds_directory_matches_the_python_source_of_truth():
    expected = generate.rendered()
    on_disk = {path.name: path.read_text() for path in (REPO / "crds").glob("*.yaml")}
    assert set(on_disk) == set(expected), "run `make crds`"
    stale = [name for name, text in expected.items() if on_disk[name] != text]
    assert not stale, f"crds/ is stale ({', '.join(stale)}); run `make crds`"


def test_every_kind_is_namespaced_with_status_short_names_and_category():
    short_names = {}
    for crd in manifests.crds():
        spec = crd["spec"]
        assert spec["scope"] == "Namespaced"
        assert spec["names"]["categories"] == ["keyroom"]
        version = spec["versions"][0]
        assert version["subresources"] == {"status": {}}
        assert any(c["name"] == "Age" for c in version["additionalPrinterColumns"])
        short_names[spec["names"]["kind"]] = spec["names"]["shortNames"]
    assert short_names == {"SigningKey": ["sk"], "Certificate": ["kcert"], "SigningPolicy": ["spol"],
                           "SignRequest": ["sr"]}


def _walk(schema: dict, path: str = ""):
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_every_field_is_described_and_every_list_bounded():
    for crd in manifests.crds():
        root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, schema in _walk(root):
            if path.endswith(".metadata") or path.endswith("[]") or path.endswith("{}"):
                continue
            assert schema.get("description"), f"{crd['metadata']['name']}{path} has no description"
            if schema.get("type") == "array":
                assert "maxItems" in schema, f"{crd['metadata']['name']}{path} is unbounded"

"""kubectl apply and GitOps tools: a requester applies SignRequests server-side and client-side.

Applying is a patch. The requester role grants it; the CRD (spec immutable)
and the admission policy (only one's own approval appended, no attestation
without the builder role) keep everything a requester must not change after
creation refused, whether it comes as an apply or as any other patch.
"""
from __future__ import annotations

import copy

import pytest
import yaml

from tests.conftest import approve, get, identity, kubectl

pytestmark = pytest.mark.integration

NAMESPACE = "team-a"


def _manifest(name: str, *, key: str = "some-key", digest: str = "ab" * 32) -> dict:
    return {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SignRequest",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"keyRef": {"name": key}, "requester": identity("alice"), "reason": "release from git",
                     "digests": [{"name": "app.bin", "value": digest}]}}


def _apply(cluster, manifest: dict, *server_side: str, user: str = "alice"):
    return kubectl(cluster, "apply", *server_side, "-f", "-", identity=user, input=yaml.safe_dump(manifest))


@pytest.mark.parametrize("mode", [("--server-side",), ()], ids=["server-side", "client-side"])
def test_a_requester_applies_a_request_and_reapplies_it_unchanged(cluster, unique, mode):
    name = unique("applied")
    created = _apply(cluster, _manifest(name), *mode)
    assert created.returncode == 0, created.stderr
    before = get(cluster, "signrequest", name, namespace=NAMESPACE)
    again = _apply(cluster, _manifest(name), *mode)
    assert again.returncode == 0, again.stderr
    after = get(cluster, "signrequest", name, namespace=NAMESPACE)
    assert (after["metadata"]["generation"], after["spec"]) == (before["metadata"]["generation"], before["spec"])
    assert after["metadata"].get("annotations") == before["metadata"].get("annotations")
    if not mode:
        assert "unchanged" in again.stdout

    assert approve(cluster, name, "bob", namespace=NAMESPACE).returncode == 0
    after_approval = _apply(cluster, _manifest(name), *mode)
    assert after_approval.returncode == 0, after_approval.stderr
    approvals = get(cluster, "signrequest", name, namespace=NAMESPACE)["spec"]["approvals"]
    assert [a["user"] for a in approvals] == ["bob"], "re-applying the manifest from git keeps the approvals"


@pytest.mark.parametrize("mode", [("--server-side",), ()], ids=["server-side", "client-side"])
def test_an_apply_that_changes_a_request_after_creation_is_refused(cluster, unique, mode):
    name = unique("applied")
    assert _apply(cluster, _manifest(name), *mode).returncode == 0
    changed = _apply(cluster, _manifest(name, digest="cd" * 32), *mode)
    assert changed.returncode != 0 and "cannot change after creation" in changed.stderr

    forged = copy.deepcopy(_manifest(name))
    forged["spec"]["approvals"] = [{"user": "bob", "groups": identity("bob")["groups"], "decision": "Approve"}]
    refused = _apply(cluster, forged, *mode)
    assert refused.returncode != 0 and "an approval must be your own" in refused.stderr

    attested = copy.deepcopy(_manifest(name))
    attested["spec"]["attestations"] = [{"user": "alice", "groups": identity("alice")["groups"],
                                         "digests": [{"name": "app.bin", "value": "ab" * 32}]}]
    refused = _apply(cluster, attested, *mode)
    assert refused.returncode != 0 and "only a builder may attest" in refused.stderr
    spec = get(cluster, "signrequest", name, namespace=NAMESPACE)["spec"]
    assert spec["digests"][0]["value"] == "ab" * 32 and "approvals" not in spec and "attestations" not in spec


def test_a_requester_cannot_apply_a_request_in_someone_elses_name(cluster, unique):
    manifest = _manifest(unique("applied"))
    manifest["spec"]["requester"] = identity("carol")
    refused = _apply(cluster, manifest, "--server-side")
    assert refused.returncode != 0 and "must be your own username" in refused.stderr

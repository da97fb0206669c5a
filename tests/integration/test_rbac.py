"""The shipped roles, bound per team namespace, keep teams in their own rooms."""
from __future__ import annotations

import pytest

from tests.conftest import apply, kubectl

pytestmark = pytest.mark.integration

SHA256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def can_i(cluster, identity: str, verb: str, resource: str, namespace: str, *extra: str) -> bool:
    result = kubectl(cluster, "auth", "can-i", verb, resource, "-n", namespace, *extra, identity=identity)
    assert result.stdout.strip() in ("yes", "no"), result.stderr
    return result.stdout.strip() == "yes"


def _key(name: str, namespace: str) -> dict:
    return {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningKey",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"algorithm": "ECDSA_P256"}}


def _policy(name: str, namespace: str) -> dict:
    return {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"keys": ["release-key"], "requesters": {"users": ["alice"]}, "requiredApprovals": 0}}


@pytest.mark.parametrize("kind", ["signingkeys", "signingpolicies", "certificates"])
@pytest.mark.parametrize("verb", ["create", "update", "patch", "delete"])
def test_requesters_and_approvers_cannot_write_keys_policies_or_certificates(cluster, kind, verb):
    for identity in ("alice", "bob"):
        assert not can_i(cluster, identity, verb, f"{kind}.keyroom.dev", "team-a")


def test_alice_cannot_create_a_key_or_a_policy(cluster, unique):
    for document in (_key(unique("key"), "team-a"), _policy(unique("policy"), "team-a")):
        result = apply(cluster, document, identity="alice")
        assert result.returncode != 0 and "forbidden" in result.stderr.lower(), result.stderr


def test_alice_cannot_change_an_existing_key(cluster, unique):
    name = unique("key")
    assert apply(cluster, _key(name, "team-a")).returncode == 0
    result = kubectl(cluster, "label", "signingkey", name, "-n", "team-a", "owner=alice", identity="alice")
    assert result.returncode != 0 and "forbidden" in result.stderr.lower(), result.stderr


def test_nobody_but_the_operator_writes_status(cluster):
    for kind in ("signingkeys", "signingpolicies", "signrequests"):
        for identity in ("alice", "bob"):
            assert not can_i(cluster, identity, "patch", f"{kind}.keyroom.dev", "team-a", "--subresource=status")
    assert can_i(cluster, "operator", "patch", "signrequests.keyroom.dev", "team-a", "--subresource=status")


def test_alice_reads_and_requests_in_her_team(cluster):
    assert can_i(cluster, "alice", "list", "signingkeys.keyroom.dev", "team-a")
    assert can_i(cluster, "alice", "create", "signrequests.keyroom.dev", "team-a")
    assert not can_i(cluster, "alice", "patch", "signrequests.keyroom.dev", "team-a")
    result = kubectl(cluster, "get", "keyroom", "-n", "team-a", identity="alice")
    assert result.returncode == 0, result.stderr


def test_approvers_may_patch_requests_but_not_create_them(cluster):
    assert can_i(cluster, "bob", "patch", "signrequests.keyroom.dev", "team-a")
    assert not can_i(cluster, "bob", "create", "signrequests.keyroom.dev", "team-a")


@pytest.mark.parametrize("kind", ["signingkeys", "certificates", "signingpolicies", "signrequests"])
def test_dave_can_neither_read_nor_create_anything_in_team_a(cluster, kind):
    for verb in ("get", "list", "watch", "create"):
        assert not can_i(cluster, "dave", verb, f"{kind}.keyroom.dev", "team-a")
    result = kubectl(cluster, "get", kind, "-n", "team-a", identity="dave")
    assert result.returncode != 0 and "forbidden" in result.stderr.lower()


def test_dave_cannot_request_a_signature_in_team_a(cluster, unique):
    request = {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SignRequest",
               "metadata": {"name": unique("sr"), "namespace": "team-a"},
               "spec": {"keyRef": {"name": "release-key"},
                        "requester": {"username": "dave", "groups": ["team-b-devs", "system:authenticated"]},
                        "digests": [{"name": "a", "value": SHA256}]}}
    result = apply(cluster, request, identity="dave")
    assert result.returncode != 0 and "forbidden" in result.stderr.lower(), result.stderr


def test_dave_works_in_team_b(cluster):
    assert can_i(cluster, "dave", "create", "signrequests.keyroom.dev", "team-b")
    assert not can_i(cluster, "dave", "create", "signingkeys.keyroom.dev", "team-b")


def test_the_shipped_roles_are_not_aggregated_into_edit(cluster):
    result = kubectl(cluster, "auth", "can-i", "create", "signingkeys.keyroom.dev", "-n", "team-a",
                     "--as=someone", "--as-group=editors")
    assert result.stdout.strip() == "no"
    roles = kubectl(cluster, "get", "clusterroles", "-l", "app.kubernetes.io/part-of=keyroom", "-o",
                    "jsonpath={.items[*].metadata.labels}")
    assert "aggregate-to" not in roles.stdout

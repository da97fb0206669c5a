"""The API server itself makes SignRequest identities authentic.

Requesters cannot spoof who they are, approvals cannot exist at creation, and
an update may only append the caller's own approval, carrying the caller's
own groups. Everything here goes through a real kube-apiserver with the
shipped ValidatingAdmissionPolicy, as the fixture users.
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import apply, get, kubectl

pytestmark = pytest.mark.integration

NAMESPACE = "team-a"
SHA256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
ALICE = {"username": "alice", "groups": ["team-a-devs", "system:authenticated"]}
BOB_GROUPS = ["team-a-approvers", "system:authenticated"]
CAROL_GROUPS = ["team-a-approvers", "system:authenticated"]


def request(name: str, *, requester: dict = ALICE, approvals: list | None = None) -> dict:
    spec = {"keyRef": {"name": "release-key"}, "requester": requester, "reason": "release 1.4.2",
            "digests": [{"name": "app.exe", "value": SHA256}]}
    if approvals is not None:
        spec["approvals"] = approvals
    return {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SignRequest",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def patch(cluster, name: str, operations: list, *, identity: str):
    return kubectl(cluster, "patch", "signrequest", name, "-n", NAMESPACE, "--type=json",
                   "-p", json.dumps(operations), identity=identity)


def approval(user: str, groups: list, decision: str = "Approve") -> dict:
    return {"user": user, "groups": groups, "decision": decision, "reason": "checked"}


def append(entry: dict, *, first: bool = False) -> list:
    if first:
        return [{"op": "add", "path": "/spec/approvals", "value": [entry]}]
    return [{"op": "add", "path": "/spec/approvals/-", "value": entry}]


@pytest.fixture
def created(cluster, unique) -> str:
    name = unique("sr")
    result = apply(cluster, request(name), identity="alice")
    assert result.returncode == 0, result.stderr
    return name


@pytest.fixture
def approved_by_bob(cluster, created) -> str:
    result = patch(cluster, created, append(approval("bob", BOB_GROUPS), first=True), identity="bob")
    assert result.returncode == 0, result.stderr
    return created


def test_a_requester_creates_a_request_in_their_own_name(cluster, created):
    assert get(cluster, "signrequest", created, namespace=NAMESPACE)["spec"]["requester"]["username"] == "alice"


def test_a_spoofed_requester_is_refused(cluster, unique):
    result = apply(cluster, request(unique("spoof"), requester={"username": "bob", "groups": ALICE["groups"]}),
                   identity="alice")
    assert result.returncode != 0
    assert 'spec.requester.username must be your own username "alice", not "bob"' in result.stderr


def test_claimed_groups_must_be_the_callers_groups(cluster, unique):
    forged = {"username": "alice", "groups": ["team-a-devs", "team-a-approvers", "system:authenticated"]}
    result = apply(cluster, request(unique("groups"), requester=forged), identity="alice")
    assert result.returncode != 0
    assert "spec.requester.groups must be exactly your groups [team-a-devs, system:authenticated]" in result.stderr


def test_approvals_at_creation_are_refused(cluster, unique):
    result = apply(cluster, request(unique("preapproved"), approvals=[approval("alice", ALICE["groups"])]),
                   identity="alice")
    assert result.returncode != 0
    assert "cannot carry approvals when it is created" in result.stderr


def test_a_genuine_approval_by_bob_is_accepted(cluster, approved_by_bob):
    approvals = get(cluster, "signrequest", approved_by_bob, namespace=NAMESPACE)["spec"]["approvals"]
    assert approvals == [approval("bob", BOB_GROUPS)]


def test_an_approval_in_someone_elses_name_is_refused(cluster, approved_by_bob):
    result = patch(cluster, approved_by_bob, append(approval("bob", CAROL_GROUPS)), identity="carol")
    assert result.returncode != 0
    assert 'an approval must be your own: user must be "carol", not "bob"' in result.stderr


def test_an_approval_with_forged_groups_is_refused(cluster, created):
    result = patch(cluster, created, append(approval("carol", ["team-a-approvers", "team-a-admins",
                                                               "system:authenticated"]), first=True),
                   identity="carol")
    assert result.returncode != 0
    assert "an approval must carry exactly your groups" in result.stderr


def test_an_approval_cannot_be_edited(cluster, approved_by_bob):
    result = patch(cluster, approved_by_bob,
                   [{"op": "replace", "path": "/spec/approvals/0/decision", "value": "Deny"}], identity="bob")
    assert result.returncode != 0
    assert "approvals are append-only" in result.stderr


def test_an_approval_cannot_be_removed(cluster, approved_by_bob):
    result = patch(cluster, approved_by_bob, [{"op": "remove", "path": "/spec/approvals/0"}], identity="carol")
    assert result.returncode != 0
    assert "approvals are append-only" in result.stderr


def test_an_approval_cannot_be_replaced_by_the_callers_own(cluster, approved_by_bob):
    result = patch(cluster, approved_by_bob, [{"op": "replace", "path": "/spec/approvals/0",
                                               "value": approval("carol", CAROL_GROUPS)}], identity="carol")
    assert result.returncode != 0
    assert "append-only" in result.stderr


def test_two_approvals_in_one_update_are_refused(cluster, created):
    result = patch(cluster, created, [{"op": "add", "path": "/spec/approvals", "value": [
        approval("carol", CAROL_GROUPS), approval("carol", CAROL_GROUPS)]}], identity="carol")
    assert result.returncode != 0
    assert "append exactly one approval per update" in result.stderr


def test_digests_cannot_change(cluster, approved_by_bob):
    result = patch(cluster, approved_by_bob, [{"op": "replace", "path": "/spec/digests/0/value",
                                               "value": "0" * 64}], identity="carol")
    assert result.returncode != 0
    assert "spec.digests cannot change after creation" in result.stderr


def test_the_reason_cannot_change(cluster, created):
    result = patch(cluster, created, [{"op": "replace", "path": "/spec/reason", "value": "something else"}],
                   identity="bob")
    assert result.returncode != 0
    assert "spec.reason cannot change after creation" in result.stderr


def test_two_approvers_append_in_turn(cluster, approved_by_bob):
    result = patch(cluster, approved_by_bob, append(approval("carol", CAROL_GROUPS, "Deny")), identity="carol")
    assert result.returncode == 0, result.stderr
    approvals = get(cluster, "signrequest", approved_by_bob, namespace=NAMESPACE)["spec"]["approvals"]
    assert [(a["user"], a["decision"]) for a in approvals] == [("bob", "Approve"), ("carol", "Deny")]


def test_metadata_updates_pass_the_policy(cluster, created):
    result = kubectl(cluster, "label", "signrequest", created, "-n", NAMESPACE, "release=1.4.2")
    assert result.returncode == 0, result.stderr


def test_the_operator_identity_may_write_metadata_but_never_spec(cluster, unique):
    """A compromised operator cannot relax a policy to get a pending request signed."""
    name = unique("guarded")
    policy = {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningPolicy",
              "metadata": {"name": name, "namespace": NAMESPACE},
              "spec": {"keys": ["release-key"], "requesters": {"groups": ["team-a-devs"]},
                       "approvers": {"groups": ["team-a-approvers"]}, "requiredApprovals": 2}}
    assert apply(cluster, policy).returncode == 0
    relaxed = kubectl(cluster, "patch", "signingpolicy", name, "-n", NAMESPACE, "--type=merge",
                      "-p", '{"spec": {"requiredApprovals": 0}}', identity="operator")
    assert relaxed.returncode != 0 and "may change status and metadata, never spec" in relaxed.stderr
    annotated = kubectl(cluster, "annotate", "signingpolicy", name, "-n", NAMESPACE, "checked=yes",
                        identity="operator")
    assert annotated.returncode == 0, annotated.stderr
    labelled = kubectl(cluster, "label", "signingpolicy", name, "-n", NAMESPACE, "checked=yes", identity="operator")
    assert labelled.returncode != 0 and "may not change labels" in labelled.stderr
    assert get(cluster, "signingpolicy", name, namespace=NAMESPACE)["spec"]["requiredApprovals"] == 2

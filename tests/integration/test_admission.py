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


# ---------------------------------------------------------------- build attestations

CI_A = "system:serviceaccount:team-a:ci-builder-a"
CI_B = "system:serviceaccount:team-a:ci-builder-b"
SA_GROUPS = ["system:serviceaccounts", "system:serviceaccounts:team-a", "system:authenticated"]
DIGESTS = [{"name": "app.exe", "value": SHA256}]


def attestation(user: str, groups: list = SA_GROUPS, digests: list = DIGESTS) -> dict:
    return {"user": user, "groups": groups, "build": "https://ci.example/run/1", "digests": digests}


def attest(entry: dict, *, first: bool = False) -> list:
    if first:
        return [{"op": "add", "path": "/spec/attestations", "value": [entry]}]
    return [{"op": "add", "path": "/spec/attestations/-", "value": entry}]


@pytest.fixture
def built(cluster, unique) -> str:
    """A request by ci-builder-a (the pipeline that requests), attested by ci-builder-a itself."""
    name = unique("built")
    created = apply(cluster, request(name, requester={"username": CI_A, "groups": SA_GROUPS}), identity="ci-builder-a")
    assert created.returncode == 0, created.stderr
    attested = patch(cluster, name, attest(attestation(CI_A), first=True), identity="ci-builder-a")
    assert attested.returncode == 0, attested.stderr
    return name


def test_builders_attest_in_their_own_name(cluster, built):
    result = patch(cluster, built, attest(attestation(CI_B)), identity="ci-builder-b")
    assert result.returncode == 0, result.stderr
    attestations = get(cluster, "signrequest", built, namespace=NAMESPACE)["spec"]["attestations"]
    assert [a["user"] for a in attestations] == [CI_A, CI_B] and attestations[1]["digests"] == DIGESTS


def test_an_attestation_in_another_builders_name_is_refused(cluster, built):
    result = patch(cluster, built, attest(attestation(CI_B)), identity="ci-builder-a")
    assert result.returncode != 0
    assert f'an attestation must be your own: user must be "{CI_A}", not "{CI_B}"' in result.stderr


def test_an_attestation_with_forged_groups_is_refused(cluster, built):
    result = patch(cluster, built, attest(attestation(CI_B, groups=[*SA_GROUPS, "release-builders"])),
                   identity="ci-builder-b")
    assert result.returncode != 0 and "an attestation must carry exactly your groups" in result.stderr


def test_the_requester_cannot_attest_twice(cluster, built):
    """A second attestation by the requester's pipeline would be a second vote for one build."""
    result = patch(cluster, built, attest(attestation(CI_A)), identity="ci-builder-a")
    assert result.returncode != 0 and "you already attested this request: a builder attests once" in result.stderr


@pytest.mark.parametrize("operation", [
    {"op": "replace", "path": "/spec/attestations/0/digests/0/value", "value": "0" * 64},
    {"op": "replace", "path": "/spec/attestations/0/user", "value": CI_B},
    {"op": "remove", "path": "/spec/attestations/0"},
    {"op": "replace", "path": "/spec/attestations/0", "value": attestation(CI_B)},
], ids=["digests-edited", "builder-renamed", "removed", "replaced"])
def test_an_attestation_cannot_be_edited_or_removed(cluster, built, operation):
    for identity in ("ci-builder-b", "ci-builder-a"):
        result = patch(cluster, built, [operation], identity=identity)
        assert result.returncode != 0
        assert "attestations are append-only: existing entries cannot be removed or edited" in result.stderr
    assert get(cluster, "signrequest", built, namespace=NAMESPACE)["spec"]["attestations"] == [attestation(CI_A)]


def test_attestations_at_creation_are_refused(cluster, unique):
    document = request(unique("preattested"), requester={"username": CI_A, "groups": SA_GROUPS})
    document["spec"]["attestations"] = [attestation(CI_A)]
    result = apply(cluster, document, identity="ci-builder-a")
    assert result.returncode != 0 and "cannot carry build attestations when it is created" in result.stderr


def test_two_attestations_in_one_update_are_refused(cluster, built):
    result = patch(cluster, built, attest(attestation(CI_B)) + attest(attestation(CI_B)), identity="ci-builder-b")
    assert result.returncode != 0 and "append exactly one build attestation per update" in result.stderr


def test_an_approver_cannot_attest_without_the_builder_role(cluster, built):
    """bob may patch SignRequests (to approve), but RBAC grants him no attest verb."""
    entry = attestation("bob", groups=BOB_GROUPS)
    result = patch(cluster, built, attest(entry), identity="bob")
    assert result.returncode != 0
    assert 'only a builder may attest: bob may not "attest" signrequests in team-a' in result.stderr


def test_an_admin_cannot_attest_in_a_builders_name(cluster, built):
    result = patch(cluster, built, attest(attestation(CI_B)), identity="admin")
    assert result.returncode != 0
    assert f'an attestation must be your own: user must be "keyroom-admin", not "{CI_B}"' in result.stderr


def test_the_operator_identity_cannot_attest(cluster, built):
    operator = "system:serviceaccount:keyroom-system:keyroom-operator"
    result = patch(cluster, built, attest(attestation(operator, groups=[
        "system:serviceaccounts", "system:serviceaccounts:keyroom-system", "system:authenticated"])),
        identity="operator")
    # refused twice over: it has no attest verb, and keyroom-operator-writes-no-spec keeps it away from spec
    assert result.returncode != 0 and "forbidden" in result.stderr and (
        'may not "attest"' in result.stderr or "never spec" in result.stderr)
    assert get(cluster, "signrequest", built, namespace=NAMESPACE)["spec"]["attestations"] == [attestation(CI_A)]


def test_an_attested_digest_must_fit_the_requests_algorithm(cluster, built):
    result = patch(cluster, built, attest(attestation(CI_B, digests=[{"name": "app.exe", "value": "ab" * 48}])),
                   identity="ci-builder-b")
    assert result.returncode != 0
    assert "each attested digest must be the hex of a digest of the request's digestAlgorithm" in result.stderr


# ---------------------------------------------------------------- labels and annotations of someone else's request

TTL = "keyroom.dev/ttl-after-finished"


def _metadata_changes(name: str) -> dict[str, list[str]]:
    """Each way to change a request's labels or annotations, as kubectl arguments."""
    return {
        "annotate": ["annotate", "signrequest", name, "-n", NAMESPACE, "--overwrite", f"{TTL}=2h"],
        "label": ["label", "signrequest", name, "-n", NAMESPACE, "--overwrite", "release=forged"],
        "merge patch": ["patch", "signrequest", name, "-n", NAMESPACE, "--type=merge",
                        "-p", json.dumps({"metadata": {"annotations": {TTL: "2h"}, "labels": {"x": "y"}}})],
    }


def test_nobody_but_the_requester_an_admin_or_the_operator_changes_a_requests_metadata(cluster, unique):
    name = unique("sr")
    made = apply(cluster, request(name) | {"metadata": {"name": name, "namespace": NAMESPACE,
                                                        "labels": {"release": "1.4.2"},
                                                        "annotations": {TTL: "30d"}}}, identity="alice")
    assert made.returncode == 0, made.stderr
    before = get(cluster, "signrequest", name, namespace=NAMESPACE)["metadata"]
    # bob (approver) and ci-builder-a (another requester of team-a) hold patch, but not over alice's metadata
    for user in ("bob", "ci-builder-a"):
        for how, args in _metadata_changes(name).items():
            refused = kubectl(cluster, *args, identity=user)
            assert refused.returncode != 0, f"{user} changed alice's request by {how}"
            assert "only the requester (alice)" in refused.stderr, refused.stderr
        removed = kubectl(cluster, "annotate", "signrequest", name, "-n", NAMESPACE, f"{TTL}-", identity=user)
        assert removed.returncode != 0 and "only the requester (alice)" in removed.stderr, removed.stderr
    # an approval that smuggles an annotation along is refused as a whole
    smuggled = patch(cluster, name, [*append(approval("bob", BOB_GROUPS), first=True),
                                     {"op": "add", "path": f"/metadata/annotations/{TTL.replace('/', '~1')}",
                                      "value": "1s"}], identity="bob")
    assert smuggled.returncode != 0 and "only the requester (alice)" in smuggled.stderr, smuggled.stderr
    after = get(cluster, "signrequest", name, namespace=NAMESPACE)
    assert (after["metadata"]["labels"], after["metadata"]["annotations"]) == (before["labels"], before["annotations"])
    assert "approvals" not in after["spec"]
    # bob's plain approval still passes, as kubectl keyroom approve sends it
    approved = patch(cluster, name, append(approval("bob", BOB_GROUPS), first=True), identity="bob")
    assert approved.returncode == 0, approved.stderr
    # alice on her own request, and an admin (who may delete it), may
    for user in ("alice", "admin"):
        for how, args in _metadata_changes(name).items():
            changed = kubectl(cluster, *args, identity=user)
            assert changed.returncode == 0, f"{user} could not change the request by {how}: {changed.stderr}"
    assert get(cluster, "signrequest", name, namespace=NAMESPACE)["metadata"]["annotations"][TTL] == "2h"
    # the operator's own bookkeeping annotations stay writable by its ServiceAccount
    bookkeeping = kubectl(cluster, "annotate", "signrequest", name, "-n", NAMESPACE, "keyroom.dev/progress=x",
                          identity="operator")
    assert bookkeeping.returncode == 0, bookkeeping.stderr


def test_a_requester_cannot_change_another_requesters_metadata(cluster, unique):
    name = unique("built")
    made = apply(cluster, request(name, requester={"username": CI_A, "groups": SA_GROUPS}), identity="ci-builder-a")
    assert made.returncode == 0, made.stderr
    for how, args in _metadata_changes(name).items():
        refused = kubectl(cluster, *args, identity="alice")
        assert refused.returncode != 0 and f"only the requester ({CI_A})" in refused.stderr, how
        assert kubectl(cluster, *args, identity="ci-builder-a").returncode == 0, how

"""A requester tries to approve her own SignRequest.

The attacker is alice: a developer of team-a who creates SignRequests, and
who (a platform mistake, or a small team) is also named an approver by the
policy and given the approver role. She uses her own credentials only, and
every client route there is: the kubectl plugin, JSON and merge patches,
server-side apply, replace; she writes entries in bob's name or with bob's
groups, several at once, edits or removes existing entries, and creates
requests that already carry approvals or name bob as the requester.

The API server's admission policy must refuse every forged entry, and the
entries it accepts (alice's own, authentic ones) must never count under
separation of duties. Either way the request is never signed.
"""
from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
import yaml

from tests.conftest import apply, get, kubectl, wait_for
from tests.security.conftest import (
    NAMESPACE, approve, audit_entries, digest, entries_for, final, identity, make_key, make_policy, make_request,
    request_document, request_status, uid_of, wait_request,
)

pytestmark = pytest.mark.integration

ALICE = identity("alice")
BOB = identity("bob")


def _entry(user: str = "alice", groups: list[str] | None = None, decision: str = "Approve") -> dict:
    return {"user": user, "groups": groups if groups is not None else identity(user)["groups"],
            "decision": decision, "reason": "looks good to me"}


def _approvals(cluster, name: str) -> list[dict]:
    return get(cluster, "signrequest", name, namespace=NAMESPACE)["spec"].get("approvals") or []


def _json_patch(cluster, name: str, ops: list[dict], user: str = "alice"):
    return kubectl(cluster, "patch", "signrequest", name, "-n", NAMESPACE, "--type=json", "-p", json.dumps(ops),
                   identity=user)


def _merge_patch(cluster, name: str, approvals: list[dict], user: str = "alice"):
    return kubectl(cluster, "patch", "signrequest", name, "-n", NAMESPACE, "--type=merge",
                   "-p", json.dumps({"spec": {"approvals": approvals}}), identity=user)


def _server_side_apply(cluster, name: str, approvals: list[dict], user: str = "alice"):
    document = {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SignRequest",
                "metadata": {"name": name, "namespace": NAMESPACE}, "spec": {"approvals": approvals}}
    return kubectl(cluster, "apply", "--server-side", "--force-conflicts", f"--field-manager={user}-approvals",
                   "-f", "-", identity=user, input=yaml.safe_dump(document))


def _replace(cluster, name: str, approvals: list[dict], user: str = "alice"):
    body = get(cluster, "signrequest", name, namespace=NAMESPACE)
    body["spec"]["approvals"] = approvals
    body.pop("status", None)
    return kubectl(cluster, "replace", "-f", "-", identity=user, input=json.dumps(body))


def _plugin(cluster, user: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keyroom.cli", *args, "-n", NAMESPACE,
                           "--kubeconfig", str(cluster.kubeconfig(user))], capture_output=True, text=True, timeout=120)


def _refused(result, *words: str) -> None:
    assert result.returncode != 0, f"accepted: {result.stdout}"
    assert any(word in result.stderr for word in words), result.stderr


def _never_signed(cluster, name: str) -> None:
    status = request_status(cluster, name)
    assert status.get("phase") != "Signed" and not status.get("signatures"), status
    uid = uid_of(cluster, "signrequest", name)
    assert not entries_for(cluster, uid, "Intent") and not entries_for(cluster, uid, "Signed")


@pytest.fixture(scope="module")
def guarded_key(cluster) -> str:
    """A key whose policy needs one approval and names alice among its approvers."""
    unique = lambda prefix: f"{prefix}-{uuid.uuid4().hex[:8]}"  # noqa: E731
    key = make_key(cluster, unique)
    make_policy(cluster, unique, key, requiredApprovals=1,
                approvers={"groups": ["team-a-approvers"], "users": ["alice"]})
    return key


@pytest.fixture(scope="module")
def alice_approves(cluster, guarded_key):
    """alice also holds the approver role in team-a (so RBAC lets her patch requests)."""
    binding = "alice-is-also-an-approver"
    assert kubectl(cluster, "create", "rolebinding", binding, "-n", NAMESPACE, "--clusterrole=keyroom-approver",
                   "--user=alice").returncode == 0
    wait_for(lambda: kubectl(cluster, "auth", "can-i", "patch", "signrequests", "-n", NAMESPACE,
                             identity="alice").stdout.strip() == "yes", what="alice's approver role")
    yield
    kubectl(cluster, "delete", "rolebinding", binding, "-n", NAMESPACE)


def _pending(cluster, unique, key: str) -> str:
    name = make_request(cluster, unique, key)
    wait_request(cluster, name, lambda s: s.get("phase") == "Pending")
    return name


def test_a_plain_requester_cannot_write_approvals_that_count_or_status(cluster, unique, guarded_key):
    """The requester role may patch (kubectl apply needs it): alice appends only her own entry, which never counts."""
    name = _pending(cluster, unique, guarded_key)
    _refused(_json_patch(cluster, name, [{"op": "add", "path": "/spec/approvals", "value": [_entry("bob")]}]),
             "must be your own")
    _refused(_json_patch(cluster, name, [{"op": "add", "path": "/spec/approvals",
                                          "value": [_entry("alice", BOB["groups"])]}]), "exactly your groups")
    status_patch = {"status": {"phase": "Approved", "approvals": [{"user": "bob", "decision": "Approve",
                                                                   "counted": True}]}}
    _refused(kubectl(cluster, "patch", "signrequest", name, "-n", NAMESPACE, "--subresource=status",
                     "--type=merge", "-p", json.dumps(status_patch), identity="alice"), "forbidden")
    assert _approvals(cluster, name) == []
    own = _json_patch(cluster, name, [{"op": "add", "path": "/spec/approvals", "value": [_entry()]}])
    assert own.returncode == 0, own.stderr
    status = wait_request(cluster, name, lambda s: s.get("approvals"), what="alice's entry to be seen")
    assert [(a["user"], a["counted"]) for a in status["approvals"]] == [("alice", False)], status
    assert "own request" in status["approvals"][0]["reason"]
    assert status["phase"] == "Pending" and status["approvalSummary"] == "0/1"
    _never_signed(cluster, name)


def test_alices_own_approvals_by_every_accepted_route_are_never_counted(cluster, unique, guarded_key,
                                                                         alice_approves):
    name = _pending(cluster, unique, guarded_key)
    accepted = _plugin(cluster, "alice", "approve", name, "--reason", "my own release")
    assert accepted.returncode == 0, accepted.stderr
    assert "not counted" in accepted.stdout, accepted.stdout
    assert _json_patch(cluster, name, [{"op": "add", "path": "/spec/approvals/-", "value": _entry()}]).returncode == 0
    assert _merge_patch(cluster, name, [*_approvals(cluster, name), _entry()]).returncode == 0
    applied = _server_side_apply(cluster, name, [*_approvals(cluster, name), _entry()])
    assert applied.returncode == 0, applied.stderr
    replaced = _replace(cluster, name, [*_approvals(cluster, name), _entry()])
    assert replaced.returncode == 0, replaced.stderr

    assert [a["user"] for a in _approvals(cluster, name)] == ["alice"] * 5
    status = wait_request(cluster, name, lambda s: any(a["user"] == "alice" for a in s.get("approvals") or []),
                          what="the operator to count alice's entries")
    assert all(a["counted"] is False and "own request" in a["reason"] for a in status["approvals"]), status
    assert status["phase"] == "Pending" and status["approvalSummary"] == "0/1"
    _never_signed(cluster, name)


def test_forged_approval_entries_are_refused_at_admission(cluster, unique, guarded_key, alice_approves):
    name = _pending(cluster, unique, guarded_key)
    not_own = ("must be your own", "exactly your groups", "exactly one", "append-only")
    append = lambda entry: _json_patch(cluster, name, [{"op": "add", "path": "/spec/approvals",  # noqa: E731
                                                        "value": [entry]}])
    _refused(append(_entry("bob")), "must be your own")                                # in bob's name
    _refused(append(_entry("alice", BOB["groups"])), "exactly your groups")            # with bob's groups
    _refused(append(_entry("alice", [*ALICE["groups"], "team-a-approvers"])), "exactly your groups")
    _refused(append(_entry("alice", [*ALICE["groups"], "system:masters"])), "exactly your groups")
    _refused(append(_entry("bob ", ALICE["groups"])), "must be your own")
    _refused(_json_patch(cluster, name, [{"op": "add", "path": "/spec/approvals",        # two at once
                                          "value": [_entry(), _entry("bob")]}]), *not_own)
    _refused(_json_patch(cluster, name, [{"op": "add", "path": "/spec/approvals",
                                          "value": [_entry(), _entry()]}]), "exactly one")
    _refused(_merge_patch(cluster, name, [_entry("bob")]), *not_own)
    _refused(_server_side_apply(cluster, name, [_entry("bob")]), *not_own)
    _refused(_replace(cluster, name, [_entry("carol")]), *not_own)
    assert _approvals(cluster, name) == []

    # an existing entry (alice's own, accepted) cannot be edited into someone else's
    assert _json_patch(cluster, name, [{"op": "add", "path": "/spec/approvals", "value": [_entry()]}]).returncode == 0
    _refused(_json_patch(cluster, name, [{"op": "replace", "path": "/spec/approvals/0/user", "value": "bob"}]),
             *not_own)
    _refused(_json_patch(cluster, name, [{"op": "replace", "path": "/spec/approvals/0/groups",
                                          "value": BOB["groups"]}]), *not_own)
    _refused(_merge_patch(cluster, name, [_entry("bob")]), *not_own)
    assert [a["user"] for a in _approvals(cluster, name)] == ["alice"]
    status = wait_request(cluster, name, lambda s: s.get("approvals"), what="alice's entry to be seen")
    assert status["approvals"][0]["counted"] is False and status["phase"] == "Pending"
    _never_signed(cluster, name)


def test_carols_deny_cannot_be_removed_or_turned_into_an_approval(cluster, unique, guarded_key, alice_approves):
    name = _pending(cluster, unique, guarded_key)
    assert approve(cluster, name, "carol", "Deny").returncode == 0
    denied = _approvals(cluster, name)
    append_only = ("append-only", "exactly one", "must be your own")
    _refused(_json_patch(cluster, name, [{"op": "remove", "path": "/spec/approvals/0"}]), *append_only)
    _refused(_json_patch(cluster, name, [{"op": "remove", "path": "/spec/approvals"}]), *append_only)
    _refused(_json_patch(cluster, name, [{"op": "replace", "path": "/spec/approvals/0/decision",
                                          "value": "Approve"}]), *append_only)
    _refused(_merge_patch(cluster, name, []), *append_only)
    _refused(_merge_patch(cluster, name, [{**denied[0], "decision": "Approve"}]), *append_only)
    _refused(_merge_patch(cluster, name, [_entry()]), *append_only)          # swap carol's deny for alice's
    _refused(_server_side_apply(cluster, name, [_entry()]), *append_only)
    _refused(_replace(cluster, name, []), *append_only)
    assert _approvals(cluster, name) == denied
    # alice may add her own approval after the deny; it neither counts nor lifts the deny
    assert _json_patch(cluster, name, [{"op": "add", "path": "/spec/approvals/-", "value": _entry()}]).returncode == 0
    status = final(cluster, name)
    assert status["phase"] == "Denied" and "denied by carol" in status["message"], status
    _never_signed(cluster, name)


@pytest.mark.parametrize("case", ["approved by bob", "approved by herself", "requester bob",
                                  "requester with the approvers' group", "requester without groups"])
def test_a_request_cannot_be_created_approved_or_in_someone_elses_name(cluster, unique, guarded_key, case):
    name = unique("sr")
    document = request_document(name, guarded_key, {"a.bin": digest(name)})
    spec = document["spec"]
    if case == "approved by bob":
        spec["approvals"], words = [_entry("bob")], ("cannot carry approvals",)
    elif case == "approved by herself":
        spec["approvals"], words = [_entry()], ("cannot carry approvals",)
    elif case == "requester bob":
        spec["requester"], words = BOB, ("must be your own username",)
    elif case == "requester with the approvers' group":
        spec["requester"] = {"username": "alice", "groups": [*ALICE["groups"], "team-a-approvers"]}
        words = ("exactly your groups",)
    else:
        spec["requester"], words = {"username": "alice", "groups": []}, ("exactly your groups",)
    _refused(apply(cluster, document, identity="alice"), *words)
    assert kubectl(cluster, "get", "signrequest", name, "-n", NAMESPACE).returncode != 0  # nothing was created
    assert not [e for e in audit_entries(cluster) if (e.get("request") or {}).get("name") == name]

"""Access resolution (keyroom.cli.access) without a cluster: policies joined with RBAC bindings, and whether an
approver's approval could still count for a pending request."""
from __future__ import annotations

import datetime

from keyroom.cli.access import Subject, approval_prospect, bound_roles, granting_roles, resolve
from keyroom.policy import Identity

NOW = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=datetime.timezone.utc)


def key(name="release", labels=None, **spec):
    return {"metadata": {"namespace": "team-a", "name": name, "labels": labels or {}},
            "spec": {"algorithm": "ECDSA_P256", **spec}, "status": {"phase": "Active", "currentVersion": 2}}


def policy(name, **spec):
    return {"metadata": {"namespace": "team-a", "name": name}, "spec": {"keys": ["release"], **spec}}


def binding(name, role, *subjects, namespace="team-a", kind="ClusterRole"):
    return {"metadata": {"namespace": namespace, "name": name}, "roleRef": {"kind": kind, "name": role},
            "subjects": [{"kind": k, "name": n, **({"namespace": namespace} if k == "ServiceAccount" else {})}
                         for k, n in subjects]}


TEAM_A_BINDINGS = [binding("devs", "keyroom-requester", ("Group", "team-a-devs")),
                   binding("approvers", "keyroom-approver", ("Group", "team-a-approvers")),
                   binding("ci", "keyroom-builder", ("ServiceAccount", "ci-builder-b"))]


def test_a_well_configured_key_has_no_problems_and_says_who_binds_whom():
    resolved = resolve(key=key(), policies=[policy("release", requesters={"groups": ["team-a-devs"]},
                                                   approvers={"groups": ["team-a-approvers"]}, requiredApprovals=2)],
                       role_bindings=TEAM_A_BINDINGS, cluster_role_bindings=[], at=NOW)
    assert resolved["problems"] == [] and resolved["requiredApprovals"] == 2 and resolved["rbacChecked"]
    assert resolved["requesters"] == [{"kind": "Group", "name": "team-a-devs", "policies": ["release"],
                                       "boundBy": ["RoleBinding team-a/devs"], "rbac": True}]
    assert resolved["approvers"][0]["boundBy"] == ["RoleBinding team-a/approvers"]
    assert resolved["availability"]["online"] is True


def test_an_approver_group_without_a_binding_is_a_problem():
    resolved = resolve(key=key(), policies=[policy("release", requesters={"groups": ["team-a-devs"]},
                                                   approvers={"groups": ["team-a-reviewers"]})],
                       role_bindings=TEAM_A_BINDINGS, cluster_role_bindings=[], at=NOW)
    assert resolved["approvers"][0]["rbac"] is False
    assert any("Group team-a-reviewers is an approver in release but has no binding to keyroom-approver in "
               "team-a" in p for p in resolved["problems"])
    # the group bound to keyroom-approver that this key's policy does not name is reported too
    assert any("Group team-a-approvers is bound to keyroom-approver in team-a but no policy of release names it"
               in n for n in resolved["notes"])


def test_bindings_elsewhere_or_to_other_roles_do_not_count_but_cluster_wide_ones_do():
    subject = Subject("Group", "team-a-approvers")
    other_namespace = binding("x", "keyroom-approver", ("Group", "team-a-approvers"), namespace="team-b")
    a_role = binding("y", "keyroom-approver", ("Group", "team-a-approvers"), kind="Role")
    assert bound_roles(subject, namespace="team-a", role_bindings=[other_namespace, a_role],
                       cluster_role_bindings=[]) == {}
    cluster_wide = {"metadata": {"name": "all"}, "roleRef": {"kind": "ClusterRole", "name": "keyroom-admin"},
                    "subjects": [{"kind": "Group", "name": "system:authenticated"}]}
    assert bound_roles(Subject("User", "alice"), namespace="team-a", role_bindings=[],
                       cluster_role_bindings=[cluster_wide]) == {"keyroom-admin": "ClusterRoleBinding all"}
    account = Subject("ServiceAccount", "ci-builder-b", "team-a")
    assert bound_roles(account, namespace="team-a", role_bindings=TEAM_A_BINDINGS, cluster_role_bindings=[]) == {
        "keyroom-builder": "RoleBinding team-a/ci"}
    assert bound_roles(Subject("ServiceAccount", "ci-builder-b", "team-b"), namespace="team-a",
                       role_bindings=TEAM_A_BINDINGS, cluster_role_bindings=[]) == {}


def test_policy_problems_no_policy_quorum_and_every_policy_must_name_the_requester():
    assert "no SigningPolicy in team-a selects release" in resolve(
        key=key(), policies=[], role_bindings=[], cluster_role_bindings=[], at=NOW)["problems"][0]
    resolved = resolve(key=key(), policies=[
        policy("a", requesters={"users": ["alice"]}, approvers={"users": ["bob"]}, requiredApprovals=2),
        policy("b", requesters={"users": ["carol"]}, approvers={}, requiredApprovals=1)],
        role_bindings=None, cluster_role_bindings=None, at=NOW)
    problems = "\n".join(resolved["problems"])
    assert "policy a requires 2 approvals but names only 1 approver user(s)" in problems
    assert "policy b requires 1 approval(s) but names no approver" in problems
    assert "User alice is a requester in a but not in b" in problems
    assert "rbac" not in resolved["requesters"][0]  # not readable: unknown, not missing
    assert not resolved["rbacChecked"] and "not checked" in resolved["notes"][0]


def test_an_offline_key_without_a_window_ahead_is_a_problem():
    offline = key(offline={"enabled": True, "windows": [{"start": "2026-01-01T00:00:00Z",
                                                          "end": "2026-01-02T00:00:00Z"}]})
    resolved = resolve(key=offline, policies=[policy("p", requesters={"users": ["a"]}, approvers={"users": ["b"]})],
                       role_bindings=None, cluster_role_bindings=None, at=NOW)
    assert resolved["availability"]["online"] is False and resolved["availability"]["nextWindowAt"] is None
    assert any("offline and no window lies ahead" in p for p in resolved["problems"])


def request(approvals=(), phase="Pending", requester="alice"):
    return {"metadata": {"namespace": "team-a", "name": "r1"},
            "spec": {"keyRef": {"name": "release"}, "requester": {"username": requester, "groups": ["team-a-devs"]},
                     "digests": [{"name": "a", "value": "ab" * 32}], "approvals": list(approvals)},
            "status": {"phase": phase}}


BOB = Identity("bob", ("team-a-approvers",))
POLICY = policy("release", requesters={"groups": ["team-a-devs"]}, approvers={"groups": ["team-a-approvers"]},
                requiredApprovals=2)


def test_an_approval_could_count_only_while_it_is_still_needed_and_allowed():
    assert approval_prospect(request(), policies=[POLICY], key_labels={}, identity=BOB) == (
        True, "counts for release: 0/2")
    carol = {"user": "carol", "groups": ["team-a-approvers"], "decision": "Approve"}
    assert approval_prospect(request([carol]), policies=[POLICY], key_labels={}, identity=BOB)[1] == \
        "counts for release: 1/2"
    assert approval_prospect(request([{**carol, "user": "bob"}]), policies=[POLICY], key_labels={},
                             identity=BOB) == (False, "you already decided")
    assert approval_prospect(request(phase="Approved"), policies=[POLICY], key_labels={}, identity=BOB) == (
        False, "it is Approved")
    assert approval_prospect(request(), policies=[POLICY], key_labels={},
                             identity=Identity("dave", ("team-b-devs",))) == (False, "you are no approver in release")
    assert approval_prospect(request(requester="bob"), policies=[POLICY], key_labels={}, identity=BOB) == (
        False, "you requested it (separation of duties)")
    assert approval_prospect(request([{**carol, "decision": "Deny"}]), policies=[POLICY], key_labels={},
                             identity=BOB) == (False, "denied by carol")
    assert approval_prospect(request(), policies=[], key_labels={}, identity=BOB) == (
        False, "no policy selects its key")
    one = policy("release", approvers={"groups": ["team-a-approvers"]}, requiredApprovals=1)
    assert approval_prospect(request([carol]), policies=[one], key_labels={}, identity=BOB) == (
        False, "release has its 1 approval(s)")


def test_which_roles_let_each_part_act_is_read_from_their_rules():
    def role(name, *rules):
        return {"metadata": {"name": name}, "rules": list(rules)}
    roles = granting_roles([
        role("keyroom-requester", {"apiGroups": ["keyroom.dev"], "resources": ["signrequests"],
                                   "verbs": ["create", "patch"]}),
        role("release-reviewers", {"apiGroups": ["keyroom.dev"], "resources": ["*"], "verbs": ["patch"]}),
        role("one-request", {"apiGroups": ["keyroom.dev"], "resources": ["signrequests"], "verbs": ["*"],
                             "resourceNames": ["r1"]}),
        role("viewer", {"apiGroups": ["keyroom.dev"], "resources": ["signrequests"], "verbs": ["get"]}),
        role("cluster-admin", {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]})])
    assert roles == {"requester": ("keyroom-requester", "cluster-admin"),
                     "approver": ("keyroom-requester", "release-reviewers", "cluster-admin"),
                     "builder": ("cluster-admin",)}
    resolved = resolve(key=key(), policies=[policy("release", approvers={"groups": ["reviewers"]})],
                       role_bindings=[binding("r", "release-reviewers", ("Group", "reviewers"))],
                       cluster_role_bindings=[], at=NOW, roles=roles)
    assert resolved["approvers"][0]["boundBy"] == ["RoleBinding team-a/r"] and resolved["problems"] == []

"""Who may request, whose approval counts, and what a request may ask for."""
from __future__ import annotations

import pytest

from keyroom.policy import Identity, count_approvals, request_problems, requester_allowed

POLICY = {
    "requesters": {"users": ["erin"], "groups": ["team-a-devs"], "serviceAccounts": ["ci"]},
    "approvers": {"users": ["frank"], "groups": ["team-a-approvers"]},
    "requiredApprovals": 2,
}
ALICE = Identity("alice", ("team-a-devs", "system:authenticated"))


def approval(user, groups=("team-a-approvers",), decision="Approve"):
    return {"user": user, "groups": list(groups), "decision": decision}


@pytest.mark.parametrize("identity,allowed", [
    (ALICE, True),
    (Identity("erin"), True),
    (Identity("system:serviceaccount:team-a:ci", ("system:serviceaccounts",)), True),
    (Identity("system:serviceaccount:team-b:ci", ("system:serviceaccounts",)), False),  # another room's account
    (Identity("dave", ("team-b-devs",)), False),
    (Identity("bob", ("team-a-approvers",)), False),
])
def test_requester_allowed(identity, allowed):
    assert requester_allowed(POLICY, identity, namespace="team-a") is allowed


def test_two_distinct_approvers_approve():
    tally = count_approvals(POLICY, requester=ALICE, approvals=[approval("bob"), approval("carol")])
    assert tally.approved and tally.approved_by == ("bob", "carol") and tally.missing == 0


def test_one_approver_twice_counts_once():
    tally = count_approvals(POLICY, requester=ALICE, approvals=[approval("bob"), approval("bob")])
    assert not tally.approved and tally.missing == 1


def test_the_requester_never_counts_with_separation_of_duties():
    requester = Identity("bob", ("team-a-approvers", "team-a-devs"))
    tally = count_approvals(POLICY, requester=requester, approvals=[approval("bob"), approval("carol")])
    assert tally.approved_by == ("carol",) and not tally.approved
    assert tally.ignored == (("bob", "a requester cannot approve or deny their own request"),)


def test_without_separation_of_duties_the_requester_may_count():
    policy = dict(POLICY, separationOfDuties=False)
    requester = Identity("bob", ("team-a-approvers",))
    assert count_approvals(policy, requester=requester, approvals=[approval("bob"), approval("carol")]).approved


def test_one_eligible_deny_denies_even_with_enough_approvals():
    tally = count_approvals(POLICY, requester=ALICE, approvals=[
        approval("bob"), approval("carol"), approval("frank", (), "Deny")])
    assert tally.denied and not tally.approved and tally.denied_by == ("frank",)


def test_an_ineligible_entry_is_ignored_and_reported():
    tally = count_approvals(POLICY, requester=ALICE, approvals=[
        approval("dave", ("team-b-devs",), "Deny"), approval("bob")])
    assert not tally.denied and tally.approved_by == ("bob",)
    assert tally.ignored == (("dave", "not an approver in the policy"),)


def test_zero_required_approvals_is_approved_at_once():
    assert count_approvals(dict(POLICY, requiredApprovals=0), requester=ALICE, approvals=[]).approved


REQUEST = {"requester": {"username": "alice", "groups": ["team-a-devs"]}, "digestAlgorithm": "SHA256",
           "format": "raw", "digests": [{"name": "a", "value": "00" * 32}]}


def test_a_fitting_request_has_no_problems():
    assert request_problems(POLICY, REQUEST, namespace="team-a") == []


def test_request_problems_name_each_violation():
    policy = dict(POLICY, allowedDigestAlgorithms=["SHA512"], allowedFormats=["cms"], maxDigestsPerRequest=1)
    request = dict(REQUEST, requester={"username": "dave", "groups": ["team-b-devs"]},
                   digests=REQUEST["digests"] * 2)
    problems = request_problems(policy, request, namespace="team-a")
    assert problems == ["dave is not a requester in the policy", "digest algorithm SHA256 is not allowed",
                        "format raw is not allowed", "2 digests exceed the policy's maxDigestsPerRequest of 1"]

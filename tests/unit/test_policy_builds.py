"""Matching builds: which build attestations count, which block a request, and how decide() combines them."""
from __future__ import annotations

import datetime

import pytest

from keyroom import policy
from keyroom.policy import BuildTally, Identity, Mismatch, builder_eligible, count_builds, first_difference
from keyroom.schedule import format_time
from tests.unit.test_signer_authentication import surviving

T0 = datetime.datetime(2026, 11, 26, 12, 0, tzinfo=datetime.timezone.utc)
NS = "team-a"
CI_A = "system:serviceaccount:team-a:ci-builder-a"
CI_B = "system:serviceaccount:team-a:ci-builder-b"
CI_C = "system:serviceaccount:team-a:ci-builder-c"
SA_GROUPS = ["system:serviceaccounts", "system:serviceaccounts:team-a", "system:authenticated"]
DIGESTS = [{"name": "app.exe", "value": "ab" * 32}, {"name": "lib.dll", "value": "cd" * 32}]
BUILDERS = {"serviceAccounts": ["ci-builder-a", "ci-builder-b", "ci-builder-c"], "users": ["erin"],
            "groups": ["release-builders"]}
POLICY = {"requesters": {"groups": ["team-a-devs"], "serviceAccounts": ["ci-builder-a"]},
          "matchingBuilds": {"required": 2, "builders": BUILDERS}}


def attestation(user, digests=DIGESTS, groups=SA_GROUPS, build=None):
    entry = {"user": user, "groups": list(groups), "digests": [dict(d) for d in digests]}
    if build:
        entry["build"] = build
    return entry


def changed(name, value="ee" * 32, digests=DIGESTS):
    return [dict(d, value=value) if d["name"] == name else dict(d) for d in digests]


def count(*attestations, policy_spec=POLICY, digests=DIGESTS):
    return count_builds(policy_spec, digests=digests, attestations=attestations, namespace=NS)


# ---------------------------------------------------------------- who is a builder

@pytest.mark.parametrize("identity,eligible", [
    (Identity(CI_A, tuple(SA_GROUPS)), True),
    (Identity("erin"), True),
    (Identity("frank", ("release-builders",)), True),
    (Identity("system:serviceaccount:team-b:ci-builder-a", ("system:serviceaccounts",)), False),  # another room
    (Identity("alice", ("team-a-devs",)), False),
    (Identity("system:serviceaccount:team-a:ci-builder-d", tuple(SA_GROUPS)), False),
])
def test_builder_eligible(identity, eligible):
    assert builder_eligible(POLICY, identity, namespace=NS) is eligible


def test_a_policy_without_matching_builds_has_no_builders_and_counts_nothing():
    plain = {"requesters": {"groups": ["team-a-devs"]}}
    assert not builder_eligible(plain, Identity(CI_A, tuple(SA_GROUPS)), namespace=NS)
    assert count(attestation(CI_A), policy_spec=plain) is None


# ---------------------------------------------------------------- comparing digests

def test_equal_lists_do_not_differ_whatever_the_order_or_hex_case():
    assert first_difference(DIGESTS, list(reversed([dict(d, value=d["value"].upper()) for d in DIGESTS]))) is None


def test_the_first_differing_file_is_named_in_the_requests_order():
    both = changed("lib.dll", digests=changed("app.exe"))
    file, detail = first_difference(DIGESTS, both)
    assert file == "app.exe" and detail == f"its digest {'ee' * 6}... is not the request's {'ab' * 6}..."
    assert first_difference(DIGESTS, changed("lib.dll"))[0] == "lib.dll"


def test_a_file_left_out_or_added_differs():
    assert first_difference(DIGESTS, DIGESTS[:1]) == ("lib.dll", "the builder attested no digest for it")
    extra = [*DIGESTS, {"name": "evil.so", "value": "00" * 32}]
    assert first_difference(DIGESTS, extra) == ("evil.so", "the builder attested it, but the request does not carry it")


# ---------------------------------------------------------------- counting

def test_two_independent_builders_that_agree_match():
    tally = count(attestation(CI_A), attestation(CI_B, build="https://ci.example/run/7"))
    assert tally == BuildTally(matched_by=(CI_A, CI_B), mismatched=(), ignored=(), required=2)
    assert tally.matched and tally.missing == 0 and not tally.blocked


def test_one_builder_is_not_enough_for_two():
    tally = count(attestation(CI_A))
    assert not tally.matched and tally.missing == 1


def test_a_builder_attesting_twice_counts_once():
    """The requester's own build (or anyone's) counts at most once, however often it is attested."""
    tally = count(attestation(CI_A), attestation(CI_A), attestation(CI_A, groups=["release-builders"]))
    assert tally.matched_by == (CI_A,) and not tally.matched and tally.missing == 1


def test_one_eligible_builder_that_differs_blocks_the_request_whatever_the_others_say():
    tally = count(attestation(CI_A), attestation(CI_B), attestation(CI_C, changed("lib.dll")))
    assert tally.blocked and not tally.matched
    assert tally.mismatched == (Mismatch(CI_C, "lib.dll", f"its digest {'ee' * 6}... is not the request's "
                                                          f"{'cd' * 6}..."),)
    assert tally.mismatched[0].message.startswith(f"{CI_C}'s build differs at lib.dll: ")


def test_an_ineligible_attestation_is_ignored_and_blocks_nothing():
    stranger = "system:serviceaccount:team-a:somebody"
    tally = count(attestation(stranger, changed("app.exe")), attestation("alice", groups=["team-a-devs"]),
                  attestation(CI_A), attestation(CI_B))
    assert tally.matched and not tally.blocked
    assert tally.ignored == ((stranger, "not a builder in the policy"), ("alice", "not a builder in the policy"))


def test_required_defaults_to_two_and_may_be_raised():
    default = {"matchingBuilds": {"builders": BUILDERS}}
    assert count(attestation(CI_A), attestation(CI_B), policy_spec=default).matched
    three = {"matchingBuilds": {"required": 3, "builders": BUILDERS}}
    assert count(attestation(CI_A), attestation(CI_B), policy_spec=three).missing == 1
    assert count(attestation(CI_A), attestation(CI_B), attestation("erin", groups=[]), policy_spec=three).matched


def check_build_tally() -> None:
    """Each property of BuildTally at its edges (the mutation check below runs this against mutants)."""
    mismatch = Mismatch("x", "f", "d")
    assert not BuildTally((), (), (), 1).blocked and BuildTally((), (mismatch,), (), 1).blocked
    assert BuildTally(("a", "b"), (), (), 2).matched and not BuildTally(("a",), (), (), 2).matched
    assert not BuildTally(("a", "b"), (mismatch,), (), 2).matched
    assert BuildTally(("a", "b", "c"), (), (), 2).matched and BuildTally((), (), (), 0).matched
    assert BuildTally(("a",), (), (), 3).missing == 2 and BuildTally(("a", "b", "c"), (), (), 2).missing == 0
    assert BuildTally(("a", "b"), (), (), 2).missing == 0


def test_the_build_tally_properties():
    check_build_tally()


@pytest.mark.parametrize("name", ["blocked", "matched", "missing"])
def test_every_mutant_of_a_build_tally_property_is_caught(name):
    function = getattr(BuildTally, name).fget
    assert surviving(function, lambda patch, mutant: patch.setattr(BuildTally, name, mutant), check_build_tally) == []


# ---------------------------------------------------------------- one decision: approvals and builds together

REQUESTER = {"username": CI_A, "groups": SA_GROUPS}


def request(*attestations, approvals=(), digests=DIGESTS):
    return {"metadata": {"name": "sr-1", "namespace": NS, "uid": "u-1", "creationTimestamp": format_time(T0)},
            "spec": {"keyRef": {"name": "release"}, "requester": REQUESTER, "digestAlgorithm": "SHA256",
                     "digests": [dict(d) for d in digests], "attestations": list(attestations),
                     "approvals": [{"user": u, "groups": ["team-a-approvers"], "decision": d} for u, d in approvals]}}


KEY = {"metadata": {"name": "release", "labels": {"tier": "release"}}, "spec": {"algorithm": "ECDSA_P256"}}


def pol(name="release", required_approvals=0, **spec):
    return {"metadata": {"name": name},
            "spec": {"keys": ["release"], "requesters": POLICY["requesters"],
                     "approvers": {"groups": ["team-a-approvers"]}, "requiredApprovals": required_approvals,
                     "matchingBuilds": {"required": 2, "builders": BUILDERS}, **spec}}


def decide(req, policies=None):
    return policy.decide(req, key=KEY, key_state=policy.KeyState(current_version=1),
                         policies=[pol()] if policies is None else policies, at=T0 + datetime.timedelta(minutes=1))


def test_matching_builds_alone_approve_when_no_human_approval_is_asked():
    decision = decide(request(attestation(CI_A), attestation(CI_B, build="run 7")))
    assert (decision.phase, decision.approved, decision.build_summary) == ("Approved", True, "2/2")
    assert decision.builds == ({"user": CI_A, "counted": True}, {"user": CI_B, "counted": True, "build": "run 7"})


def test_without_enough_builds_the_request_waits_and_says_for_whom():
    decision = decide(request(attestation(CI_A)))
    assert (decision.phase, decision.reason, decision.approved, decision.build_summary) == (
        "Pending", "AwaitingBuilds", False, "1/2")
    assert decision.message == ("needs 1 more matching build from group release-builders or erin or serviceaccount "
                                "ci-builder-b or serviceaccount ci-builder-c (policy release)")


def test_the_requester_attesting_twice_does_not_make_two_builds():
    decision = decide(request(attestation(CI_A), attestation(CI_A)))
    assert decision.phase == "Pending" and decision.build_summary == "1/2"


def test_approvals_and_matching_builds_are_both_required_where_both_are_configured():
    both = [pol(required_approvals=1)]
    builds_only = decide(request(attestation(CI_A), attestation(CI_B)), both)
    assert (builds_only.phase, builds_only.reason) == ("Pending", "AwaitingApproval")
    assert builds_only.message.startswith("needs 1 more approval from team-a-approvers (policy release)")
    approval_only = decide(request(attestation(CI_A), approvals=[("bob", "Approve")]), both)
    assert (approval_only.phase, approval_only.reason) == ("Pending", "AwaitingBuilds")
    neither = decide(request(approvals=()), both)
    assert neither.reason == "AwaitingApproval" and "; needs 2 more matching builds from" in neither.message
    assert decide(request(attestation(CI_A), attestation(CI_B), approvals=[("bob", "Approve")]), both).phase == \
        "Approved"


def test_a_mismatching_build_fails_the_request_naming_the_builder_and_the_file():
    decision = decide(request(attestation(CI_A), attestation(CI_B, changed("lib.dll"))))
    assert (decision.phase, decision.reason, decision.approved) == ("Failed", "BuildMismatch", False)
    assert decision.message.startswith(f"{CI_B}'s build differs at lib.dll: its digest ")
    [counted_a, blocked_b] = decision.builds
    assert counted_a == {"user": CI_A, "counted": True}
    assert blocked_b["counted"] is False and blocked_b["reason"].startswith(f"{CI_B}'s build differs at lib.dll")


def test_every_policy_that_selects_the_key_must_see_its_builds():
    strict = pol(name="strict", matchingBuilds={"required": 3, "builders": BUILDERS})
    decision = decide(request(attestation(CI_A), attestation(CI_B)), [pol(), strict])
    assert decision.phase == "Pending" and "(policy strict)" in decision.message and decision.build_summary == "2/3"
    plain = pol(name="plain")
    del plain["spec"]["matchingBuilds"]
    assert decide(request(), [plain]).phase == "Approved"  # no policy asks for builds: none are needed


def test_attestations_no_policy_asks_for_are_shown_as_not_counted():
    plain = pol(name="plain")
    del plain["spec"]["matchingBuilds"]
    decision = decide(request(attestation(CI_A)), [plain])
    assert decision.phase == "Approved" and decision.build_summary == ""
    assert decision.builds == ({"user": CI_A, "counted": False,
                                "reason": "no policy of the key asks for matching builds"},)


def test_an_ineligible_builder_is_reported_and_a_denial_still_wins():
    stranger = "system:serviceaccount:team-a:somebody"
    decision = decide(request(attestation(stranger, changed("app.exe")), attestation(CI_A)))
    assert decision.phase == "Pending" and decision.builds[0] == {
        "user": stranger, "counted": False, "reason": "not a builder in the policy"}
    denied = decide(request(attestation(CI_A), attestation(CI_B, changed("app.exe")), approvals=[("bob", "Deny")]),
                    [pol(required_approvals=1)])
    assert denied.phase == "Denied"

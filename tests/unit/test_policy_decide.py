"""One decision for one SignRequest: its key, every policy that selects the key, and the clock."""
from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings, strategies as st

from keyroom import policy
from keyroom.schedule import format_time

T0 = datetime.datetime(2026, 11, 26, 12, 0, tzinfo=datetime.timezone.utc)
ALICE = {"username": "alice", "groups": ["team-a-devs", "system:authenticated"]}
GROUPS = {"alice": ["team-a-devs"], "bob": ["team-a-approvers"], "carol": ["team-a-approvers"],
          "frank": ["team-a-approvers", "team-a-devs"], "dave": ["team-b-devs"]}


def request(*approvals, digests=1, name="sr-1", **spec):
    return {"metadata": {"name": name, "namespace": "team-a", "creationTimestamp": format_time(T0)},
            "spec": {"keyRef": {"name": "release"}, "requester": ALICE, "digestAlgorithm": "SHA256",
                     "digests": [{"name": f"f{i}", "value": "ab" * 32} for i in range(digests)],
                     "approvals": [{"user": u, "groups": GROUPS[u], "decision": d} for u, d in approvals], **spec}}


def key(name="release", labels=None, offline=None, consumed=None, usage="Reusable", phase="Active"):
    return {"metadata": {"name": name, "labels": labels or {"tier": "release"}},
            "spec": {"algorithm": "ECDSA_P256", "usage": usage, **({"offline": offline} if offline else {})},
            "status": {"phase": phase, "versions": [{"version": 2, "state": "Enabled"}, {"version": 1, "state": "Disabled"}],
                       **({"consumedBy": consumed} if consumed else {})}}


def pol(name="release", required=2, **spec):
    return {"metadata": {"name": name},
            "spec": {"keySelector": {"matchLabels": {"tier": "release"}}, "requesters": {"groups": ["team-a-devs"]},
                     "approvers": {"groups": ["team-a-approvers"]}, "requiredApprovals": required, **spec}}


def decide(req, *, k=None, policies=None, at=T0 + datetime.timedelta(minutes=1), **kwargs):
    k = key() if k is None else k
    kwargs.setdefault("key_state", policy.KeyState.from_status(k["status"]))
    return policy.decide(req, key=k, policies=[pol()] if policies is None else policies, at=at, **kwargs)


def test_two_distinct_approvers_approve_and_the_current_version_signs():
    decision = decide(request(("bob", "Approve"), ("carol", "Approve")))
    assert (decision.phase, decision.key_version, decision.summary) == ("Approved", 2, "2/2")


def test_the_requesters_own_approval_never_counts():
    decision = decide(request(("alice", "Approve"), ("bob", "Approve")),
                      policies=[pol(approvers={"users": ["alice"], "groups": ["team-a-approvers"]})])
    assert decision.phase == "Pending" and decision.reason == "AwaitingApproval" and decision.summary == "1/2"
    assert decision.message.startswith("needs 1 more approval from team-a-approvers (policy")  # not alice
    alice = next(a for a in decision.approvals if a["user"] == "alice")
    assert alice["counted"] is False and "own request" in alice["reason"]


def test_one_eligible_deny_denies_and_an_ineligible_one_is_ignored():
    assert decide(request(("bob", "Approve"), ("carol", "Deny"))).phase == "Denied"
    decision = decide(request(("dave", "Deny"), ("bob", "Approve"), ("carol", "Approve")))
    assert decision.phase == "Approved"
    assert next(a for a in decision.approvals if a["user"] == "dave")["counted"] is False


def test_every_selecting_policy_must_pass():
    strict = pol(name="strict", required=3, approvers={"users": ["frank"], "groups": ["team-a-approvers"]})
    decision = decide(request(("bob", "Approve"), ("carol", "Approve")), policies=[pol(), strict])
    assert decision.phase == "Pending" and "(policy strict)" in decision.message and decision.summary == "2/3"
    assert decision.policies == ("release", "strict")
    other_key = pol(name="other", required=5, keys=["unrelated"], keySelector=None)
    assert decide(request(("bob", "Approve"), ("carol", "Approve")), policies=[pol(), other_key]).phase == "Approved"


def test_no_policy_fails_closed_and_a_missing_key_waits():
    assert decide(request(), policies=[]).reason == "NoPolicy"
    decision = policy.decide(request(), key=None, key_state=None, policies=[pol()], at=T0)
    assert decision.phase == "Pending" and decision.reason == "KeyNotFound"


def test_expiry_uses_the_shortest_ttl_and_is_final():
    policies = [pol(requestTTL="1h", required=0), pol(name="b", requestTTL="30m", required=0)]
    pending = decide(request(), policies=policies, at=T0 + datetime.timedelta(minutes=29),
                     k=key(offline={"enabled": True, "windows": []}))
    assert pending.expires_at == T0 + datetime.timedelta(minutes=30) and pending.wake_at == pending.expires_at
    assert decide(request(), policies=policies, at=T0 + datetime.timedelta(minutes=30)).phase == "Expired"


@pytest.mark.parametrize("spec,problem", [
    ({"requesters": {"users": ["erin"]}}, "alice is not a requester"),
    ({"allowedDigestAlgorithms": ["SHA512"]}, "digest algorithm SHA256 is not allowed"),
    ({"allowedFormats": ["cms"]}, "format raw is not allowed"),
    ({"maxDigestsPerRequest": 2}, "exceed the policy's maxDigestsPerRequest of 2"),
    ({"maxSignaturesPerHour": 2}, "exceed the policy's maxSignaturesPerHour of 2"),
])
def test_what_the_policy_never_allows_fails(spec, problem):
    decision = decide(request(digests=3, format="raw"), policies=[pol(required=0, **spec)])
    assert decision.phase == "Failed" and decision.reason == "NotAllowed" and problem in decision.message


def test_an_approved_request_waits_for_the_keys_window():
    opens = T0 + datetime.timedelta(hours=2)
    offline = {"enabled": True, "windows": [{"start": format_time(opens), "end": format_time(opens + datetime.timedelta(hours=1))}]}
    decision = decide(request(("bob", "Approve"), ("carol", "Approve")), k=key(offline=offline))
    assert decision.phase == "Pending" and decision.reason == "KeyOffline" and decision.approved
    assert decision.wake_at == opens and format_time(opens) in decision.message
    assert decide(request(("bob", "Approve"), ("carol", "Approve")), k=key(offline=offline),
                  at=opens + datetime.timedelta(seconds=1)).phase == "Approved"


def test_a_consumed_one_time_key_refuses_other_requests_but_not_its_own():
    consumed = key(usage="OneTime", consumed="sr-1")
    assert decide(request(name="sr-2"), k=consumed, policies=[pol(required=0)]).reason == "KeyConsumed"
    assert decide(request(name="sr-1"), k=consumed, policies=[pol(required=0)]).phase == "Approved"
    assert decide(request(), k=key(phase="Destroyed"), policies=[pol(required=0)]).reason == "KeyDestroyed"


def test_rate_limits_count_signatures_of_the_keys_a_policy_selects():
    at = T0 + datetime.timedelta(minutes=1)
    recent = [policy.Signature(at - datetime.timedelta(minutes=50), "release", 6),
              policy.Signature(at - datetime.timedelta(minutes=10), "release", 3),
              policy.Signature(at - datetime.timedelta(minutes=5), "unselected", 100)]
    limited = pol(required=0, maxSignaturesPerHour=10)
    labels = {"release": {"tier": "release"}, "unselected": {"tier": "dev"}}
    decision = decide(request(digests=2), policies=[limited], recent=recent, key_labels=labels)
    assert decision.reason == "RateLimited" and decision.wake_at == at + datetime.timedelta(minutes=10)
    assert decide(request(digests=1), policies=[limited], recent=recent, key_labels=labels).phase == "Approved"


users = st.sampled_from(sorted(GROUPS))
entries = st.lists(st.tuples(users, st.sampled_from(["Approve", "Deny"])), max_size=8)


@settings(max_examples=300, deadline=None)
@given(entries, st.integers(min_value=0, max_value=4), st.booleans())
def test_invariants_of_any_approval_history(history, required, separation):
    """Approved and Denied never both; the requester never counts under SoD; counts are distinct eligible users."""
    spec = dict(required=required, separationOfDuties=separation,
                approvers={"users": ["alice"], "groups": ["team-a-approvers"]})
    decision = decide(request(*history), policies=[pol(**spec)])
    counted = {a["user"] for a in decision.approvals if a["counted"] and a["decision"] == "Approve"}
    deniers = {u for u, d in history if d == "Deny" and u != "dave" and not (separation and u == "alice")}
    assert not (decision.approved and decision.phase == "Denied")
    assert (decision.phase == "Denied") == bool(deniers)
    if separation:
        assert "alice" not in counted
    assert "dave" not in counted
    if decision.phase == "Approved":
        assert len({u for u, d in history if d == "Approve"} - {"dave"} - ({"alice"} if separation else set())) >= required
    # appending an approval never withdraws approval that was given, unless it is a deny
    later = decide(request(*history, ("bob", "Approve")), policies=[pol(**spec)])
    if decision.phase == "Approved":
        assert later.phase == "Approved"


def test_a_format_the_signer_does_not_produce_fails_clearly_instead_of_signing_raw():
    decision = decide(request(format="msix"), policies=[pol(required=0, allowedFormats=["msix"])])
    assert decision.phase == "Failed" and decision.reason == "FormatNotSupported" and "ask for raw" in decision.message
    assert decide(request(format="cms"), policies=[pol(required=0)]).phase == "Approved"


def test_the_decision_reads_what_it_is_given_of_the_key_never_its_status():
    """The signer passes its own record: a status saying otherwise changes nothing."""
    forged = key(consumed=None)
    forged["status"]["versions"] = [{"version": 1, "state": "Enabled"}]
    mine = policy.KeyState(current_version=2, consumed_by=("sr-1", "uid-1"))
    assert decide(request(name="sr-2"), k=forged, policies=[pol(required=0)], key_state=mine).reason == "KeyConsumed"
    decision = decide(request(name="sr-1"), k=forged, policies=[pol(required=0)], key_state=mine)
    assert (decision.phase, decision.key_version) == ("Approved", 2)
    assert decide(request(), k=key(), policies=[pol(required=0)],
                  key_state=policy.KeyState(current_version=None)).reason == "KeyNotReady"
    assert decide(request(), k=key(), policies=[pol(required=0)],
                  key_state=policy.KeyState(current_version=None, destroyed=True)).reason == "KeyDestroyed"


def test_missing_key_material_fails_a_request_with_the_way_out():
    decision = decide(request(), k=key(), policies=[pol(required=0)],
                      key_state=policy.KeyState(current_version=None, missing_versions=(2,)))
    assert (decision.phase, decision.reason) == ("Failed", "KeyMaterialMissing")
    assert "version 2" in decision.message and "rotate" in decision.message


def test_key_state_from_status_is_the_operators_mirror():
    state = policy.KeyState.from_status({"phase": "Active", "consumedBy": "sr-9", "versions": [
        {"version": 3, "state": "Enabled"}, {"version": 4, "state": "Destroyed", "missing": True},
        {"version": 2, "state": "Enabled"}]})
    assert state == policy.KeyState(current_version=3, consumed_by=("sr-9",), destroyed=False, missing_versions=(4,))
    assert policy.KeyState.from_status({"phase": "Destroyed"}).destroyed

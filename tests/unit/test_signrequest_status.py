"""A SignRequest's status for each decision: conditions, summary, finished time, removal and rate counts."""
from __future__ import annotations

import datetime

import hypothesis
import hypothesis.strategies
import pytest

from keyroom import conditions, policy
from keyroom.controllers.signrequest import desired_status, in_window, recent_signatures, removal_due, status_patch

AT = datetime.datetime(2026, 11, 26, 12, 0, tzinfo=datetime.timezone.utc)
APPROVALS = ({"user": "bob", "decision": "Approve", "counted": True},
             {"user": "alice", "decision": "Approve", "counted": False, "reason": "a requester cannot approve"})


def decision(phase="Pending", reason="AwaitingApproval", approved=False):
    return policy.Decision(phase, reason, f"{reason} message", approved=approved, summary="1/2",
                           approvals=APPROVALS, expires_at=AT + datetime.timedelta(hours=1))


def status_of(phase, **kwargs):
    approved = phase in ("Approved", "Signing", "Signed")
    return desired_status(decision=decision(phase if phase in ("Pending", "Denied", "Expired", "Failed") else "Approved",
                                            approved=approved, **kwargs),
                          phase=phase, status={}, generation=3, at=AT)


@pytest.mark.parametrize("phase", ["Pending", "Approved", "Signing", "Signed", "Denied", "Expired", "Failed"])
def test_approved_and_denied_are_never_both_true_and_ready_means_signed(phase):
    status = status_of(phase)
    true = {c["type"] for c in status["conditions"] if c["status"] == "True"}
    assert not {"Approved", "Denied"} <= true
    assert ("Ready" in true) == (phase == "Signed") == ("Signed" in true)
    assert ("Stalled" in true) == (phase in ("Denied", "Expired", "Failed"))
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])
    assert ("finishedAt" in status) == (phase in ("Signed", "Denied", "Expired", "Failed"))
    assert status["phase"] == phase and status["approvalSummary"] == "1/2"


def test_waiting_shows_the_reason_and_the_approvals_as_counted():
    status = status_of("Pending")
    ready = conditions.find(status["conditions"], "Ready")
    assert (ready["reason"], ready["message"]) == ("AwaitingApproval", "AwaitingApproval message")
    assert status["message"] == "AwaitingApproval message"
    assert [(a["user"], a["counted"]) for a in status["approvals"]] == [("bob", True), ("alice", False)]
    assert status["expiresAt"] == "2026-11-26T13:00:00Z"


def test_an_unchanged_decision_writes_nothing():
    first = status_of("Pending")
    later = desired_status(decision=decision(), phase="Pending", status=first, generation=3,
                           at=AT + datetime.timedelta(minutes=5))
    assert status_patch(first, later) is None  # observedAt and lastTransitionTime are kept


def test_finished_requests_are_removed_after_the_ttl_or_their_annotation():
    body = {"metadata": {}, "status": {"phase": "Signed", "finishedAt": "2026-11-26T12:00:00Z"}}
    assert removal_due(body, default_ttl="7d") == AT + datetime.timedelta(days=7)
    body["metadata"]["annotations"] = {"keyroom.dev/ttl-after-finished": "10m"}
    assert removal_due(body, default_ttl="7d") == AT + datetime.timedelta(minutes=10)
    body["metadata"]["annotations"] = {"keyroom.dev/ttl-after-finished": "soon"}
    assert removal_due(body, default_ttl="7d") == AT + datetime.timedelta(days=7)
    assert removal_due({"metadata": {}, "status": {"phase": "Pending"}}, default_ttl="7d") is None


def test_rate_counts_come_from_signed_and_signing_requests_of_the_last_hour():
    def req(phase, signed_at=None, digests=2, key="k"):
        return {"spec": {"keyRef": {"name": key}, "digests": [{}] * digests},
                "status": {"phase": phase, **({"signedAt": signed_at} if signed_at else {})}}
    found = recent_signatures([req("Signed", "2026-11-26T11:30:00Z"), req("Signed", "2026-11-26T10:59:00Z"),
                               req("Signing", digests=5), req("Pending"), req("Failed")], AT)
    assert sorted((s.count, s.at) for s in found) == [(2, AT - datetime.timedelta(minutes=30)), (5, AT)]


def test_the_cache_keeps_little_of_a_final_request_and_never_goes_back_in_time():
    from keyroom.controllers.signrequest import Requests

    def body(version, phase, **status):
        return {"metadata": {"namespace": "team-a", "name": "r", "uid": "u1", "resourceVersion": str(version),
                             "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
                             "annotations": {"keyroom.dev/last-handled-configuration": '{"digests": ["ab"]}',
                                             "keyroom.dev/ttl-after-finished": "1h"}},
                "spec": {"keyRef": {"name": "k"}, "digests": [{"name": "a", "value": "ab" * 32}]},
                "status": {"phase": phase, **status}}
    cache = Requests()
    cache.remember(body(3, "Pending"))
    assert "managedFields" not in cache.bodies[("team-a", "r")]["metadata"]
    final = body(5, "Signed", signatures=[{"name": "a", "value": "MEUC"}], signedAt="2026-11-26T12:00:00Z",
                 finishedAt="2026-11-26T12:00:01Z", message="1 signature(s)", approvals=[{"user": "bob"}],
                 conditions=[{"type": "Ready", "status": "True", "message": "signed"}], audit={"index": 3})
    final["metadata"].update(labels={"release": "1.4"}, finalizers=["x"], creationTimestamp="2026-11-26T11:00:00Z")
    final["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] = '{"spec": {}}'
    final["spec"].update(requester={"username": "alice"}, reason="release")
    cache.remember(final)
    kept = cache.bodies[("team-a", "r")]
    assert kept["spec"] == {"keyRef": {"name": "k"}, "digests": [{"name": "a"}]}
    assert kept["status"] == {"phase": "Signed", "signedAt": "2026-11-26T12:00:00Z",
                              "finishedAt": "2026-11-26T12:00:01Z"}
    assert kept["metadata"] == {"namespace": "team-a", "name": "r", "uid": "u1", "resourceVersion": "5",
                                "annotations": {"keyroom.dev/ttl-after-finished": "1h"}}
    assert recent_signatures([kept], AT)[0].count == 1
    assert removal_due(kept, default_ttl="7d") == removal_due(final, default_ttl="7d") is not None
    cache.remember(body(4, "Signing"))  # an older event arriving late changes nothing
    assert cache.bodies[("team-a", "r")]["status"]["phase"] == "Signed"


def test_a_requests_timer_runs_without_the_context_of_the_handler_that_set_it():
    """10,000 finished requests each wait for their removal: their timers must not hold the event being handled."""
    import asyncio
    import contextvars

    from keyroom.controllers.signrequest import Requests
    handled = contextvars.ContextVar("handled")  # stands for Kopf's cause, with the event's whole body
    seen = []

    async def scenario():
        ran = asyncio.Event()

        async def run(namespace, name):
            seen.append((namespace, name, handled.get(None)))
            ran.set()

        cache = Requests()
        handled.set({"metadata": {"managedFields": ["..."]}})
        cache.wake_at("team-a", "r", datetime.datetime.now(datetime.timezone.utc), run)
        await ran.wait()

    asyncio.run(asyncio.wait_for(scenario(), 5))
    assert seen == [("team-a", "r", None)]


def test_an_absurd_ttl_annotation_falls_back_instead_of_overflowing():
    from keyroom.controllers import signrequest as sr
    body = {"metadata": {"annotations": {sr.TTL_ANNOTATION: "9" * 30 + "d"}},
            "status": {"phase": "Signed", "finishedAt": "2026-12-01T00:00:00Z"}}
    due = sr.removal_due(body, default_ttl="7d")
    assert due == datetime.datetime(2026, 12, 8, tzinfo=datetime.timezone.utc)
    body["metadata"]["annotations"][sr.TTL_ANNOTATION] = "36500d"
    assert sr.removal_due(body, default_ttl="7d").year == 2036


def test_builds_show_as_counted_keep_when_they_were_seen_and_stay_out_when_no_policy_asks():
    builds = ({"user": "ci-a", "counted": True, "build": "run 1"},
              {"user": "ci-b", "counted": False, "reason": "ci-b's build differs at app.exe: ..."})
    waiting = policy.Decision("Pending", "AwaitingBuilds", "needs 1 more matching build", summary="1/1",
                              approvals=APPROVALS[:1], build_summary="1/2", builds=builds[:1])
    first = desired_status(decision=waiting, phase="Pending", status={}, generation=3, at=AT)
    assert first["buildSummary"] == "1/2"
    assert first["builds"] == [{"user": "ci-a", "counted": True, "build": "run 1", "observedAt": "2026-11-26T12:00:00Z"}]
    later = AT + datetime.timedelta(minutes=5)
    failed = policy.Decision("Failed", "BuildMismatch", "ci-b's build differs", summary="1/1", approvals=APPROVALS[:1],
                             build_summary="1/2", builds=builds)
    status = desired_status(decision=failed, phase="Failed", status=first, generation=3, at=later)
    assert [b["observedAt"] for b in status["builds"]] == ["2026-11-26T12:00:00Z", "2026-11-26T12:05:00Z"]
    assert conditions.find(status["conditions"], "Stalled")["reason"] == "BuildMismatch"
    signed = desired_status(decision=policy.Decision("Approved", "Approved", "", approved=True, summary="1/1",
                                                     approvals=APPROVALS[:1], build_summary="2/2",
                                                     builds=(builds[0], {"user": "ci-b", "counted": True})),
                            phase="Signed", status={}, generation=3, at=AT)
    assert conditions.find(signed["conditions"], "Approved")["message"] == "approved by bob; builds of ci-a, ci-b match"
    plain = status_of("Pending")
    assert "builds" not in plain and "buildSummary" not in plain


def test_the_caches_rate_index_counts_what_a_scan_of_its_bodies_counts():
    from keyroom.controllers.signrequest import Requests

    def body(namespace, name, phase, version=1, digests=1, key="k", **status):
        return {"metadata": {"namespace": namespace, "name": name, "uid": f"{namespace}-{name}",
                             "resourceVersion": str(version)},
                "spec": {"keyRef": {"name": key}, "digests": [{"name": f"d{i}", "value": "ab" * 32}
                                                               for i in range(digests)]},
                "status": {"phase": phase, **status}}
    cache = Requests()
    cache.remember(body("team-a", "old", "Signed", signedAt="2026-11-26T10:00:00Z", digests=3))
    cache.remember(body("team-a", "new", "Signed", signedAt="2026-11-26T11:45:00Z", digests=2, key="j"))
    cache.remember(body("team-a", "busy", "Signing", digests=4))
    cache.remember(body("team-a", "waiting", "Pending"))
    cache.remember(body("team-b", "other", "Signed", signedAt="2026-11-26T11:50:00Z", digests=7))

    def counted(namespace):
        tally = cache.rate_tally(namespace, AT)
        return sorted((s.at, s.key, s.count) for key in tally.keys() for s in tally.signatures(key))
    assert counted("team-a") == sorted((s.at, s.key, s.count)
                                       for s in recent_signatures(cache.in_namespace("team-a"), AT))
    assert counted("team-a") == [(AT - datetime.timedelta(minutes=15), "j", 2), (AT, "k", 4)]
    assert counted("team-b") == [(AT - datetime.timedelta(minutes=10), "k", 7)]
    cache.remember(body("team-a", "busy", "Failed", version=2, digests=4))  # no longer signing: not counted
    cache.forget("team-a", "new")
    assert counted("team-a") == [] and [b["metadata"]["name"] for b in cache.in_namespace("team-a")] == [
        "old", "busy", "waiting"]
    cache.forget("team-b", "other")
    assert counted("team-b") == [] and cache.in_namespace("team-b") == []


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(hypothesis.strategies.lists(hypothesis.strategies.tuples(
    hypothesis.strategies.sampled_from(["put", "drop", "at"]), hypothesis.strategies.sampled_from("abcdef"),
    hypothesis.strategies.sampled_from(["k", "j"]), hypothesis.strategies.integers(0, 200),
    hypothesis.strategies.integers(1, 5), hypothesis.strategies.booleans()), max_size=60))
@hypothesis.example([("put", "a", "k", 30, 1, False), ("at", "a", "k", 30, 1, False)])  # exactly an hour old
def test_the_incremental_rate_index_always_equals_a_tally_of_all_signatures(steps):
    """Requests signing, signed, dropped, and time passing (minutes): the index and a full tally agree."""
    from keyroom import policy
    from keyroom.policy import RateIndex

    index, everything = RateIndex(), {}
    moment = AT
    for action, name, key, minutes, count, signing in steps:
        if action == "put":
            signature = (None if signing else moment - datetime.timedelta(minutes=minutes), key, count)
            index.put(name, signature)
            everything[name] = signature
        elif action == "drop":
            index.drop(name)
            everything.pop(name, None)
        else:
            moment += datetime.timedelta(minutes=minutes)
        tally = index.at(moment)
        expected = policy.RateTally.of(in_window(everything.values(), moment), moment)
        assert sorted(tally.keys()) == sorted(expected.keys())
        for key in ("k", "j"):
            assert tally.total(key) == expected.total(key)
            assert sorted(tally.signatures(key), key=repr) == sorted(expected.signatures(key), key=repr)


VERSION_STATES = hypothesis.strategies.sampled_from(["Enabled", "Disabled", "PendingDestruction", "Destroyed"])


@hypothesis.given(
    versions=hypothesis.strategies.lists(hypothesis.strategies.tuples(VERSION_STATES, hypothesis.strategies.booleans()),
                                         max_size=5),
    phase=hypothesis.strategies.sampled_from(["Active", "Offline", "Destroyed", "Consumed", "Pending"]),
    consumed=hypothesis.strategies.sampled_from([None, "release-1"]))
def test_the_operator_keeps_of_a_key_status_all_its_decisions_read_and_drops_the_rest(versions, phase, consumed):
    import asyncio

    from keyroom.controllers.signrequest import signing_keys
    status = {"phase": phase, "message": "m" * 200, "online": True, "currentVersion": 1,
              "conditions": [{"type": "Ready", "status": "True", "reason": "KeyAvailable", "message": "x"}],
              "versions": [{"version": n + 1, "state": state, "fingerprint": "SHA256:" + "ab" * 32,
                            "createdAt": "2026-11-26T12:00:00Z", **({"missing": True} if missing else {})}
                           for n, (state, missing) in enumerate(versions)]}
    if consumed:
        status["consumedBy"] = consumed
    body = {"metadata": {"name": "k", "namespace": "team-a", "uid": "u", "labels": {"team": "a"}},
            "spec": {"algorithm": "ECDSA_P256"}, "status": status}
    kept = asyncio.run(signing_keys(namespace="team-a", name="k", body=body))[("team-a", "k")]
    assert policy.KeyState.from_status(kept["status"]) == policy.KeyState.from_status(status)
    assert kept["status"].get("consumedBy") == status.get("consumedBy")
    assert "conditions" not in kept["status"] and "message" not in kept["status"]
    assert all("fingerprint" not in v for v in kept["status"]["versions"])
    assert kept["spec"] == body["spec"] and kept["metadata"]["labels"] == {"team": "a"}


def test_a_key_write_that_changes_nothing_a_decision_reads_wakes_no_request():
    from keyroom.controllers.signrequest import Requests
    key = {"metadata": {"name": "k", "namespace": "team-a", "uid": "u", "labels": {"team": "a"}},
           "spec": {"algorithm": "ECDSA_P256"},
           "status": {"phase": "Active", "signatureCount": 1, "message": "x",
                      "versions": [{"version": 1, "state": "Enabled", "fingerprint": "SHA256:ab"}]}}
    cache = Requests()
    assert cache.key_changed("team-a", "k", key)  # first seen
    counted = {**key, "status": {**key["status"], "signatureCount": 2, "message": "y",
                                 "conditions": [{"type": "Ready", "status": "True"}]}}
    assert not cache.key_changed("team-a", "k", counted)
    for changed in ({**counted, "status": {**counted["status"], "phase": "Offline"}},
                    {**counted, "status": {**counted["status"], "consumedBy": "release-1"}},
                    {**counted, "spec": {**counted["spec"], "offline": {"windows": []}}},
                    {**counted, "metadata": {**counted["metadata"], "labels": {"team": "b"}}},
                    {**counted, "status": {**counted["status"], "versions": [
                        {"version": 1, "state": "Enabled"}, {"version": 2, "state": "Enabled"}]}}):
        assert cache.key_changed("team-a", "k", changed)
        assert not cache.key_changed("team-a", "k", changed)
    assert cache.key_changed("team-a", "k", None)  # deleted
    assert cache.key_changed("team-a", "other", counted)  # another key is its own


class _SlowSigner:
    """A signer that answers after ``seconds``: what the operator sees when the signer is busy."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def sign_request(self, *, namespace, name, uid, digests):
        import asyncio
        await asyncio.sleep(self.seconds)
        return {"keyVersion": 1, "signedAt": "2026-11-26T12:00:00Z", "audit": {"index": 1, "hash": "sha256:00"},
                "signatures": [{"name": "a", "value": "AA=="}]}


@pytest.mark.parametrize("in_flight", [1, 12])
def test_a_slow_call_shows_signing_unless_many_calls_are_in_flight(monkeypatch, in_flight):
    """One slow call shows Signing; under load (many calls, all slow) requests go straight to Signed."""
    import asyncio

    from keyroom.controllers import signrequest

    monkeypatch.setattr(signrequest.kopf, "info", lambda *a, **k: None)
    phases: list[str] = []

    class Recording(signrequest.Reconciler):
        async def _write(self, body, patch):
            phases.append(patch["phase"])
            return {**body, "status": {**body["status"], **patch}}

        async def _finished(self, body, at):
            pass

    reconciler = Recording(requests=signrequest.Requests(), signer=_SlowSigner(signrequest.SIGNING_SHOWN_AFTER + 0.3),
                           keys={}, policies={}, key_labels={})
    approved = policy.Decision("Approved", "Approved", "approved", approved=True, key_version=1)

    async def one(n):
        body = {"metadata": {"namespace": "team-a", "name": f"r{n}", "uid": f"u{n}", "generation": 1},
                "spec": {"keyRef": {"name": "release"}, "digests": [{"name": "a", "value": "00" * 32}]},
                "status": {}}
        show = lambda: reconciler._write(body, {"phase": "Signing"})  # noqa: E731
        await reconciler._sign(body, approved, show)

    async def scenario():
        await asyncio.gather(*(one(n) for n in range(in_flight)))
    asyncio.run(scenario())
    assert phases.count("Signed") == in_flight
    assert phases.count("Signing") == (in_flight if in_flight <= signrequest.SIGNING_SHOWN_UP_TO else 0)
    assert reconciler.requests.signing == 0


def test_failures_that_events_bring_before_the_retry_do_not_push_it_back():
    """A burst of failed attempts (key events while the signer restarts) leaves the retry 1 s after the first."""
    import asyncio

    from keyroom.controllers import signrequest

    reconciler = signrequest.Reconciler(requests=signrequest.Requests(), signer=None, keys={}, policies={},
                                        key_labels={})

    async def scenario() -> list[float]:
        loop, waits = asyncio.get_running_loop(), []
        for _ in range(12):
            reconciler._retry("team-a", "r")
            waits.append(reconciler.requests.timers[("team-a", "r")].when() - loop.time())
        reconciler.requests.forget("team-a", "r")
        return waits
    waits = asyncio.run(scenario())
    assert all(0.9 < wait <= 1.1 for wait in waits), waits

    async def after_each_retry_fell_due() -> list[float]:
        loop, waits = asyncio.get_running_loop(), []
        for _ in range(8):
            key = ("team-a", "s")
            if key in reconciler.requests.backoff:  # as if the retry ran when it was due
                delay, due = reconciler.requests.backoff[key]
                reconciler.requests.backoff[key] = (delay, due - datetime.timedelta(hours=1))
            reconciler._retry(*key)
            waits.append(round(reconciler.requests.timers[key].when() - loop.time()))
        reconciler.requests.forget(*key)
        return waits
    assert asyncio.run(after_each_retry_fell_due()) == [1, 2, 4, 8, 16, 32, 60, 60]

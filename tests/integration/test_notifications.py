"""What approvers can watch and hear: the Event a request posts when it starts waiting for approval, and the
webhook the operator calls when a request starts waiting and when it finishes.

The session's operator is configured with the Secret ``keyroom-system/keyroom-notify-webhook``, which points
at the test's local HTTP server (tests/conftest.py: ``webhook``).
"""
from __future__ import annotations

import json
import threading
import time

import pytest

from tests.conftest import WEBHOOK_TOKEN, apply, approve, get, identity, kubectl, wait_for

pytestmark = pytest.mark.integration

NAMESPACE = "team-a"


def _events(cluster, **selector: str) -> list[dict]:
    fields = ",".join(f"{k}={v}" for k, v in selector.items())
    listed = kubectl(cluster, "get", "events", "-n", NAMESPACE, "--field-selector", fields, "-o", "json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)["items"]


def test_a_request_that_starts_waiting_for_approval_posts_an_awaiting_approval_event(cluster, unique):
    key, policy, name = unique("key"), unique("policy"), unique("sr")
    for kind, item, spec in (("SigningKey", key, {"algorithm": "ECDSA_P256"}),
                             ("SigningPolicy", policy, {"keys": [key], "requesters": {"groups": ["team-a-devs"]},
                                                        "approvers": {"groups": ["team-a-approvers"]},
                                                        "requiredApprovals": 1})):
        assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": kind,
                               "metadata": {"name": item, "namespace": NAMESPACE}, "spec": spec}).returncode == 0
    assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SignRequest",
                           "metadata": {"name": name, "namespace": NAMESPACE},
                           "spec": {"keyRef": {"name": key}, "requester": identity("alice"), "reason": "events",
                                    "digests": [{"name": "a.bin", "value": "ab" * 32}]}},
                 identity="alice").returncode == 0
    events = wait_for(lambda: [e for e in _events(cluster, **{"involvedObject.name": name})
                               if e["reason"] == "AwaitingApproval"], timeout=60, what="an AwaitingApproval event")
    assert events[0]["involvedObject"]["kind"] == "SignRequest" and events[0]["type"] == "Normal"



DIGESTS = [{"name": "a.bin", "value": "ab" * 32}, {"name": "b.bin", "value": "cd" * 32}]


def _guarded_request(cluster, unique, *, required: int = 1) -> str:
    """A request by alice for a key whose policy needs ``required`` approvals of team-a's approvers."""
    key, policy, name = unique("key"), unique("policy"), unique("sr")
    for kind, item, spec in (("SigningKey", key, {"algorithm": "ECDSA_P256"}),
                             ("SigningPolicy", policy, {"keys": [key], "requesters": {"groups": ["team-a-devs"]},
                                                        "approvers": {"groups": ["team-a-approvers"]},
                                                        "requiredApprovals": required})):
        assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": kind,
                               "metadata": {"name": item, "namespace": NAMESPACE}, "spec": spec}).returncode == 0
    wait_for(lambda: get(cluster, "signingkey", key, namespace=NAMESPACE).get("status", {}).get("currentVersion"),
             timeout=60, what=f"key {key} to get a version")
    return key, name


def _request(cluster, key: str, name: str) -> None:
    made = apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SignRequest",
                           "metadata": {"name": name, "namespace": NAMESPACE},
                           "spec": {"keyRef": {"name": key}, "requester": identity("alice"),
                                    "reason": "release 2.0", "digests": DIGESTS}}, identity="alice")
    assert made.returncode == 0, made.stderr


def _phase(cluster, name: str) -> str | None:
    return get(cluster, "signrequest", name, namespace=NAMESPACE).get("status", {}).get("phase")


def test_a_request_is_announced_once_when_it_waits_for_approval_and_once_when_it_finishes(cluster, webhook,
                                                                                          unique):
    key, name = _guarded_request(cluster, unique)
    _request(cluster, key, name)
    waiting = wait_for(lambda: webhook.received(name, "AwaitingApproval"), timeout=60,
                       what="the AwaitingApproval notification")
    uid = get(cluster, "signrequest", name, namespace=NAMESPACE)["metadata"]["uid"]
    assert waiting[0]["authorization"] == f"Bearer {WEBHOOK_TOKEN}"
    announced = waiting[0]["payload"]
    assert announced == {
        "event": "AwaitingApproval", "request": {"namespace": NAMESPACE, "name": name, "uid": uid},
        "requester": "alice", "key": key, "reason": "release 2.0", "digests": 2, "format": "raw",
        "phase": "Pending", "waitingFor": announced["message"], "approvalSummary": "0/1",
        "message": announced["message"], "approveCommand": f"kubectl keyroom approve {name} -n {NAMESPACE}"}
    assert "approval" in announced["message"]

    assert approve(cluster, name, "bob").returncode == 0
    finished = wait_for(lambda: webhook.received(name, "Finished"), timeout=60, what="the Finished notification")
    assert _phase(cluster, name) == "Signed"
    done = finished[0]["payload"]
    assert (done["phase"], done["approvalSummary"], done["request"]["uid"], done["waitingFor"]) == (
        "Signed", "1/1", uid, None)
    time.sleep(2)  # anything sent twice would have arrived by now
    assert [p["payload"]["event"] for p in webhook.received(name)] == ["AwaitingApproval", "Finished"]
    everything = json.dumps([p["payload"] for p in webhook.received(name)])
    assert "ab" * 32 not in everything and "cd" * 32 not in everything and '"signatures"' not in everything


def test_a_request_that_needs_no_approval_is_not_announced(cluster, webhook, unique):
    key, name = _guarded_request(cluster, unique, required=0)
    _request(cluster, key, name)
    wait_for(lambda: _phase(cluster, name) == "Signed", timeout=60, what="the request to be signed")
    time.sleep(2)
    assert webhook.received(name) == []


def test_a_failing_webhook_is_retried(cluster, webhook, unique):
    key, name = _guarded_request(cluster, unique)
    webhook.respond[name] = [500, 503]
    _request(cluster, key, name)
    posts = wait_for(lambda: (p := webhook.received(name, "AwaitingApproval")) and len(p) >= 3 and p,
                     timeout=60, what="the notification to be retried until it passes")
    assert [p["status"] for p in posts] == [500, 503, 200]
    assert posts[0]["payload"] == posts[2]["payload"]


def test_a_hanging_webhook_does_not_hold_up_the_reconciler(cluster, webhook, unique):
    key, name = _guarded_request(cluster, unique)
    webhook.hang[name] = release = threading.Event()
    try:
        _request(cluster, key, name)
        wait_for(lambda: name in webhook.hanging, timeout=60, what="the webhook to hold the notification")
        assert approve(cluster, name, "bob").returncode == 0
        wait_for(lambda: _phase(cluster, name) == "Signed", timeout=8, what="the request to be signed")
        assert name in webhook.hanging, "the webhook let go before the request was signed: nothing was tested"
    finally:
        release.set()
    wait_for(lambda: webhook.received(name, "Finished"), timeout=60, what="the Finished notification, later")

"""What approvers can watch: the Event a request posts when it starts waiting for approval."""
from __future__ import annotations

import json

import pytest

from tests.conftest import apply, identity, kubectl, wait_for

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


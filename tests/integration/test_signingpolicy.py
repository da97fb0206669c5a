"""The operator reconciles SigningPolicies: matchedKeys, Ready, observedGeneration."""
from __future__ import annotations

import pytest

from tests.conftest import apply, get, kubectl, wait_for

pytestmark = pytest.mark.integration

NAMESPACE = "team-a"


def _key(name: str, labels: dict | None = None, namespace: str = NAMESPACE) -> dict:
    return {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningKey",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {"algorithm": "ECDSA_P256"}}


def _policy(name: str, selector: dict) -> dict:
    return {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningPolicy",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {**selector, "requesters": {"groups": ["team-a-devs"]},
                     "approvers": {"groups": ["team-a-approvers"]}, "requiredApprovals": 1}}


def _status(cluster, name: str) -> dict:
    return get(cluster, "signingpolicy", name, namespace=NAMESPACE).get("status", {})


def _ready(status: dict) -> dict | None:
    return next((c for c in status.get("conditions", []) if c["type"] == "Ready"), None)


def test_a_policy_becomes_ready_with_the_keys_it_selects(cluster, unique):
    team = unique("team")
    selected, other = unique("key"), unique("key")
    assert apply(cluster, _key(selected, {"team": team})).returncode == 0
    assert apply(cluster, _key(other, {"team": "someone-else"})).returncode == 0
    name = unique("policy")
    assert apply(cluster, _policy(name, {"keySelector": {"matchLabels": {"team": team}}})).returncode == 0

    status = wait_for(lambda: (s := _status(cluster, name)).get("matchedKeys") == [selected] and s,
                      what="matchedKeys to list the selected key")
    ready = _ready(status)
    assert ready["status"] == "True" and ready["reason"] == "KeysSelected"
    assert ready["observedGeneration"] == status["observedGeneration"] == 1
    assert ready["lastTransitionTime"]
    result = kubectl(cluster, "wait", "--for=condition=Ready", f"signingpolicy/{name}", "-n", NAMESPACE,
                     "--timeout=10s", identity="alice")
    assert result.returncode == 0, result.stderr


def test_matched_keys_follow_new_and_relabelled_keys(cluster, unique):
    team = unique("team")
    name = unique("policy")
    assert apply(cluster, _policy(name, {"keySelector": {"matchLabels": {"team": team}}})).returncode == 0
    wait_for(lambda: _ready(_status(cluster, name)), what="the policy to be reconciled")
    assert _ready(_status(cluster, name))["reason"] == "NoKeysSelected"

    key = unique("key")
    assert apply(cluster, _key(key, {"team": team})).returncode == 0
    wait_for(lambda: _status(cluster, name).get("matchedKeys") == [key], what="a new key to be matched")

    assert kubectl(cluster, "label", "signingkey", key, "-n", NAMESPACE, f"team={team}-moved",
                   "--overwrite").returncode == 0
    wait_for(lambda: _status(cluster, name).get("matchedKeys") == [], what="a relabelled key to be dropped")


def test_a_spec_change_is_observed(cluster, unique):
    key_a, key_b = unique("key"), unique("key")
    for key in (key_a, key_b):
        assert apply(cluster, _key(key)).returncode == 0
    name = unique("policy")
    assert apply(cluster, _policy(name, {"keys": [key_a]})).returncode == 0
    wait_for(lambda: _status(cluster, name).get("matchedKeys") == [key_a], what="the first key")

    assert apply(cluster, _policy(name, {"keys": [key_a, key_b, "missing-key"]})).returncode == 0
    status = wait_for(lambda: (s := _status(cluster, name)).get("observedGeneration") == 2 and s,
                      what="generation 2 to be observed")
    assert status["matchedKeys"] == sorted([key_a, key_b])
    assert "not found: missing-key" in _ready(status)["message"]


def test_a_policy_never_selects_another_teams_key(cluster, unique):
    key = unique("key")
    assert apply(cluster, _key(key, {"shared": "yes"}, namespace="team-b")).returncode == 0
    name = unique("policy")
    assert apply(cluster, _policy(name, {"keys": [key]})).returncode == 0
    status = wait_for(lambda: _ready(s := _status(cluster, name)) and s, what="the policy to be reconciled")
    assert status["matchedKeys"] == []


def test_the_operator_posts_an_event(cluster, unique):
    key = unique("key")
    assert apply(cluster, _key(key)).returncode == 0
    name = unique("policy")
    assert apply(cluster, _policy(name, {"keys": [key]})).returncode == 0
    wait_for(lambda: key in kubectl(cluster, "get", "events", "-n", NAMESPACE,
                                    f"--field-selector=involvedObject.name={name}").stdout,
             what="an event naming the selected key")

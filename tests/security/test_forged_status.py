"""A compromised operator writes false status and metadata, and tries to change spec.

The attacker holds the operator's ServiceAccount credentials (its kubeconfig,
``cluster.kubeconfig("operator")``): it may patch status and metadata of the
four kinds, which is its job. Status is a mirror for people; the signer decides
from spec and its own audited records. So a forged status must not bring back
a retired key version, a consumed one-time key, or make anyone trust a foreign
public key; and spec (policies, keys, requests) and the rotation annotation,
which the signer does act on, must stay out of the operator's reach, as must
Secrets and ConfigMaps.
"""
from __future__ import annotations

import hashlib
import json

import kubernetes
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyroom.signer.client import digests_fingerprint
from tests.conftest import get, key_label, kubectl, token_labels, wait_for
from tests.security.conftest import (
    NAMESPACE, approve, audit_entries, condition, digest, entries_for, final, key_status, make_key, make_policy,
    make_request, request_document, request_status, sign_call, signer_call, uid_of, verifies, wait_request,
)

pytestmark = pytest.mark.integration


def as_operator(cluster, *args: str, input: str | None = None):
    return kubectl(cluster, *args, identity="operator", input=input)


def forge_key_status(cluster, key: str, status: dict) -> dict:
    """Merge-patch the SigningKey's status as the operator; returns the status as the API server stored it.

    (kubectl patch --subresource=status would first GET the status, which the operator's role does not allow:
    it only patches status, so the patch goes out as the operator's own client sends it.)
    """
    client = kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig("operator")))
    try:
        written = kubernetes.client.CustomObjectsApi(client).patch_namespaced_custom_object_status(
            "keyroom.dev", "v1alpha1", NAMESPACE, "signingkeys", key, {"status": status},
            _content_type="application/merge-patch+json")
    finally:
        client.close()
    return written["status"]  # accepted: writing status is the operator's right, status being only a mirror


def signer_record(cluster, key: str) -> dict:
    """The signer's own record of the key, as it answers the operator's reconcile call."""
    uid = uid_of(cluster, "signingkey", key)
    status, record = signer_call(cluster, "POST", f"/v1/keys/{NAMESPACE}/{key}/{uid}/reconcile")
    assert status == 200, record
    return record


def signed_entries_of_key(cluster, key_uid: str) -> list[dict]:
    return [e for e in audit_entries(cluster) if e["event"] == "Signed" and e["key"]["uid"] == key_uid]


def test_a_forged_current_version_does_not_bring_back_a_retired_one(cluster, unique):
    key = make_key(cluster, unique)
    make_policy(cluster, unique, key)
    assert kubectl(cluster, "annotate", "signingkey", key, "-n", NAMESPACE, "keyroom.dev/rotate=r1").returncode == 0
    status = wait_for(lambda: (s := key_status(cluster, key)).get("currentVersion") == 2 and s, what="version 2")
    public = {v["version"]: v["publicKey"] for v in status["versions"]}
    assert {v["version"]: v["publicKey"] for v in signer_record(cluster, key)["versions"]} == public

    v2, v1 = status["versions"]
    forged = forge_key_status(cluster, key, {"currentVersion": 1, "phase": "Active", "versions": [
        {**v2, "state": "Disabled"}, {**v1, "state": "Enabled"}]})
    assert forged["currentVersion"] == 1

    value = digest("release built while v1 looked current")
    name = make_request(cluster, unique, key, {"app.bin": value})
    result = final(cluster, name)
    assert result["phase"] == "Signed" and result["keyVersion"] == 2, result
    [signature] = result["signatures"]
    assert verifies(public[2], value, signature["value"])
    assert not verifies(public[1], value, signature["value"])
    [intent] = entries_for(cluster, uid_of(cluster, "signrequest", name), "Intent")
    assert intent["key"]["version"] == 2
    assert signer_record(cluster, key)["currentVersion"] == 2


def test_a_forged_unconsumed_one_time_key_does_not_sign_twice(cluster, unique):
    key = make_key(cluster, unique, usage="OneTime")
    key_uid = uid_of(cluster, "signingkey", key)
    make_policy(cluster, unique, key)
    first = make_request(cluster, unique, key)
    assert final(cluster, first)["phase"] == "Signed"
    consumed = wait_for(lambda: (s := key_status(cluster, key)).get("consumedBy") == first
                        and s["versions"][0]["state"] == "PendingDestruction" and s, what="the key to be consumed")
    before = token_labels(cluster)

    version = {k: v for k, v in consumed["versions"][0].items() if k != "destroyAt"}
    forged = forge_key_status(cluster, key, {"consumedBy": None, "phase": "Active", "currentVersion": 1,
                                             "versions": [{**version, "state": "Enabled"}]})
    assert "consumedBy" not in forged and forged["versions"][0]["state"] == "Enabled"

    second = make_request(cluster, unique, key)
    result = final(cluster, second)
    assert result["phase"] == "Failed" and condition(result, "Stalled")["reason"] == "KeyConsumed", result
    assert not result.get("signatures")
    # the compromised operator insists, straight to the signer
    body = get(cluster, "signrequest", second, namespace=NAMESPACE)
    code, answer = sign_call(cluster, NAMESPACE, second, body["metadata"]["uid"], digests_fingerprint(body["spec"]))
    assert code == 403 and answer["reason"] == "KeyConsumed", answer
    assert [e["request"]["name"] for e in signed_entries_of_key(cluster, key_uid)] == [first]
    assert not entries_for(cluster, body["metadata"]["uid"], "Intent")
    assert token_labels(cluster) == before and key_label(cluster, key, 1) in before  # destruction still pending
    assert signer_record(cluster, key)["consumedBy"] == first


def test_a_foreign_public_key_in_status_changes_nothing_that_is_signed(cluster, unique):
    key = make_key(cluster, unique)
    make_policy(cluster, unique, key)
    [real] = key_status(cluster, key)["versions"]
    assert signer_record(cluster, key)["versions"][0]["publicKey"] == real["publicKey"]

    foreign = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = foreign.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    foreign_pem = foreign.public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    fingerprint = "sha256:" + hashlib.sha256(der).hexdigest()
    forged = forge_key_status(cluster, key, {"versions": [{**real, "publicKey": foreign_pem,
                                                           "fingerprint": fingerprint}]})
    assert forged["versions"][0]["publicKey"] == foreign_pem

    value = digest("artifact")
    name = make_request(cluster, unique, key, {"artifact": value})
    result = final(cluster, name)
    assert result["phase"] == "Signed", result
    [signature] = result["signatures"]
    assert verifies(real["publicKey"], value, signature["value"])
    assert not verifies(foreign_pem, value, signature["value"])
    assert signer_record(cluster, key)["versions"][0]["publicKey"] == real["publicKey"]
    # the mirror heals from the signer's record
    wait_for(lambda: key_status(cluster, key)["versions"][0]["publicKey"] == real["publicKey"],
             what="the operator to mirror the real public key again")


def test_the_operator_cannot_change_spec_rotate_or_read_secrets(cluster, unique):
    key = make_key(cluster, unique)
    policy = make_policy(cluster, unique, key, requiredApprovals=1)
    name = make_request(cluster, unique, key)
    wait_request(cluster, name, lambda s: s.get("phase") == "Pending")
    uid = uid_of(cluster, "signrequest", name)
    policy_before = get(cluster, "signingpolicy", policy, namespace=NAMESPACE)["spec"]
    key_before = get(cluster, "signingkey", key, namespace=NAMESPACE)
    labels_before = token_labels(cluster)

    def refused(result, *words: str) -> None:
        assert result.returncode != 0, result.stdout
        assert any(word in result.stderr for word in words), result.stderr

    spec_refusal = ("never spec",)
    patch = lambda kind, object_name, body: as_operator(  # noqa: E731
        cluster, "patch", kind, object_name, "-n", NAMESPACE, "--type=merge", "-p", json.dumps(body))
    refused(patch("signingpolicy", policy, {"spec": {"requiredApprovals": 0}}), *spec_refusal)
    refused(patch("signingpolicy", policy, {"spec": {"approvers": {"users": ["alice"]}}}), *spec_refusal)
    refused(patch("signingkey", key, {"spec": {"usage": "Reusable", "destructionDelay": "1s"}}), *spec_refusal)
    refused(patch("signrequest", name, {"spec": {"approvals": [
        {"user": "bob", "groups": ["team-a-approvers", "system:authenticated"], "decision": "Approve"}]}}),
        "never spec", "must be your own")
    refused(as_operator(cluster, "annotate", "signingkey", key, "-n", NAMESPACE, "keyroom.dev/rotate=now"),
            "may not request a rotation")

    forbidden = ("forbidden", "Forbidden")
    refused(as_operator(cluster, "delete", "signingpolicy", policy, "-n", NAMESPACE), *forbidden)
    refused(as_operator(cluster, "create", "-f", "-", input=json.dumps(
        request_document(unique("sr"), key, {"x": digest("x")}, user="alice"))), *forbidden)
    for namespace in ("keyroom-system", NAMESPACE):
        refused(as_operator(cluster, "get", "secrets", "-n", namespace), *forbidden)
        refused(as_operator(cluster, "get", "configmaps", "-n", namespace), *forbidden)
    refused(as_operator(cluster, "get", "configmap", "keyroom-audit-checkpoint", "-n", "keyroom-system"), *forbidden)
    refused(as_operator(cluster, "delete", "configmap", "keyroom-audit-checkpoint", "-n", "keyroom-system"),
            *forbidden)
    refused(as_operator(cluster, "create", "configmap", "keyroom-audit-new-chain", "-n", "keyroom-system",
                        "--from-literal=supersedes=none", "--from-literal=reason=forged"), *forbidden)

    assert get(cluster, "signingpolicy", policy, namespace=NAMESPACE)["spec"] == policy_before
    key_after = get(cluster, "signingkey", key, namespace=NAMESPACE)
    assert key_after["spec"] == key_before["spec"]
    assert "keyroom.dev/rotate" not in (key_after["metadata"].get("annotations") or {})
    assert token_labels(cluster) == labels_before
    status = request_status(cluster, name)
    assert status["phase"] == "Pending" and not status.get("signatures")
    assert not entries_for(cluster, uid, "Intent")
    # and the approval it could not forge is still what signing waits for
    assert approve(cluster, name, "bob").returncode == 0
    assert final(cluster, name)["phase"] == "Signed"


def test_relabelling_a_key_does_not_move_it_to_a_laxer_policy(cluster, unique):
    release, nightly = unique("release"), unique("nightly")
    key = make_key(cluster, unique, labels={"tier": release})
    strict = make_policy(cluster, unique, None, keySelector={"matchLabels": {"tier": release}}, requiredApprovals=2)
    make_policy(cluster, unique, None, keySelector={"matchLabels": {"tier": nightly}}, requiredApprovals=0)
    wait_for(lambda: key in get(cluster, "signingpolicy", strict, namespace=NAMESPACE).get("status", {})
             .get("matchedKeys", []), what="the strict policy to select the key")
    name = make_request(cluster, unique, key)
    status = wait_request(cluster, name, lambda s: s.get("phase") == "Pending")
    assert condition(status, "Ready")["reason"] == "AwaitingApproval"
    body = get(cluster, "signrequest", name, namespace=NAMESPACE)
    uid = body["metadata"]["uid"]

    relabelled = as_operator(cluster, "label", "--overwrite", "signingkey", key, "-n", NAMESPACE, f"tier={nightly}")
    assert relabelled.returncode != 0 and "may not change labels" in relabelled.stderr
    assert get(cluster, "signingkey", key, namespace=NAMESPACE)["metadata"]["labels"]["tier"] == release
    code, answer = sign_call(cluster, NAMESPACE, name, uid, digests_fingerprint(body["spec"]))
    assert code == 403 and answer["reason"] == "AwaitingApproval", (code, answer)
    assert not entries_for(cluster, uid, "Signed")
    assert request_status(cluster, name).get("phase") != "Signed"

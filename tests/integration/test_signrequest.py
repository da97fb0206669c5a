"""SignRequests on the real control plane: policies, approvals, the signer's own checks, exactly-once, audit.

Every request here is created by the fixture identity it names (alice, bob,
...), so the API server's admission policy checks the requester and each
approval exactly as it would for people using kubectl. Signatures are verified
with openssl against the public key the SigningKey publishes.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from keyroom.devenv import controlplane
from keyroom.schedule import format_time, parse_time
from keyroom.signer.client import SignerClient, SignerError, digests_fingerprint
from tests.conftest import apply, get, kubectl, wait_for
from tests.conftest import approve as _approve, identity as _identity

pytestmark = pytest.mark.integration

NAMESPACE = "team-a"
FINAL = ("Signed", "Denied", "Expired", "Failed")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _key(cluster, unique, **spec) -> str:
    name = unique("key")
    assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningKey",
                           "metadata": {"name": name, "namespace": NAMESPACE},
                           "spec": {"algorithm": "ECDSA_P256", **spec}}).returncode == 0
    wait_for(lambda: get(cluster, "signingkey", name, namespace=NAMESPACE).get("status", {}).get("currentVersion"),
             what=f"key {name} to get a version")
    return name


def _policy(cluster, unique, key: str, **spec) -> str:
    name = unique("policy")
    body = {"keys": [key], "requesters": {"groups": ["team-a-devs"]},
            "approvers": {"groups": ["team-a-approvers"]}, "requiredApprovals": 0, **spec}
    assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningPolicy",
                           "metadata": {"name": name, "namespace": NAMESPACE}, "spec": body}).returncode == 0
    wait_for(lambda: key in get(cluster, "signingpolicy", name, namespace=NAMESPACE).get("status", {})
             .get("matchedKeys", []), what=f"policy {name} to select {key}")
    return name


def _request(cluster, unique, key: str, digests: dict[str, str], *, user: str = "alice",
             namespace: str = NAMESPACE, annotations: dict | None = None, **spec) -> tuple[str, subprocess.CompletedProcess]:
    name = unique("sr")
    document = {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SignRequest",
                "metadata": {"name": name, "namespace": namespace, **({"annotations": annotations} if annotations else {})},
                "spec": {"keyRef": {"name": key}, "requester": _identity(user), "reason": "test release",
                         "digests": [{"name": n, "value": v} for n, v in digests.items()], **spec}}
    return name, apply(cluster, document, identity=user)


def _status(cluster, name: str, namespace: str = NAMESPACE) -> dict:
    return get(cluster, "signrequest", name, namespace=namespace).get("status", {})


def _until(cluster, name: str, check, *, timeout: float = 30, what: str = "", namespace: str = NAMESPACE) -> dict:
    return wait_for(lambda: (s := _status(cluster, name, namespace)) and check(s) and s, timeout=timeout,
                    what=what or f"{name} to change")


def _final(cluster, name: str, **kwargs) -> dict:
    return _until(cluster, name, lambda s: s.get("phase") in FINAL, what=f"{name} to finish", **kwargs)


def _condition(status: dict, type: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == type), {})


def _public_key(cluster, key: str, version: int) -> str:
    versions = get(cluster, "signingkey", key, namespace=NAMESPACE)["status"]["versions"]
    return next(v["publicKey"] for v in versions if v["version"] == version)


def _openssl_verifies(tmp_path, public_key: str, artifact: bytes, signature_b64: str) -> bool:
    (tmp_path / "key.pem").write_text(public_key)
    (tmp_path / "artifact").write_bytes(artifact)
    (tmp_path / "artifact.sig").write_bytes(base64.b64decode(signature_b64))
    result = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(tmp_path / "key.pem"), "-signature",
                             str(tmp_path / "artifact.sig"), str(tmp_path / "artifact")], capture_output=True, text=True)
    return result.returncode == 0 and "Verified OK" in result.stdout


def _audit_entries(cluster, *, requests_only: bool = True) -> list[dict]:
    """The signer's log (by default only the entries about requests, not its key records)."""
    entries = [json.loads(line) for line in (cluster.state_dir / "signer" / "audit.jsonl").read_text().splitlines()]
    return [e for e in entries if "request" in e] if requests_only else entries


def _signer(cluster) -> SignerClient:
    return SignerClient(url=cluster.signer_url, token_file=str(cluster.state_dir / "operator-signer-token"),
                        ca_file=str(cluster.state_dir / "pki" / "ca.crt"))


# ---------------------------------------------------------------- approvals

def test_two_approvals_from_distinct_approvers_sign_and_openssl_verifies(cluster, unique, tmp_path):
    key = _key(cluster, unique)
    _policy(cluster, unique, key, requiredApprovals=2, approvers={"groups": ["team-a-approvers"], "users": ["alice"]})
    artifacts = {"app.exe": b"the application\n", "lib.dll": b"a library\n"}
    name, created = _request(cluster, unique, key, {n: hashlib.sha256(b).hexdigest() for n, b in artifacts.items()})
    assert created.returncode == 0, created.stderr
    status = _until(cluster, name, lambda s: s.get("phase") == "Pending", what="Pending")
    assert status["approvalSummary"] == "0/2"
    assert "needs 2 more approvals from team-a-approvers (policy" in status["message"]  # alice cannot count

    # alice is named an approver (and given the approver role), but separation of duties keeps her own
    # approval from counting
    binding = unique("alice-approves")
    assert kubectl(cluster, "create", "rolebinding", binding, "-n", NAMESPACE, "--clusterrole=keyroom-approver",
                   "--user=alice").returncode == 0
    try:
        approved = wait_for(lambda: (r := _approve(cluster, name, "alice")).returncode == 0 and r,
                            what="alice's approval to be accepted by the API server")
    finally:
        kubectl(cluster, "delete", "rolebinding", binding, "-n", NAMESPACE)
    assert approved
    status = _until(cluster, name, lambda s: any(a["user"] == "alice" for a in s.get("approvals", [])))
    alice = next(a for a in status["approvals"] if a["user"] == "alice")
    assert alice["counted"] is False and "own request" in alice["reason"]
    assert status["phase"] == "Pending" and status["approvalSummary"] == "0/2"

    assert _approve(cluster, name, "bob").returncode == 0
    status = _until(cluster, name, lambda s: s.get("approvalSummary") == "1/2", what="bob's approval to count")
    assert status["phase"] == "Pending" and "needs 1 more approval from" in status["message"]
    assert _condition(status, "Approved")["status"] == "False"

    assert _approve(cluster, name, "carol").returncode == 0
    status = _final(cluster, name)
    assert status["phase"] == "Signed", status["message"]
    assert status["approvalSummary"] == "2/2"
    assert _condition(status, "Approved")["status"] == "True" and "bob, carol" in _condition(status, "Approved")["message"]
    assert _condition(status, "Ready")["status"] == "True" and _condition(status, "Denied")["status"] == "False"
    assert status["audit"]["entryHash"].startswith("sha256:") and status["finishedAt"]
    public_key = _public_key(cluster, key, status["keyVersion"])
    signatures = {s["name"]: s["value"] for s in status["signatures"]}
    assert set(signatures) == set(artifacts)
    for artifact_name, content in artifacts.items():
        assert _openssl_verifies(tmp_path, public_key, content, signatures[artifact_name])
        assert not _openssl_verifies(tmp_path, public_key, content + b"tampered", signatures[artifact_name])

    # the signer's audit entry names who approved and what was signed
    intent, signed = [e for e in _audit_entries(cluster) if e["request"]["name"] == name]
    assert intent["event"] == "Intent" and sorted(intent["approvers"]) == ["bob", "carol"]
    assert signed["event"] == "Signed" and signed["hash"] == status["audit"]["entryHash"]
    assert signed["index"] == status["audit"]["index"]
    # the key's status counts the signatures the signer made with it
    wait_for(lambda: get(cluster, "signingkey", key, namespace=NAMESPACE)["status"].get("signatureCount") == 2,
             what="the key's signatureCount to count both signatures")

    # a final request never changes again
    assert kubectl(cluster, "wait", "--for=condition=Ready", f"signrequest/{name}", "-n", NAMESPACE,
                   "--timeout=5s").returncode == 0
    events = kubectl(cluster, "get", "events", "-n", NAMESPACE, f"--field-selector=involvedObject.name={name}")
    for reason in ("AwaitingApproval", "ApprovalIgnored", "ApproveCounted", "Signed"):
        assert reason in events.stdout, events.stdout


def test_one_deny_from_an_approver_denies_for_good(cluster, unique):
    key = _key(cluster, unique)
    _policy(cluster, unique, key, requiredApprovals=1)
    name, _ = _request(cluster, unique, key, {"a.bin": _digest("a")})
    _until(cluster, name, lambda s: s.get("phase") == "Pending")
    assert _approve(cluster, name, "bob", "Deny").returncode == 0
    status = _final(cluster, name)
    assert status["phase"] == "Denied" and "denied by bob" in status["message"]
    assert _condition(status, "Denied")["status"] == "True"
    assert _condition(status, "Approved")["status"] == "False"
    assert _condition(status, "Stalled")["status"] == "True"
    # carol's later approval is recorded by the API server but changes nothing
    assert _approve(cluster, name, "carol").returncode == 0
    wait_for(lambda: len(get(cluster, "signrequest", name, namespace=NAMESPACE)["spec"]["approvals"]) == 2)
    assert _status(cluster, name)["phase"] == "Denied" and "signatures" not in _status(cluster, name)


def test_a_pending_request_expires_after_the_policy_ttl(cluster, unique):
    key = _key(cluster, unique)
    _policy(cluster, unique, key, requiredApprovals=1, requestTTL="4s")
    name, _ = _request(cluster, unique, key, {"a.bin": _digest("a")})
    status = _final(cluster, name, timeout=20)
    assert status["phase"] == "Expired" and "expired at" in status["message"]
    created = parse_time(get(cluster, "signrequest", name, namespace=NAMESPACE)["metadata"]["creationTimestamp"])
    assert parse_time(status["finishedAt"]) - created >= datetime.timedelta(seconds=4)
    assert status["expiresAt"] == format_time(created + datetime.timedelta(seconds=4))


def test_a_requester_the_policy_does_not_name_is_refused(cluster, unique):
    key = _key(cluster, unique)
    _policy(cluster, unique, key, requesters={"users": ["somebody-else"]})
    name, _ = _request(cluster, unique, key, {"a.bin": _digest("a")})
    status = _final(cluster, name)
    assert status["phase"] == "Failed" and _condition(status, "Stalled")["reason"] == "NotAllowed"
    assert "alice is not a requester" in status["message"]


def test_a_key_no_policy_selects_cannot_sign(cluster, unique):
    key = _key(cluster, unique)
    name, _ = _request(cluster, unique, key, {"a.bin": _digest("a")})
    status = _until(cluster, name, lambda s: s.get("phase") == "Pending")
    assert _condition(status, "Ready")["reason"] == "NoPolicy" and "fail closed" in status["message"]
    # a policy that appears later is picked up without touching the request
    _policy(cluster, unique, key)
    assert _final(cluster, name)["phase"] == "Signed"


def test_a_ci_service_account_of_the_namespace_signs_without_a_human(cluster, unique):
    account = unique("ci")
    for args in (("create", "serviceaccount", account, "-n", NAMESPACE),
                 ("create", "rolebinding", account, "-n", NAMESPACE, "--clusterrole=keyroom-requester",
                  f"--serviceaccount={NAMESPACE}:{account}")):
        assert kubectl(cluster, *args).returncode == 0
    username = f"system:serviceaccount:{NAMESPACE}:{account}"
    controlplane.write_kubeconfig(cluster.kubeconfig(account), server=cluster.server,
                                  ca_pem=(cluster.state_dir / "pki" / "ca.crt").read_bytes(), user=username,
                                  token=controlplane.request_token(cluster, namespace=NAMESPACE,
                                                                   service_account=account))
    key = _key(cluster, unique)
    _policy(cluster, unique, key, requesters={"serviceAccounts": [account]})
    name = unique("sr")
    document = {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SignRequest",
                "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": {"keyRef": {"name": key}, "reason": "nightly",
                         "requester": {"username": username, "groups": [
                             "system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}", "system:authenticated"]},
                         "digests": [{"name": "build.zip", "value": _digest("build")}]}}
    created = apply(cluster, document, identity=account)
    assert created.returncode == 0, created.stderr
    assert _final(cluster, name)["phase"] == "Signed"
    # alice, a developer but not named by this policy, is refused
    refused, _ = _request(cluster, unique, key, {"a": _digest("a")})
    assert _final(cluster, refused)["phase"] == "Failed"


# ---------------------------------------------------------------- keys: windows, one-time, rooms

def test_an_approved_request_waits_for_the_keys_window_then_signs(cluster, unique):
    start = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) + datetime.timedelta(seconds=5)
    key = _key(cluster, unique, offline={"enabled": True, "windows": [
        {"start": format_time(start), "end": format_time(start + datetime.timedelta(minutes=5))}]})
    _policy(cluster, unique, key)
    name, _ = _request(cluster, unique, key, {"a.bin": _digest("a")})
    status = _until(cluster, name, lambda s: s.get("phase") == "Pending", what="Pending")
    assert _condition(status, "Ready")["reason"] == "KeyOffline"
    assert f"offline until {format_time(start)}" in status["message"]
    assert _condition(status, "Approved")["status"] == "True"
    status = _final(cluster, name, timeout=30)
    assert status["phase"] == "Signed"
    assert parse_time(status["signedAt"]) >= start


def test_a_one_time_key_signs_one_request_and_then_refuses(cluster, unique, tmp_path):
    key = _key(cluster, unique, usage="OneTime")
    _policy(cluster, unique, key)
    first, _ = _request(cluster, unique, key, {"release.tar": _digest("release")})
    assert _final(cluster, first)["phase"] == "Signed"
    key_status = wait_for(lambda: (s := get(cluster, "signingkey", key, namespace=NAMESPACE)["status"])
                          .get("consumedBy") == first and s, what="the key to be consumed")
    wait_for(lambda: all(v["state"] == "PendingDestruction"
                         for v in get(cluster, "signingkey", key, namespace=NAMESPACE)["status"]["versions"]),
             what="the consumed key's versions to be scheduled for destruction")
    assert key_status["consumedBy"] == first
    second, _ = _request(cluster, unique, key, {"other.tar": _digest("other")})
    status = _final(cluster, second)
    assert status["phase"] == "Failed" and _condition(status, "Stalled")["reason"] == "KeyConsumed"
    assert f"already signed {first}" in status["message"]


def test_dave_cannot_sign_with_team_as_key_by_any_route(cluster, unique):
    key = _key(cluster, unique)
    _policy(cluster, unique, key)
    # not in team-a's namespace
    name, created = _request(cluster, unique, key, {"a.bin": _digest("a")}, user="dave")
    assert created.returncode != 0 and "forbidden" in created.stderr.lower()
    # not by naming team-a's key from team-b: a request can only name a key of its own namespace
    name, created = _request(cluster, unique, key, {"a.bin": _digest("a")}, user="dave", namespace="team-b")
    assert created.returncode == 0, created.stderr
    status = _until(cluster, name, lambda s: s.get("phase"), namespace="team-b")
    assert status["phase"] == "Pending" and _condition(status, "Ready")["reason"] == "KeyNotFound"
    # not by approving someone else's request, nor by forging an approval in bob's name
    victim, _ = _request(cluster, unique, key, {"b.bin": _digest("b")})
    _final(cluster, victim)
    assert _approve(cluster, victim, "dave").returncode != 0
    # nor by reading or changing the key or the policies that guard it
    assert kubectl(cluster, "get", "signingkey", key, "-n", NAMESPACE, identity="dave").returncode != 0
    assert kubectl(cluster, "label", "signingkey", key, "-n", NAMESPACE, "x=y", identity="dave").returncode != 0
    # calling the signer directly is refused to every identity but the operator's
    # (test_signingkey.test_the_signer_refuses_calls_without_a_valid_operator_token)


def test_the_signer_re_checks_and_refuses_what_the_policy_does_not_allow(cluster, unique):
    """Even the operator's own identity gets nothing for a request that is not approved."""
    import asyncio

    key = _key(cluster, unique)
    _policy(cluster, unique, key, requiredApprovals=1)
    name, _ = _request(cluster, unique, key, {"a.bin": _digest("a")})
    status = _until(cluster, name, lambda s: s.get("phase") == "Pending")
    body = get(cluster, "signrequest", name, namespace=NAMESPACE)

    async def ask(fingerprint: str):
        client = _signer(cluster)
        try:
            return await client.sign_request(namespace=NAMESPACE, name=name, uid=body["metadata"]["uid"],
                                             digests=fingerprint)
        finally:
            await client.close()
    with pytest.raises(SignerError) as refused:
        asyncio.run(ask(digests_fingerprint(body["spec"])))
    assert refused.value.reason == "AwaitingApproval" and refused.value.status == 403
    with pytest.raises(SignerError) as mismatch:
        asyncio.run(ask(digests_fingerprint({"digests": [{"name": "a.bin", "value": _digest("evil")}]})))
    assert mismatch.value.reason == "DigestsMismatch"
    refusals = [e for e in _audit_entries(cluster) if e["request"]["name"] == name]
    assert [e["event"] for e in refusals] == ["Refused", "Refused"]
    assert _status(cluster, name)["phase"] == "Pending" and status["approvalSummary"] == "0/1"


# ---------------------------------------------------------------- volume, limits, clean-up

def test_a_batch_of_500_digests_is_approved_once_and_signed(cluster, unique):
    key = _key(cluster, unique)
    _policy(cluster, unique, key, requiredApprovals=1)
    digests = {f"file-{i:03}.bin": _digest(f"content {i}") for i in range(500)}
    name, created = _request(cluster, unique, key, digests)
    assert created.returncode == 0, created.stderr
    _until(cluster, name, lambda s: s.get("phase") == "Pending")
    assert _approve(cluster, name, "bob").returncode == 0
    status = _final(cluster, name)
    assert status["phase"] == "Signed" and len(status["signatures"]) == 500
    public = serialization.load_pem_public_key(_public_key(cluster, key, status["keyVersion"]).encode())
    for signature in status["signatures"]:
        public.verify(base64.b64decode(signature["value"]), bytes.fromhex(digests[signature["name"]]),
                      ec.ECDSA(utils.Prehashed(hashes.SHA256())))  # raises if any does not verify
    [signed] = [e for e in _audit_entries(cluster) if e["request"]["name"] == name and e["event"] == "Signed"]
    assert len(signed["signatures"]) == 500


def test_the_hourly_signature_limit_holds_requests(cluster, unique):
    key = _key(cluster, unique)
    _policy(cluster, unique, key, maxSignaturesPerHour=2)
    first, _ = _request(cluster, unique, key, {"a": _digest("a"), "b": _digest("b")})
    assert _final(cluster, first)["phase"] == "Signed"
    second, _ = _request(cluster, unique, key, {"c": _digest("c")})
    status = _until(cluster, second, lambda s: s.get("phase") == "Pending")
    assert _condition(status, "Ready")["reason"] == "RateLimited"
    assert "allows 2 signatures per hour" in status["message"]
    too_big, _ = _request(cluster, unique, key, {"d": _digest("d"), "e": _digest("e"), "f": _digest("f")})
    status = _final(cluster, too_big)
    assert status["phase"] == "Failed" and "maxSignaturesPerHour of 2" in status["message"]


def test_finished_requests_are_removed_after_their_ttl(cluster, unique):
    key = _key(cluster, unique)
    _policy(cluster, unique, key)
    name, _ = _request(cluster, unique, key, {"a": _digest("a")},
                       annotations={"keyroom.dev/ttl-after-finished": "3s"})
    assert _final(cluster, name)["phase"] == "Signed"
    wait_for(lambda: kubectl(cluster, "get", "signrequest", name, "-n", NAMESPACE).returncode != 0,
             timeout=20, what="the finished request to be removed")


# ---------------------------------------------------------------- crashes, audit, secrets

def _kill(cluster, process: str) -> None:
    state = json.loads((cluster.state_dir / "state.json").read_text())
    os.killpg(state["processes"][process]["pid"], signal.SIGKILL)


def test_kill_9_of_operator_then_signer_mid_signing_signs_every_request_exactly_once(cluster, unique):
    key = _key(cluster, unique, algorithm="RSA_3072")  # ~3 ms a signature: long enough to be caught mid-way
    _policy(cluster, unique, key, maxSignaturesPerHour=10_000)
    names = []
    for batch in range(8):
        name, created = _request(cluster, unique, key,
                                 {f"f{i}": _digest(f"{batch}-{i}") for i in range(150)})
        assert created.returncode == 0, created.stderr
        names.append(name)
    phases = lambda: [_status(cluster, n).get("phase") for n in names]
    wait_for(lambda: any(p in ("Signing", "Signed") for p in phases()), what="signing to start")
    _kill(cluster, "operator")
    assert "Pending" in phases() or "Signing" in phases() or None in phases(), "everything finished before the kill"
    controlplane.start_operator(cluster)
    wait_for(lambda: "Signed" in phases(), what="a request to be signed after the operator restart")
    _kill(cluster, "signer")
    controlplane.start_signer(cluster)
    wait_for(lambda: all(p == "Signed" for p in phases()), timeout=120, what="every request to be signed")

    entries = _audit_entries(cluster)
    for name in names:
        status = _status(cluster, name)
        signed = [e for e in entries if e["request"]["name"] == name and e["event"] == "Signed"]
        assert len(signed) == 1, f"{name} has {len(signed)} Signed entries"
        assert [s["name"] for s in signed[0]["signatures"]] == [f"f{i}" for i in range(150)]
        assert {s["name"]: "sha256:" + hashlib.sha256(base64.b64decode(s["value"])).hexdigest()
                for s in status["signatures"]} == {s["name"]: s["hash"] for s in signed[0]["signatures"]}
        assert status["audit"]["index"] == signed[0]["index"]
    result = subprocess.run([sys.executable, "-m", "keyroom.signer.audit", "verify",
                             str(cluster.state_dir / "signer" / "audit.jsonl")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_one_byte_edit_of_the_audit_log_is_detected(cluster, unique, tmp_path):
    key = _key(cluster, unique)
    _policy(cluster, unique, key)
    name, _ = _request(cluster, unique, key, {"a": _digest("a")})
    assert _final(cluster, name)["phase"] == "Signed"
    checkpoint = wait_for(lambda: json.loads(kubectl(
        cluster, "get", "configmap", "keyroom-audit-checkpoint", "-n", "keyroom-system", "-o", "json").stdout or "{}")
        .get("data"), what="the audit checkpoint")
    log = (cluster.state_dir / "signer" / "audit.jsonl").read_bytes()

    def verify(content: bytes) -> subprocess.CompletedProcess:
        (tmp_path / "audit.jsonl").write_bytes(content)
        return subprocess.run([sys.executable, "-m", "keyroom.signer.audit", "verify", str(tmp_path / "audit.jsonl"),
                               "--index", checkpoint["index"], "--hash", checkpoint["entryHash"]],
                              capture_output=True, text=True)
    assert verify(log).returncode == 0
    position = log.index(b'"requester":"alice"') + len(b'"requester":"')
    edited = log[:position] + b"A" + log[position + 1:]  # one byte: alice -> Alice
    result = verify(edited)
    assert result.returncode == 1 and "does not match its hash" in result.stderr
    # a log cut back before the checkpointed entry is caught by the checkpoint
    lines = log.splitlines(keepends=True)
    result = verify(b"".join(lines[:int(checkpoint["index"])]))
    assert result.returncode == 1 and "truncated" in result.stderr


def test_the_token_pin_appears_in_no_log_event_or_status(cluster):
    pin = (cluster.state_dir / "hsm" / "pin").read_text().strip()
    assert len(pin) >= 8
    for path in (cluster.state_dir / "logs").glob("*.log"):
        assert pin not in path.read_text(errors="replace"), f"the PIN leaked into {path.name}"
    assert pin not in (cluster.state_dir / "signer" / "audit.jsonl").read_text()
    events = kubectl(cluster, "get", "events", "-A", "-o", "json")
    assert events.returncode == 0 and pin not in events.stdout
    everything = kubectl(cluster, "get", "keyroom", "-A", "-o", "json")
    assert everything.returncode == 0 and '"status"' in everything.stdout and pin not in everything.stdout


@pytest.mark.parametrize("then", ["denied", "expired"])
def test_a_request_the_signer_signed_is_reported_signed_whatever_happened_since(cluster, unique, then):
    """The operator died after the signer signed and before it wrote Signed; then a Deny came, or the TTL passed.

    On restart the operator's own decision says Denied or Expired, but an audited signature exists: the request
    is settled by the signer, never reported as Denied, Expired or Pending.
    """
    import asyncio

    key = _key(cluster, unique)
    _policy(cluster, unique, key, requiredApprovals=1, requestTTL="6s")
    _kill(cluster, "operator")
    try:
        name, created = _request(cluster, unique, key, {"a.bin": _digest("a")})
        assert created.returncode == 0, created.stderr
        assert _approve(cluster, name, "bob").returncode == 0
        body = get(cluster, "signrequest", name, namespace=NAMESPACE)

        async def sign():  # the call the operator made just before it died
            client = _signer(cluster)
            try:
                return await client.sign_request(namespace=NAMESPACE, name=name, uid=body["metadata"]["uid"],
                                                 digests=digests_fingerprint(body["spec"]))
            finally:
                await client.close()
        answer = asyncio.run(sign())
        assert len(answer["signatures"]) == 1
        if then == "denied":
            assert _approve(cluster, name, "carol", "Deny").returncode == 0
        else:
            created_at = parse_time(body["metadata"]["creationTimestamp"])
            wait_for(lambda: datetime.datetime.now(datetime.timezone.utc) > created_at + datetime.timedelta(seconds=7),
                     timeout=20, what="the request's TTL to pass")
    finally:
        controlplane.start_operator(cluster)
    status = _final(cluster, name)
    assert status["phase"] == "Signed", status
    assert status["signatures"] == answer["signatures"] and status["audit"] == answer["audit"]
    assert len([e for e in _audit_entries(cluster) if e["request"]["name"] == name and e["event"] == "Signed"]) == 1


# ---------------------------------------------------------------- matching builds

CI_A = "system:serviceaccount:team-a:ci-builder-a"
CI_B = "system:serviceaccount:team-a:ci-builder-b"
SA_GROUPS = ["system:serviceaccounts", "system:serviceaccounts:team-a", "system:authenticated"]
BUILDERS = {"required": 2, "builders": {"serviceAccounts": ["ci-builder-a", "ci-builder-b"]}}


def _built_request(cluster, unique, key: str, artifacts: dict[str, bytes]) -> str:
    """A request by the ci-builder-a pipeline for the artifacts it built."""
    name = unique("sr")
    created = apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SignRequest",
                              "metadata": {"name": name, "namespace": NAMESPACE},
                              "spec": {"keyRef": {"name": key}, "requester": {"username": CI_A, "groups": SA_GROUPS},
                                       "reason": "release 2.0",
                                       "digests": [{"name": n, "value": hashlib.sha256(b).hexdigest()}
                                                   for n, b in artifacts.items()]}}, identity="ci-builder-a")
    assert created.returncode == 0, created.stderr
    return name


def _attest(cluster, name: str, builder: str, artifacts: dict[str, bytes]) -> subprocess.CompletedProcess:
    """Append ``builder``'s own attestation of the digests of ``artifacts`` (its own build of the release)."""
    current = get(cluster, "signrequest", name, namespace=NAMESPACE)["spec"].get("attestations")
    entry = {"user": f"system:serviceaccount:team-a:{builder}", "groups": SA_GROUPS, "build": f"{builder} run 1",
             "digests": [{"name": n, "value": hashlib.sha256(b).hexdigest()} for n, b in artifacts.items()]}
    ops = ([{"op": "test", "path": "/spec/attestations", "value": current},
            {"op": "add", "path": "/spec/attestations/-", "value": entry}] if current is not None
           else [{"op": "add", "path": "/spec/attestations", "value": [entry]}])
    return kubectl(cluster, "patch", "signrequest", name, "-n", NAMESPACE, "--type=json", "-p", json.dumps(ops),
                   identity=builder)


def _events(cluster, name: str) -> str:
    return kubectl(cluster, "get", "events", "-n", NAMESPACE, f"--field-selector=involvedObject.name={name}",
                   "-o", "custom-columns=REASON:.reason,MESSAGE:.message").stdout


def test_two_ci_builders_that_agree_get_a_signature_and_the_audit_names_them(cluster, unique, tmp_path):
    key = _key(cluster, unique)
    _policy(cluster, unique, key, requesters={"serviceAccounts": ["ci-builder-a"]}, matchingBuilds=BUILDERS)
    artifacts = {"app.exe": b"the application, built reproducibly\n", "lib.dll": b"a library\n"}
    name = _built_request(cluster, unique, key, artifacts)
    status = _until(cluster, name, lambda s: s.get("phase") == "Pending", what="Pending")
    assert _condition(status, "Ready")["reason"] == "AwaitingBuilds" and status["buildSummary"] == "0/2"
    assert "needs 2 more matching builds from serviceaccount ci-builder-a or serviceaccount ci-builder-b" in \
        status["message"]

    # the requesting pipeline's own build counts once, however it is attested
    assert _attest(cluster, name, "ci-builder-a", artifacts).returncode == 0
    status = _until(cluster, name, lambda s: s.get("buildSummary") == "1/2", what="ci-builder-a's build to count")
    assert status["phase"] == "Pending" and status["builds"][0]["user"] == CI_A and status["builds"][0]["counted"]
    assert "needs 1 more matching build from serviceaccount ci-builder-b" in status["message"]
    assert _attest(cluster, name, "ci-builder-a", artifacts).returncode != 0  # refused at admission
    assert _status(cluster, name)["phase"] == "Pending"

    assert _attest(cluster, name, "ci-builder-b", artifacts).returncode == 0
    status = _final(cluster, name)
    assert status["phase"] == "Signed", status["message"]
    assert status["buildSummary"] == "2/2" and [(b["user"], b["counted"], b["build"]) for b in status["builds"]] == [
        (CI_A, True, "ci-builder-a run 1"), (CI_B, True, "ci-builder-b run 1")]
    assert f"builds of {CI_A}, {CI_B} match" in _condition(status, "Approved")["message"]
    public_key = _public_key(cluster, key, status["keyVersion"])
    for signature in status["signatures"]:
        assert _openssl_verifies(tmp_path, public_key, artifacts[signature["name"]], signature["value"])
    intent = next(e for e in _audit_entries(cluster) if e["request"]["name"] == name and e["event"] == "Intent")
    assert intent["builders"] == [{"user": CI_A, "build": "ci-builder-a run 1"},
                                  {"user": CI_B, "build": "ci-builder-b run 1"}]
    assert "BuildCounted" in _events(cluster, name)


def test_one_builder_whose_build_differs_blocks_the_signature(cluster, unique):
    key = _key(cluster, unique)
    _policy(cluster, unique, key, requesters={"serviceAccounts": ["ci-builder-a"]}, matchingBuilds=BUILDERS)
    artifacts = {"app.exe": b"the application\n", "lib.dll": b"a library\n"}
    name = _built_request(cluster, unique, key, artifacts)
    assert _attest(cluster, name, "ci-builder-a", artifacts).returncode == 0
    _until(cluster, name, lambda s: s.get("buildSummary") == "1/2", what="ci-builder-a's build to count")
    tampered = {**artifacts, "lib.dll": b"a library with a backdoor\n"}  # what the other build machine saw differs
    assert _attest(cluster, name, "ci-builder-b", tampered).returncode == 0
    status = _final(cluster, name)
    assert status["phase"] == "Failed" and "signatures" not in status
    assert _condition(status, "Stalled")["reason"] == "BuildMismatch"
    assert status["message"].startswith(f"{CI_B}'s build differs at lib.dll: its digest "
                                        f"{hashlib.sha256(tampered['lib.dll']).hexdigest()[:12]}...")
    assert [(b["user"], b["counted"]) for b in status["builds"]] == [(CI_A, True), (CI_B, False)]
    assert status["builds"][1]["reason"].startswith(f"{CI_B}'s build differs at lib.dll")
    events = _events(cluster, name)
    assert "BuildMismatch" in events and f"{CI_B}'s build differs at lib.dll" in events
    assert not [e for e in _audit_entries(cluster) if e["request"]["name"] == name and e["event"] == "Intent"]


def test_approvals_and_matching_builds_are_both_required(cluster, unique):
    key = _key(cluster, unique)
    _policy(cluster, unique, key, requesters={"serviceAccounts": ["ci-builder-a"]}, matchingBuilds=BUILDERS,
            requiredApprovals=1)
    artifacts = {"app.exe": b"the application\n"}
    name = _built_request(cluster, unique, key, artifacts)
    assert _attest(cluster, name, "ci-builder-a", artifacts).returncode == 0
    assert _attest(cluster, name, "ci-builder-b", artifacts).returncode == 0
    status = _until(cluster, name, lambda s: s.get("buildSummary") == "2/2", what="both builds to count")
    assert status["phase"] == "Pending" and _condition(status, "Ready")["reason"] == "AwaitingApproval"
    assert _approve(cluster, name, "bob").returncode == 0
    assert _final(cluster, name)["phase"] == "Signed"

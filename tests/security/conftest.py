"""Shared helpers for the attack tests: real identities against the real control plane and signer.

Everything here goes through the same doors an attacker would use: kubectl
with a fixture identity's kubeconfig, raw HTTPS calls to the signer with a
bearer token of the attacker's choosing, files in the signer's state
directory. What an attack obtained is read back from independent places: the
audit log on disk, the SigningKey's token objects through pkcs11-tool, and
signatures checked with ``cryptography`` against public keys recorded before
the attack.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.parse
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

from keyroom.devenv import controlplane
from tests.conftest import apply, approve, get, identity, kubectl, wait_for  # noqa: F401  (shared)

NAMESPACE = "team-a"
FINAL = ("Signed", "Denied", "Expired", "Failed")
#: the bearer a signer call carries unless told otherwise: the operator's own token for the signer audience
OPERATOR = object()


# ---------------------------------------------------------------- objects, as the fixture people write them

def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_key(cluster, unique, *, namespace: str = NAMESPACE, labels: dict | None = None, **spec) -> str:
    """A SigningKey (as admin); returns its name once the signer generated its first version."""
    name = unique("key")
    document = {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningKey",
                "metadata": {"name": name, "namespace": namespace, **({"labels": labels} if labels else {})},
                "spec": {"algorithm": "ECDSA_P256", **spec}}
    created = apply(cluster, document)
    assert created.returncode == 0, created.stderr
    wait_for(lambda: key_status(cluster, name, namespace).get("currentVersion"), timeout=60,
             what=f"key {name} to get a version")
    return name


def make_policy(cluster, unique, key: str | None, *, namespace: str = NAMESPACE, **spec) -> str:
    """A SigningPolicy (as admin) for ``key`` (or for spec's keySelector); returns once it selected the key."""
    name = unique("policy")
    body = {"requesters": {"groups": ["team-a-devs"]}, "approvers": {"groups": ["team-a-approvers"]},
            "requiredApprovals": 0, **({"keys": [key]} if key else {}), **spec}
    created = apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningPolicy",
                              "metadata": {"name": name, "namespace": namespace}, "spec": body})
    assert created.returncode == 0, created.stderr
    if key:
        wait_for(lambda: key in get(cluster, "signingpolicy", name, namespace=namespace).get("status", {})
                 .get("matchedKeys", []), what=f"policy {name} to select {key}")
    return name


def request_document(name: str, key: str, digests: dict[str, str], *, user: str = "alice",
                     namespace: str = NAMESPACE, **spec) -> dict:
    return {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SignRequest",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"keyRef": {"name": key}, "requester": identity(user), "reason": "security test",
                     "digests": [{"name": n, "value": v} for n, v in digests.items()], **spec}}


def make_request(cluster, unique, key: str, digests: dict[str, str] | None = None, *, user: str = "alice",
                 namespace: str = NAMESPACE, **spec) -> str:
    """A SignRequest created by ``user`` (who must be allowed to create it); returns its name."""
    name = unique("sr")
    created = apply(cluster, request_document(name, key, digests or {"a.bin": digest(name)}, user=user,
                                              namespace=namespace, **spec), identity=user)
    assert created.returncode == 0, created.stderr
    return name


def key_status(cluster, name: str, namespace: str = NAMESPACE) -> dict:
    return get(cluster, "signingkey", name, namespace=namespace).get("status", {})


def request_status(cluster, name: str, namespace: str = NAMESPACE) -> dict:
    return get(cluster, "signrequest", name, namespace=namespace).get("status", {})


def uid_of(cluster, kind: str, name: str, namespace: str = NAMESPACE) -> str:
    return get(cluster, kind, name, namespace=namespace)["metadata"]["uid"]


def wait_request(cluster, name: str, check, *, timeout: float = 60, what: str = "",
                 namespace: str = NAMESPACE) -> dict:
    return wait_for(lambda: (s := request_status(cluster, name, namespace)) and check(s) and s, timeout=timeout,
                    what=what or f"{name} to change")


def final(cluster, name: str, *, timeout: float = 60, namespace: str = NAMESPACE) -> dict:
    return wait_request(cluster, name, lambda s: s.get("phase") in FINAL, timeout=timeout,
                        what=f"{name} to finish", namespace=namespace)


def condition(status: dict, type: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == type), {})


def public_key(cluster, key: str, version: int, namespace: str = NAMESPACE) -> str:
    return next(v["publicKey"] for v in key_status(cluster, key, namespace)["versions"] if v["version"] == version)


def verifies(public_pem: str, digest_hex: str, signature_b64: str, algorithm: str = "SHA256") -> bool:
    """Does the signature verify over the (pre-hashed) digest with this public key (EC or RSA PKCS#1 v1.5)?"""
    key = serialization.load_pem_public_key(public_pem.encode())
    chosen = {"SHA256": hashes.SHA256(), "SHA384": hashes.SHA384(), "SHA512": hashes.SHA512()}[algorithm]
    signature, value = base64.b64decode(signature_b64), bytes.fromhex(digest_hex)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, value, ec.ECDSA(utils.Prehashed(chosen)))
        else:
            key.verify(signature, value, padding.PKCS1v15(), utils.Prehashed(chosen))
    except InvalidSignature:
        return False
    return True


# ---------------------------------------------------------------- the audit log and its checkpoint

def audit_path(cluster):
    return cluster.state_dir / "signer" / "audit.jsonl"


def audit_entries(cluster) -> list[dict]:
    """The entries of the signer's current log (a line being written at this moment is left out)."""
    try:
        text = audit_path(cluster).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def entries_for(cluster, uid: str, event: str | None = None) -> list[dict]:
    return [e for e in audit_entries(cluster) if (e.get("request") or {}).get("uid") == uid
            and (event is None or e["event"] == event)]


def checkpoint(cluster) -> dict | None:
    """The checkpoint ConfigMap's data, read as admin; None when there is none."""
    found = kubectl(cluster, "get", "configmap", "keyroom-audit-checkpoint", "-n", "keyroom-system", "-o", "json")
    return json.loads(found.stdout).get("data") if found.returncode == 0 else None


# ---------------------------------------------------------------- the signer's door

def operator_token(cluster) -> str:
    return (cluster.state_dir / "operator-signer-token").read_text().strip()


def service_account_token(cluster, service_account: str, *, namespace: str = "keyroom-system",
                          audience: str | None = None) -> str:
    return controlplane.request_token(cluster, namespace=namespace, service_account=service_account,
                                      audience=audience, duration="1h")


def signer_call(cluster, method: str, path: str, *, token: Any = OPERATOR, body: Any = None,
                data: bytes | None = None, content_type: str = "application/json",
                client_cert: tuple[str, str] | None = None, headers: dict | None = None) -> tuple[int, Any]:
    """One raw HTTPS call to the signer, the path sent exactly as given; returns (status, JSON or text)."""
    context = ssl.create_default_context(cafile=str(cluster.state_dir / "pki" / "ca.crt"))
    if client_cert is not None:
        context.load_cert_chain(*client_cert)
    url = urllib.parse.urlsplit(cluster.signer_url)
    connection = http.client.HTTPSConnection(url.hostname, url.port, context=context, timeout=120)
    headers = dict(headers or {})
    if token is OPERATOR:
        token = operator_token(cluster)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if body is not None:
        data = json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = content_type
    try:
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode(errors="replace")


def sign_call(cluster, namespace: str, name: str, uid: str, fingerprint: str, **kwargs) -> tuple[int, Any]:
    return signer_call(cluster, "POST", f"/v1/requests/{namespace}/{name}/{uid}/sign",
                       body={"digests": fingerprint}, **kwargs)


def health(cluster) -> tuple[int | None, Any]:
    """The signer's /healthz answer, or (None, None) while nothing answers."""
    try:
        return signer_call(cluster, "GET", "/healthz", token=None)
    except OSError:
        return None, None


def wait_healthy(cluster, timeout: float = 60) -> None:
    wait_for(lambda: health(cluster)[0] == 200, timeout=timeout, what="the signer's /healthz to answer 200")


# ---------------------------------------------------------------- the signer process

def signer_process(cluster) -> dict | None:
    state = json.loads((cluster.state_dir / "state.json").read_text())
    return state["processes"].get("signer")


def signer_running(cluster) -> bool:
    process = signer_process(cluster)
    return process is not None and controlplane._alive(process)  # noqa: SLF001


def kill_signer(cluster) -> None:
    """kill -9 of the signer's process group, as a node failure or the OOM killer would."""
    process = signer_process(cluster)
    os.killpg(process["pid"], signal.SIGKILL)
    wait_for(lambda: not controlplane._alive(process), what="the signer to die")  # noqa: SLF001


def stop_signer(cluster) -> None:
    controlplane.stop_process(cluster.state_dir, "signer", log=print)


class _AnswersHealth(controlplane._Supervisor):  # noqa: SLF001
    """start_signer's own process start, but waiting only until /healthz answers at all (200 or 503)."""

    def __init__(self, cluster) -> None:
        super().__init__(cluster.state_dir, controlplane._read_state(cluster.state_dir))  # noqa: SLF001
        self.cluster = cluster

    def wait_until(self, name, process, check, *, what, timeout=60.0):
        super().wait_until(name, process, lambda: health(self.cluster)[0] is not None, what="answering /healthz",
                           timeout=timeout)


def start_signer_unchecked(cluster) -> None:
    """Start the dev signer (same environment as controlplane.start_signer) even if it is going to refuse."""
    controlplane.start_signer(cluster, supervisor=_AnswersHealth(cluster))


def wait_audit_failure(cluster, *, contains: str | tuple[str, ...], timeout: float = 30) -> dict:
    """Health is 503 AuditLogUnavailable because the log failed verification (not merely "not open yet").

    ``contains``: what the message must say (any one of several ways the signer may find the damage).
    """
    def failed():
        code, answer = health(cluster)
        return (code == 503 and isinstance(answer, dict) and answer.get("reason") == "AuditLogUnavailable"
                and "failed verification" in answer.get("message", "") and answer)
    answer = wait_for(failed, timeout=timeout, what="the signer to refuse with AuditLogUnavailable")
    assert any(words in answer["message"] for words in ((contains,) if isinstance(contains, str) else contains)), \
        answer
    return answer


def new_chain(cluster, reason: str) -> subprocess.CompletedProcess:
    """The administrator's recovery command, with the admin kubeconfig."""
    return subprocess.run([sys.executable, "-m", "keyroom.signer.audit", "new-chain", "--reason", reason],
                          env=dict(os.environ, KUBECONFIG=str(cluster.kubeconfig("admin"))),
                          capture_output=True, text=True, timeout=60)


def recover(cluster, reason: str) -> None:
    """Leave the shared signer running and healthy, starting a new chain if its log fails verification."""
    if not signer_running(cluster):
        start_signer_unchecked(cluster)
    if health(cluster)[0] == 200:
        return
    # wait until the signer has looked at its log (health stays 503 "not open yet" for a moment at start)
    wait_for(lambda: (h := health(cluster))[0] == 200 or "failed verification" in str(h[1]), timeout=30,
             what="the signer to verify its log")
    if health(cluster)[0] != 200:
        written = new_chain(cluster, reason)
        assert written.returncode == 0, written.stderr
    wait_healthy(cluster, timeout=30)

"""APK signing on the real control plane: alice asks, bob and carol approve, apksigner verifies what comes back.

The requester runs ``kubectl keyroom sign app.apk --format apk``: the plugin
sends the APK's content digest and v2/v3 signed data, the operator waits for
two approvals, the signer checks the blocks against its own certificate record
and returns the APK Signing Block, and the plugin writes the signed APK. Only
``apksigner verify -v`` (Debian's 31.0.2) decides whether it is right. A
request whose signed data names another certificate fails at the signer,
however many approvals it has.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import subprocess

import pytest
from cryptography import x509 as crypto_x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keyroom.cli import apk as cli_apk
from keyroom.signer.formats import apk
from tests.android import make_apk, verify
from tests.conftest import apply, approve, get, identity, kubectl, wait_for
from tests.integration.test_cli import NAMESPACE, _created_name, keyroom, make_key
from tests.integration.test_cli_roles import offline


def offline_verify(path, trust) -> subprocess.CompletedProcess:
    return offline("verify", str(path), "--trust", str(trust), "-o", "json")

pytestmark = pytest.mark.integration


def _certificate(cluster, name: str, key: str) -> bytes:
    """A self-signed code-signing Certificate for ``key`` made to last, as an app's is; once Ready, its DER."""
    assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "Certificate",
                           "metadata": {"name": name, "namespace": NAMESPACE},
                           "spec": {"keyRef": {"name": key}, "issuerRef": {"selfSigned": {}},
                                    "subject": {"commonName": name, "organization": ["Keyroom Android"]},
                                    "duration": "9125d", "followRotation": False}}
                 ).returncode == 0
    wait_for(lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in
                         get(cluster, "certificate", name, namespace=NAMESPACE).get("status", {}).get("conditions", [])),
             timeout=60, what=f"certificate {name} to be Ready")
    pem = get(cluster, "certificate", name, namespace=NAMESPACE)["status"]["certificate"]
    return crypto_x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


def _apk_key(cluster, unique, what: str, algorithm: str = "ECDSA_P256") -> tuple[str, str, bytes]:
    key = make_key(cluster, unique(what), requesters={"groups": ["team-a-devs"]},
                   approvers={"groups": ["team-a-approvers"]}, required=2, algorithm=algorithm)
    certificate = unique(f"{what}-cert")
    return key, certificate, _certificate(cluster, certificate, key)


def test_an_apk_signed_through_two_approvals_verifies_with_apksigner(cluster, unique, tmp_path):
    key, certificate, der = _apk_key(cluster, unique, "apk")
    source = make_apk(tmp_path / "app.apk")
    out = tmp_path / "signed"
    signing = keyroom(cluster, "alice", "sign", str(source), "--format", "apk", "--key", key, "--certificate",
                      certificate, "--out", str(out), "--reason", "android 3.1.0", "--timeout", "90", wait=False)
    name = _created_name(cluster, key)
    wait_for(lambda: "needs 2 more approvals" in get(cluster, "sr", name, namespace=NAMESPACE)
             .get("status", {}).get("message", ""), what=f"{name} to wait for two approvals")
    spec = get(cluster, "sr", name, namespace=NAMESPACE)["spec"]
    content_digest = cli_apk.content_digest(source)
    assert spec["format"] == "apk" and spec["certificateRef"] == {"name": certificate}
    assert spec["digests"] == [{"name": "app.apk", "value": content_digest.hex()}]
    assert [b["scheme"] for b in spec["apk"]["signedData"]] == ["v2", "v3"]

    for approver in ("bob", "carol"):
        approved = keyroom(cluster, approver, "approve", name, "--reason", "release checklist done")
        assert approved.returncode == 0, approved.stderr
        assert "format:     apk, 1 digest(s) (SHA256)" in approved.stderr  # what the approver saw
    stdout, stderr = signing.communicate(timeout=90)
    assert signing.returncode == 0, stderr
    assert stdout.splitlines() == [name, str(out / "app.apk")]

    result = verify(out / "app.apk", "--print-certs")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Verifies"
    assert "Verified using v2 scheme (APK Signature Scheme v2): true" in lines
    assert "Verified using v3 scheme (APK Signature Scheme v3): true" in lines
    assert f"Signer #1 certificate DN: CN={certificate}, O=Keyroom Android" in lines
    assert f"Signer #1 certificate SHA-256 digest: {hashlib.sha256(der).hexdigest()}" in lines

    trust = tmp_path / "trust"  # anyone with the exported public material verifies it without a cluster too
    assert keyroom(cluster, "alice", "export", key, "--out", str(trust)).returncode == 0
    offline = offline_verify(out / "app.apk", trust)
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["signer"]["requestDigest"] == content_digest.hex()

    tampered = bytearray((out / "app.apk").read_bytes())
    position = tampered.index(bytes(range(256)) * 4) + 4096
    tampered[position] ^= 0xFF
    (tmp_path / "tampered.apk").write_bytes(tampered)
    broken = verify(tmp_path / "tampered.apk")
    assert broken.returncode != 0 and "DOES NOT VERIFY" in broken.stdout + broken.stderr
    assert "APK integrity check failed" in broken.stdout + broken.stderr
    refused = offline_verify(tmp_path / "tampered.apk", trust)
    assert refused.returncode == 3 and "changed after signing" in json.loads(refused.stdout)["error"]

    body = get(cluster, "sr", name, namespace=NAMESPACE)
    assert body["status"]["phase"] == "Signed" and body["status"]["certificate"]["name"] == certificate
    log = cluster.state_dir / "signer" / "audit.jsonl"
    shown = json.loads(keyroom(cluster, "admin", "audit", "show", "--file", str(log), "--request", name,
                               "-o", "json").stdout)
    intent = next(e for e in shown if e["event"] == "Intent")
    assert intent["format"] == "apk" and sorted(intent["approvers"]) == ["bob", "carol"]
    assert intent["digests"] == [{"name": "app.apk", "value": content_digest.hex()}]
    assert intent["apk"] == [{"scheme": b["scheme"], "signedData": "sha256:" + hashlib.sha256(
        base64.b64decode(b["value"])).hexdigest()} for b in spec["apk"]["signedData"]]
    assert intent["certificate"]["fingerprint"] == "sha256:" + hashlib.sha256(der).hexdigest()


def _stranger_certificate() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = crypto_x509.Name([crypto_x509.NameAttribute(NameOID.COMMON_NAME, "not the key's certificate")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (crypto_x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(crypto_x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER))


def test_signed_data_naming_another_certificate_fails_at_the_signer_despite_approvals(cluster, unique, tmp_path):
    key, certificate, _ = _apk_key(cluster, unique, "apk-forged")
    source = make_apk(tmp_path / "app.apk")
    _, digest, blocks = cli_apk.signed_data(source, certificate_der=_stranger_certificate())
    name = unique("apk-forged")
    request = {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SignRequest",
               "metadata": {"name": name, "namespace": NAMESPACE},
               "spec": {"keyRef": {"name": key}, "requester": identity("alice"), "format": "apk",
                        "certificateRef": {"name": certificate}, "digests": [{"name": "app.apk", "value": digest.hex()}],
                        "apk": {"signedData": [{"scheme": s, "value": base64.b64encode(d).decode()} for s, d in blocks]}}}
    created = apply(cluster, request, identity="alice")
    assert created.returncode == 0, created.stderr
    for approver in ("bob", "carol"):
        assert approve(cluster, name, approver).returncode == 0
    status = wait_for(lambda: (lambda s: s if s.get("phase") in ("Failed", "Signed") else None)(
        get(cluster, "sr", name, namespace=NAMESPACE).get("status", {})), timeout=60, what=f"{name} to finish")
    assert status["phase"] == "Failed" and "exactly the key version's certificate" in status["message"], status
    assert not status.get("signatures")

    without = dict(request, metadata={"name": unique("apk-bare"), "namespace": NAMESPACE},
                   spec={k: v for k, v in request["spec"].items() if k != "apk"})
    refused = apply(cluster, without, identity="alice")
    assert refused.returncode != 0 and "format apk signs one APK" in refused.stderr
    assert kubectl(cluster, "get", "sr", without["metadata"]["name"], "-n", NAMESPACE).returncode != 0


def test_the_signed_apk_carries_only_what_the_signer_checked(cluster, unique, tmp_path):
    """The block in the APK holds exactly the signed data of the request, whose hashes the audit log holds."""
    key, certificate, der = _apk_key(cluster, unique, "apk-block")
    source = make_apk(tmp_path / "app.apk", resource=b"small")
    signing = keyroom(cluster, "alice", "sign", str(source), "--format", "apk", "--key", key, "--certificate",
                      certificate, "--in-place", "--timeout", "90", wait=False)
    name = _created_name(cluster, key)
    for approver in ("bob", "carol"):
        assert approve(cluster, name, approver).returncode == 0
    _, stderr = signing.communicate(timeout=90)
    assert signing.returncode == 0, stderr
    spec = get(cluster, "sr", name, namespace=NAMESPACE)["spec"]
    parts = cli_apk.read(source, replace_signature=True)
    assert apk.signed_data_of(parts.old_block) == {b["scheme"]: base64.b64decode(b["value"])
                                                   for b in spec["apk"]["signedData"]}
    assert verify(source).returncode == 0

"""Certificates on the real control plane: the operator names them, the signer issues them in SoftHSM.

Every chain and CRL is checked with the ``openssl`` command line. Renewal uses
durations of seconds, so the renewal timer itself is exercised.
"""
from __future__ import annotations

import base64
import hashlib
import json
import pathlib
import subprocess
import time

import pytest
from cryptography import x509 as crypto_x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import apply, get, kubectl, wait_for
from tests.integration.test_signrequest import _final, _policy, _request

pytestmark = pytest.mark.integration

NAMESPACE = "team-a"
SUBJECT = {"commonName": "Team A Release Signing", "organization": ["Example Corp"], "country": ["DE"]}


def _key(cluster, unique, **spec) -> str:
    name = unique("key")
    assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningKey",
                           "metadata": {"name": name, "namespace": NAMESPACE},
                           "spec": {"algorithm": "ECDSA_P256", **spec}}).returncode == 0
    return name


def _certificate(cluster, name: str, key: str, **spec) -> subprocess.CompletedProcess:
    return apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "Certificate",
                           "metadata": {"name": name, "namespace": NAMESPACE},
                           "spec": {"keyRef": {"name": key}, "issuerRef": {"selfSigned": {}}, "subject": SUBJECT,
                                    **spec}})


def _status(cluster, name: str) -> dict:
    return get(cluster, "certificate", name, namespace=NAMESPACE).get("status", {})


def _condition(status: dict, type: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == type), {})


def _ready(cluster, name: str, timeout: float = 60) -> dict:
    return wait_for(lambda: (s := _status(cluster, name)) and _condition(s, "Ready").get("status") == "True" and s,
                    timeout=timeout, what=f"certificate {name} to be Ready")


def _openssl(directory: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True, timeout=30)


def _config_map(cluster, name: str) -> dict:
    found = kubectl(cluster, "get", "configmap", name, "-n", NAMESPACE, "-o", "json")
    return json.loads(found.stdout) if found.returncode == 0 else {}


def test_a_self_signed_certificate_is_issued_and_published_in_its_secret(cluster, unique, tmp_path):
    key = _key(cluster, unique)
    name = unique("cert")
    assert _certificate(cluster, name, key, secretName=name, duration="30d", renewBefore="10d").returncode == 0
    status = _ready(cluster, name)
    assert status["revision"] == 1 and status["keyVersion"] == 1 and status["issuer"] == "selfSigned"
    assert _condition(status, "Issuing")["status"] == "False"
    assert _condition(status, "Expired")["status"] == "False"
    certificate = crypto_x509.load_pem_x509_certificate(status["certificate"].encode())
    assert format(certificate.serial_number, "x") == status["serialNumber"]
    key_status = get(cluster, "signingkey", key, namespace=NAMESPACE)["status"]
    assert certificate.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo).decode() == \
        key_status["versions"][0]["publicKey"]
    secret = wait_for(lambda: (found := kubectl(cluster, "get", "secret", name, "-n", NAMESPACE, "-o", "json"))
                      .returncode == 0 and json.loads(found.stdout), what="the certificate's Secret")
    assert secret["type"] == "keyroom.dev/certificate" and sorted(secret["data"]) == ["ca.crt", "tls.crt"]
    assert base64.b64decode(secret["data"]["tls.crt"]).decode() == status["certificate"]
    (tmp_path / "cert.pem").write_text(status["certificate"])
    assert _openssl(tmp_path, "verify", "-CAfile", "cert.pem", "cert.pem").returncode == 0
    columns = kubectl(cluster, "get", "kcert", name, "-n", NAMESPACE).stdout
    assert "selfSigned" in columns and "True" in columns and key in columns


def test_bad_durations_are_refused_at_admission(cluster, unique):
    key = _key(cluster, unique)
    for spec, message in (({"duration": "10d", "renewBefore": "10d"}, "less than spec.duration"),
                          ({"duration": "0d", "renewBefore": "1h"}, "must be positive"),
                          ({"duration": "90d", "renewBefore": "0h"}, "must be positive"),
                          ({"duration": "1.5h"}, "spec.duration")):
        refused = _certificate(cluster, unique("cert"), key, **spec)
        assert refused.returncode != 0 and message in refused.stderr, (spec, refused.stderr)


def test_a_ca_issues_a_leaf_and_revocation_reaches_its_crl(cluster, unique, tmp_path):
    ca_key, leaf_key = _key(cluster, unique), _key(cluster, unique)
    ca, leaf = unique("ca"), unique("cert")
    assert _certificate(cluster, ca, ca_key, isCA=True, duration="365d",
                        subject={"commonName": "Team A CA"}).returncode == 0
    assert _certificate(cluster, leaf, leaf_key, issuerRef={"ca": {"name": ca}}).returncode == 0
    ca_status, leaf_status = _ready(cluster, ca), _ready(cluster, leaf)
    assert leaf_status["issuer"] == f"ca/{ca}" and leaf_status["chain"] == ca_status["certificate"]
    crl_map = wait_for(lambda: _config_map(cluster, f"{ca}-crl"), what="the CA's CRL ConfigMap")
    assert sorted(crl_map["data"]) == ["ca.crl", "ca.crt"]
    (tmp_path / "ca.pem").write_text(ca_status["certificate"])
    (tmp_path / "leaf.pem").write_text(leaf_status["certificate"])
    (tmp_path / "crl.pem").write_text(crl_map["data"]["ca.crl"])
    checked = _openssl(tmp_path, "verify", "-crl_check", "-CAfile", "ca.pem", "-CRLfile", "crl.pem", "leaf.pem")
    assert checked.returncode == 0, checked.stdout + checked.stderr

    revoked = kubectl(cluster, "patch", "certificate", leaf, "-n", NAMESPACE, "--type=merge", "-p",
                      json.dumps({"spec": {"revocation": {"reason": "keyCompromise",
                                                          "since": "2026-01-01T00:00:00Z"}}}))
    assert revoked.returncode == 0, revoked.stderr
    status = wait_for(lambda: (s := _status(cluster, leaf)) and _condition(s, "Revoked").get("status") == "True" and s,
                      what="the leaf to be revoked")
    assert _condition(status, "Ready")["status"] == "False" and _condition(status, "Ready")["reason"] == "Revoked"
    crl_map = wait_for(lambda: (m := _config_map(cluster, f"{ca}-crl")) and m["data"]["ca.crl"]
                       != (tmp_path / "crl.pem").read_text() and m, what="a new CRL")
    (tmp_path / "crl.pem").write_text(crl_map["data"]["ca.crl"])
    checked = _openssl(tmp_path, "verify", "-crl_check", "-CAfile", "ca.pem", "-CRLfile", "crl.pem", "leaf.pem")
    assert checked.returncode != 0 and "certificate revoked" in checked.stdout + checked.stderr
    withdrawn = kubectl(cluster, "patch", "certificate", leaf, "-n", NAMESPACE, "--type=json", "-p",
                        '[{"op": "remove", "path": "/spec/revocation"}]')
    assert withdrawn.returncode != 0 and "cannot be withdrawn" in withdrawn.stderr
    # once the CRL lists the leaf, the CA and its revoked leaf leave each other alone: a pass of either one that
    # woke the other made them ask the signer and apply the CRL ConfigMap several times a second, for good
    before = _config_map_applies(cluster)
    time.sleep(3)  # a measurement window, not a wait for a condition
    assert _config_map_applies(cluster) - before <= 1


def _config_map_applies(cluster) -> int:
    """Server-side applies of ConfigMaps the API server has served: the operator's CRL ConfigMaps are its only ones."""
    metrics = kubectl(cluster, "get", "--raw", "/metrics")
    assert metrics.returncode == 0, metrics.stderr
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in metrics.stdout.splitlines()
               if line.startswith("apiserver_request_total{") and 'resource="configmaps"' in line
               and 'verb="APPLY"' in line)


def test_a_short_lived_certificate_is_renewed_on_the_same_key_pair(cluster, unique):
    key = _key(cluster, unique)
    name = unique("cert")
    assert _certificate(cluster, name, key, duration="40s", renewBefore="30s").returncode == 0
    first = _ready(cluster, name)
    renewed = wait_for(lambda: (s := _status(cluster, name)).get("revision", 0) >= 2 and s, timeout=45,
                       what="the renewal 10 s after issuance")
    assert renewed["serialNumber"] != first["serialNumber"] and renewed["keyVersion"] == first["keyVersion"]
    public = [crypto_x509.load_pem_x509_certificate(s["certificate"].encode()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) for s in (first, renewed)]
    assert public[0] == public[1]
    events = kubectl(cluster, "get", "events", "-n", NAMESPACE, f"--field-selector=involvedObject.name={name}").stdout
    assert "Issued" in events and "Renewed" in events


def test_a_cms_signature_embeds_the_certificate_and_openssl_verifies_it(cluster, unique, tmp_path):
    key = _key(cluster, unique)
    name = unique("cert")
    assert _certificate(cluster, name, key).returncode == 0
    status = _ready(cluster, name)
    _policy(cluster, unique, key)
    artifact = tmp_path / "app.bin"
    artifact.write_bytes(b"release 1.4.2\n" * 100)
    request, created = _request(cluster, unique, key, {"app.bin": hashlib.sha256(artifact.read_bytes()).hexdigest()},
                                format="cms")
    assert created.returncode == 0, created.stderr
    signed = _final(cluster, request)
    assert signed["phase"] == "Signed", signed
    assert signed["certificate"] == {"name": name, "serialNumber": status["serialNumber"],
                                     "fingerprint": status["fingerprint"]}
    (tmp_path / "app.bin.p7s").write_bytes(base64.b64decode(signed["signatures"][0]["value"]))
    (tmp_path / "ca.pem").write_text(status["certificate"])
    verified = _openssl(tmp_path, "cms", "-verify", "-binary", "-inform", "DER", "-in", "app.bin.p7s", "-content",
                        "app.bin", "-CAfile", "ca.pem", "-purpose", "any", "-out", "/dev/null")
    assert verified.returncode == 0, verified.stderr
    artifact.write_bytes(b"tampered")
    tampered = _openssl(tmp_path, "cms", "-verify", "-binary", "-inform", "DER", "-in", "app.bin.p7s", "-content",
                        "app.bin", "-CAfile", "ca.pem", "-purpose", "any", "-out", "/dev/null")
    assert tampered.returncode != 0


def test_a_revoked_certificate_is_never_embedded_in_a_new_signature(cluster, unique):
    key = _key(cluster, unique)
    name = unique("cert")
    assert _certificate(cluster, name, key).returncode == 0
    _ready(cluster, name)
    _policy(cluster, unique, key)
    assert kubectl(cluster, "patch", "certificate", name, "-n", NAMESPACE, "--type=merge", "-p",
                   json.dumps({"spec": {"revocation": {"since": "2026-01-01T00:00:00Z"}}})).returncode == 0
    request, created = _request(cluster, unique, key, {"app.bin": "ab" * 32}, format="cms")
    assert created.returncode == 0, created.stderr
    waiting = wait_for(lambda: (s := get(cluster, "signrequest", request, namespace=NAMESPACE).get("status", {}))
                       and "no usable certificate" in s.get("message", "") and s, what="the request to wait")
    assert waiting["phase"] == "Pending" and "revoked" in waiting["message"]
    assert not waiting.get("signatures")


def test_the_operator_cannot_supply_an_external_certificate(cluster, unique):
    """A forged certificate from the operator's token would otherwise be checked only against the key and CSR."""
    key = _key(cluster, unique)
    name = unique("cert")
    assert _certificate(cluster, name, key, issuerRef={"external": {}}).returncode == 0
    supplied = kubectl(cluster, "annotate", "certificate", name, "-n", NAMESPACE,
                       "keyroom.dev/issued-certificate=-----BEGIN CERTIFICATE-----", identity="operator")
    assert supplied.returncode != 0 and "may not supply an external certificate" in supplied.stderr
    by_admin = kubectl(cluster, "annotate", "certificate", name, "-n", NAMESPACE,
                       "keyroom.dev/issued-certificate=-----BEGIN CERTIFICATE-----")
    assert by_admin.returncode == 0, by_admin.stderr

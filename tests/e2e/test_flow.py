"""keyroom installed with its Helm chart, the operator and signer running as pods on a local node.

The images are built from images/Dockerfile and loaded into the node's containerd; `helm install` puts the
chart into the control plane (taking over the CRDs, policies and roles the control plane applied from crds/);
then the flow a platform team would try first: keys generated in the signer pod's token, a SignRequest
approved by bob and carol and verified with openssl, a certificate issued, the signer pod replaced with its
token and audit log intact on the volume, the operator pod killed mid-request without a duplicate signature.
Each step prints how long it took. ``KEYROOM_E2E_CLUSTER=kind`` (``make e2e-kind``) runs the same flow on kind.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
from cryptography import x509

from keyroom.devenv import helm as helm_module
from keyroom.devenv import images, node
from tests.e2e import kind
from tests.conftest import REPO, apply, approve, get, identity, kubectl, wait_for
from tests.integration.test_signrequest import _final, _key, _openssl_verifies, _policy, _public_key, _request

NAMESPACE = "team-a"
RELEASE_NAMESPACE = "keyroom-system"
CHART = REPO / "charts" / "keyroom"

KIND = os.environ.get("KEYROOM_E2E_CLUSTER") == "kind"

pytestmark = pytest.mark.timeout(3600)


class Steps:
    """Prints each step of the flow with its duration, and the whole run's at the end."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def done(self, what: str, since: float) -> None:
        print(f"[e2e] {what}: {time.monotonic() - since:.1f}s (total {time.monotonic() - self.started:.1f}s)")


STEPS = Steps()


def _pods(environment, component: str) -> list[dict]:
    result = kubectl(environment, "-n", RELEASE_NAMESPACE, "get", "pods", "-l",
                     f"app.kubernetes.io/name={component}", "-o", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["items"]


def _ready_pod(environment, component: str, *, other_than: str | None = None, timeout: float = 300) -> dict:
    def ready():
        for pod in _pods(environment, component):
            conditions = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
            if (conditions.get("Ready") == "True" and pod["metadata"]["uid"] != other_than
                    and not pod["metadata"].get("deletionTimestamp")):
                return pod
        return None
    return wait_for(ready, timeout=timeout, what=f"a Ready {component} pod")


def _volume(environment) -> pathlib.Path:
    """The host directory behind the signer's PersistentVolume (the local node's volumes are host paths)."""
    claim = json.loads(kubectl(environment, "-n", RELEASE_NAMESPACE, "get", "pvc", "keyroom-signer",
                               "-o", "json").stdout)
    volume = json.loads(kubectl(environment, "get", "pv", claim["spec"]["volumeName"], "-o", "json").stdout)
    path = (volume["spec"].get("hostPath") or volume["spec"]["local"])["path"]
    return kind.volume_path(environment.state_dir, path) if KIND else pathlib.Path(path)


def _audit(environment) -> list[dict]:
    return [json.loads(line) for line in (_volume(environment) / "audit.jsonl").read_text().splitlines()]


def _audit_verifies(environment) -> str:
    result = subprocess.run([sys.executable, "-m", "keyroom.signer.audit", "verify",
                             str(_volume(environment) / "audit.jsonl")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def environment(request, tmp_path_factory):
    """The local control plane with its node, or (KEYROOM_E2E_CLUSTER=kind) a kind cluster."""
    if not KIND:
        yield request.getfixturevalue("node_environment")
        return
    if os.environ.get("KEYROOM_E2E") != "1" or kind.skip_reason():
        pytest.skip(kind.skip_reason() or "end-to-end tests run only with KEYROOM_E2E=1")
    since = time.monotonic()
    try:
        yield kind.up(tmp_path_factory.mktemp("kind"))
    finally:
        kind.down()
    STEPS.done("kind cluster up, flow run, cluster deleted", since)


@pytest.fixture(scope="module")
def release(environment, tmp_path_factory):
    """Images built and loaded into the node, the chart installed, both pods Ready."""
    since = time.monotonic()
    if KIND:
        kind.load_images()
    else:
        images.ensure_base()
        directory = tmp_path_factory.mktemp("images")
        for target in images.TARGETS:
            archive = images.save(images.build(target), directory / f"keyroom-{target}.oci.tar")
            node.load_image(environment.node, archive)
    STEPS.done("images built and loaded into the node", since)

    since = time.monotonic()
    helm = helm_module.ensure(log=print)
    result = subprocess.run([str(helm), "install", "keyroom", str(CHART), "-n", RELEASE_NAMESPACE,
                             "--take-ownership", "--set", "image.pullPolicy=Never", "--create-namespace",
                             "--kubeconfig", str(environment.kubeconfig())], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    signer = _ready_pod(environment, "keyroom-signer")
    operator = _ready_pod(environment, "keyroom-operator")
    STEPS.done("helm install until the signer and operator pods are Ready", since)
    yield {"signer": signer, "operator": operator, "helm": helm}


def test_keys_are_generated_in_the_signer_pods_token_on_its_volume(environment, release, unique):
    since = time.monotonic()
    key = _key(environment, unique)
    uid = get(environment, "signingkey", key, namespace=NAMESPACE)["metadata"]["uid"]
    volume = _volume(environment)
    # the SoftHSM2 token the init container made, and the signer's record of the key, are on the volume
    assert any((volume / "softhsm-tokens").iterdir())
    assert any(uid in json.dumps(entry) for entry in _audit(environment))
    STEPS.done("a SigningKey generated in the signer pod", since)


def test_a_request_approved_by_bob_and_carol_is_signed_and_openssl_verifies_it(environment, release, unique,
                                                                                tmp_path):
    since = time.monotonic()
    key = _key(environment, unique)
    _policy(environment, unique, key, requiredApprovals=2)
    artifact = b"keyroom end to end\n"
    name, created = _request(environment, unique, key, {"artifact.bin": hashlib.sha256(artifact).hexdigest()})
    assert created.returncode == 0, created.stderr
    for approver in ("bob", "carol"):
        assert approve(environment, name, approver, namespace=NAMESPACE).returncode == 0
    status = _final(environment, name, timeout=120)
    assert status["phase"] == "Signed", status.get("message")
    (signature,) = status["signatures"]
    assert _openssl_verifies(tmp_path, _public_key(environment, key, status["keyVersion"]), artifact,
                             signature["value"])
    STEPS.done("a SignRequest approved by bob and carol, signed and verified with openssl", since)


def test_a_certificate_is_issued_for_a_key_and_published(environment, release, unique, tmp_path):
    since = time.monotonic()
    key = _key(environment, unique)
    name = unique("cert")
    assert apply(environment, {
        "apiVersion": "keyroom.dev/v1alpha1", "kind": "Certificate",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"keyRef": {"name": key}, "issuerRef": {"selfSigned": {}}, "subject": {"commonName": name},
                 "duration": "30d", "renewBefore": "10d", "secretName": name}}).returncode == 0
    status = wait_for(lambda: (s := get(environment, "certificate", name, namespace=NAMESPACE).get("status", {}))
                      .get("certificate") and s, timeout=120, what=f"certificate {name} to be issued")
    certificate = x509.load_pem_x509_certificate(status["certificate"].encode())
    assert certificate.subject.rfc4514_string() == f"CN={name}"
    (tmp_path / "cert.pem").write_text(status["certificate"])
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "cert.pem"), str(tmp_path / "cert.pem")],
                              capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    secret = wait_for(lambda: (r := kubectl(environment, "-n", NAMESPACE, "get", "secret", name, "-o", "json"))
                      .returncode == 0 and json.loads(r.stdout), timeout=60, what=f"secret {name}")
    assert base64.b64decode(secret["data"]["tls.crt"]).decode().startswith("-----BEGIN CERTIFICATE-----")
    STEPS.done("a Certificate issued and its Secret published", since)


def test_a_replaced_signer_pod_keeps_its_token_and_audit_log(environment, release, unique, tmp_path):
    key = _key(environment, unique)
    _policy(environment, unique, key)
    public_before = get(environment, "signingkey", key, namespace=NAMESPACE)["status"]["versions"]
    entries_before = _audit(environment)

    since = time.monotonic()
    old = _ready_pod(environment, "keyroom-signer")
    assert kubectl(environment, "-n", RELEASE_NAMESPACE, "delete", "pod", old["metadata"]["name"],
                   "--wait=false").returncode == 0
    new = _ready_pod(environment, "keyroom-signer", other_than=old["metadata"]["uid"])
    STEPS.done("the signer pod deleted and a new one Ready", since)

    # the new pod opened the same token: the key signs with the version it had, verified by openssl
    artifact = b"after the signer moved\n"
    name, created = _request(environment, unique, key, {"a.bin": hashlib.sha256(artifact).hexdigest()})
    assert created.returncode == 0, created.stderr
    status = _final(environment, name, timeout=120)
    assert status["phase"] == "Signed", status.get("message")
    assert get(environment, "signingkey", key, namespace=NAMESPACE)["status"]["versions"] == public_before
    assert _openssl_verifies(tmp_path, _public_key(environment, key, status["keyVersion"]), artifact,
                             status["signatures"][0]["value"])
    # and continued the same hash-chained log: every earlier entry is still there, in order, and it verifies
    entries_after = _audit(environment)
    assert entries_after[:len(entries_before)] == entries_before and len(entries_after) > len(entries_before)
    assert "audit log valid" in _audit_verifies(environment)
    assert new["metadata"]["name"] != old["metadata"]["name"]


def test_killing_the_operator_pod_mid_request_signs_each_request_exactly_once(environment, release, unique):
    key = _key(environment, unique)
    _policy(environment, unique, key)

    def scale(replicas: int) -> None:
        assert kubectl(environment, "-n", RELEASE_NAMESPACE, "scale", "deployment/keyroom-operator",
                       f"--replicas={replicas}").returncode == 0

    # a backlog the operator is still working through when it is killed: requests made while it is scaled down
    scale(0)
    wait_for(lambda: not _pods(environment, "keyroom-operator"), timeout=120, what="the operator pod to go")
    names = [unique("sr") for _ in range(200)]
    created = apply(environment, {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SignRequest", "metadata": {"name": name, "namespace": NAMESPACE},
         "spec": {"keyRef": {"name": key}, "requester": identity("alice"), "reason": "e2e: operator killed",
                  "digests": [{"name": f"file-{index}", "value": hashlib.sha256(f"{index}".encode()).hexdigest()}]}}
        for index, name in enumerate(names)]}, identity="alice")
    assert created.returncode == 0, created.stderr
    scale(1)
    first = _ready_pod(environment, "keyroom-operator")

    def phases() -> list[str]:
        listed = json.loads(kubectl(environment, "-n", NAMESPACE, "get", "signrequests", "-o", "json").stdout)
        return [r.get("status", {}).get("phase", "") for r in listed["items"] if r["metadata"]["name"] in names]

    since = time.monotonic()
    wait_for(lambda: "Signed" in phases(), timeout=120, what="a first request signed")
    assert kubectl(environment, "-n", RELEASE_NAMESPACE, "delete", "pod", first["metadata"]["name"],
                   "--grace-period=0", "--force").returncode == 0
    unsigned = sum(phase != "Signed" for phase in phases())
    print(f"[e2e] the operator was killed with {unsigned} of {len(names)} requests not yet Signed")
    _ready_pod(environment, "keyroom-operator", other_than=first["metadata"]["uid"])
    STEPS.done("the operator pod killed and a new one Ready", since)

    uids = {}
    for name in names:
        status = _final(environment, name, timeout=300)
        assert status["phase"] == "Signed", status.get("message")
        uids[get(environment, "signrequest", name, namespace=NAMESPACE)["metadata"]["uid"]] = name
    signed: dict[str, int] = {}
    for entry in _audit(environment):
        if entry.get("event") == "Signed" and entry.get("request", {}).get("uid") in uids:
            signed[entry["request"]["uid"]] = signed.get(entry["request"]["uid"], 0) + 1
    assert sorted(signed) == sorted(uids), "every request has a Signed entry"
    assert set(signed.values()) == {1}, "no request was signed twice"
    assert unsigned > 0, "the operator was killed only after every request was signed: nothing was tested"
    STEPS.done(f"all {len(names)} requests signed once", since)


def test_both_components_serve_their_metrics_on_the_ports_the_chart_exposes(environment, release):
    if KIND:
        pytest.skip("kind's pod addresses are not reachable from the host; the local node's bridge is")
    import ssl
    import urllib.request

    operator = _ready_pod(environment, "keyroom-operator")["status"]["podIP"]
    with urllib.request.urlopen(f"http://{operator}:9090/metrics", timeout=10) as response:
        assert "keyroom_token_undeclared_objects" in response.read().decode()
    signer = _ready_pod(environment, "keyroom-signer")["status"]["podIP"]
    # the signer's certificate names its Service, not the pod's address: checked against the chart's CA by name
    tls = json.loads(kubectl(environment, "-n", RELEASE_NAMESPACE, "get", "secret", "keyroom-signer-tls",
                             "-o", "json").stdout)
    context = ssl.create_default_context(cadata=base64.b64decode(tls["data"]["ca.crt"]).decode())
    context.check_hostname = False
    with urllib.request.urlopen(f"https://{signer}:8443/metrics", timeout=10, context=context) as response:
        assert "keyroom_signer_signatures" in response.read().decode()

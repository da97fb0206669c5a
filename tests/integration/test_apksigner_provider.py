"""apksigner's own ``sign``, with keyroom's provider jar: one SignRequest, two approvals, apksigner verifies.

The jar is built by ``kubectl keyroom apksigner provider`` (javac and jar of
the JDK here). apksigner loads it, reads the Certificate through the plugin,
and each signature it asks for goes through ``kubectl keyroom apksigner
sign`` as alice: one request covers v2 and v3, bob and carol approve it, and
Debian's apksigner 31.0.2 verifies the APK it wrote.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import subprocess
import sys

import pytest

from tests.android import APKSIGNER_CLASSPATH, make_apk, verify
from tests.conftest import get, wait_for
from tests.integration.test_apk import _apk_key
from tests.integration.test_cli import NAMESPACE, keyroom

pytestmark = pytest.mark.integration

PLUGIN = pathlib.Path(sys.executable).with_name("kubectl-keyroom")


@pytest.fixture(scope="module")
def provider_jar(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("provider") / "keyroom-apksigner.jar"
    built = subprocess.run([sys.executable, "-m", "keyroom.cli", "apksigner", "provider", "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert built.stdout.strip() == str(out) and out.stat().st_size > 0
    return out


def _requests(cluster, key: str) -> list[dict]:
    result = subprocess.run([str(cluster.kubectl), f"--kubeconfig={cluster.kubeconfig()}", "get", "sr", "-n",
                             NAMESPACE, "-o", "json"], capture_output=True, text=True, check=True)
    return [i for i in json.loads(result.stdout)["items"] if i["spec"]["keyRef"]["name"] == key]


def apksigner_sign(cluster, jar: pathlib.Path, source: pathlib.Path, out: pathlib.Path, *, key: str,
                   certificate: str, extra: tuple[str, ...] = ("--v1-signing-enabled", "false",
                                                               "--v4-signing-enabled", "false")) -> subprocess.Popen:
    """``apksigner sign`` as alice, through the provider, started (it waits for approvals)."""
    argument = (f"namespace={NAMESPACE},key={key},certificate={certificate},reason=android 3.2.0,"
                f"kubeconfig={cluster.kubeconfig('alice')},command={PLUGIN},timeout=90")
    return subprocess.Popen(
        ["java", "-cp", f"{APKSIGNER_CLASSPATH}:{jar}", "com.android.apksigner.ApkSignerTool", "sign",
         "--provider-class", "dev.keyroom.apksigner.KeyroomProvider", "--provider-arg", argument,
         "--ks", "NONE", "--ks-type", "KEYROOM", "--ks-pass", "pass:none", "--min-sdk-version", "24", *extra,
         "--in", str(source), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ended(process: subprocess.Popen) -> None:
    """Nothing while ``process`` runs; a test failure with its output once it ended."""
    if process.poll() is not None:
        stdout, stderr = process.communicate()
        pytest.fail(f"apksigner ended early ({process.returncode}): {stdout}{stderr}")


@pytest.mark.parametrize("algorithm", ["ECDSA_P256", "RSA_4096"])
def test_apksigner_signs_through_one_approved_request_and_verifies(cluster, unique, provider_jar, tmp_path,
                                                                   algorithm):
    key, certificate, der = _apk_key(cluster, unique, "apksigner", algorithm)
    source = make_apk(tmp_path / "app.apk")
    signed = tmp_path / "app-signed.apk"
    signing = apksigner_sign(cluster, provider_jar, source, signed, key=key, certificate=certificate)

    request = wait_for(lambda: next(iter(_requests(cluster, key)), None) or _ended(signing), timeout=60,
                       what="the provider to create a SignRequest")
    name = request["metadata"]["name"]
    wait_for(lambda: "needs 2 more approvals" in get(cluster, "sr", name, namespace=NAMESPACE)
             .get("status", {}).get("message", ""), what=f"{name} to wait for two approvals")
    spec = request["spec"]
    assert spec["format"] == "apk" and spec["certificateRef"] == {"name": certificate}
    assert spec["requester"]["username"] == "alice" and spec["reason"] == "android 3.2.0"
    assert spec["digests"][0]["name"] == "app.apk"
    assert spec["digestAlgorithm"] == ("SHA512" if algorithm == "RSA_4096" else "SHA256")
    assert [b["scheme"] for b in spec["apk"]["signedData"]] == ["v2", "v3"]
    for approver in ("bob", "carol"):
        approved = keyroom(cluster, approver, "approve", name, "--reason", "release checklist done")
        assert approved.returncode == 0, approved.stderr
    stdout, stderr = signing.communicate(timeout=120)
    assert signing.returncode == 0, stdout + stderr
    assert f"{name} signed" in stderr

    result = verify(signed, "--print-certs")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "Verified using v2 scheme (APK Signature Scheme v2): true" in lines
    assert "Verified using v3 scheme (APK Signature Scheme v3): true" in lines
    assert f"Signer #1 certificate SHA-256 digest: {hashlib.sha256(der).hexdigest()}" in lines
    # one request, one round of approvals, covered both schemes: apksigner's v3 call asked for nothing new
    assert [r["metadata"]["name"] for r in _requests(cluster, key)] == [name]
    assert get(cluster, "sr", name, namespace=NAMESPACE)["status"]["phase"] == "Signed"


def test_a_v1_signature_is_refused_before_any_request(cluster, unique, provider_jar, tmp_path):
    key, certificate, _ = _apk_key(cluster, unique, "apksigner-v1")
    signing = apksigner_sign(cluster, provider_jar, make_apk(tmp_path / "app.apk"), tmp_path / "out.apk",
                             key=key, certificate=certificate, extra=("--v1-signing-enabled", "true"))
    stdout, stderr = signing.communicate(timeout=120)
    assert signing.returncode != 0
    assert "add --v1-signing-enabled false" in stderr
    assert _requests(cluster, key) == []
    if (tmp_path / "out.apk").exists():  # apksigner may leave what it wrote before the failure: it must not verify
        assert verify(tmp_path / "out.apk").returncode != 0

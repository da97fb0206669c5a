"""`kubectl keyroom` against the real control plane, as the fixture users would run it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import apply, get, wait_for

pytestmark = pytest.mark.integration

NAMESPACE = "team-a"


def keyroom(cluster, identity: str, *args: str, wait: bool = True):
    command = [sys.executable, "-m", "keyroom.cli", *args, "-n", NAMESPACE,
               "--kubeconfig", str(cluster.kubeconfig(identity))]
    if wait:
        return subprocess.run(command, capture_output=True, text=True, timeout=120)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def key(cluster, unique) -> str:
    name = unique("cli-key")
    assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningKey",
                           "metadata": {"name": name, "namespace": NAMESPACE},
                           "spec": {"algorithm": "ECDSA_P256"}}).returncode == 0
    assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningPolicy",
                           "metadata": {"name": name, "namespace": NAMESPACE},
                           "spec": {"keys": [name], "requesters": {"groups": ["team-a-devs"]},
                                    "approvers": {"groups": ["team-a-approvers"]}, "requiredApprovals": 1}}
                 ).returncode == 0
    wait_for(lambda: get(cluster, "signingkey", name, namespace=NAMESPACE).get("status", {}).get("phase") == "Active",
             what=f"{name} to be Active")
    return name


def _created_name(cluster, key: str) -> str:
    def find():
        result = subprocess.run([str(cluster.kubectl), f"--kubeconfig={cluster.kubeconfig()}", "get", "sr", "-n",
                                 NAMESPACE, "-o", "json"], capture_output=True, text=True)
        names = [i["metadata"]["name"] for i in json.loads(result.stdout)["items"]
                 if i["spec"]["keyRef"]["name"] == key]
        return names[0] if names else None
    return wait_for(find, what="the plugin to create a SignRequest")


def test_sign_waits_for_an_approval_and_writes_signatures_openssl_verifies(cluster, key, tmp_path):
    files = [tmp_path / "app.exe", tmp_path / "notes.txt"]
    files[0].write_bytes(b"\x7fELF application" * 1000)
    files[1].write_text("release notes\n")
    signing = keyroom(cluster, "alice", "sign", *map(str, files), "--key", key, "--reason", "release 2.0",
                      "--timeout", "60", wait=False)
    name = _created_name(cluster, key)

    approved = keyroom(cluster, "bob", "approve", name, "--reason", "looked at it")
    assert approved.returncode == 0, approved.stderr
    assert f"approved {NAMESPACE}/{name} as bob" in approved.stdout
    assert "requester:  alice" in approved.stderr and "release 2.0" in approved.stderr  # shown before approving
    out, err = signing.communicate(timeout=60)
    assert signing.returncode == 0, err
    assert out.splitlines()[0] == name and "needs 1 more approval" in err

    public_key = tmp_path / "key.pem"
    public_key.write_text(get(cluster, "signingkey", key, namespace=NAMESPACE)["status"]["versions"][0]["publicKey"])
    for path in files:
        signature = path.with_name(path.name + ".sig")
        assert str(signature) in out
        verified = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(public_key), "-signature",
                                   str(signature), str(path)], capture_output=True, text=True)
        assert verified.returncode == 0 and "Verified OK" in verified.stdout, verified.stderr

    status = keyroom(cluster, "alice", "status", name)
    assert status.returncode == 0 and "phase:      Signed" in status.stdout and "bob: Approve (counted)" in status.stdout
    listed = keyroom(cluster, "alice", "get")
    assert listed.returncode == 0 and name in listed.stdout and "Signed" in listed.stdout
    again = keyroom(cluster, "carol", "approve", name)
    assert again.returncode == 1 and "already Signed" in again.stderr


def test_deny_ends_a_waiting_sign_with_the_reason(cluster, key, tmp_path):
    artifact = tmp_path / "tool.bin"
    artifact.write_bytes(b"tool")
    signing = keyroom(cluster, "alice", "sign", str(artifact), "--key", key, "--out", str(tmp_path / "sigs"),
                      wait=False)
    name = _created_name(cluster, key)
    denied = keyroom(cluster, "carol", "deny", name, "--reason", "not a release build")
    assert denied.returncode == 0, denied.stderr
    out, err = signing.communicate(timeout=60)
    assert signing.returncode == 1 and "Denied" in err and "denied by carol" in err
    assert not (tmp_path / "sigs").exists()
    refused = keyroom(cluster, "bob", "deny", name)
    assert refused.returncode == 2 and "--reason" in refused.stderr  # a denial needs a reason


def test_dave_gets_a_clear_error_and_no_request(cluster, key, tmp_path):
    artifact = tmp_path / "x.bin"
    artifact.write_bytes(b"x")
    result = keyroom(cluster, "dave", "sign", str(artifact), "--key", key)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "forbidden" in result.stderr
    assert "Traceback" not in result.stderr
    missing = keyroom(cluster, "alice", "sign", str(tmp_path / "absent"), "--key", key)
    assert missing.returncode == 1 and "is not a readable file" in missing.stderr

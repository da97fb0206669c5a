"""`kubectl keyroom` against the real control plane, as the fixture users would run it."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import kubernetes
import pytest

from keyroom.cli import plugin
from tests.conftest import apply, get, wait_for

pytestmark = pytest.mark.integration

NAMESPACE = "team-a"


def keyroom(cluster, identity: str, *args: str, wait: bool = True):
    command = [sys.executable, "-m", "keyroom.cli", *args, "-n", NAMESPACE,
               "--kubeconfig", str(cluster.kubeconfig(identity))]
    if wait:
        return subprocess.run(command, capture_output=True, text=True, timeout=120)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def make_key(cluster, name: str, *, requesters: dict, approvers: dict, required: int = 1,
             algorithm: str = "ECDSA_P256") -> str:
    """A SigningKey and a policy for it; returns once the key is Active."""
    assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningKey",
                           "metadata": {"name": name, "namespace": NAMESPACE},
                           "spec": {"algorithm": algorithm}}).returncode == 0
    assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningPolicy",
                           "metadata": {"name": name, "namespace": NAMESPACE},
                           "spec": {"keys": [name], "requesters": requesters, "approvers": approvers,
                                    "requiredApprovals": required}}).returncode == 0
    wait_for(lambda: get(cluster, "signingkey", name, namespace=NAMESPACE).get("status", {}).get("phase") == "Active",
             what=f"{name} to be Active")
    return name


@pytest.fixture
def key(cluster, unique) -> str:
    return make_key(cluster, unique("cli-key"), requesters={"groups": ["team-a-devs"]},
                    approvers={"groups": ["team-a-approvers"]})


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
    wait_for(lambda: "needs 1 more approval" in get(cluster, "sr", name, namespace=NAMESPACE)
             .get("status", {}).get("message", ""), what=f"{name} to wait for an approval")

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
    unknown = keyroom(cluster, "alice", "status", "no-such-request")
    assert unknown.returncode == 1 and unknown.stderr == 'error: signrequests.keyroom.dev "no-such-request" not found\n'


def test_a_requester_cannot_approve_their_own_request(cluster, key, unique, tmp_path):
    artifact = tmp_path / "x.bin"
    artifact.write_bytes(b"x")
    created = keyroom(cluster, "alice", "sign", str(artifact), "--key", key, "--no-wait")
    assert created.returncode == 0, created.stderr
    name = created.stdout.strip()
    # the requester role may patch (kubectl apply works), so alice's own entry is appended but never counted
    own = keyroom(cluster, "alice", "approve", name)
    assert own.returncode == 0, own.stderr
    assert f"approved team-a/{name} as alice (0/1; not counted: a requester cannot" in own.stdout
    refused = keyroom(cluster, "dave", "approve", name)  # team-b's developer may not touch team-a's requests
    assert refused.returncode == 1 and "forbidden" in refused.stderr.splitlines()[-1]

    # One who may both request and approve appends the entry, but it does not count (separation of duties).
    both = make_key(cluster, unique("cli-both"), requesters={"users": ["keyroom-admin"]},
                    approvers={"users": ["keyroom-admin"], "groups": ["team-a-approvers"]})
    created = keyroom(cluster, "admin", "sign", str(artifact), "--key", both, "--no-wait")
    name = created.stdout.strip()
    own = keyroom(cluster, "admin", "approve", name)
    assert own.returncode == 0, own.stderr
    assert "approved team-a/" + name + " as keyroom-admin (0/1; not counted: a requester cannot" in own.stdout
    status = keyroom(cluster, "alice", "status", name)
    assert "phase:      Pending" in status.stdout and "keyroom-admin: Approve (not counted" in status.stdout


def test_sign_stops_waiting_at_its_timeout_and_the_request_stays(cluster, key, tmp_path):
    artifact = tmp_path / "slow.bin"
    artifact.write_bytes(b"slow")
    result = keyroom(cluster, "alice", "sign", str(artifact), "--key", key, "--timeout", "1")
    name = result.stdout.strip()
    assert result.returncode == 2 and f"kubectl keyroom status {name} -n {NAMESPACE}" in result.stderr
    assert get(cluster, "signrequest", name, namespace=NAMESPACE)["status"]["phase"] == "Pending"


def test_an_approval_appended_at_the_same_moment_is_kept_and_bobs_follows(cluster, unique, tmp_path, monkeypatch,
                                                                          capsys):
    key = make_key(cluster, unique("cli-race"), requesters={"groups": ["team-a-devs"]},
                   approvers={"groups": ["team-a-approvers"]}, required=2)
    artifact = tmp_path / "race.bin"
    artifact.write_bytes(b"race")
    name = keyroom(cluster, "alice", "sign", str(artifact), "--key", key, "--no-wait").stdout.strip()
    monkeypatch.setattr(kubernetes.client.Configuration, "_default", None)  # the plugin loads bob's config globally
    bob = plugin.Cluster(argparse.Namespace(kubeconfig=str(cluster.kubeconfig("bob")), context=None,
                                            namespace=NAMESPACE))
    before_carol = bob.get(name)
    assert keyroom(cluster, "carol", "approve", name).returncode == 0
    reads = iter([before_carol])
    monkeypatch.setattr(bob, "get", lambda n: next(reads, None) or plugin.Cluster.get(bob, n))
    identity = bob.whoami()
    plugin.append_decision(bob, name, {"user": "bob", "groups": identity["groups"], "decision": "Approve"})
    assert "someone else decided at the same moment" in capsys.readouterr().err
    assert [a["user"] for a in get(cluster, "signrequest", name, namespace=NAMESPACE)["spec"]["approvals"]] == \
        ["carol", "bob"]


def test_rotate_makes_a_new_version_current_and_only_admins_may(cluster, key):
    refused = keyroom(cluster, "alice", "rotate", key)
    assert refused.returncode == 1 and refused.stderr.startswith("error: ") and "forbidden" in refused.stderr.lower()
    rotated = keyroom(cluster, "admin", "rotate", key)
    assert rotated.returncode == 0, rotated.stderr
    assert "version 2 is current" in rotated.stdout
    status = get(cluster, "signingkey", key, namespace=NAMESPACE)["status"]
    assert status["currentVersion"] == 2
    assert [(v["version"], v["state"]) for v in status["versions"]] == [(2, "Enabled"), (1, "Disabled")]
    again = keyroom(cluster, "admin", "rotate", key, "--request", status["lastRotationRequest"], "--timeout", "3")
    assert again.returncode == 2  # the same request value rotates nothing
    assert get(cluster, "signingkey", key, namespace=NAMESPACE)["status"]["currentVersion"] == 2


def test_two_pipelines_attest_the_same_release_and_the_first_pipelines_sign_gets_the_signature(cluster, unique,
                                                                                               tmp_path):
    name = unique("cli-builds")
    assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningKey",
                           "metadata": {"name": name, "namespace": NAMESPACE},
                           "spec": {"algorithm": "ECDSA_P256"}}).returncode == 0
    assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningPolicy",
                           "metadata": {"name": name, "namespace": NAMESPACE},
                           "spec": {"keys": [name], "requesters": {"serviceAccounts": ["ci-builder-a"]},
                                    "requiredApprovals": 0, "matchingBuilds": {"required": 2, "builders": {
                                        "serviceAccounts": ["ci-builder-a", "ci-builder-b"]}}}}).returncode == 0
    wait_for(lambda: get(cluster, "signingkey", name, namespace=NAMESPACE).get("status", {}).get("phase") == "Active",
             what=f"{name} to be Active")
    builds = {}
    for pipeline in ("a", "b"):  # each pipeline's own, independent build of the same sources
        builds[pipeline] = tmp_path / pipeline
        builds[pipeline].mkdir()
        (builds[pipeline] / "app.exe").write_bytes(b"reproducible application")
        (builds[pipeline] / "notes.txt").write_text("release notes\n")
    files = lambda pipeline: [str(builds[pipeline] / "app.exe"), str(builds[pipeline] / "notes.txt")]  # noqa: E731

    signing = keyroom(cluster, "ci-builder-a", "sign", *files("a"), "--key", name, "--out", str(tmp_path / "sigs"),
                      "--timeout", "60", wait=False)
    request = _created_name(cluster, name)
    attested = keyroom(cluster, "ci-builder-a", "attest", request, *files("a"), "--build", "pipeline a #12")
    assert attested.returncode == 0, attested.stderr
    assert f"attested {NAMESPACE}/{request} as system:serviceaccount:team-a:ci-builder-a: 2 digest(s) match" in \
        attested.stdout
    again = keyroom(cluster, "ci-builder-a", "attest", request, *files("a"))
    assert again.returncode == 1 and "already attested" in again.stderr
    shown = keyroom(cluster, "ci-builder-a", "status", request)
    assert "builds:     1/2" in shown.stdout and "ci-builder-a: matches, counted [pipeline a #12]" in shown.stdout
    partial = keyroom(cluster, "ci-builder-b", "attest", request, files("b")[0])
    assert partial.returncode == 1 and "attest exactly the request's files: missing notes.txt" in partial.stderr

    attested = keyroom(cluster, "ci-builder-b", "attest", request, *files("b"), "--build", "pipeline b #7")
    assert attested.returncode == 0, attested.stderr
    out, err = signing.communicate(timeout=60)
    assert signing.returncode == 0, err
    assert (tmp_path / "sigs" / "app.exe.sig").exists() and (tmp_path / "sigs" / "notes.txt.sig").exists()

    # the next release: pipeline b's build differs, and says so
    (builds["b"] / "app.exe").write_bytes(b"reproducible application, patched on the build machine")
    second = keyroom(cluster, "ci-builder-a", "sign", *files("a"), "--key", name, "--no-wait")
    request = second.stdout.strip()
    assert keyroom(cluster, "ci-builder-a", "attest", request, *files("a")).returncode == 0
    differs = keyroom(cluster, "ci-builder-b", "attest", request, *files("b"))
    assert differs.returncode == 1 and "your build differs from the request's at app.exe" in differs.stderr
    status = wait_for(lambda: (s := get(cluster, "sr", request, namespace=NAMESPACE).get("status", {}))
                      .get("phase") == "Failed" and s, what=f"{request} to fail")
    assert "ci-builder-b's build differs at app.exe" in status["message"]

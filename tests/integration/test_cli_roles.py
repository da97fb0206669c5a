"""`kubectl keyroom` for each role on the real control plane: requesters (whoami, sign of a directory split at
the policy's limit, -o json), approvers (pending, a batch approval), verifiers (export, then verify with no
cluster, for every format the signer produces, against the chain and the CRL), admins (keys, access, audit,
report)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml

from keyroom.devenv import samples
from tests.conftest import apply, get, kubectl, wait_for
from tests.integration.test_cli import NAMESPACE, keyroom, make_key

pytestmark = pytest.mark.integration


def offline(*args: str) -> subprocess.CompletedProcess:
    """The plugin with no kubeconfig at all: what a verifier without cluster access runs."""
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["HOME"] = "/nonexistent"
    return subprocess.run([sys.executable, "-m", "keyroom.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def policy(cluster, name: str, key: str, **spec) -> None:
    assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningPolicy",
                           "metadata": {"name": name, "namespace": NAMESPACE},
                           "spec": {"keys": [key], "requesters": {"groups": ["team-a-devs"]},
                                    "approvers": {"groups": ["team-a-approvers"]}, **spec}}).returncode == 0


def active_key(cluster, name: str) -> str:
    assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningKey",
                           "metadata": {"name": name, "namespace": NAMESPACE},
                           "spec": {"algorithm": "ECDSA_P256"}}).returncode == 0
    wait_for(lambda: get(cluster, "signingkey", name, namespace=NAMESPACE).get("status", {}).get("phase") == "Active",
             what=f"{name} to be Active")
    return name


def test_whoami_says_who_the_api_server_sees_and_what_they_may_do(cluster):
    result = keyroom(cluster, "alice", "whoami", "-o", "json")
    assert result.returncode == 0, result.stderr
    alice = json.loads(result.stdout)
    assert alice["username"] == "alice" and "team-a-devs" in alice["groups"] and alice["namespace"] == NAMESPACE
    may = {a["what"]: a["allowed"] for a in alice["may"]}
    assert may["request signatures (sign)"] and not may["manage keys and policies"]
    assert not may["read the signer's audit log (audit, report)"] and not may["attest builds (attest)"]
    assert any("signrequests" in rule["resources"] and "create" in rule["verbs"] for rule in alice["keyroomRules"])
    bob = keyroom(cluster, "bob", "whoami")
    assert bob.returncode == 0 and "user:       bob" in bob.stdout
    assert [line.split()[0] for line in bob.stdout.splitlines() if "request signatures" in line] == ["no"]
    admin = json.loads(keyroom(cluster, "admin", "whoami", "-o", "json").stdout)
    assert all(a["allowed"] for a in admin["may"])


def test_an_approver_sees_what_waits_for_them_and_approves_a_batch(cluster, unique, tmp_path):
    key = make_key(cluster, unique("cli-pending"), requesters={"groups": ["team-a-devs"]},
                   approvers={"groups": ["team-a-approvers"]}, required=2)
    names = []
    for number in (1, 2):
        artifact = tmp_path / f"app{number}.bin"
        artifact.write_bytes(b"app %d" % number)
        created = keyroom(cluster, "alice", "sign", str(artifact), "--key", key, "--reason", f"release {number}",
                          "--no-wait", "-o", "json")
        assert created.returncode == 0, created.stderr
        names.append(json.loads(created.stdout)[0]["name"])
    wait_for(lambda: all("needs 2 more approvals" in get(cluster, "sr", n, namespace=NAMESPACE)
                         .get("status", {}).get("message", "") for n in names), what="both requests to wait")

    listed = keyroom(cluster, "bob", "pending", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    mine = {p["name"]: p for p in json.loads(listed.stdout) if p["key"] == key}
    assert set(mine) == set(names)
    assert mine[names[0]]["requester"] == "alice" and mine[names[0]]["reason"] == "release 1"
    assert mine[names[0]]["yourApproval"].endswith(": 0/2") and "needs 2 more approvals" in \
        mine[names[0]]["waitingFor"]
    assert not [p for p in json.loads(keyroom(cluster, "alice", "pending", "-o", "json").stdout) if p["key"] == key]

    batch = keyroom(cluster, "bob", "approve", *names, "--reason", "checked")
    assert batch.returncode == 0, batch.stderr
    assert batch.stderr.startswith(f"approving 2 request(s), 2 digest(s) in all; key(s) {key}; requester(s) alice")
    for name in names:  # each request was shown before it was approved
        assert f"SignRequest {NAMESPACE}/{name}" in batch.stderr and f"approved {NAMESPACE}/{name} as bob" in batch.stdout
    assert "reason:     release 2" in batch.stderr and "format:     raw, 1 digest(s) (SHA256)" in batch.stderr
    assert "2 of 2 request(s) approved" in batch.stdout

    after = [p for p in json.loads(keyroom(cluster, "bob", "pending", "-o", "json").stdout) if p["key"] == key]
    assert after == []  # bob decided both
    for_carol = [p for p in json.loads(keyroom(cluster, "carol", "pending", "-o", "json").stdout) if p["key"] == key]
    assert sorted(p["name"] for p in for_carol) == sorted(names) and for_carol[0]["yourApproval"].endswith(": 1/2")
    partly = keyroom(cluster, "carol", "approve", names[0], "no-such-request")
    assert partly.returncode == 1 and 'signrequests.keyroom.dev "no-such-request" not found' in partly.stderr
    assert "approved" not in partly.stdout  # every request is read before any is approved


def test_sign_splits_a_directory_at_the_policys_limit_and_export_lets_anyone_verify(cluster, unique, tmp_path):
    key = active_key(cluster, unique("cli-split"))
    policy(cluster, key, key, requiredApprovals=0, maxDigestsPerRequest=2)
    dist = tmp_path / "dist"
    (dist / "lib").mkdir(parents=True)
    for name in ("a.bin", "b.bin", "lib/c.so", "lib/d.so", "e.txt"):
        (dist / name).write_bytes(f"content of {name}\n".encode() * 100)
    signed = keyroom(cluster, "alice", "sign", str(dist), "--key", key, "--reason", "split", "--timeout", "60",
                     "-o", "json")
    assert signed.returncode == 0, signed.stderr
    assert "5 files exceed the 2 digests one request" in signed.stderr and "splitting into 3 requests" in signed.stderr
    assert "Ctrl-C stops waiting" in signed.stderr
    requests = json.loads(signed.stdout)
    assert [r["phase"] for r in requests] == ["Signed"] * 3 and sum(len(r["files"]) for r in requests) == 5

    trust = tmp_path / "trust"
    exported = keyroom(cluster, "alice", "export", key, "--out", str(trust))
    assert exported.returncode == 0, exported.stderr
    assert "1 public key(s)" in exported.stdout and "only its public keys are exported" in exported.stderr
    for name in ("a.bin", "lib/c.so", "e.txt"):
        verified = offline("verify", str(dist / name), "--sig", str(dist / f"{name}.sig"), "--trust", str(trust))
        assert verified.returncode == 0, verified.stderr
        assert verified.stdout.startswith(f"verified: {dist / name} (raw)")
    (dist / "e.txt").write_text("changed after signing\n")
    changed = offline("verify", str(dist / "e.txt"), "--sig", str(dist / "e.txt.sig"), "--trust", str(trust))
    assert changed.returncode == 3 and changed.stderr.startswith("NOT VERIFIED: ")
    swapped = offline("verify", str(dist / "a.bin"), "--sig", str(dist / "b.bin.sig"), "--trust", str(trust))
    assert swapped.returncode == 3


def _certificate(cluster, name: str, key: str, **spec) -> None:
    assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "Certificate",
                           "metadata": {"name": name, "namespace": NAMESPACE},
                           "spec": {"keyRef": {"name": key}, "subject": {"commonName": name}, **spec}}).returncode == 0
    wait_for(lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in
                         get(cluster, "certificate", name, namespace=NAMESPACE).get("status", {}).get("conditions", [])),
             timeout=60, what=f"certificate {name} to be Ready")


def _jar(path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("com/example/App.class", b"\xca\xfe\xba\xbe" + b"\0" * 64)
        archive.writestr("app.properties", b"version=1.4.2\n")


def test_every_format_verifies_offline_against_the_exported_chain_and_crl(cluster, unique, tmp_path):
    ca_key, key = active_key(cluster, unique("cli-ca-key")), active_key(cluster, unique("cli-formats"))
    ca, leaf = unique("cli-ca"), unique("cli-leaf")
    _certificate(cluster, ca, ca_key, issuerRef={"selfSigned": {}}, isCA=True, duration="365d")
    _certificate(cluster, leaf, key, issuerRef={"ca": {"name": ca}})
    policy(cluster, key, key, requiredApprovals=0)
    wait_for(lambda: kubectl(cluster, "get", "configmap", f"{ca}-crl", "-n", NAMESPACE).returncode == 0,
             what="the CA's CRL")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("release notes\n")
    (work / "app.exe").write_bytes(samples.minimal_pe())
    _jar(work / "app.jar")
    outputs = {}
    for fmt, name in (("raw", "notes.txt"), ("cms", "notes.txt"), ("sigstore", "notes.txt"),
                      ("authenticode", "app.exe"), ("jar", "app.jar")):
        out = tmp_path / f"out-{fmt}"
        signed = keyroom(cluster, "alice", "sign", str(work / name), "--key", key, "--format", fmt, "--out", str(out),
                         "--reason", f"formats: {fmt}", "--timeout", "60")
        assert signed.returncode == 0, signed.stderr
        outputs[fmt] = (work / name, out / {"raw": f"{name}.sig", "cms": f"{name}.p7s",
                                            "sigstore": f"{name}.sigstore.json"}.get(fmt, name))

    mine = tmp_path / "alice-trust"  # a requester may not read the CRL ConfigMap: said, not hidden
    exported = keyroom(cluster, "alice", "export", key, "--out", str(mine), "-o", "json")
    assert exported.returncode == 0 and "not readable with your rights" in exported.stderr
    assert json.loads(exported.stdout)["crls"] == []
    trust = tmp_path / "trust"
    exported = keyroom(cluster, "admin", "export", key, "--out", str(trust), "-o", "json")
    assert exported.returncode == 0, exported.stderr
    manifest = json.loads(exported.stdout)
    assert [c["name"] for c in manifest["certificates"]] == [leaf] and manifest["crls"] == [{"ca": ca, "file": "crl.pem"}]
    assert manifest["roots"] == [{"subject": f"CN={ca}", "file": "ca.pem"}]

    def check(fmt: str, trust_dir) -> subprocess.CompletedProcess:
        artifact, output = outputs[fmt]
        args = (["verify", str(output), "--format", fmt] if fmt in ("authenticode", "jar")
                else ["verify", str(artifact), "--sig", str(output)])
        return offline(*args, "--trust", str(trust_dir), "-o", "json")

    for fmt in outputs:
        verified = check(fmt, trust)
        assert verified.returncode == 0, (fmt, verified.stderr)
        report = json.loads(verified.stdout)
        if fmt in ("cms", "authenticode", "jar"):
            assert any(line.startswith(f"revocation: CN={leaf} is not on the CRL of CN={ca}")
                       for line in report["checked"]), report
    assert "revocation: no CRL given (--crl)" in json.loads(check("cms", mine).stdout)["not_checked"]
    openssl = subprocess.run(["openssl", "verify", "-crl_check", "-CAfile", str(trust / "ca.pem"), "-CRLfile",
                              str(trust / "crl.pem"), str(trust / f"{leaf}.crt.pem")], capture_output=True, text=True)
    assert openssl.returncode == 0, openssl.stdout + openssl.stderr  # the export is what openssl needs too

    revoked = kubectl(cluster, "patch", "certificate", leaf, "-n", NAMESPACE, "--type=merge", "-p",
                      json.dumps({"spec": {"revocation": {"reason": "keyCompromise", "since": "2026-01-01T00:00:00Z"}}}))
    assert revoked.returncode == 0, revoked.stderr
    first_crl = (trust / "crl.pem").read_text()
    wait_for(lambda: json.loads(kubectl(cluster, "get", "configmap", f"{ca}-crl", "-n", NAMESPACE, "-o", "json")
                                .stdout)["data"]["ca.crl"] != first_crl, what="a CRL that lists the revocation")
    fresh = tmp_path / "fresh"
    assert keyroom(cluster, "admin", "export", key, "--out", str(fresh)).returncode == 0
    for fmt in ("cms", "authenticode", "jar"):
        refused = check(fmt, fresh)
        assert refused.returncode == 3 and "is revoked since" in json.loads(refused.stdout)["error"], fmt
    assert check("raw", fresh).returncode == 0  # a raw signature names no certificate: the key alone decides


def test_keys_access_and_the_audit_log_for_an_admin(cluster, unique, tmp_path):
    key = active_key(cluster, unique("cli-admin"))
    policy(cluster, key, key, approvers={"groups": ["team-a-reviewers"]}, requiredApprovals=0)
    artifact = tmp_path / "tool.bin"
    artifact.write_bytes(b"tool")
    signed = keyroom(cluster, "alice", "sign", str(artifact), "--key", key, "--timeout", "60")
    assert signed.returncode == 0, signed.stderr
    request = signed.stdout.splitlines()[0]
    assert keyroom(cluster, "admin", "rotate", key).returncode == 0

    keys = keyroom(cluster, "alice", "keys", "-o", "json")
    assert keys.returncode == 0, keys.stderr
    view = next(k for k in json.loads(keys.stdout) if k["name"] == key)
    assert view["currentVersion"] == 2 and [(v["version"], v["state"]) for v in view["versions"]] == [
        (2, "Enabled"), (1, "Disabled")] and view["online"] is True
    table = keyroom(cluster, "alice", "keys")
    assert any(line.split()[:2] == [key, "ECDSA_P256"] and "v2 Enabled, v1 Disabled" in line
               for line in table.stdout.splitlines())

    access = keyroom(cluster, "admin", "access", key, "-o", "json")
    assert access.returncode == 0, access.stderr
    resolved = json.loads(access.stdout)
    assert resolved["rbacChecked"] and resolved["requesters"][0]["boundBy"] == [
        "RoleBinding team-a/team-a-devs-keyroom-requester"]
    assert any("Group team-a-reviewers is an approver in" in p and "no binding to keyroom-approver" in p
               for p in resolved["problems"])
    text = keyroom(cluster, "admin", "access", key)
    assert "[NO ROLE BINDING]" in text.stdout and "problem: Group team-a-reviewers" in text.stdout
    limited = json.loads(keyroom(cluster, "alice", "access", key, "-o", "json").stdout)
    assert not limited["rbacChecked"] and "rbac" not in limited["approvers"][0]

    log = cluster.state_dir / "signer" / "audit.jsonl"
    verified = keyroom(cluster, "admin", "audit", "verify", "--file", str(log), "-o", "json")
    assert verified.returncode == 0, verified.stderr
    result = json.loads(verified.stdout)
    assert result["valid"] and result["checkpoint"] is not None and \
        result["checkpointSource"] == "ConfigMap keyroom-system/keyroom-audit-checkpoint"
    shown = json.loads(keyroom(cluster, "admin", "audit", "show", "--file", str(log), "--request", request,
                               "-o", "json").stdout)
    assert [e["event"] for e in shown][-2:] == ["Intent", "Signed"] and shown[-2]["requester"] == "alice"
    report = json.loads(keyroom(cluster, "admin", "report", "--file", str(log), "--since", "1h", "-o", "json").stdout)
    mine = [r for r in report["byKey"] if r["key"] == key]
    assert mine == [{"namespace": NAMESPACE, "key": key, "requests": 1, "signatures": 1}]
    assert all(r["namespace"] == NAMESPACE for r in json.loads(keyroom(
        cluster, "admin", "report", "--file", str(log), "-o", "json").stdout)["byTeam"])  # -n team-a: one team

    copy = tmp_path / "audit.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    copy.write_bytes(b"".join(lines[:-1] + [lines[-1].replace(b'"time":"', b'"time":"1', 1)]))
    tampered = keyroom(cluster, "admin", "audit", "verify", "--file", str(copy))
    assert tampered.returncode == 3 and "audit log INVALID" in tampered.stderr
    copy.write_bytes(b"".join(lines[:1]))
    cut = keyroom(cluster, "admin", "audit", "verify", "--file", str(copy))
    assert cut.returncode == 3 and "truncated" in cut.stderr  # the checkpoint is further on
    refused = keyroom(cluster, "alice", "audit", "verify", "--file", str(log))
    assert refused.returncode == 1 and "--no-checkpoint" in refused.stderr
    env = {**os.environ, "KUBECTL": str(cluster.kubectl)}
    no_pod = subprocess.run([sys.executable, "-m", "keyroom.cli", "audit", "verify", "--kubeconfig",
                             str(cluster.kubeconfig("admin"))], capture_output=True, text=True, env=env, timeout=120)
    assert no_pod.returncode == 1 and "pass it with --file" in no_pod.stderr  # no signer pod on this control plane


def test_status_and_get_for_scripts(cluster, key, tmp_path):
    artifact = tmp_path / "s.bin"
    artifact.write_bytes(b"s")
    name = keyroom(cluster, "alice", "sign", str(artifact), "--key", key, "--no-wait").stdout.strip()
    status = json.loads(keyroom(cluster, "alice", "status", name, "-o", "json").stdout)
    assert status["name"] == name and status["spec"]["keyRef"]["name"] == key
    listed = yaml.safe_load(keyroom(cluster, "alice", "get", "-o", "yaml").stdout)
    assert name in [item["name"] for item in listed]


@pytest.fixture
def key(cluster, unique) -> str:
    return make_key(cluster, unique("cli-key"), requesters={"groups": ["team-a-devs"]},
                    approvers={"groups": ["team-a-approvers"]})


def test_kubectl_finds_the_plugin_and_its_completion(cluster, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, target in (("kubectl-keyroom", "main"), ("kubectl_complete-keyroom", "complete_for_kubectl")):
        script = bin_dir / name
        script.write_text(f"#!{sys.executable}\nimport sys\nfrom keyroom.cli.plugin import {target}\n"
                          f"sys.exit({target}())\n")
        script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    plugin = subprocess.run([str(cluster.kubectl), "keyroom", "whoami", "-n", NAMESPACE,
                             f"--kubeconfig={cluster.kubeconfig('alice')}"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert plugin.returncode == 0 and "user:       alice" in plugin.stdout, plugin.stderr
    completed = subprocess.run([str(cluster.kubectl), "__complete", "keyroom", "au"], capture_output=True, text=True,
                               env=env, timeout=60)
    assert completed.returncode == 0 and completed.stdout.splitlines()[0] == "audit", completed.stdout
    assert shutil.which("kubectl_complete-keyroom", path=env["PATH"])

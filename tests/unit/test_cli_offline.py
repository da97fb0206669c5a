"""The verbs that need no cluster, run through the plugin's entry point as a user would: verify against an
export directory, audit verify/show and report on a copy of the log; and the pure parts of sign, export and keys.

Exit codes are the plugin's interface: 0 verified/valid, 3 not verified/invalid, 1 unusable input, 2 usage.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import pathlib

import pytest
from cryptography.hazmat.primitives import serialization

from keyroom.cli import offline, report
from keyroom.cli.admin import key_view
from keyroom.cli.plugin import (CliError, batches, decision_summary, describe, digest_limit, expand_inputs, main,
                                waiting_line)
from keyroom.signer import audit, x509
from keyroom.signer.formats import cms
from tests.unit.test_cli_verify import Pki

UTC = datetime.timezone.utc


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki("Export")


def exported(pki: Pki, directory: pathlib.Path, *, revoked: bool = False) -> pathlib.Path:
    """What export writes for a key with a certificate under a CA (the files verify --trust reads)."""
    leaf_pem, ca_pem = x509.to_pem(pki.leaf), x509.to_pem(pki.ca)
    public = pki.leaf_key.public.public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    key = {"metadata": {"namespace": "team-a", "name": "release"},
           "status": {"versions": [{"version": 1, "state": "Enabled", "publicKey": public, "fingerprint": "f"}]}}
    leaf = {"metadata": {"name": "release-cert"},
            "spec": {"keyRef": {"name": "release"}, "issuerRef": {"ca": {"name": "team-ca"}}},
            "status": {"certificate": leaf_pem, "chain": ca_pem, "serialNumber": format(pki.serial, "x"),
                       "keyVersion": 1}}
    ca = {"metadata": {"name": "team-ca"}, "spec": {"issuerRef": {"selfSigned": {}}},
          "status": {"certificate": ca_pem}}
    crl = x509.to_pem(pki.revoking_crl if revoked else pki.empty_crl, "X509 CRL")
    found = offline.gather(key=key, certificates=[leaf, ca], read_certificate={"team-ca": ca}.get,
                           read_crl=lambda name: crl)
    manifest = offline.write_export(directory, namespace="team-a", key="release", found=found)
    assert manifest["publicKeys"] == [{"version": 1, "state": "Enabled", "fingerprint": "f",
                                       "file": "release-v1.pub.pem"}]
    assert manifest["roots"] == [{"subject": "CN=Export CA", "file": "ca.pem"}] and manifest["chain"] == []
    assert manifest["crls"] == [{"ca": "team-ca", "file": "crl.pem"}] and manifest["missing"] == []
    return directory


def test_verify_against_an_export_exits_0_3_or_1(pki, tmp_path, capsys):
    trust = exported(pki, tmp_path / "trust")
    artifact = tmp_path / "app.bin"
    artifact.write_bytes(b"application" * 100)
    signature = tmp_path / "app.bin.p7s"
    signature.write_bytes(cms.detached(digest=hashlib.sha256(artifact.read_bytes()).digest(),
                                       digest_algorithm="SHA256", **pki.embedded()))
    assert main(["verify", str(artifact), "--sig", str(signature), "--trust", str(trust)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"verified: {artifact} (cms)") and "revocation: CN=Export release is not on the CRL" in out
    assert main(["verify", str(artifact), "--sig", str(signature), "--trust", str(trust), "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True

    artifact.write_bytes(b"application, patched")
    assert main(["verify", str(artifact), "--sig", str(signature), "--trust", str(trust), "-o", "json"]) == 3
    captured = capsys.readouterr()
    assert json.loads(captured.out)["verified"] is False and captured.err.startswith("NOT VERIFIED: ")

    revoked = exported(pki, tmp_path / "revoked", revoked=True)
    artifact.write_bytes(b"application" * 100)
    assert main(["verify", str(artifact), "--sig", str(signature), "--trust", str(revoked)]) == 3
    assert "is revoked since" in capsys.readouterr().err
    assert main(["verify", str(artifact), "--sig", str(signature)]) == 1  # nothing trusted: nothing verified
    assert "nothing to trust" in capsys.readouterr().err
    assert main(["verify", str(artifact), "--sig", str(tmp_path / "absent.p7s"), "--trust", str(trust)]) == 2
    assert main(["verify", str(artifact), "--sig", str(signature), "--key", str(trust / "ca.pem")]) == 1
    assert "holds no PEM public key" in capsys.readouterr().err


def _log(directory: pathlib.Path) -> pathlib.Path:
    """A log as the signer writes it: two signings by alice (one of two digests), one refusal, one abandoned."""
    log = audit.AuditLog(directory)

    def signing(namespace, name, key, requester, digests, signed=True):
        intent = log.append("Intent", request={"namespace": namespace, "name": name, "uid": name},
                            requester=requester, approvers=["bob"], builders=[], policies=["p"],
                            key={"name": key, "uid": "k", "version": 1, "usage": "Reusable"}, reason="release",
                            digestAlgorithm="SHA256", format="raw", certificate=None,
                            digests=[{"name": f"f{i}", "value": "ab" * 32} for i in range(digests)])
        if signed:
            log.append("Signed", request=intent["request"], key=intent["key"], intent=intent["index"],
                       signatures=[{"name": f"f{i}", "hash": "sha256:00"} for i in range(digests)])
        else:
            log.append("Abandoned", request=intent["request"], intent=intent["index"], message="crashed")

    signing("team-a", "r1", "release", "alice", 2)
    log.append("Refused", request={"namespace": "team-a", "name": "r2", "uid": "r2"}, reason="NotApproved",
               message="needs 1 more approval")
    signing("team-a", "r3", "release", "alice", 1)
    signing("team-b", "r4", "tools", "dave", 3)
    signing("team-b", "r5", "tools", "dave", 5, signed=False)
    log.close()
    return log.path


def test_audit_verify_a_copy_against_a_checkpoint(tmp_path, capsys):
    path = _log(tmp_path)
    entries = list(audit.read_entries(path))
    middle = entries[3]
    assert main(["audit", "verify", "--file", str(path), "--index", str(middle["index"]), "--hash",
                 middle["hash"]]) == 0
    assert f"{len(entries)} entries" in capsys.readouterr().out
    assert main(["audit", "verify", "--file", str(path), "--index", "3"]) == 2  # --hash goes with --index
    capsys.readouterr()

    lines = path.read_bytes().splitlines(keepends=True)
    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(b"".join([lines[0].replace(b"alice", b"mallory")] + lines[1:]))
    assert main(["audit", "verify", "--file", str(edited), "--no-checkpoint", "-o", "json"]) == 3
    assert "content does not match its hash" in json.loads(capsys.readouterr().out)["error"]
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_bytes(b"".join(lines[:3]))  # a valid chain, but shorter than the checkpoint
    assert main(["audit", "verify", "--file", str(truncated), "--no-checkpoint"]) == 0
    capsys.readouterr()
    assert main(["audit", "verify", "--file", str(truncated), "--index", str(middle["index"]), "--hash",
                 middle["hash"]]) == 3
    assert "truncated" in capsys.readouterr().err
    assert main(["audit", "show", "--file", str(edited), "--no-checkpoint"]) == 3  # nothing shown from a bad log
    assert capsys.readouterr().out == ""


def test_audit_show_filters_and_report_counts_completed_signings(tmp_path, capsys):
    path = _log(tmp_path)
    assert main(["audit", "show", "--file", str(path), "--no-checkpoint", "--event", "Intent", "-n", "team-a",
                 "-o", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [e["request"]["name"] for e in shown] == ["r1", "r3"]
    assert main(["audit", "show", "--file", str(path), "--no-checkpoint", "--request", "r2"]) == 0
    assert "team-a/r2: NotApproved: needs 1 more approval" in capsys.readouterr().out

    assert main(["report", "--file", str(path), "--no-checkpoint", "-o", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["total"] == {"requests": 3, "signatures": 6}  # the abandoned r5 signed nothing
    assert result["byTeam"] == [{"namespace": "team-a", "requests": 2, "signatures": 3},
                                {"namespace": "team-b", "requests": 1, "signatures": 3}]
    assert result["byRequester"][0] == {"namespace": "team-a", "requester": "alice", "requests": 2, "signatures": 3}
    assert main(["report", "--file", str(path), "--no-checkpoint", "-n", "team-a"]) == 0
    text = capsys.readouterr().out
    assert "3 in 2 request(s)" in text and "team-b" not in text
    future = (datetime.datetime.now(UTC) + datetime.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert main(["report", "--file", str(path), "--no-checkpoint", "--since", future, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == {"requests": 0, "signatures": 0}
    assert main(["report", "--file", str(path), "--no-checkpoint", "--since", "soon"]) == 2


def test_report_periods_and_summaries():
    now = datetime.datetime(2026, 11, 27, tzinfo=UTC)
    assert report.parse_moment("7d", now) == datetime.datetime(2026, 11, 20, tzinfo=UTC)
    assert report.parse_moment("2026-11-01T00:00:00Z", now) == datetime.datetime(2026, 11, 1, tzinfo=UTC)
    assert report.summary({"event": "KeyVersionGenerated", "key": {"namespace": "team-a", "name": "k"},
                           "version": 2}) == "team-a/k v2"


def test_sign_splits_above_the_policys_limit_and_skips_earlier_signatures(tmp_path):
    (tmp_path / "dist" / "sub").mkdir(parents=True)
    for name in ("a.bin", "sub/b.bin", "a.bin.sig", "c.p7s"):
        (tmp_path / "dist" / name).write_bytes(b"x")
    assert [p.name for p in expand_inputs([tmp_path / "dist"])] == ["a.bin", "b.bin"]
    with pytest.raises(CliError, match="is not a readable file"):
        expand_inputs([tmp_path / "absent"])
    key = {"metadata": {"name": "k", "labels": {"tier": "release"}}}
    policies = [{"spec": {"keys": ["k"], "maxDigestsPerRequest": 3}},
                {"spec": {"keySelector": {"matchLabels": {"tier": "release"}}, "maxDigestsPerRequest": 200}},
                {"spec": {"keys": ["other"], "maxDigestsPerRequest": 1}}]
    assert digest_limit(policies, key=key, fmt="raw") == 3
    assert digest_limit(policies[1:], key=key, fmt="raw") == 200
    assert digest_limit(policies[1:], key=key, fmt="cms") == 100  # signatures that embed a chain
    assert digest_limit([], key=None, fmt="raw") == 500
    files = [pathlib.Path(f"f{i}") for i in range(7)]
    assert [len(b) for b in batches(files, 3)] == [3, 3, 1]


def test_what_an_approver_and_a_waiting_requester_read():
    body = {"metadata": {"namespace": "team-a", "name": "r1"},
            "spec": {"keyRef": {"name": "k"}, "requester": {"username": "alice"}, "format": "cms",
                     "digestAlgorithm": "SHA384", "digests": [{"name": "a", "value": "ab"}, {"name": "b", "value": "cd"}]},
            "status": {"phase": "Pending", "message": "needs 1 more approval"}}
    assert "  format:     cms, 2 digest(s) (SHA384)" in describe(body)
    assert waiting_line(body) == "team-a/r1: Pending: needs 1 more approval"
    other = {**body, "spec": {**body["spec"], "keyRef": {"name": "j"}, "format": "raw",
                              "requester": {"username": "carol"}}}
    assert decision_summary([body, other], "Approve") == (
        "approving 2 request(s), 4 digest(s) in all; key(s) j, k; requester(s) alice, carol; format(s) cms, raw")


def test_keys_show_versions_windows_rotation_and_destruction():
    view = key_view({"metadata": {"namespace": "team-a", "name": "k"},
                     "spec": {"algorithm": "ECDSA_P256", "rotation": {"every": "90d"}},
                     "status": {"phase": "Offline", "currentVersion": 2, "online": False,
                                "nextWindowAt": "2026-12-01T10:00:00Z", "nextRotationAt": "2027-02-01T00:00:00Z",
                                "versions": [{"version": 2, "state": "Enabled"},
                                             {"version": 1, "state": "PendingDestruction",
                                              "destroyAt": "2026-12-04T00:00:00Z"}]}})
    assert view["destruction"] == [{"version": 1, "destroyAt": "2026-12-04T00:00:00Z"}]
    assert view["online"] is False and view["nextWindowAt"] == "2026-12-01T10:00:00Z"
    assert view["rotationEvery"] == "90d" and view["currentVersion"] == 2

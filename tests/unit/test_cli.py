"""The plugin without a cluster: hashing, the SignRequest it creates, the approval patch and its retry,
build attestations, where signatures go, and one-line errors."""
from __future__ import annotations

import copy
import hashlib
import pathlib

import kubernetes
import pytest
import yaml

from keyroom.cli.plugin import (CliError, append_decision, approval_patch, attestation, build_reference, describe,
                                main, sign_request_body, signature_paths, table)

ALICE = {"username": "alice", "groups": ["team-a-devs", "system:authenticated"]}


def test_the_request_carries_local_digests_and_the_callers_identity(tmp_path):
    app, lib = tmp_path / "app.exe", tmp_path / "lib.dll"
    app.write_bytes(b"x" * 3_000_000)  # more than one read chunk
    lib.write_bytes(b"")
    body = sign_request_body([app, lib], key="release-key", namespace="team-a", identity=ALICE,
                             reason="release 1.4.2", algorithm="SHA384")
    assert body["metadata"] == {"namespace": "team-a", "generateName": "release-key-"}
    spec = body["spec"]
    assert spec["requester"] == ALICE and spec["reason"] == "release 1.4.2" and spec["digestAlgorithm"] == "SHA384"
    assert spec["digests"] == [{"name": "app.exe", "value": hashlib.sha384(b"x" * 3_000_000).hexdigest()},
                               {"name": "lib.dll", "value": hashlib.sha384(b"").hexdigest()}]
    assert "approvals" not in spec
    named = sign_request_body([app], key="k", namespace="team-a", identity=ALICE, name="mine")
    assert named["metadata"]["name"] == "mine" and "reason" not in named["spec"]


def test_files_that_cannot_share_a_request_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    same = [tmp_path / "a" / "app.exe", tmp_path / "b" / "app.exe"]
    for path in same:
        path.write_bytes(b"1")
    with pytest.raises(CliError, match="same name"):
        sign_request_body(same, key="k", namespace="n", identity=ALICE)
    with pytest.raises(CliError, match="at most 500"):
        sign_request_body([tmp_path / f"f{i}" for i in range(501)], key="k", namespace="n", identity=ALICE)


def test_the_approval_patch_appends_and_fails_if_the_list_changed():
    entry = {"user": "bob", "groups": ["team-a-approvers"], "decision": "Approve"}
    assert approval_patch(None, entry) == [{"op": "add", "path": "/spec/approvals", "value": [entry]}]
    earlier = [{"user": "carol", "decision": "Approve"}]
    assert approval_patch(earlier, entry) == [{"op": "test", "path": "/spec/approvals", "value": earlier},
                                              {"op": "add", "path": "/spec/approvals/-", "value": entry}]


def test_signatures_go_beside_the_files_or_into_a_directory():
    files = [pathlib.Path("/src/app.exe"), pathlib.Path("lib.dll")]
    assert signature_paths(files, None) == {"app.exe": pathlib.Path("/src/app.exe.sig"),
                                            "lib.dll": pathlib.Path("lib.dll.sig")}
    assert signature_paths(files, pathlib.Path("out")) == {"app.exe": pathlib.Path("out/app.exe.sig"),
                                                           "lib.dll": pathlib.Path("out/lib.dll.sig")}


def test_an_approver_sees_what_they_approve():
    body = {"metadata": {"namespace": "team-a", "name": "r1"},
            "spec": {"keyRef": {"name": "release-key"}, "requester": ALICE, "reason": "release 1.4.2",
                     "digests": [{"name": "app.exe", "value": "ab" * 32}]},
            "status": {"phase": "Pending", "message": "needs 1 more approval", "approvalSummary": "1/2",
                       "approvals": [{"user": "alice", "decision": "Approve", "counted": False,
                                      "reason": "a requester cannot approve or deny their own request"}]}}
    text = describe(body)
    for expected in ("requester:  alice", "key:        release-key", "reason:     release 1.4.2",
                     "approvals:  1/2", "alice: Approve (not counted: a requester cannot", "app.exe  " + "ab" * 32):
        assert expected in text
    assert table([["NAME", "PHASE"], ["a-long-name", "Signed"]]) == "NAME          PHASE\na-long-name   Signed"


class FakeApi:
    """A SignRequest store that, like the API server, refuses a JSON patch whose test fails."""

    def __init__(self, approvals, *, interleaved=(), refusal=None):
        self.spec = {"approvals": list(approvals)} if approvals is not None else {}
        self.interleaved, self.refusal, self.patches = list(interleaved), refusal, []

    def get(self, name):
        return {"metadata": {"namespace": "team-a", "name": name}, "status": {"phase": "Pending"},
                "spec": {"keyRef": {"name": "k"}, "requester": ALICE, "digests": [], **copy.deepcopy(self.spec)}}

    def patch_namespaced_custom_object(self, *args, _content_type):
        ops = args[-1]
        assert _content_type == "application/json-patch+json"
        self.patches.append(ops)
        if self.interleaved:  # someone else's decision lands between our read and our patch
            self.spec.setdefault("approvals", []).append(self.interleaved.pop(0))
        if self.refusal:
            raise kubernetes.client.ApiException(status=403, reason=self.refusal)
        if ops[0]["op"] == "test" and ops[0]["value"] != self.spec.get("approvals"):
            raise kubernetes.client.ApiException(status=422, reason="Unprocessable Entity")
        if ops[0]["op"] == "add" and "approvals" in self.spec:  # the append-only rule refuses a replaced list
            raise kubernetes.client.ApiException(status=422, reason="Unprocessable Entity")
        self.spec.setdefault("approvals", []).append(ops[-1]["value"] if ops[0]["op"] == "test" else ops[0]["value"][0])


class FakeCluster:
    namespace = "team-a"

    def __init__(self, api):
        self.custom, self.get = api, api.get


BOB = {"user": "bob", "groups": ["team-a-approvers"], "decision": "Approve"}
CAROL = {"user": "carol", "groups": ["team-a-approvers"], "decision": "Approve"}


@pytest.mark.parametrize("approvals", [None, [], [CAROL]])
def test_a_decision_that_lands_at_the_same_moment_is_kept_and_ours_appended_after_it(approvals):
    api = FakeApi(approvals, interleaved=[{"user": "dan", "decision": "Deny"}])
    append_decision(FakeCluster(api), "r1", BOB)
    assert api.spec["approvals"] == (approvals or []) + [{"user": "dan", "decision": "Deny"}, BOB]
    assert len(api.patches) == 2 and api.patches[1][0]["op"] == "test"


def test_a_refusal_is_not_retried_and_a_final_request_is_not_touched():
    api = FakeApi(None, refusal="Forbidden")
    with pytest.raises(kubernetes.client.ApiException):
        append_decision(FakeCluster(api), "r1", BOB)
    assert len(api.patches) == 1
    api = FakeApi([CAROL])
    api.get = lambda name: {**FakeApi.get(api, name), "status": {"phase": "Signed"}}
    with pytest.raises(CliError, match="already Signed; nothing to approve"):
        append_decision(FakeCluster(api), "r1", BOB)
    assert api.patches == []


def test_expected_failures_are_one_line_errors(tmp_path, capsys):
    assert main(["get", "--kubeconfig", str(tmp_path / "absent")]) == 1
    assert capsys.readouterr().err.startswith(f"error: cannot load a kubeconfig from {tmp_path / 'absent'}")
    nobody = tmp_path / "kubeconfig"
    nobody.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}}]}))
    assert main(["status", "r1", "--kubeconfig", str(nobody)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the API server at https://127.0.0.1:1") and err.count("\n") == 1


CI_A = {"username": "system:serviceaccount:team-a:ci-builder-a", "groups": ["system:serviceaccounts"]}


def test_an_attestation_hashes_the_builders_own_files_as_the_request_says(tmp_path):
    app, lib = tmp_path / "app.exe", tmp_path / "lib.dll"
    app.write_bytes(b"app")
    lib.write_bytes(b"lib")
    spec = sign_request_body([app, lib], key="k", namespace="team-a", identity=ALICE, algorithm="SHA512")["spec"]
    entry, difference = attestation(spec, [lib, app], identity=CI_A, build="https://ci.example/run/7")
    assert difference is None
    assert entry == {"user": CI_A["username"], "groups": CI_A["groups"], "build": "https://ci.example/run/7",
                     "digests": [{"name": "lib.dll", "value": hashlib.sha512(b"lib").hexdigest()},
                                 {"name": "app.exe", "value": hashlib.sha512(b"app").hexdigest()}]}
    lib.write_bytes(b"lib, built elsewhere")
    entry, difference = attestation(spec, [app, lib], identity=CI_A)
    assert difference[0] == "lib.dll" and "build" not in entry


def test_an_attestation_names_exactly_the_requests_files(tmp_path):
    app, lib, other = tmp_path / "app.exe", tmp_path / "lib.dll", tmp_path / "other.so"
    for path in (app, lib, other):
        path.write_bytes(path.name.encode())
    spec = sign_request_body([app, lib], key="k", namespace="team-a", identity=ALICE)["spec"]
    with pytest.raises(CliError, match="attest exactly the request's files: missing lib.dll; not in the request "
                                       "other.so"):
        attestation(spec, [app, other], identity=CI_A)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "app.exe").write_bytes(b"")
    with pytest.raises(CliError, match="same name"):
        attestation(spec, [app, tmp_path / "d" / "app.exe", lib], identity=CI_A)


def test_the_build_reference_comes_from_the_ci_system():
    assert build_reference({"CI_JOB_URL": "https://gitlab.example/g/p/-/jobs/9"}) == "https://gitlab.example/g/p/-/jobs/9"
    assert build_reference({"GITHUB_SERVER_URL": "https://github.com", "GITHUB_REPOSITORY": "o/r",
                            "GITHUB_RUN_ID": "42"}) == "https://github.com/o/r/actions/runs/42"
    assert build_reference({"GITHUB_RUN_ID": "42"}) == ""


def test_the_status_shows_builds_as_counted_or_not():
    body = {"metadata": {"namespace": "team-a", "name": "r1"},
            "spec": {"keyRef": {"name": "k"}, "requester": ALICE, "digests": [{"name": "a", "value": "ab" * 32}],
                     "attestations": [{"user": "x", "digests": []}]},
            "status": {"phase": "Failed", "buildSummary": "1/2", "builds": [
                {"user": "ci-a", "counted": True, "build": "run 1"},
                {"user": "ci-b", "counted": False, "reason": "ci-b's build differs at a: ..."}]}}
    text = describe(body)
    for expected in ("builds:     1/2", "ci-a: matches, counted [run 1]", "ci-b: not counted: ci-b's build differs at a"):
        assert expected in text
    assert "builds:" not in describe({**body, "spec": {**body["spec"], "attestations": []}, "status": {}})

"""The plugin's pure parts: hashing, the SignRequest it creates, the approval patch, where signatures go."""
from __future__ import annotations

import hashlib
import pathlib

import pytest

from keyroom.cli.plugin import CliError, approval_patch, describe, sign_request_body, signature_paths, table

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

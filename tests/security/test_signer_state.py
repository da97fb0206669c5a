"""Attacks on the signer's durable state: two writers, and a crash in the middle of signing.

The first attacker (or an operations mistake: a second replica, a stuck pod
that did not die) starts another signer process on the same state directory,
so that two processes would append to one log from their own heads and could
each sign a request once. The second is a kill -9 (node failure, OOM killer,
an attacker who can kill the pod) while a request is being signed, between
the signer's Intent entry and its Signed entry, hoping that the restarted
signer either signs the request twice or loses the record of the attempt.

The second process must refuse to start with a clear message and leave the
running signer and its log untouched. After the crash, the restarted signer
must record that the interrupted attempt was abandoned (no signature left
it), then sign the request exactly once, with signatures that match the
audited hashes, in a log that verifies against its checkpoint.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import socket
import subprocess

import pytest

from keyroom.devenv import controlplane
from keyroom.signer import audit
from tests.conftest import wait_for
from tests.security.conftest import (
    audit_path, checkpoint, digest, entries_for, final, health, kill_signer, make_key, make_policy, make_request,
    public_key, signer_process, uid_of, verifies,
)

pytestmark = pytest.mark.integration


class _SecondSigner(controlplane._Supervisor):  # noqa: SLF001
    """start_signer's own environment and command, for a process that is not recorded in state.json."""

    def __init__(self, cluster, log_path) -> None:
        super().__init__(cluster.state_dir, {"processes": {}})
        self.log_path = log_path

    def spawn(self, name, argv, *, env=None):
        with open(self.log_path, "wb") as log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=self.state_dir, start_new_session=True)

    def wait_until(self, name, process, check, *, what, timeout=60.0):
        try:
            process.wait(timeout=timeout)  # it must give up on its own
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail("a second signer on the same state directory kept running")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_second_signer_on_the_same_state_directory_refuses_to_start(cluster, tmp_path):
    running = signer_process(cluster)
    log_before = audit_path(cluster).read_bytes()
    other = dataclasses.replace(cluster, signer_url=f"https://127.0.0.1:{_free_port()}")
    second = controlplane.start_signer(other, supervisor=_SecondSigner(cluster, tmp_path / "second.log"))
    output = (tmp_path / "second.log").read_text()
    assert second.returncode == 2, output
    assert f"another signer (pid {running['pid']}) holds the state directory" in output, output

    assert signer_process(cluster) == running and health(cluster)[0] == 200
    assert (audit_path(cluster).parent / "signer.lock").read_text().strip() == str(running["pid"])
    assert audit_path(cluster).read_bytes().startswith(log_before)  # the running signer's log, only grown by it
    audit.verify(audit_path(cluster))


def test_kill_9_between_intent_and_signed_abandons_the_attempt_then_signs_exactly_once(cluster, unique):
    key = make_key(cluster, unique, algorithm="RSA_4096")
    make_policy(cluster, unique, key, maxSignaturesPerHour=10_000, maxDigestsPerRequest=500)
    digests = {f"file-{i:03}.bin": digest(f"{key}-{i}") for i in range(500)}  # ~10 s of RSA-4096 signing
    name = make_request(cluster, unique, key, digests)
    uid = uid_of(cluster, "signrequest", name)

    intent = wait_for(lambda: (found := entries_for(cluster, uid, "Intent")) and found[0], timeout=60,
                      what="the signer's Intent entry for the request")
    assert not entries_for(cluster, uid, "Signed"), "signed before the kill: make the request slower"
    kill_signer(cluster)
    assert not entries_for(cluster, uid, "Signed"), "signed before the kill: make the request slower"
    assert not (audit_path(cluster).parent / "results" / f"{uid}.json").exists()

    controlplane.start_signer(cluster)
    status = final(cluster, name, timeout=180)
    assert status["phase"] == "Signed", status

    entries = entries_for(cluster, uid)
    [abandoned] = [e for e in entries if e["event"] == "Abandoned"]
    assert abandoned["intent"] == intent["index"]
    [signed] = [e for e in entries if e["event"] == "Signed"]
    intents = [e for e in entries if e["event"] == "Intent"]
    assert intents[0] == intent and signed["intent"] == intents[-1]["index"] != intent["index"]
    assert intent["index"] < abandoned["index"] < intents[-1]["index"] < signed["index"]

    assert status["audit"] == {"index": signed["index"], "entryHash": signed["hash"]}
    hashes = {s["name"]: "sha256:" + hashlib.sha256(base64.b64decode(s["value"])).hexdigest()
              for s in status["signatures"]}
    assert hashes == {s["name"]: s["hash"] for s in signed["signatures"]} and len(hashes) == 500
    public = public_key(cluster, key, status["keyVersion"])
    assert all(verifies(public, digests[s["name"]], s["value"]) for s in status["signatures"])

    head = wait_for(lambda: (c := checkpoint(cluster)) and int(c["index"]) >= signed["index"] and c,
                    what="the checkpoint to cover the Signed entry")
    audit.verify(audit_path(cluster), audit.Head(int(head["index"]), head["entryHash"]))

"""Attacks on the signer's audit log: the evidence, and the signer's memory of what it signed.

The attacker can write the signer's state volume while the signer is down (a
node administrator, a stolen volume snapshot restored in place) or, as a
cluster admin, delete the checkpoint ConfigMap. They delete the log to make
the signer forget what it signed, cut its tail to hide the last signatures,
replace it with a valid-looking chain of their own, or drop the checkpoint so
that any log would be believed; and they replay an old new-chain instruction.

The signer must fail closed each time: /healthz 503 AuditLogUnavailable and
every signature refused, until an administrator's new-chain instruction that
names the current checkpoint starts a new chain, which records why and
carries the requests it knows were signed, so none is signed twice.

These tests break the session's shared signer on purpose; each one ends by
starting a new chain and waiting until /healthz is 200 again (the autouse
fixture does it too when a test fails half-way).
"""
from __future__ import annotations

import datetime
import json
import uuid

import pytest

from keyroom.signer import audit
from keyroom.signer.client import digests_fingerprint
from tests.conftest import get, kubectl, token_labels, wait_for
from tests.security.conftest import (
    NAMESPACE, audit_entries, audit_path, checkpoint, condition, entries_for, final, health, key_status,
    make_key, make_policy, make_request, new_chain, recover, sign_call, signer_call, start_signer_unchecked,
    stop_signer, uid_of, verifies, wait_audit_failure, wait_healthy, wait_request,
)

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def healthy_signer_afterwards(cluster):
    recover(cluster, "security tests: a healthy signer to start from")
    yield
    recover(cluster, "security tests: restore the shared signer after an audit attack")


# ---------------------------------------------------------------- helpers

def _signed_request(cluster, unique, key: str) -> dict:
    """A request signed before the attack: its name, UID, status; returns once the checkpoint covers it."""
    name = make_request(cluster, unique, key)
    status = final(cluster, name)
    assert status["phase"] == "Signed", status
    uid = uid_of(cluster, "signrequest", name)
    [signed] = entries_for(cluster, uid, "Signed")
    wait_for(lambda: int((checkpoint(cluster) or {}).get("index", -1)) >= signed["index"],
             what="the checkpoint to cover the signature")
    return {"name": name, "uid": uid, "status": status, "intent": entries_for(cluster, uid, "Intent")[0],
            "token": token_labels(cluster)}


def _restart_with(cluster, damage, *, failure: str | tuple[str, ...]) -> dict:
    """Stop the signer, damage its state, start it again: it must refuse with AuditLogUnavailable."""
    stop_signer(cluster)
    damage()
    start_signer_unchecked(cluster)
    return wait_audit_failure(cluster, contains=failure)


def _refuses_every_signature(cluster, unique, key: str) -> None:
    """A new request the policy approves at once is not signed, neither through the operator nor directly."""
    name = make_request(cluster, unique, key)
    status = wait_request(cluster, name, lambda s: condition(s, "Ready").get("reason") == "AuditLogUnavailable",
                          what="the operator to show the signer's refusal")
    assert status["phase"] == "Approved" and not status.get("signatures"), status
    body = get(cluster, "signrequest", name, namespace=NAMESPACE)
    code, answer = sign_call(cluster, NAMESPACE, name, body["metadata"]["uid"], digests_fingerprint(body["spec"]))
    assert code == 503 and answer["reason"] == "AuditLogUnavailable", answer
    kubectl(cluster, "delete", "signrequest", name, "-n", NAMESPACE, "--wait=false")


def _start_new_chain(cluster, reason: str) -> dict:
    """The administrator's recovery; returns the new chain's first entry."""
    written = new_chain(cluster, reason)
    assert written.returncode == 0, written.stderr
    wait_healthy(cluster, timeout=30)
    first = audit_entries(cluster)[0]
    assert first["event"] == "ChainStarted" and first["reason"] == reason, first
    return first


def _not_signed_again(cluster, signed: dict) -> None:
    """After the reset, the request signed before gets its recorded signatures back, nothing new is signed;
    and the token holds exactly the keys it held before the attack (a new chain adopts, never generates)."""
    body = get(cluster, "signrequest", signed["name"], namespace=NAMESPACE)
    code, answer = sign_call(cluster, NAMESPACE, signed["name"], signed["uid"], digests_fingerprint(body["spec"]))
    assert (code == 200 and answer["signatures"] == signed["status"]["signatures"]) or \
        (code == 409 and answer["reason"] == "AlreadySigned"), (code, answer)
    assert not entries_for(cluster, signed["uid"], "Intent") and not entries_for(cluster, signed["uid"], "Signed")
    assert token_labels(cluster) == signed["token"]


def _head(data: dict) -> dict:
    return {"index": int(data["index"]), "hash": data["entryHash"]}


def _broken_logs(cluster) -> set[str]:
    return {p.name for p in audit_path(cluster).parent.glob("audit-*.jsonl.broken")}


# ---------------------------------------------------------------- attacks

def test_a_deleted_log_stops_all_signing_until_an_admin_starts_a_new_chain(cluster, unique):
    key = make_key(cluster, unique)
    make_policy(cluster, unique, key)
    signed = _signed_request(cluster, unique, key)
    before = {}

    def delete_log():  # the checkpoint as the stopped signer left it: other requests may have moved it since
        before.update(checkpoint(cluster))
        audit_path(cluster).unlink()
    failure = _restart_with(cluster, delete_log, failure="the log is missing")
    assert "new-chain" in failure["message"]
    _refuses_every_signature(cluster, unique, key)
    assert not audit_path(cluster).exists()  # nothing at all was written while refusing

    first = _start_new_chain(cluster, "INC-1: the audit log was deleted")
    assert first["previous"]["checkpoint"] == _head(before)
    assert signed["uid"] in first["signedRequests"]  # from the signatures kept beside the log
    _not_signed_again(cluster, signed)

    # signing resumes with the same key material, adopted from the token
    assert kubectl(cluster, "label", "signingkey", key, "-n", NAMESPACE, "poke=after-new-chain").returncode == 0
    value = "0" * 64
    after = make_request(cluster, unique, key, {"after.bin": value})
    status = final(cluster, after)
    assert status["phase"] == "Signed" and verifies(key_status(cluster, key)["versions"][0]["publicKey"], value,
                                                    status["signatures"][0]["value"])


def test_a_truncated_log_is_refused_and_the_cut_signature_is_not_made_again(cluster, unique):
    key = make_key(cluster, unique)
    make_policy(cluster, unique, key)
    signed = _signed_request(cluster, unique, key)

    def cut():  # everything from the request's Intent on: its signing vanishes from the log
        lines = audit_path(cluster).read_bytes().splitlines(keepends=True)
        audit_path(cluster).write_bytes(b"".join(lines[:signed["intent"]["index"]]))
    _restart_with(cluster, cut, failure="the log was truncated")
    body = get(cluster, "signrequest", signed["name"], namespace=NAMESPACE)
    code, answer = sign_call(cluster, NAMESPACE, signed["name"], signed["uid"], digests_fingerprint(body["spec"]))
    assert code == 503 and answer["reason"] == "AuditLogUnavailable", answer
    _refuses_every_signature(cluster, unique, key)

    kept = _broken_logs(cluster)
    first = _start_new_chain(cluster, "INC-2: the audit log was truncated")
    [aside] = _broken_logs(cluster) - kept
    assert first["previous"]["keptAs"] == aside
    assert signed["uid"] in first["signedRequests"]
    _not_signed_again(cluster, signed)


def test_a_rewritten_valid_looking_log_is_refused(cluster, unique):
    key = make_key(cluster, unique)
    make_policy(cluster, unique, key)
    signed = _signed_request(cluster, unique, key)
    current = checkpoint(cluster)

    def rewrite():  # a valid chain from scratch, longer than the real one, that never mentions the signature
        count = len(audit_entries(cluster)) + 3
        previous, lines = audit.GENESIS, []
        for index in range(count):
            entry = {"index": index, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                     "event": "Refused", "request": {"namespace": NAMESPACE, "name": "nothing-to-see",
                                                     "uid": str(uuid.uuid4())},
                     "reason": "AwaitingApproval", "message": "rewritten", "prev": previous}
            entry["hash"] = previous = audit.entry_hash(entry)
            lines.append(audit.canonical(entry) + b"\n")
        audit_path(cluster).write_bytes(b"".join(lines))
        assert audit.verify(audit_path(cluster)).index == count - 1  # the chain itself is valid
        with pytest.raises(audit.AuditError, match="rewritten"):
            audit.verify(audit_path(cluster), audit.Head(int(current["index"]), current["entryHash"]))
    # found by the checkpoint (the checkpointed entry is not in it), or earlier by the entries' HSM-keyed MACs
    _restart_with(cluster, rewrite, failure=("the log was rewritten", "its MAC is not the signer's"))
    _refuses_every_signature(cluster, unique, key)

    kept = _broken_logs(cluster)
    first = _start_new_chain(cluster, "INC-3: the audit log was rewritten")
    [aside] = _broken_logs(cluster) - kept
    assert b"nothing-to-see" in (audit_path(cluster).parent / aside).read_bytes()  # the forgery is kept as evidence
    _not_signed_again(cluster, signed)


def test_an_entry_appended_by_a_volume_writer_is_refused(cluster, unique):
    """An entry that chains correctly but was not written by the signer: here, version 1 of a key disabled."""
    key = make_key(cluster, unique)
    make_policy(cluster, unique, key)
    signed = _signed_request(cluster, unique, key)

    def append():
        last = audit_entries(cluster)[-1]
        entry = {"index": last["index"] + 1, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                 "event": "KeyVersionDisabled", "key": {"namespace": NAMESPACE, "name": key,
                                                        "uid": uid_of(cluster, "signingkey", key)},
                 "version": 1, "reason": "appended by someone else", "prev": last["hash"]}
        entry["hash"] = audit.entry_hash(entry)
        with open(audit_path(cluster), "ab") as log:
            log.write(audit.canonical(entry) + b"\n")
        audit.verify(audit_path(cluster))  # the hash chain alone accepts it
    _restart_with(cluster, append, failure="its MAC is not the signer's")
    _refuses_every_signature(cluster, unique, key)

    _start_new_chain(cluster, "INC-7: an entry was appended to the audit log")
    _not_signed_again(cluster, signed)


def test_a_deleted_checkpoint_makes_the_intact_log_untrusted(cluster, unique):
    key = make_key(cluster, unique)
    make_policy(cluster, unique, key)
    signed = _signed_request(cluster, unique, key)
    log_before = {}

    def delete_checkpoint():
        # read while the signer is stopped: until then it may still write (other tests' keys being deleted)
        log_before["bytes"] = audit_path(cluster).read_bytes()
        deleted = kubectl(cluster, "delete", "configmap", "keyroom-audit-checkpoint", "-n", "keyroom-system")
        assert deleted.returncode == 0, deleted.stderr
    _restart_with(cluster, delete_checkpoint, failure="there is no checkpoint")
    _refuses_every_signature(cluster, unique, key)
    assert audit_path(cluster).read_bytes() == log_before["bytes"]  # the refusing signer wrote nothing

    first = _start_new_chain(cluster, "INC-4: the checkpoint ConfigMap was deleted")
    assert first["previous"]["checkpoint"] is None
    assert signed["uid"] in first["signedRequests"]
    wait_for(lambda: checkpoint(cluster), what="a checkpoint for the new chain")
    _not_signed_again(cluster, signed)


def test_a_new_chain_instruction_for_another_checkpoint_is_ignored(cluster, unique):
    key = make_key(cluster, unique)
    make_policy(cluster, unique, key)
    stale = checkpoint(cluster)
    _signed_request(cluster, unique, key)  # the checkpoint moves on
    assert int(checkpoint(cluster)["index"]) > int(stale["index"])
    kept = _broken_logs(cluster)

    def delete_log_and_replay_an_old_instruction():
        audit_path(cluster).unlink()
        instruction = {"apiVersion": "v1", "kind": "ConfigMap",
                       "metadata": {"name": "keyroom-audit-new-chain", "namespace": "keyroom-system"},
                       "data": {"supersedes": f"{stale['index']}:{stale['entryHash']}", "reason": "replayed"}}
        written = kubectl(cluster, "apply", "-f", "-", input=json.dumps(instruction))
        assert written.returncode == 0, written.stderr
    # the failure is reported only after the signer read the instruction and found it names another checkpoint
    _restart_with(cluster, delete_log_and_replay_an_old_instruction, failure="the log is missing")
    assert health(cluster)[0] == 503
    assert not audit_path(cluster).exists() and _broken_logs(cluster) == kept
    _refuses_every_signature(cluster, unique, key)

    _start_new_chain(cluster, "INC-5: the log was deleted; this instruction names the current checkpoint")


def test_a_consumed_one_time_key_stays_consumed_after_a_new_chain(cluster, unique):
    key = make_key(cluster, unique, usage="OneTime")
    make_policy(cluster, unique, key)
    signed = _signed_request(cluster, unique, key)
    wait_for(lambda: key_status(cluster, key).get("consumedBy") == signed["name"], what="the key to be consumed")

    _restart_with(cluster, lambda: audit_path(cluster).unlink(), failure="the log is missing")
    first = _start_new_chain(cluster, "INC-6: the audit log was deleted")
    assert signed["uid"] in first["signedRequests"]
    _not_signed_again(cluster, signed)

    key_uid = uid_of(cluster, "signingkey", key)
    code, record = signer_call(cluster, "POST", f"/v1/keys/{NAMESPACE}/{key}/{key_uid}/reconcile")  # adopt it
    assert code == 200, record
    second = make_request(cluster, unique, key)
    body = get(cluster, "signrequest", second, namespace=NAMESPACE)
    code, answer = sign_call(cluster, NAMESPACE, second, body["metadata"]["uid"], digests_fingerprint(body["spec"]))
    assert not entries_for(cluster, body["metadata"]["uid"], "Signed")
    assert code == 403 and answer["reason"] == "KeyConsumed", (code, answer)


def test_the_signers_identity_cannot_give_itself_a_new_chain_instruction(cluster):
    kubectl(cluster, "delete", "configmap", "keyroom-audit-new-chain", "-n", "keyroom-system", "--ignore-not-found")
    created = kubectl(cluster, "create", "configmap", "keyroom-audit-new-chain", "-n", "keyroom-system",
                      "--from-literal=supersedes=none", "--from-literal=reason=the signer itself", identity="signer")
    if created.returncode == 0:
        kubectl(cluster, "delete", "configmap", "keyroom-audit-new-chain", "-n", "keyroom-system")
    assert created.returncode != 0 and "forbidden" in created.stderr, created.stdout
    # nor change or remove one an administrator wrote
    assert new_chain(cluster, "an administrator's instruction").returncode == 0
    for verb in (("label", "configmap", "keyroom-audit-new-chain", "forged=yes"),
                 ("delete", "configmap", "keyroom-audit-new-chain")):
        changed = kubectl(cluster, *verb, "-n", "keyroom-system", identity="signer")
        assert changed.returncode != 0 and "forbidden" in changed.stderr, changed.stdout

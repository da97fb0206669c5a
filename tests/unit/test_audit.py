"""The signer's hash-chained audit log: every edit, cut or rewrite is caught; the log is the signer's memory."""
from __future__ import annotations

import datetime

import pytest

from keyroom import policy
from keyroom.signer import audit

REQUEST = {"namespace": "team-a", "name": "sr-1", "uid": "u-1"}
KEY = {"name": "release", "uid": "k-1", "version": 1, "usage": "Reusable"}


def write_log(directory, entries=3):
    log = audit.AuditLog(directory)
    for i in range(entries):
        log.append("Intent", request={**REQUEST, "uid": f"u-{i}"}, key=KEY, digests=[{"name": "a", "value": "00"}])
    log.close()
    return directory / "audit.jsonl"


def test_a_valid_chain_verifies_and_reopens_with_its_head(tmp_path):
    path = write_log(tmp_path)
    head = audit.verify(path)
    assert head.index == 2
    reopened = audit.AuditLog(tmp_path, checkpoint=head)
    assert reopened.head == head and set(reopened.requests) == {"u-0", "u-1", "u-2"}
    entry = reopened.append("Refused", request=REQUEST, reason="AwaitingApproval", message="")
    assert entry["index"] == 3 and entry["prev"] == head.hash


def test_every_single_byte_edit_is_detected(tmp_path):
    path = write_log(tmp_path, entries=2)
    original = path.read_bytes()
    for position in range(len(original)):
        if original[position:position + 1] == b"\n":
            continue
        edited = bytearray(original)
        edited[position] = ord("0") if edited[position] != ord("0") else ord("1")
        path.write_bytes(bytes(edited))
        with pytest.raises(audit.AuditError):
            list(audit.read_entries(path))
    path.write_bytes(original)


def test_truncation_and_rewriting_are_caught_by_the_checkpoint(tmp_path):
    path = write_log(tmp_path)
    checkpoint = audit.verify(path)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))
    assert audit.verify(path) is not None  # a shorter chain is still a chain...
    with pytest.raises(audit.AuditError, match="truncated"):
        audit.verify(path, checkpoint)  # ...but not the one the checkpoint saw
    path.unlink()
    write_log(tmp_path)  # a rewritten log with other times, hence other hashes
    with pytest.raises(audit.AuditError, match="rewritten"):
        audit.verify(path, checkpoint)
    with pytest.raises(audit.AuditError):
        audit.AuditLog(tmp_path, checkpoint=audit.Head(9, checkpoint.hash))


def test_the_log_remembers_signed_requests_consumed_keys_and_abandoned_intents(tmp_path):
    log = audit.AuditLog(tmp_path)
    intent = log.append("Intent", request=REQUEST, key={**KEY, "usage": "OneTime"}, digests=[{"name": "a", "value": "00"}])
    log.append("Signed", request=REQUEST, key={**KEY, "usage": "OneTime"}, intent=intent["index"],
               signatures=[{"name": "a", "hash": "sha256:x"}])
    other = {**REQUEST, "uid": "u-2"}
    crashed = log.append("Intent", request=other, key=KEY, digests=[{"name": "b", "value": "00"}])
    head = log.head
    log.close()
    reopened = audit.AuditLog(tmp_path, checkpoint=head)
    assert reopened.requests["u-1"].signed is not None and reopened.keys["k-1"].consumed_by["uid"] == "u-1"
    assert reopened.requests["u-2"].open_intent
    reopened.append("Abandoned", request=other, intent=crashed["index"])
    assert not reopened.requests["u-2"].open_intent
    since = datetime.datetime.fromisoformat(intent["time"])
    tally = reopened.rate_tally("team-a", since)
    assert tally.signatures("release") == [policy.Signature(since, "release", 1)]  # the abandoned one no longer counts
    assert tally.total("release") == 1 and reopened.rate_tally("team-b", since).total("release") == 0
    assert reopened.rate_tally("team-a", since + policy.RATE_WINDOW).total("release") == 0  # aged out of the hour


def test_results_are_stored_atomically_and_read_back(tmp_path):
    log = audit.AuditLog(tmp_path)
    assert log.load_result("u-1") is None
    log.store_result("u-1", {"signatures": [{"name": "a", "value": "AA=="}]})
    assert log.load_result("u-1") == {"signatures": [{"name": "a", "value": "AA=="}]}
    assert not list((tmp_path / "results").glob("*.tmp"))


def test_the_command_line_verifier_reports_valid_and_invalid_logs(tmp_path, capsys):
    path = write_log(tmp_path)
    head = audit.verify(path)
    assert audit.main(["verify", str(path), "--index", str(head.index), "--hash", head.hash]) == 0
    assert "valid: 3 entries" in capsys.readouterr().out
    path.write_bytes(path.read_bytes().replace(b'"sr-1"', b'"sr-X"', 1))
    assert audit.main(["verify", str(path)]) == 1
    assert "INVALID" in capsys.readouterr().err


def test_old_results_of_signed_requests_are_pruned_and_others_kept(tmp_path):
    import os
    log = audit.AuditLog(tmp_path)
    intent = log.append("Intent", request=REQUEST, key=KEY, digests=[{"name": "a", "value": "00"}])
    log.append("Signed", request=REQUEST, key=KEY, intent=intent["index"], signatures=[])
    log.store_result("u-1", {"signatures": []})
    log.store_result("u-open", {"signatures": []})  # no Signed entry: never pruned
    for uid in ("u-1", "u-open"):
        os.utime(tmp_path / "results" / f"{uid}.json", (0, 0))
    assert log.prune_results(datetime.timedelta(days=30)) == 1
    assert log.load_result("u-1") is None and log.load_result("u-open") is not None


def test_a_log_without_its_checkpoint_or_a_checkpoint_without_its_log_fails(tmp_path):
    path = write_log(tmp_path)
    head = audit.verify(path)
    with pytest.raises(audit.AuditError, match="no checkpoint"):
        audit.AuditLog(tmp_path, checkpoint=None)
    path.unlink()
    with pytest.raises(audit.AuditError, match="missing or empty"):
        audit.AuditLog(tmp_path, checkpoint=head)
    assert audit.AuditLog(tmp_path, checkpoint=None).head is None  # neither: a new installation


def test_a_new_chain_records_what_was_lost_and_carries_what_the_old_log_proves(tmp_path):
    log = audit.AuditLog(tmp_path)
    intent = log.append("Intent", request=REQUEST, key={**KEY, "usage": "OneTime"}, digests=[])
    log.append("Signed", request=REQUEST, key={**KEY, "usage": "OneTime"}, intent=intent["index"], signatures=[])
    log.append("Refused", request={**REQUEST, "uid": "u-9"}, reason="AwaitingApproval", message="")
    checkpoint = log.head
    log.store_result("u-stored", {"signatures": []})
    log.close()
    path = tmp_path / "audit.jsonl"
    path.write_bytes(path.read_bytes()[:-10])  # torn at the end
    with pytest.raises(audit.AuditError):
        audit.AuditLog(tmp_path, checkpoint=checkpoint)
    fresh = audit.start_new_chain(tmp_path, checkpoint=checkpoint, reason="INC-42", instruction={"reason": "INC-42"})
    first = next(audit.read_entries(path))
    assert first["event"] == "ChainStarted" and first["reason"] == "INC-42"
    assert first["previous"]["checkpoint"] == {"index": checkpoint.index, "hash": checkpoint.hash}
    assert "incomplete" in first["previous"]["problem"]
    assert (tmp_path / first["previous"]["keptAs"]).exists()
    assert fresh.requests["u-1"].signed is not None and fresh.requests["u-stored"].signed is not None
    assert fresh.keys["k-1"].consumed_by["uid"] == "u-1" and fresh.restarted
    fresh.close()
    reopened = audit.AuditLog(tmp_path, checkpoint=audit.Head(0, first["hash"]))
    assert reopened.requests["u-1"].signed is not None and reopened.keys["k-1"].consumed_by is not None


def test_one_process_holds_the_state_directory(tmp_path):
    import os
    import subprocess
    import sys
    descriptor = audit.lock_state_dir(tmp_path)
    try:
        child = subprocess.run([sys.executable, "-c", "import pathlib, sys; from keyroom.signer import audit\n"
                                "try:\n    audit.lock_state_dir(pathlib.Path(sys.argv[1]))\n"
                                "except audit.StateLocked as e:\n    print(e); sys.exit(3)", str(tmp_path)],
                               capture_output=True, text=True)
        assert child.returncode == 3 and f"pid {os.getpid()}" in child.stdout
    finally:
        os.close(descriptor)
    audit.lock_state_dir(tmp_path)  # free again once the holder is gone


def test_entries_need_the_signers_mac_so_a_volume_writer_cannot_append(tmp_path):
    """The chain shows edits and cuts; the MAC (keyed in the HSM) shows entries someone else appended."""
    import hashlib
    import hmac
    import json
    secret = b"k" * 32
    mac = lambda data: hmac.new(secret, data, hashlib.sha256).digest()  # noqa: E731  (stands for the HSM's)
    log = audit.AuditLog(tmp_path, mac=mac)
    log.append("Intent", request=REQUEST, key=KEY, digests=[])
    checkpoint = log.head
    log.close()
    assert audit.AuditLog(tmp_path, checkpoint=checkpoint, mac=mac).head == checkpoint
    # an intruder with write access to the volume appends a well-chained entry, without the key
    path = tmp_path / "audit.jsonl"
    forged = {"index": 1, "time": "2026-12-01T00:00:00+00:00", "event": "KeyVersionDisabled",
              "key": {"namespace": "team-a", "name": "release", "uid": "k-1"}, "version": 1,
              "prev": checkpoint.hash}
    forged["hash"] = audit.entry_hash(forged)
    forged["mac"] = hmac.new(b"guess" * 8, forged["hash"].encode(), hashlib.sha256).hexdigest()
    path.write_bytes(path.read_bytes() + audit.canonical(forged) + b"\n")
    assert audit.verify(path).index == 1  # the chain alone cannot tell
    with pytest.raises(audit.AuditError, match="MAC"):
        audit.AuditLog(tmp_path, checkpoint=checkpoint, mac=mac)
    del forged["mac"]
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:1]) + audit.canonical(forged) + b"\n")
    with pytest.raises(audit.AuditError, match="MAC"):
        audit.AuditLog(tmp_path, checkpoint=checkpoint, mac=mac)
    assert json.loads(path.read_bytes().splitlines()[0])["mac"]


def test_stored_signatures_are_checked_against_their_signed_entry(tmp_path):
    import base64
    log = audit.AuditLog(tmp_path)
    result = {"signatures": [{"name": "a", "value": base64.b64encode(b"sig-a").decode()}]}
    intent = log.append("Intent", request=REQUEST, key=KEY, digests=[])
    log.append("Signed", request=REQUEST, key=KEY, intent=intent["index"],
               signatures=[{"name": "a", "hash": audit.digest_of(b"sig-a")}])
    assert log.requests["u-1"].signed["signatures"] == audit.result_digest(result)
    swapped = {"signatures": [{"name": "a", "value": base64.b64encode(b"other").decode()}]}
    assert log.requests["u-1"].signed["signatures"] != audit.result_digest(swapped)


def test_a_new_chain_takes_one_time_keys_used_by_stored_results_as_consumed(tmp_path):
    log = audit.AuditLog(tmp_path)
    log.store_result("u-7", {"signatures": [], "request": {"namespace": "team-a", "name": "sr-7", "uid": "u-7"},
                             "key": {"name": "once", "uid": "k-7", "version": 1, "usage": "OneTime"}})
    log.close()
    (tmp_path / "audit.jsonl").unlink()  # the log is lost; the stored result is not
    fresh = audit.start_new_chain(tmp_path, checkpoint=audit.Head(3, "sha256:gone"), reason="INC-7", instruction={})
    assert fresh.keys["k-7"].consumed_by["name"] == "sr-7" and fresh.keys["k-7"].name == "once"
    assert fresh.requests["u-7"].signed is not None

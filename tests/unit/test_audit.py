"""The signer's hash-chained audit log: every edit, cut or rewrite is caught; the log is the signer's memory."""
from __future__ import annotations

import datetime

import pytest

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
    log.close()
    reopened = audit.AuditLog(tmp_path)
    assert reopened.requests["u-1"].signed is not None and reopened.consumed == {"k-1": "u-1"}
    assert reopened.requests["u-2"].open_intent
    reopened.append("Abandoned", request=other, intent=crashed["index"])
    assert not reopened.requests["u-2"].open_intent
    since = datetime.datetime.fromisoformat(intent["time"])
    counts = reopened.recent_signatures("team-a", since=since)
    assert counts == [(since, "release", 1)]  # the abandoned intent no longer counts


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

"""SigningKey lifecycle decisions: rotation, trimming, destruction, phases, next wake-up."""
from __future__ import annotations

import datetime

from keyroom import conditions
from keyroom.controllers import signingkey as sk
from keyroom.schedule import format_time, parse_time
from keyroom.signer.client import SignerError

NOW = parse_time("2026-12-01T12:00:00Z")


def version(number: int, state: str, created: str = "2026-11-01T00:00:00Z", **extra) -> dict:
    return {"version": number, "state": state, "publicKey": f"pem{number}", "fingerprint": f"sha256:{number}",
            "createdAt": created, **extra}


def test_manual_rotation_fires_once_per_annotation_value():
    versions = [version(1, "Enabled")]
    assert sk.rotation_due({}, {sk.ROTATE_ANNOTATION: "a"}, {}, versions, NOW) == "ManualRotation"
    assert sk.rotation_due({}, {sk.ROTATE_ANNOTATION: "a"}, {"lastRotationRequest": "a"}, versions, NOW) is None
    assert sk.rotation_due({}, {}, {}, versions, NOW) is None


def test_scheduled_rotation_is_due_after_every():
    spec = {"rotation": {"every": "30d"}}
    assert sk.rotation_due(spec, {}, {}, [version(1, "Enabled", "2026-11-01T12:00:00Z")], NOW) == "ScheduledRotation"
    assert sk.rotation_due(spec, {}, {}, [version(1, "Enabled", "2026-11-01T12:00:01Z")], NOW) is None


def test_one_time_keys_never_rotate():
    spec = {"usage": "OneTime"}
    assert sk.rotation_due(spec, {sk.ROTATE_ANNOTATION: "x"}, {}, [version(1, "Enabled")], NOW) is None


def test_versions_beyond_keep_versions_are_scheduled_for_destruction():
    spec = {"rotation": {"every": "1d", "keepVersions": 1}, "destructionDelay": "2h"}
    versions = [version(3, "Enabled"), version(2, "Disabled"), version(1, "Disabled")]
    result = sk.schedule_destruction(versions, spec=spec, at=NOW)
    assert [v["state"] for v in result] == ["Enabled", "Disabled", "PendingDestruction"]
    assert result[2]["destroyAt"] == "2026-12-01T14:00:00Z"


def test_raising_keep_versions_cancels_a_pending_destruction():
    spec = {"rotation": {"every": "1d", "keepVersions": 2}}
    versions = [version(2, "Enabled"), version(1, "PendingDestruction", destroyAt="2026-12-02T00:00:00Z")]
    result = sk.schedule_destruction(versions, spec=spec, at=NOW)
    assert result[1]["state"] == "Disabled" and "destroyAt" not in result[1]


def test_a_consumed_or_deleted_key_schedules_every_version():
    versions = [version(2, "Enabled"), version(1, "Destroyed")]
    result = sk.schedule_destruction(versions, spec={"destructionDelay": "1h"}, at=NOW, everything=True)
    assert [v["state"] for v in result] == ["PendingDestruction", "Destroyed"]


def test_destruction_happens_at_destroy_at():
    versions = [version(1, "PendingDestruction", destroyAt=format_time(NOW))]
    assert sk.due_for_destruction(versions, NOW - datetime.timedelta(seconds=1)) == []
    assert sk.due_for_destruction(versions, NOW) == versions


def test_status_of_an_online_key():
    status = sk.desired_status(spec={"algorithm": "ECDSA_P256"}, status={}, versions=[version(1, "Enabled")],
                               generation=1, at=NOW)
    assert status["phase"] == "Active" and status["online"] is True and status["currentVersion"] == 1
    assert conditions.find(status["conditions"], "Ready")["status"] == "True"
    assert conditions.find(status["conditions"], "Online")["reason"] == "AlwaysOnline"
    assert conditions.find(status["conditions"], "Stalled") is None


def test_status_of_a_key_outside_its_window_says_when_it_opens():
    spec = {"offline": {"enabled": True, "windows": [{"start": "2026-12-02T10:00:00Z", "end": "2026-12-02T11:00:00Z"}]}}
    status = sk.desired_status(spec=spec, status={}, versions=[version(1, "Enabled")], generation=2, at=NOW)
    assert status["phase"] == "Offline" and status["online"] is False
    assert status["nextWindowAt"] == "2026-12-02T10:00:00Z"
    online = conditions.find(status["conditions"], "Online")
    assert online["status"] == "False" and "offline until 2026-12-02T10:00:00Z" in online["message"]
    assert conditions.find(status["conditions"], "Ready")["status"] == "True"


def test_a_stalling_signer_error_before_the_first_version_fails_the_key():
    error = SignerError("PinIncorrect", "the token refused the PIN")
    status = sk.desired_status(spec={}, status={}, versions=[], generation=1, at=NOW, error=error)
    assert status["phase"] == "Failed"
    stalled = conditions.find(status["conditions"], "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "PinIncorrect"
    assert conditions.find(status["conditions"], "Reconciling") is None


def test_an_unreachable_signer_is_reconciling_not_stalled():
    error = SignerError("SignerUnreachable", "cannot reach the signer")
    status = sk.desired_status(spec={}, status={}, versions=[], generation=1, at=NOW, error=error)
    assert status["phase"] == "Pending"
    assert conditions.find(status["conditions"], "Reconciling")["status"] == "True"
    assert conditions.find(status["conditions"], "Stalled") is None


def test_all_versions_destroyed_is_the_destroyed_phase():
    status = sk.desired_status(spec={}, status={"consumedBy": "sr-1"}, versions=[version(1, "Destroyed")],
                               generation=1, at=NOW)
    assert status["phase"] == "Destroyed" and status["online"] is False


def test_next_wakeup_is_the_earliest_of_window_rotation_and_destruction():
    spec = {"rotation": {"every": "31d"},
            "offline": {"windows": [{"start": "2026-12-01T13:00:00Z", "end": "2026-12-01T14:00:00Z"}]}}
    versions = [version(2, "Enabled", "2026-11-01T00:00:00Z"),
                version(1, "PendingDestruction", destroyAt="2026-12-01T12:30:00Z")]
    from keyroom.schedule import availability
    due = sk.next_wakeup(spec, versions, availability(spec["offline"], NOW), NOW)
    assert format_time(due) == "2026-12-01T12:30:00Z"


def test_status_patch_sends_only_changes_and_removes_stale_fields():
    current = {"phase": "Offline", "nextWindowAt": "x", "signatureCount": 5}
    desired = {"phase": "Active"}
    assert sk.status_patch(current, desired) == {"phase": "Active", "nextWindowAt": None}
    assert sk.status_patch(desired, desired) is None

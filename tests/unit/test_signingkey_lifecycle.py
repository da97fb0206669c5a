"""SigningKey lifecycle: the signer's plan from spec, record and clock (pure), and the operator's mirror of it."""
from __future__ import annotations

import datetime

from keyroom import conditions
from keyroom.controllers import signingkey as sk
from keyroom.schedule import format_time, parse_time
from keyroom.signer import keys
from keyroom.signer.client import SignerError

NOW = parse_time("2026-12-01T12:00:00Z")
HOUR = datetime.timedelta(hours=1)


def record(*versions: keys.VersionRecord, usage: str = "Reusable", **fields) -> keys.KeyRecord:
    found = keys.KeyRecord("team-a", "release", "0b1c2d3e-0000-4000-8000-000000000001", algorithm="ECDSA_P256",
                           usage=usage, **fields)
    found.versions = {v.version: v for v in versions}
    return found


def v(number: int, state: str = "Enabled", created: datetime.datetime = NOW - 30 * 24 * HOUR, **fields):
    return keys.VersionRecord(number, state, f"pem{number}", f"sha256:{number}", created, **fields)


def plan(rec, *, spec=None, annotations=None, deleted=False, at=NOW):
    spec = {"algorithm": "ECDSA_P256"} if spec is None else spec
    return keys.next_action(spec=spec, annotations=annotations or {}, deleted=deleted, record=rec, at=at)


def run(rec, *, spec=None, annotations=None, deleted=False, at=NOW, gone=False):
    """Apply the plan step by step as the signer does (without a token), returning the actions taken."""
    spec = {"algorithm": "ECDSA_P256"} if spec is None and not gone else spec
    taken = []
    for _ in range(20):
        action = keys.next_action(spec=spec, annotations=annotations or {}, deleted=deleted or gone, record=rec,
                                  at=at)
        if action is None:
            return taken
        taken.append((action.kind, action.version, action.reason))
        version = rec.versions.get(action.version)
        if action.kind == "generate":
            rec.versions[action.version] = v(action.version, "Enabled", at)
            rec.rotation_request = action.rotation_request or rec.rotation_request
        elif action.kind == "disable":
            version.state = "Disabled"
        elif action.kind == "schedule":
            version.state, version.scheduled_at, version.destruction_reason = "PendingDestruction", at, action.reason
            version.delay = keys.destruction_delay(spec)
        elif action.kind == "cancel":
            version.state, version.scheduled_at, version.destruction_reason = "Disabled", None, None
        elif action.kind == "destroy":
            version.state, version.destroyed_at = "Destroyed", at
    raise AssertionError(f"the plan does not settle: {taken}")


def test_a_new_key_gets_its_first_version_and_then_nothing_more():
    rec = record()
    assert run(rec) == [("generate", 1, "Generated")]
    assert rec.current.version == 1 and plan(rec) is None


def test_manual_rotation_fires_once_per_annotation_value():
    rec = record(v(1))
    taken = run(rec, annotations={keys.ROTATE_ANNOTATION: "a"})
    assert taken[:2] == [("generate", 2, "ManualRotation"), ("disable", 1, "Superseded")]
    assert rec.rotation_request == "a" and rec.current.version == 2
    assert run(rec, annotations={keys.ROTATE_ANNOTATION: "a"}) == []
    assert run(rec, annotations={keys.ROTATE_ANNOTATION: "b"})[0] == ("generate", 3, "ManualRotation")


def test_scheduled_rotation_is_due_after_every_from_the_signers_own_creation_time():
    spec = {"algorithm": "ECDSA_P256", "rotation": {"every": "30d"}}
    assert plan(record(v(1, created=NOW - 30 * 24 * HOUR)), spec=spec).kind == "generate"
    assert plan(record(v(1, created=NOW - 30 * 24 * HOUR + datetime.timedelta(seconds=1))), spec=spec) is None
    assert keys.next_change_at(spec=spec, record=record(v(1, created=NOW))) == NOW + 30 * 24 * HOUR


def test_one_time_keys_never_rotate():
    spec = {"algorithm": "ECDSA_P256", "usage": "OneTime"}
    assert plan(record(v(1), usage="OneTime"), spec=spec, annotations={keys.ROTATE_ANNOTATION: "x"}) is None


def test_versions_beyond_keep_versions_are_scheduled_and_destroyed_each_at_its_own_time():
    spec = {"algorithm": "ECDSA_P256", "rotation": {"every": "100d", "keepVersions": 1}, "destructionDelay": "2h"}
    rec = record(v(3), v(2, "Disabled"), v(1, "Disabled"))
    assert run(rec, spec=spec) == [("schedule", 1, "Trimmed")]
    assert keys.destroy_at(rec.versions[1], spec) == NOW + 2 * HOUR
    assert run(rec, spec=spec, at=NOW + 2 * HOUR - datetime.timedelta(seconds=1)) == []
    assert run(rec, spec=spec, at=NOW + 2 * HOUR) == [("destroy", 1, "Trimmed")]
    assert rec.versions[2].state == "Disabled" and rec.versions[3].state == "Enabled"


def test_raising_keep_versions_cancels_a_pending_destruction():
    rec = record(v(2), v(1, "PendingDestruction", scheduled_at=NOW, destruction_reason="Trimmed"))
    assert run(rec, spec={"algorithm": "ECDSA_P256", "rotation": {"every": "100d", "keepVersions": 0}}) == []
    assert run(rec, spec={"algorithm": "ECDSA_P256", "rotation": {"every": "100d", "keepVersions": 1}}) == [
        ("cancel", 1, "KeepVersions")]


def test_a_longer_destruction_delay_in_spec_postpones_a_scheduled_destruction():
    rec = record(v(2), v(1, "PendingDestruction", scheduled_at=NOW - 3 * HOUR, destruction_reason="Trimmed"))
    spec = {"algorithm": "ECDSA_P256", "rotation": {"every": "100d", "keepVersions": 0}}
    assert run(rec, spec={**spec, "destructionDelay": "1d"}) == []
    assert run(rec, spec={**spec, "destructionDelay": "2h"}) == [("destroy", 1, "Trimmed")]


def test_a_deleted_key_schedules_every_version_and_retain_cancels():
    spec = {"algorithm": "ECDSA_P256", "destructionDelay": "1h"}
    rec = record(v(2), v(1, "Disabled"), v(0 + 3, "Destroyed"))
    assert run(rec, spec=spec, deleted=True) == [("schedule", 3 - 1, "Deleted"), ("schedule", 1, "Deleted")]
    assert rec.current is None
    assert run(rec, spec={**spec, "deletionPolicy": "Retain"}, deleted=True) == [
        ("cancel", 2, "Retain"), ("cancel", 1, "Retain")]
    assert run(rec, spec={**spec, "deletionPolicy": "Retain"}, deleted=True, at=NOW + 2 * HOUR) == []


def test_a_deleted_key_is_destroyed_only_at_destroy_at_never_at_once():
    spec = {"algorithm": "ECDSA_P256", "destructionDelay": "1h"}
    rec = record(v(1))
    run(rec, spec=spec, deleted=True)
    assert rec.versions[1].state == "PendingDestruction"
    assert run(rec, spec=spec, deleted=True, at=NOW + HOUR - datetime.timedelta(seconds=1)) == []
    assert run(rec, spec=spec, deleted=True, at=NOW + HOUR) == [("destroy", 1, "Deleted")]


def test_a_key_gone_before_the_signer_saw_its_deletion_keeps_its_material():
    rec = record(v(2), v(1, "Disabled"))
    assert run(rec, gone=True, at=NOW + 1000 * HOUR) == []
    scheduled = record(v(1, "PendingDestruction", scheduled_at=NOW, destruction_reason="Deleted",
                         delay=datetime.timedelta(hours=1)))
    assert run(scheduled, gone=True, at=NOW + HOUR) == [("destroy", 1, "Deleted")]


def test_a_consumed_one_time_key_schedules_its_version():
    rec = record(v(1), usage="OneTime", consumed_by={"name": "sr-1", "uid": "u1", "at": NOW})
    assert run(rec, spec={"algorithm": "ECDSA_P256", "usage": "OneTime"}) == [("schedule", 1, "Consumed")]


def test_two_enabled_versions_after_a_crash_heal_to_the_newest():
    rec = record(v(2), v(1))
    assert plan(rec) == keys.Action("disable", 1, "Superseded")


def test_the_record_replays_from_audit_entries():
    records: dict[str, keys.KeyRecord] = {}
    ref = {"namespace": "team-a", "name": "release", "uid": "u"}
    stamp = NOW.isoformat()
    for entry in [
        {"event": "KeyVersionGenerated", "key": ref, "version": 1, "algorithm": "ECDSA_P256", "publicKey": "p1",
         "fingerprint": "f1"},
        {"event": "KeyVersionGenerated", "key": ref, "version": 2, "algorithm": "ECDSA_P256", "publicKey": "p2",
         "fingerprint": "f2", "rotationRequest": "r1"},
        {"event": "KeyVersionDisabled", "key": ref, "version": 1},
        {"event": "KeyDestructionScheduled", "key": ref, "version": 1, "reason": "Trimmed", "delay": "1h"},
        {"event": "KeyVersionMissing", "key": ref, "version": 2},
    ]:
        keys.apply(records, {**entry, "time": stamp})
    rec = records["u"]
    assert rec.rotation_request == "r1" and rec.current is None
    assert rec.versions[1].state == "PendingDestruction" and keys.destroy_at(rec.versions[1], None) == NOW + HOUR
    assert rec.versions[2].missing and rec.versions[2].state == "Destroyed"
    shown = keys.mirror(rec, spec=None)
    assert shown["missingVersions"] == [2] and shown["currentVersion"] is None
    assert shown["versions"][1]["destroyAt"] == format_time(NOW + HOUR)


def test_a_one_time_signature_in_the_log_consumes_the_key():
    records: dict[str, keys.KeyRecord] = {}
    keys.apply(records, {"event": "Signed", "time": NOW.isoformat(),
                         "request": {"namespace": "team-a", "name": "sr-1", "uid": "r1"},
                         "key": {"name": "once", "uid": "k1", "version": 1, "usage": "OneTime"}})
    assert records["k1"].consumed_by["uid"] == "r1"


# ---------------------------------------------------------------- the operator's mirror

def mirrored(*versions, **fields) -> dict:
    return keys.mirror(record(*versions, **fields), spec={"algorithm": "ECDSA_P256"})


def test_status_of_an_online_key():
    status = sk.desired_status(spec={"algorithm": "ECDSA_P256"}, status={}, record=mirrored(v(1)),
                               generation=1, at=NOW)
    assert status["phase"] == "Active" and status["online"] is True and status["currentVersion"] == 1
    assert conditions.find(status["conditions"], "Ready")["status"] == "True"
    assert conditions.find(status["conditions"], "Online")["reason"] == "AlwaysOnline"
    assert conditions.find(status["conditions"], "Stalled") is None


def test_status_of_a_key_outside_its_window_says_when_it_opens():
    spec = {"offline": {"enabled": True, "windows": [{"start": "2026-12-02T10:00:00Z", "end": "2026-12-02T11:00:00Z"}]}}
    status = sk.desired_status(spec=spec, status={}, record=mirrored(v(1)), generation=2, at=NOW)
    assert status["phase"] == "Offline" and status["online"] is False
    assert status["nextWindowAt"] == "2026-12-02T10:00:00Z"
    online = conditions.find(status["conditions"], "Online")
    assert online["status"] == "False" and "offline until 2026-12-02T10:00:00Z" in online["message"]
    assert conditions.find(status["conditions"], "Ready")["status"] == "True"


def test_a_stalling_signer_error_before_the_first_version_fails_the_key():
    error = SignerError("PinIncorrect", "the token refused the PIN")
    status = sk.desired_status(spec={}, status={}, record=None, generation=1, at=NOW, error=error)
    assert status["phase"] == "Failed"
    stalled = conditions.find(status["conditions"], "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "PinIncorrect"
    assert conditions.find(status["conditions"], "Reconciling") is None


def test_an_unreachable_signer_is_reconciling_not_stalled_and_keeps_the_versions_shown():
    error = SignerError("SignerUnreachable", "cannot reach the signer")
    shown = mirrored(v(1))["versions"]
    status = sk.desired_status(spec={}, status={"versions": shown}, record=None, generation=1, at=NOW, error=error)
    assert status["versions"] == shown and status["phase"] == "Active"
    assert conditions.find(status["conditions"], "Reconciling")["status"] == "True"
    assert conditions.find(status["conditions"], "Stalled") is None


def test_missing_key_material_stalls_the_key_with_the_way_out():
    status = sk.desired_status(spec={}, status={}, record=mirrored(v(1, "Destroyed", missing=True)),
                               generation=1, at=NOW)
    assert status["phase"] == "Failed"
    stalled = conditions.find(status["conditions"], "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "KeyMaterialMissing"
    assert "rotate" in stalled["message"]


def test_an_impossible_window_schedule_is_reported_stalled():
    spec = {"offline": {"windows": [{"schedule": "0 0 30 2 *", "duration": "1h"}]}}
    status = sk.desired_status(spec=spec, status={}, record=mirrored(v(1)), generation=1, at=NOW)
    assert conditions.find(status["conditions"], "Stalled")["reason"] == "InvalidSpec"
    assert status["online"] is False


def test_all_versions_destroyed_is_the_destroyed_phase():
    status = sk.desired_status(spec={}, status={}, record=mirrored(v(1, "Destroyed")), generation=1, at=NOW)
    assert status["phase"] == "Destroyed" and status["online"] is False


def test_events_name_what_the_signer_changed():
    before = mirrored(v(1))["versions"]
    after = mirrored(v(2), v(1, "PendingDestruction", scheduled_at=NOW, destruction_reason="Trimmed"))["versions"]
    reasons = [reason for reason, _ in sk.changes(before, after)]
    assert reasons == ["DestructionScheduled", "KeyGenerated"]


def test_next_wakeup_is_the_earliest_of_window_and_the_signers_next_change():
    spec = {"offline": {"windows": [{"start": "2026-12-01T13:00:00Z", "end": "2026-12-01T14:00:00Z"}]}}
    assert format_time(sk.next_wakeup(spec, {"nextChangeAt": "2026-12-01T12:30:00Z"}, NOW)) == "2026-12-01T12:30:00Z"
    assert format_time(sk.next_wakeup(spec, {"nextChangeAt": None}, NOW)) == "2026-12-01T13:00:00Z"


def test_status_patch_sends_only_changes_and_removes_stale_fields():
    current = {"phase": "Offline", "nextWindowAt": "x", "consumedBy": "sr-1"}
    desired = {"phase": "Active"}
    assert sk.status_patch(current, desired) == {"phase": "Active", "nextWindowAt": None}
    assert sk.status_patch(desired, desired) is None


def _kstatus_view(status: dict) -> tuple[str, str, bool, bool]:
    """(phase, Ready status/reason, Reconciling present, Stalled present): what GitOps tools judge."""
    ready = conditions.find(status["conditions"], "Ready")
    return (status["phase"], f"{ready['status']}/{ready['reason']}",
            conditions.find(status["conditions"], "Reconciling") is not None,
            conditions.find(status["conditions"], "Stalled") is not None)


def test_a_consumed_one_time_key_is_finished_and_ready_not_pending():
    consumed = mirrored(v(1, "PendingDestruction", scheduled_at=NOW, destruction_reason="Consumed"))
    consumed["consumedBy"] = "sr-1"
    status = sk.desired_status(spec={"usage": "OneTime"}, status={}, record=consumed, generation=1, at=NOW)
    assert _kstatus_view(status) == ("Consumed", "True/Consumed", False, False)
    assert status["online"] is False and "signs nothing more" in status["message"]
    assert conditions.find(status["conditions"], "Online")["status"] == "False"


def test_a_destroyed_key_is_finished_and_ready():
    status = sk.desired_status(spec={}, status={}, record=mirrored(v(1, "Destroyed")), generation=1, at=NOW)
    assert _kstatus_view(status) == ("Destroyed", "True/Destroyed", False, False)


def test_a_key_without_a_version_yet_is_pending_and_not_ready():
    status = sk.desired_status(spec={}, status={}, record=mirrored(), generation=1, at=NOW)
    assert _kstatus_view(status) == ("Pending", "False/Generating", False, False)


def test_an_object_seen_for_the_first_time_is_reconciling_not_ready():
    first = conditions.first_status(generation=3, message="working", now="2026-12-01T12:00:00Z")
    assert first["observedGeneration"] == 3
    assert [(c["type"], c["status"], c["observedGeneration"]) for c in first["conditions"]] == [
        ("Reconciling", "True", 3), ("Ready", "False", 3)]
    assert conditions.needs_first_status(None) and conditions.needs_first_status({"phase": "Pending"})
    assert not conditions.needs_first_status(first)


def test_the_signature_count_comes_from_the_logs_signed_entries():
    records: dict[str, keys.KeyRecord] = {}
    ref = {"namespace": "team-a", "name": "release", "uid": "u"}
    stamp = NOW.isoformat()
    keys.apply(records, {"event": "KeyVersionGenerated", "key": ref, "version": 1, "algorithm": "ECDSA_P256",
                         "publicKey": "p1", "fingerprint": "f1", "time": stamp})
    for index, count in enumerate((1, 3)):
        keys.apply(records, {"event": "Signed", "time": stamp, "key": {**ref, "version": 1},
                             "request": {"namespace": "team-a", "name": f"sr-{index}", "uid": f"r{index}"},
                             "signatures": [{"name": f"f{n}", "hash": "sha256:x"} for n in range(count)]})
    # a signature with another key, and one whose key the log never generated, change nothing here
    keys.apply(records, {"event": "Signed", "time": stamp, "key": {"name": "other", "uid": "elsewhere", "version": 1},
                         "request": {"namespace": "team-a", "name": "sr-x", "uid": "rx"},
                         "signatures": [{"name": "f", "hash": "sha256:y"}]})
    assert keys.mirror(records["u"], spec=None)["signatureCount"] == 4
    assert "elsewhere" not in records


def test_one_kopf_handler_tells_every_kind_of_a_key_event_and_one_failing_stops_none(monkeypatch):
    import asyncio

    import kopf

    from keyroom.controllers import daemon

    heard = []

    async def failing(**kwargs):
        heard.append(("failing", kwargs["name"]))
        raise RuntimeError("a listener's bug")

    async def listening(body, type, memo, signing_keys, **_):
        heard.append(("listening", body["metadata"]["name"], type, signing_keys))

    monkeypatch.setattr(sk, "_KEY_EVENT_LISTENERS", [failing, listening])
    memo = kopf.Memo()

    async def scenario():
        memo.signing_keys = daemon.Scheduler("signingkey", lambda body: asyncio.sleep(0))
        body = kopf.Body({"metadata": {"namespace": "team-a", "name": "k", "uid": "u", "resourceVersion": "1"},
                          "spec": {"algorithm": "ECDSA_P256"}})
        for event in ("ADDED", "MODIFIED"):
            await sk.signing_key_seen(body=body, type=event, memo=memo, name="k", namespace="team-a",
                                      signing_keys="the index")
        await memo.signing_keys.stop()
        return len(memo.signing_keys)

    assert asyncio.run(scenario()) == 1  # the scheduler saw the key as well
    assert heard == [("failing", "k"), ("listening", "k", "ADDED", "the index"),
                     ("failing", "k"), ("listening", "k", "MODIFIED", "the index")]
    monkeypatch.undo()
    from keyroom.controllers import certificate, policy, signrequest  # each registers what it does on a key event
    assert {certificate.key_changed_for_certificates, policy.key_changed,
            signrequest.key_changed_for_requests} <= set(sk._KEY_EVENT_LISTENERS)

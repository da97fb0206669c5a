"""The signer's own record of each SigningKey, and the lifecycle it derives from spec and clock.

The operator never tells the signer to generate, disable or destroy a key
version. It only names a SigningKey ("reconcile team-a/release, uid U"); the
signer reads that key's spec itself and applies it to its own record:

- the first version is generated when the record has none;
- a new version is generated when ``spec.rotation.every`` has passed since the
  current one was generated, or when the ``keyroom.dev/rotate`` annotation
  (which only platform admins can change: the operator's identity is refused
  by an admission policy) carries a value not acted on yet;
- retired versions beyond ``keepVersions`` are scheduled for destruction,
  and a schedule is cancelled when ``keepVersions`` grows again;
- a deleted SigningKey (``deletionPolicy: Destroy``) and a consumed OneTime
  key schedule every version;
- a version is destroyed in the HSM only at or after its own ``destroyAt``,
  which is the moment the signer scheduled it plus ``spec.destructionDelay``.

The record lives in the audit log (one entry per change, fsynced before the
answer), so it survives restarts and is as tamper-evident as the signatures.
Status is a mirror of this record for people and GitOps tools; nothing here
reads status. This module is pure: :func:`next_action` says what to do next,
the signer does it (in the token first, then in the log) and asks again.
"""
from __future__ import annotations

import dataclasses
import datetime
from typing import Mapping

from keyroom import schedule

from keyroom.api.common import ROTATE_ANNOTATION
DEFAULT_KEEP_VERSIONS = 3
DEFAULT_DESTRUCTION_DELAY = "7d"
#: who consumed a one-time key whose use was recorded in a lost log
UNKNOWN_CONSUMER = "(unknown: the audit log was lost)"
#: how many destroyed versions the mirror in status shows (the log keeps them all)
SHOWN_DESTROYED = 10

#: the audit events that change a key record
EVENTS = ("KeyVersionGenerated", "KeyVersionDisabled", "KeyDestructionScheduled", "KeyDestructionCancelled",
          "KeyVersionDestroyed", "KeyVersionMissing")


@dataclasses.dataclass
class VersionRecord:
    version: int
    state: str  # Enabled, Disabled, PendingDestruction, Destroyed
    public_key: str
    fingerprint: str
    created_at: datetime.datetime
    #: when the signer scheduled its destruction, and why (Trimmed, Deleted, Consumed)
    scheduled_at: datetime.datetime | None = None
    destruction_reason: str | None = None
    #: the destructionDelay in force when it was scheduled (used when the SigningKey is gone)
    delay: datetime.timedelta | None = None
    destroyed_at: datetime.datetime | None = None
    #: the private key was not found in the token (destroyed outside keyroom)
    missing: bool = False


@dataclasses.dataclass
class KeyRecord:
    namespace: str
    name: str
    uid: str
    algorithm: str = ""
    usage: str = "Reusable"
    versions: dict[int, VersionRecord] = dataclasses.field(default_factory=dict)
    #: for a OneTime key: the request that consumed it, {"name", "uid", "at"}
    consumed_by: dict | None = None
    rotation_request: str | None = None
    #: signatures made with the key, counted from the log's Signed entries
    signatures: int = 0

    @property
    def current(self) -> VersionRecord | None:
        """The newest Enabled version: the one that signs."""
        enabled = [v for v in self.versions.values() if v.state == "Enabled"]
        return max(enabled, key=lambda v: v.version, default=None)

    def newest_first(self) -> list[VersionRecord]:
        return sorted(self.versions.values(), key=lambda v: v.version, reverse=True)


def apply(records: dict[str, KeyRecord], entry: Mapping) -> None:
    """Replay one audit entry into the records (the log's memory of keys)."""
    event = entry["event"]
    key = entry.get("key") or {}
    uid = key.get("uid")
    if not uid and event != "ChainStarted":
        return
    at = datetime.datetime.fromisoformat(entry["time"])
    if event == "ChainStarted":
        for key_uid, used in (entry.get("consumedKeys") or {}).items():
            record = records.setdefault(key_uid, KeyRecord(used.get("namespace", ""), used.get("keyName", ""),
                                                           key_uid, usage="OneTime"))
            record.consumed_by = {"name": used.get("name", ""), "uid": used.get("uid", ""), "at": at}
        return
    if event == "KeyConsumed":
        record = records.setdefault(uid, KeyRecord(key["namespace"], key["name"], uid))
        record.usage = "OneTime"
        if record.consumed_by is None:
            record.consumed_by = {"name": "", "uid": "", "at": at}
        return
    if event == "Signed":
        record = records.get(uid)
        if key.get("usage") == "OneTime":
            record = records.setdefault(uid, KeyRecord(entry["request"]["namespace"], key["name"], uid))
            record.usage = "OneTime"
            if record.consumed_by is None:
                record.consumed_by = {"name": entry["request"]["name"], "uid": entry["request"]["uid"], "at": at}
        if record is not None:
            record.signatures += len(entry.get("signatures") or ())
        return
    if event not in EVENTS:
        return
    record = records.setdefault(uid, KeyRecord(key["namespace"], key["name"], uid))
    number = entry["version"]
    if event == "KeyVersionGenerated":
        record.algorithm, record.usage = entry["algorithm"], entry.get("usage", "Reusable")
        record.versions[number] = VersionRecord(number, "Enabled", entry["publicKey"], entry["fingerprint"], at)
        if entry.get("rotationRequest"):
            record.rotation_request = entry["rotationRequest"]
        return
    version = record.versions.get(number)
    if version is None:
        return
    if event == "KeyVersionDisabled":
        version.state = "Disabled"
    elif event == "KeyDestructionScheduled":
        if version.state == "Enabled":
            version.state = "Disabled"
        version.state, version.scheduled_at = "PendingDestruction", at
        version.destruction_reason = entry.get("reason")
        version.delay = schedule.parse_duration(entry.get("delay") or DEFAULT_DESTRUCTION_DELAY)
    elif event == "KeyDestructionCancelled":
        version.state, version.scheduled_at, version.destruction_reason = "Disabled", None, None
    elif event == "KeyVersionDestroyed":
        version.state, version.destroyed_at = "Destroyed", at
    elif event == "KeyVersionMissing":
        version.missing, version.state, version.destroyed_at = True, "Destroyed", at


# ---------------------------------------------------------------- what to do next (pure)

@dataclasses.dataclass(frozen=True)
class Action:
    """One step: ``kind`` is generate, disable, schedule, cancel or destroy."""

    kind: str
    version: int
    reason: str = ""
    rotation_request: str | None = None


def keep_versions(spec: Mapping) -> int:
    return int((spec.get("rotation") or {}).get("keepVersions", DEFAULT_KEEP_VERSIONS))


def destruction_delay(spec: Mapping | None) -> datetime.timedelta:
    return schedule.parse_duration((spec or {}).get("destructionDelay") or DEFAULT_DESTRUCTION_DELAY)


def destroy_at(version: VersionRecord, spec: Mapping | None) -> datetime.datetime | None:
    """The signer's own scheduling time plus the delay (the spec's, or the recorded one once the key is gone)."""
    if version.state != "PendingDestruction" or version.scheduled_at is None:
        return None
    delay = destruction_delay(spec) if spec is not None else (version.delay or destruction_delay(None))
    return version.scheduled_at + delay


def rotation_due_at(spec: Mapping, record: KeyRecord) -> datetime.datetime | None:
    current = record.current
    if current is None or record.usage == "OneTime" or not spec.get("rotation"):
        return None
    return current.created_at + schedule.parse_duration(spec["rotation"]["every"])


def next_action(*, spec: Mapping | None, annotations: Mapping[str, str], deleted: bool, record: KeyRecord,
                at: datetime.datetime) -> Action | None:
    """The next change the key needs now, or None when it is as spec and clock say.

    ``spec`` is None when the SigningKey is gone. ``deleted`` is True once the
    object has a deletionTimestamp or is gone.
    """
    versions = record.newest_first()
    retain = (spec or {}).get("deletionPolicy") == "Retain"
    gone = spec is None

    if record.consumed_by is not None or (deleted and not gone):
        why = "Consumed" if record.consumed_by is not None else "Deleted"
        if why == "Deleted" and retain:
            for version in versions:
                if version.state == "PendingDestruction" and version.destruction_reason == "Deleted":
                    return Action("cancel", version.version, "Retain")
        else:
            for version in versions:
                if version.state in ("Enabled", "Disabled"):
                    return Action("schedule", version.version, why)
    elif gone:
        # Gone before the signer saw its deletion: its policy is unknown, so nothing new is scheduled (the
        # material stays, and the token audit reports it); what was already scheduled still falls due.
        pass
    else:
        current = record.current
        for version in versions:  # a crash between generating and disabling leaves two enabled: heal it
            if version.state == "Enabled" and current is not None and version.version != current.version:
                return Action("disable", version.version, "Superseded")
        number = max(record.versions, default=0) + 1
        requested = annotations.get(ROTATE_ANNOTATION)
        manual = (bool(requested) and requested != record.rotation_request
                  and spec.get("usage", "Reusable") != "OneTime")
        if not versions:
            return Action("generate", number, "Generated", rotation_request=requested if manual else None)
        if manual:
            return Action("generate", number, "ManualRotation", rotation_request=requested)
        due = rotation_due_at(spec, record)
        if due is not None and at >= due:
            return Action("generate", number, "ScheduledRotation")
        retired = [v for v in versions if v.state == "Disabled"
                   or (v.state == "PendingDestruction" and v.destruction_reason == "Trimmed")]
        keep = keep_versions(spec)
        for position, version in enumerate(retired, start=1):
            if position > keep and version.state == "Disabled":
                return Action("schedule", version.version, "Trimmed")
            if position <= keep and version.state == "PendingDestruction":
                return Action("cancel", version.version, "KeepVersions")

    for version in sorted(versions, key=lambda v: v.version):
        when = destroy_at(version, spec)
        if when is None or at < when:
            continue
        if deleted and retain and version.destruction_reason == "Deleted":
            continue
        return Action("destroy", version.version, version.destruction_reason or "")
    return None


def next_change_at(*, spec: Mapping | None, record: KeyRecord) -> datetime.datetime | None:
    """When the clock alone next changes the record (a rotation or a destruction falls due)."""
    moments = [destroy_at(v, spec) for v in record.versions.values()]
    if spec is not None:
        moments.append(rotation_due_at(spec, record))
    return min((m for m in moments if m is not None), default=None)


def mirror(record: KeyRecord, *, spec: Mapping | None) -> dict:
    """The record as the operator shows it in status (newest version first)."""
    versions, destroyed = [], 0
    for version in record.newest_first():
        if version.state == "Destroyed":
            destroyed += 1
            if destroyed > SHOWN_DESTROYED:
                continue
        shown = {"version": version.version, "state": version.state, "publicKey": version.public_key,
                 "fingerprint": version.fingerprint, "createdAt": schedule.format_time(version.created_at)}
        when = destroy_at(version, spec)
        if when is not None:
            shown["destroyAt"] = schedule.format_time(when)
        if version.destroyed_at is not None:
            shown["destroyedAt"] = schedule.format_time(version.destroyed_at)
        if version.missing:
            shown["missing"] = True
        versions.append(shown)
    current = record.current
    change = next_change_at(spec=spec, record=record)
    missing = [v.version for v in record.versions.values() if v.missing]
    return {
        "uid": record.uid,
        "versions": versions,
        "currentVersion": current.version if current else None,
        "consumedBy": (record.consumed_by["name"] or UNKNOWN_CONSUMER) if record.consumed_by else None,
        "signatureCount": record.signatures,
        "lastRotationRequest": record.rotation_request,
        "nextChangeAt": schedule.format_time(change) if change else None,
        "missingVersions": sorted(missing),
    }

"""The SigningKey reconciler: key versions in the HSM, rotation, windows, destruction.

Each SigningKey has one Kopf daemon that keeps it: it compares the object with
the world, makes the one or two signer calls needed (generate a version,
destroy a due one), writes the status when it changed, and then sleeps until
the next moment something must happen (a window edge, a rotation, a
destruction) or until the object changes. So ``Online`` flips at the window
edge itself, without polling.

Every step is idempotent. A version is generated under a number the status
does not hold yet; if the operator dies before writing the status, the next
attempt asks the signer for the same number and gets the same key back.

Destruction is deliberate and delayed, as in cloud KMSs: a version leaves
service (trimmed by ``rotation.keepVersions``, a consumed OneTime key, a
deleted SigningKey) as PendingDestruction and is destroyed in the HSM only at
``destroyAt``. Until then it can be cancelled: raise ``keepVersions``, or, for
a deleted SigningKey, set ``spec.deletionPolicy: Retain``.
"""
from __future__ import annotations

import asyncio
import datetime
from typing import Any, Mapping

import kopf

from keyroom import conditions, schedule
from keyroom.policy import current_version, key_availability
from keyroom.api.common import GROUP, VERSION
from keyroom.controllers import kube
from keyroom.signer.client import KeyRef, SignerClient, SignerError

ROTATE_ANNOTATION = f"{GROUP}/rotate"
_MAX_BACKOFF = 60.0
#: signer failures that only a change of configuration fixes
_STALLING = {"SignerUnauthenticated", "SignerForbidden", "PinIncorrect", "PinLocked", "TokenNotFound",
             "ModuleNotFound", "TokenFull", "SignerNotConfigured", "InvalidSpec"}


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# ---------------------------------------------------------------- pure steps

def rotation_due(spec: Mapping, annotations: Mapping, status: Mapping, versions: list[dict],
                 at: datetime.datetime) -> str | None:
    """Why the key should get a new version now, or None."""
    if spec.get("usage") == "OneTime" or status.get("consumedBy"):
        return None
    requested = annotations.get(ROTATE_ANNOTATION)
    if requested and requested != status.get("lastRotationRequest"):
        return "ManualRotation"
    current = current_version(versions)
    if current and spec.get("rotation") and at >= next_rotation(spec, current):
        return "ScheduledRotation"
    return None


def next_rotation(spec: Mapping, current: Mapping) -> datetime.datetime:
    return schedule.parse_time(current["createdAt"]) + schedule.parse_duration(spec["rotation"]["every"])


def schedule_destruction(versions: list[dict], *, spec: Mapping, at: datetime.datetime,
                         everything: bool = False) -> list[dict]:
    """Versions beyond ``keepVersions`` (or all, for a deleted or consumed key) become PendingDestruction.

    A PendingDestruction version that is within ``keepVersions`` again (the
    user raised it) is restored to Disabled: that is how a trim is cancelled.
    """
    keep = (spec.get("rotation") or {}).get("keepVersions", 3)
    delay = schedule.parse_duration(spec.get("destructionDelay", "7d"))
    result, retired = [], 0
    for version in versions:  # newest first
        version = dict(version)
        if version["state"] in ("Disabled", "PendingDestruction"):
            retired += 1
            beyond = everything or retired > keep
            if beyond and version["state"] == "Disabled":
                version.update(state="PendingDestruction", destroyAt=schedule.format_time(at + delay))
            elif not beyond and version["state"] == "PendingDestruction":
                version["state"] = "Disabled"
                version.pop("destroyAt", None)
        elif version["state"] == "Enabled" and everything:
            version.update(state="PendingDestruction", destroyAt=schedule.format_time(at + delay))
        result.append(version)
    return result


def due_for_destruction(versions: list[dict], at: datetime.datetime) -> list[dict]:
    return [v for v in versions if v["state"] == "PendingDestruction" and schedule.parse_time(v["destroyAt"]) <= at]


def next_wakeup(spec: Mapping, versions: list[dict], availability: schedule.Availability,
                at: datetime.datetime) -> datetime.datetime | None:
    moments = [availability.next_edge]
    current = current_version(versions)
    if current and spec.get("rotation") and spec.get("usage") != "OneTime":
        moments.append(next_rotation(spec, current))
    moments += [schedule.parse_time(v["destroyAt"]) for v in versions if v["state"] == "PendingDestruction"]
    future = [m for m in moments if m is not None]
    return min(future, default=None)


def desired_status(*, spec: Mapping, status: Mapping, versions: list[dict], generation: int,
                   at: datetime.datetime, error: SignerError | None = None,
                   rotation_request: str | None = None) -> dict:
    """The whole status of a SigningKey from its versions, the clock and the last signer error."""
    availability = key_availability(spec, at)
    current = current_version(versions)
    destroyed = bool(versions) and all(v["state"] == "Destroyed" for v in versions)
    online = bool(current) and availability.online
    if destroyed:
        phase = "Destroyed"
    elif current is None and error is not None and error.reason in _STALLING:
        phase = "Failed"
    elif current is None:
        phase = "Pending"
    else:
        phase = "Active" if online else "Offline"

    updates = []
    if error is not None:
        stalled = error.reason in _STALLING
        message = f"{error} ({error.reason})"
        updates += [conditions.condition("Stalled", stalled, error.reason, message, generation=generation),
                    conditions.condition("Reconciling", not stalled, error.reason, message, generation=generation)]
        ready = conditions.condition("Ready", False, error.reason, message, generation=generation)
    else:
        updates += [conditions.condition("Stalled", False, "Reconciled", "", generation=generation),
                    conditions.condition("Reconciling", False, "Reconciled", "", generation=generation)]
        if destroyed:
            ready = conditions.condition("Ready", False, "Destroyed", "every version was destroyed in the HSM",
                                         generation=generation)
        elif current is None and status.get("consumedBy"):
            ready = conditions.condition("Ready", False, "Consumed",
                                         f"this OneTime key signed {status['consumedBy']} and is retired",
                                         generation=generation)
        elif current is None:
            ready = conditions.condition("Ready", False, "Generating", "generating the key pair in the HSM",
                                         generation=generation)
        else:
            ready = conditions.condition("Ready", True, "KeyAvailable",
                                         f"version {current['version']} is enabled", generation=generation)
    updates.append(ready)

    if not spec.get("offline") or not spec["offline"].get("enabled", True):
        online_reason, online_message = "AlwaysOnline", "the key is not kept offline"
    elif availability.online:
        until = schedule.format_time(availability.until) if availability.until else "further notice"
        online_reason, online_message = "InWindow", f"inside a signing window until {until}"
    elif availability.next_open:
        online_reason = "OutsideWindow"
        online_message = (f"offline until {schedule.format_time(availability.next_open)}; "
                          "ask an approver or wait for the window")
    else:
        online_reason, online_message = "NoWindow", "offline with no signing window ahead; add one to spec.offline.windows"
    if current is None:
        online_reason, online_message = "NoEnabledVersion", "no version can sign"
    updates.append(conditions.condition("Online", online, online_reason, online_message, generation=generation))

    result: dict[str, Any] = {
        "observedGeneration": generation,
        "phase": phase,
        "currentVersion": current["version"] if current else None,
        "versions": versions,
        "online": online,
        "nextRotationAt": (schedule.format_time(next_rotation(spec, current))
                           if current and spec.get("rotation") else None),
        "nextWindowAt": (schedule.format_time(availability.next_open)
                         if current and not online and availability.next_open else None),
        "message": ready["message"] if not ready["status"] == "True" else online_message,
        "conditions": conditions.merge(status.get("conditions"), updates, now=schedule.format_time(at)),
        "lastRotationRequest": rotation_request or status.get("lastRotationRequest"),
    }
    return {k: v for k, v in result.items() if v is not None}


def status_patch(current: Mapping, desired: Mapping) -> dict | None:
    """A merge patch from the current status to the desired one (None when nothing changed)."""
    keep = {"signatureCount", "consumedBy"}  # written by the SignRequest reconciler
    patch = {k: v for k, v in desired.items() if current.get(k) != v}
    patch.update({k: None for k in current if k not in desired and k not in keep})
    return patch or None


# ---------------------------------------------------------------- the daemon

def key_ref(meta: Mapping, version: int) -> KeyRef:
    """The signer's name for one version of this SigningKey (tied to its UID)."""
    return KeyRef(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], version=version)


async def reconcile(*, body: Mapping, signer: SignerClient | None, at: datetime.datetime,
                    logger: Any) -> datetime.datetime | None:
    """One pass over one SigningKey; returns when the next pass is due by the clock."""
    meta, spec, status = body["metadata"], body["spec"], body.get("status") or {}
    versions = [dict(v) for v in status.get("versions") or []]
    rotation_request = None
    error: SignerError | None = None
    try:
        problems = schedule.validate_windows(spec.get("offline"))
        if problems:
            raise SignerError("InvalidSpec", "spec.offline: " + "; ".join(problems))
        if signer is None:
            raise SignerError("SignerNotConfigured", "the operator has no signer: set KEYROOM_SIGNER_URL")
        why = None if not versions else rotation_due(spec, meta.get("annotations") or {}, status, versions, at)
        if not versions and not status.get("consumedBy"):
            why = "Generated"
        if why:
            number = max((v["version"] for v in versions), default=0) + 1
            generated = await signer.generate(key_ref(meta, number), algorithm=spec["algorithm"])
            for version in versions:
                if version["state"] == "Enabled":
                    version["state"] = "Disabled"
            versions.insert(0, {"version": number, "state": "Enabled", "publicKey": generated["publicKey"],
                                "fingerprint": generated["fingerprint"], "createdAt": schedule.format_time(at)})
            if why == "ManualRotation":
                rotation_request = (meta.get("annotations") or {})[ROTATE_ANNOTATION]
            kopf.info(body, reason=why if why != "Generated" else "KeyGenerated",
                      message=f"version {number} generated in the HSM ({generated['fingerprint']})")
        versions = schedule_destruction(versions, spec=spec, at=at, everything=bool(status.get("consumedBy")))
        for version in due_for_destruction(versions, at):
            await signer.destroy(key_ref(meta, version["version"]))
            version.update(state="Destroyed", destroyedAt=schedule.format_time(at))
            version.pop("destroyAt", None)
            kopf.info(body, reason="VersionDestroyed", message=f"version {version['version']} destroyed in the HSM")
    except SignerError as failure:
        error = failure
        logger.warning(f"signing key {meta['namespace']}/{meta['name']}: {failure} ({failure.reason})")

    desired = desired_status(spec=spec, status=status, versions=versions, generation=meta["generation"], at=at,
                             error=error, rotation_request=rotation_request)
    patch = status_patch(status, desired)
    if patch:
        await kube.patch_status(plural="signingkeys", namespace=meta["namespace"], name=meta["name"], status=patch)
        if error is not None and status.get("message") != desired.get("message"):
            kopf.warn(body, reason=error.reason, message=str(error))
        elif status.get("online") != desired.get("online") and "online" in status:
            kopf.info(body, reason="Online" if desired["online"] else "Offline", message=desired["message"])
    if error is not None:
        raise error
    return next_wakeup(spec, versions, key_availability(spec, at), at)


async def _sleep(stopped: kopf.DaemonStopped, wakeup: asyncio.Event, seconds: float | None) -> None:
    waiters = [asyncio.ensure_future(stopped.wait()), asyncio.ensure_future(wakeup.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


@kopf.daemon(GROUP, VERSION, "signingkeys", cancellation_timeout=30)
async def keep_signing_key(body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                           logger: Any, **_: Any) -> None:
    wakeup = memo.setdefault("wakeup", asyncio.Event())
    backoff = 1.0
    while not stopped:
        wakeup.clear()
        try:
            due = await reconcile(body=body, signer=memo.get("signer"), at=now(), logger=logger)
            backoff = 1.0
            seconds = None if due is None else max(0.0, (due - now()).total_seconds())
        except SignerError as error:
            seconds = None if error.reason in _STALLING else backoff
            backoff = min(backoff * 2, _MAX_BACKOFF)
        await _sleep(stopped, wakeup, seconds)


@kopf.on.event(GROUP, VERSION, "signingkeys")
def wake_signing_key(memo: kopf.Memo, **_: Any) -> None:
    if "wakeup" in memo:
        memo["wakeup"].set()


_DELETION_POLL_SECONDS = 5.0


@kopf.on.delete(GROUP, VERSION, "signingkeys")
async def delete_signing_key(body: kopf.Body, spec: Mapping, status: Mapping, meta: Mapping, memo: kopf.Memo,
                             **_: Any) -> None:
    """Deleting a SigningKey never destroys key material silently: see the module docstring.

    The handler waits for ``destroyAt`` itself, re-reading the object every few
    seconds (reads only), so that setting ``deletionPolicy: Retain`` cancels at
    once; Kopf's own retry delays would not notice the change until they expire.
    """
    versions = schedule_destruction([dict(v) for v in status.get("versions") or []], spec=spec, at=now(),
                                    everything=True)
    pending = [v for v in versions if v["state"] == "PendingDestruction"]
    if spec.get("deletionPolicy") != "Retain" and pending:
        when = min(schedule.parse_time(v["destroyAt"]) for v in pending)
        if versions != status.get("versions"):
            await kube.patch_status(plural="signingkeys", namespace=meta["namespace"], name=meta["name"],
                                    status={"versions": versions, "phase": "Offline", "online": False})
            kopf.warn(body, reason="DestructionScheduled",
                      message=f"key material will be destroyed at {schedule.format_time(when)}; "
                              "set spec.deletionPolicy: Retain to cancel")
        while now() < when:
            await asyncio.sleep(min(_DELETION_POLL_SECONDS, (when - now()).total_seconds()))
            current = await kube.get(plural="signingkeys", namespace=meta["namespace"], name=meta["name"])
            if current is None or current["metadata"]["uid"] != meta["uid"]:
                return
            spec = current["spec"]
            if spec.get("deletionPolicy") == "Retain":
                break
    if spec.get("deletionPolicy") == "Retain":
        kopf.info(body, reason="KeyRetained", message="deletionPolicy Retain: the key material stays in the HSM")
        return
    signer: SignerClient | None = memo.get("signer")
    if signer is None:
        raise kopf.TemporaryError("the operator has no signer to destroy the key material with", delay=60)
    try:
        for version in pending:
            await signer.destroy(key_ref(meta, version["version"]))
    except SignerError as error:
        raise kopf.TemporaryError(f"cannot destroy the key material yet: {error} ({error.reason})", delay=30)
    kopf.info(body, reason="KeyDestroyed", message=f"{len(pending)} version(s) destroyed in the HSM")

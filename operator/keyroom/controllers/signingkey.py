"""The SigningKey reconciler: a mirror of the signer's record, woken at the moments that change it.

The operator decides nothing about key material. A pass over a SigningKey
(one scheduler for all of them: :class:`keyroom.controllers.daemon.Scheduler`)
names the key to the signer ("reconcile team-a/release, uid U"); the signer
reads the spec itself, applies it and the clock to its own durable record
(first version, rotation, the keepVersions trim, destruction at its own
``destroyAt``, one-time consumption: :mod:`keyroom.signer.keys`) and answers
with that record. The pass writes it into status with conditions and events;
the next pass comes when the object changes or at the next moment something
changes by the clock (a window edge, a rotation or a destruction falling due).
So ``Online`` flips at the window edge itself, without polling.

Destruction is deliberate and delayed, as in cloud KMSs: a version leaves
service (trimmed by ``rotation.keepVersions``, a consumed OneTime key, a
deleted SigningKey) as PendingDestruction and is destroyed in the HSM only at
its own ``destroyAt``. Until then it can be cancelled: raise ``keepVersions``,
or, for a deleted SigningKey, set ``spec.deletionPolicy: Retain``. A forged
status changes none of this: the signer never reads status.

A key's first pass adds the finalizer :data:`FINALIZER` before the signer is
asked for anything, so no key material exists for a key that could vanish
unsettled. Once the key is deleted, a second scheduler takes it over
(:func:`_settle`) and removes the finalizer when the signer says its material
is destroyed or retained. The operator has no Kopf change handler for keys
(but for the keys of earlier versions, below): Kopf's diff base and progress
annotations, a write on each key's creation and its bookkeeping on every
event, were all for the one deletion handler.

Earlier versions held keys with Kopf's finalizer, :data:`KOPF_FINALIZER`.
Kopf removes it once a key also holds :data:`FINALIZER`. A key deleted while
held by Kopf's finalizer alone cannot get :data:`FINALIZER` (the API server
adds no finalizer to an object being deleted): Kopf's deletion handler
:func:`settle_key_held_by_kopf`, which matches only such keys, settles it,
and then Kopf releases it.
"""
from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any, Awaitable, Callable, Mapping, NamedTuple

import kopf

from keyroom import conditions, schedule
from keyroom.api.common import GROUP, VERSION
from keyroom.controllers import daemon, kube
from keyroom.policy import current_version, key_availability
from keyroom.signer.client import SignerClient, SignerError

_MAX_BACKOFF = 60.0
#: failures only a change of the object fixes: its next pass waits for that change. Every other failure is
#: asked about again (1 s doubling to a minute), also the Stalled ones: a PIN, a token or RBAC fixed elsewhere
#: ends them without a change to the object.
_FIXED_BY_A_CHANGE = {"InvalidSpec", "InvalidRequest", "KeyMaterialMissing"}
#: signer failures that only a change of configuration fixes
_STALLING = {"SignerUnauthenticated", "SignerForbidden", "PinIncorrect", "PinLocked", "TokenNotFound",
             "ModuleNotFound", "TokenFull", "SignerNotConfigured", "InvalidSpec", "InvalidRequest",
             "KeyMaterialMissing"}
#: how often a deleting key asks the signer again (so that deletionPolicy: Retain cancels quickly)
_DELETION_POLL_SECONDS = 10.0
#: what keeps a deleted SigningKey until the signer has settled its key material (destroyed or retained it)
FINALIZER = "keyroom.dev/key-material"
#: Kopf's finalizer (the operator's ``settings.persistence.finalizer``), which held keys in earlier versions
KOPF_FINALIZER = "keyroom.dev/finalizer"

logger = logging.getLogger(__name__)


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# ---------------------------------------------------------------- pure steps

def desired_status(*, spec: Mapping, status: Mapping, record: Mapping | None, generation: int,
                   at: datetime.datetime, error: SignerError | None = None) -> dict:
    """The whole status of a SigningKey from the signer's record, the clock and the last error.

    Without a record (the signer could not be asked) the versions shown stay as they were.
    """
    versions = list(record["versions"]) if record is not None else [dict(v) for v in status.get("versions") or []]
    consumed_by = (record or {}).get("consumedBy") or status.get("consumedBy")
    missing = list((record or {}).get("missingVersions") or [])
    window_problems = schedule.validate_windows(spec.get("offline"))
    if error is None and window_problems:
        error = SignerError("InvalidSpec", "spec.offline: " + "; ".join(window_problems))
    availability = key_availability(spec, at)
    current = current_version(versions)
    destroyed = bool(versions) and all(v["state"] == "Destroyed" for v in versions) and not missing
    online = bool(current) and availability.online
    if current is None and missing and not consumed_by:
        error = error or SignerError(
            "KeyMaterialMissing", f"version {missing[-1]} is missing from the HSM (destroyed outside keyroom?); "
                                  "rotate the key (annotate keyroom.dev/rotate) to generate a new version")
    if destroyed:
        phase = "Destroyed"
    elif current is None and consumed_by and error is None:
        phase = "Consumed"
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
        # A finished key is Ready (kstatus Current): it reached the end its spec asked for and nothing more
        # will happen to it. Ready False here would read as "in progress" forever and no GitOps wait would
        # end. That it signs nothing any more is what phase, reason and the Online condition say.
        if destroyed:
            ready = conditions.condition("Ready", True, "Destroyed",
                                         "every version was destroyed in the HSM; the key signs nothing more",
                                         generation=generation)
        elif current is None and consumed_by:
            ready = conditions.condition("Ready", True, "Consumed",
                                         f"this OneTime key signed {consumed_by} and is retired; it signs nothing "
                                         "more", generation=generation)
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

    rotation_at = None
    if current and spec.get("rotation") and spec.get("usage") != "OneTime":
        rotation_at = schedule.parse_time(current["createdAt"]) + schedule.parse_duration(spec["rotation"]["every"])
    result: dict[str, Any] = {
        "observedGeneration": generation,
        "phase": phase,
        "currentVersion": current["version"] if current else None,
        "versions": versions,
        "online": online,
        "nextRotationAt": schedule.format_time(rotation_at) if rotation_at else None,
        "nextWindowAt": (schedule.format_time(availability.next_open)
                         if current and not online and availability.next_open else None),
        "message": online_message if ready["reason"] == "KeyAvailable" else ready["message"],
        "conditions": conditions.merge(status.get("conditions"), updates, now=schedule.format_time(at)),
        "lastRotationRequest": (record or {}).get("lastRotationRequest") or status.get("lastRotationRequest"),
        "consumedBy": consumed_by,
        # the signer counts the signatures in its log; without its record the count shown stays
        "signatureCount": (record or {}).get("signatureCount", status.get("signatureCount")),
    }
    return {k: v for k, v in result.items() if v is not None}


def status_patch(current: Mapping, desired: Mapping) -> dict | None:
    """A merge patch from the current status to the desired one (None when nothing changed)."""
    keep = {"consumedBy"}  # written by the SignRequest reconciler
    patch = {k: v for k, v in desired.items() if current.get(k) != v}
    patch.update({k: None for k in current if k not in desired and k not in keep})
    return patch or None


def changes(before: list[Mapping], after: list[Mapping]) -> list[tuple[str, str]]:
    """Events (reason, message) for what the signer changed between two views of the versions."""
    old = {v["version"]: v for v in before}
    found = []
    for version in sorted(after, key=lambda v: v["version"]):
        was, number = old.get(version["version"]), version["version"]
        if was is None and version["state"] == "Enabled":
            found.append(("KeyGenerated", f"version {number} generated in the HSM ({version['fingerprint']})"))
        elif was is not None and was["state"] != version["state"]:
            if version["state"] == "PendingDestruction":
                found.append(("DestructionScheduled", f"version {number} will be destroyed at "
                                                      f"{version.get('destroyAt')}; it can be cancelled until then"))
            elif version["state"] == "Destroyed" and version.get("missing"):
                found.append(("KeyMaterialMissing", f"version {number} is missing from the HSM"))
            elif version["state"] == "Destroyed":
                found.append(("VersionDestroyed", f"version {number} destroyed in the HSM"))
    return found


def next_wakeup(spec: Mapping, record: Mapping | None, at: datetime.datetime) -> datetime.datetime | None:
    moments = [key_availability(spec, at).next_edge]
    if record is not None and record.get("nextChangeAt"):
        moments.append(schedule.parse_time(record["nextChangeAt"]))
    return min((m for m in moments if m is not None), default=None)


#: when a status computed from a stale body was refused, the next pass at the latest (the newer version's
#: event usually brings the next pass sooner)
_STALE_RETRY = datetime.timedelta(seconds=5)


# ---------------------------------------------------------------- the passes

async def reconcile(*, body: Mapping, signer: SignerClient | None, at: datetime.datetime,
                    logger: Any, written: Callable[[Mapping], None] | None = None) -> datetime.datetime | None:
    """One pass over one SigningKey; returns when the next pass is due by the clock (``written``: told of the
    status write, with the object as written)."""
    meta, spec, status = body["metadata"], body["spec"], body.get("status") or {}
    record, error = None, None
    try:
        if signer is None:
            raise SignerError("SignerNotConfigured", "the operator has no signer: set KEYROOM_SIGNER_URL")
        record = await signer.reconcile_key(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])
    except SignerError as failure:
        error = failure
        logger.warning(f"signing key {meta['namespace']}/{meta['name']}: {failure} ({failure.reason})")

    desired = desired_status(spec=spec, status=status, record=record, generation=meta["generation"], at=at,
                             error=error)
    patch = status_patch(status, desired)
    if patch:
        try:
            fresh = await kube.patch_status(plural="signingkeys", namespace=meta["namespace"], name=meta["name"],
                                            status=patch, resource_version=meta.get("resourceVersion"))
            if written is not None:
                written(fresh)
        except kube.Conflict:
            # Computed from a body that is no longer current: the newer version's event brings another pass.
            logger.debug(f"signing key {meta['namespace']}/{meta['name']} changed meanwhile; reconciling again")
            return at + _STALE_RETRY
        for reason, message in changes(status.get("versions") or [], desired.get("versions") or []):
            (kopf.warn if reason == "KeyMaterialMissing" else kopf.info)(body, reason=reason, message=message)
        shown = conditions.find(desired["conditions"], "Ready")
        if shown["status"] != "True" and status.get("message") != desired.get("message"):
            kopf.warn(body, reason=shown["reason"], message=desired["message"])
        elif status.get("online") != desired.get("online") and "online" in status:
            kopf.info(body, reason="Online" if desired["online"] else "Offline", message=desired["message"])
    if error is not None:
        raise error
    return next_wakeup(spec, record, at)


async def _pass(body: dict, *, memo: kopf.Memo, settings: kopf.OperatorSettings) -> datetime.datetime | None:
    """One scheduled pass over one SigningKey (see :class:`keyroom.controllers.daemon.Scheduler`)."""
    body = await daemon.write_first_status(plural="signingkeys", body=body,
                                           message="asking the signer for the key's record",
                                           written=memo.signing_keys.written)
    finalizers = list(body["metadata"].get("finalizers") or [])
    if FINALIZER not in finalizers:
        # before the signer is first asked, so that no key material exists for a key that can vanish unsettled
        meta = body["metadata"]
        try:
            body = await kube.set_finalizers(plural="signingkeys", namespace=meta["namespace"], name=meta["name"],
                                             finalizers=finalizers + [FINALIZER],
                                             resource_version=meta["resourceVersion"])
        except kube.Conflict:
            return now() + _STALE_RETRY  # the newer version's event usually brings the next pass sooner
        memo.signing_keys.written(body)
    try:
        return await reconcile(body=body, signer=memo.get("signer"), at=now(),
                               logger=kopf.ObjectLogger(body=kopf.Body(body), settings=settings),
                               written=memo.signing_keys.written)
    except SignerError as error:
        raise (daemon.Stalled if error.reason in _FIXED_BY_A_CHANGE else daemon.Retry)(str(error)) from None


async def _settle(body: dict, *, memo: kopf.Memo) -> datetime.datetime | None:
    """One pass over a deleted SigningKey: the deletion never destroys key material silently (module docstring).

    The signer schedules the destruction when it sees the deletion and
    destroys each version at its own ``destroyAt``; a pass asks it again (at
    the latest every few seconds, so that ``deletionPolicy: Retain`` cancels
    at once, and at once on any change) and lets the object go, by removing
    :data:`FINALIZER`, when the signer says it is finished.
    """
    if FINALIZER not in (body["metadata"].get("finalizers") or []):
        return None  # not held (deleted before its first pass: no key material), or held by Kopf's finalizer
    settlement = await _ask_to_settle(body, memo=memo)
    if settlement.again is not None:
        return settlement.again
    await _let_go(settlement.body)
    if settlement.outcome is not None:
        kopf.info(body, reason=settlement.outcome, message=_SETTLED[settlement.outcome])
    return None


_SETTLED = {"KeyRetained": "deletionPolicy Retain: the key material stays in the HSM",
            "KeyDestroyed": "every version was destroyed in the HSM"}


class _Settlement(NamedTuple):
    body: Mapping  #: the key as last read or written
    again: datetime.datetime | None  #: when to ask the signer again; None once it is finished
    outcome: str | None  #: what was settled (:data:`_SETTLED`); None when the signer never held material for it


async def _ask_to_settle(body: Mapping, *, memo: kopf.Memo) -> _Settlement:
    """Ask the signer to settle a deleted key's material, and mirror its record into status."""
    meta, status = body["metadata"], body.get("status") or {}
    signer: SignerClient | None = memo.get("signer")
    if signer is None:
        raise daemon.Retry("the operator has no signer to settle the key material with")
    try:
        record = await signer.reconcile_key(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])
    except SignerError as error:
        if error.reason == "KeyNotFound":  # the signer never held material for this key
            return _Settlement(body, None, None)
        logger.warning("signing key %s/%s: cannot settle the key material yet: %s (%s)", meta["namespace"],
                       meta["name"], error, error.reason)
        raise daemon.Retry(str(error)) from None
    if record["versions"] != status.get("versions"):
        for reason, message in changes(status.get("versions") or [], record["versions"]):
            kopf.info(body, reason=reason, message=message)
        body = await kube.patch_status(plural="signingkeys", namespace=meta["namespace"], name=meta["name"],
                                       status={"versions": record["versions"], "phase": "Offline",
                                               "online": False, "currentVersion": None})
        memo.key_deletions.written(body)
    if not record["finished"]:
        due = schedule.parse_time(record["nextChangeAt"]) if record.get("nextChangeAt") else None
        wait = _DELETION_POLL_SECONDS if due is None else min(_DELETION_POLL_SECONDS,
                                                              max(0.0, (due - now()).total_seconds()))
        return _Settlement(body, now() + datetime.timedelta(seconds=wait), None)
    retained = any(v["state"] != "Destroyed" for v in record["versions"])
    return _Settlement(body, None, "KeyRetained" if retained else "KeyDestroyed")


async def _let_go(body: Mapping) -> None:
    """Remove :data:`FINALIZER` from a deleted key (the API server then removes it, unless others hold it)."""
    meta = body["metadata"]
    try:
        await kube.set_finalizers(plural="signingkeys", namespace=meta["namespace"], name=meta["name"],
                                  finalizers=[f for f in meta.get("finalizers") or [] if f != FINALIZER],
                                  resource_version=meta["resourceVersion"])
    except kube.Conflict:
        raise daemon.Retry("the key changed while it was let go; asking the signer again") from None


def _held_by_kopf_alone(meta: Mapping, **_: Any) -> bool:
    finalizers = meta.get("finalizers") or []
    return KOPF_FINALIZER in finalizers and FINALIZER not in finalizers


@kopf.on.delete(GROUP, VERSION, "signingkeys", when=_held_by_kopf_alone)
async def settle_key_held_by_kopf(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Settle a key deleted while held by Kopf's finalizer alone (an earlier version's), before its first pass.

    The key cannot get :data:`FINALIZER` any more, and without this handler
    Kopf would remove its own finalizer at once: the key would go and its
    material stay in the HSM, never scheduled for destruction. Kopf keeps its
    finalizer until this handler returns, and calls it for no other key. It
    asks the signer as :func:`_settle` does, in a loop of its own: Kopf's
    retries would log each wait for the destruction delay as an error.
    """
    failures = 0
    while True:
        try:
            settlement = await _ask_to_settle(body, memo=memo)
        except daemon.Retry:
            failures += 1
            await asyncio.sleep(min(_MAX_BACKOFF, 2.0 ** failures))
            continue
        if settlement.again is None:
            break
        failures, body = 0, settlement.body
        await asyncio.sleep(max(0.0, (settlement.again - now()).total_seconds()))
    if settlement.outcome is not None:
        kopf.info(body, reason=settlement.outcome, message=_SETTLED[settlement.outcome])


@kopf.on.startup()
async def setup_signing_keys(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
    async def one_pass(body: dict) -> datetime.datetime | None:
        return await _pass(body, memo=memo, settings=settings)

    async def one_settlement(body: dict) -> datetime.datetime | None:
        return await _settle(body, memo=memo)
    memo.signing_keys = daemon.Scheduler("signingkey", one_pass, max_backoff=_MAX_BACKOFF)
    memo.key_deletions = daemon.Scheduler("signingkey-deletion", one_settlement, max_backoff=_MAX_BACKOFF)


@kopf.on.cleanup()
async def stop_signing_keys(memo: kopf.Memo, **_: Any) -> None:
    await memo.signing_keys.stop()
    await memo.key_deletions.stop()


#: how soon a key's status shows a signature made with it: signatures within this time share one status write
SIGNATURE_COUNT_DELAY = 2.0


def wake(memo: kopf.Memo, namespace: str, name: str) -> None:
    """Have a SigningKey asked about again soon (a request signed with it changed its count).

    Wake-ups within :data:`SIGNATURE_COUNT_DELAY` coalesce into one pass: a
    busy key's count is written at most about once in that time, not once per
    signature (a read at the signer and a status write each, at 10 requests a
    second the costliest writes after the requests' own).
    """
    memo.signing_keys.wake((namespace, name), after=SIGNATURE_COUNT_DELAY)


#: what the other kinds do when a SigningKey changes (its requests decide again, its policies and
#: certificates show it), each called with Kopf's arguments of the event: see :func:`on_key_event`
_KEY_EVENT_LISTENERS: list[Callable[..., Awaitable[None]]] = []


def on_key_event(listener: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Have ``listener`` called on every SigningKey watch event, with the arguments of a Kopf event handler.

    One Kopf handler calls them all: Kopf's bookkeeping around each handler
    (its state, arguments, context and log records) cost more than what the
    four of them did, and a restarted operator goes through it for every key.
    A listener's failure is logged and stops neither the others nor the next
    event, as with Kopf's own event handlers.
    """
    _KEY_EVENT_LISTENERS.append(listener)
    return listener


@kopf.on.event(GROUP, VERSION, "signingkeys")
async def signing_key_seen(body: kopf.Body, type: str | None, memo: kopf.Memo, **kwargs: Any) -> None:
    # async on purpose: Kopf runs plain functions in worker threads, and the scheduler is not thread-safe
    meta = body["metadata"]
    place = (meta["namespace"], meta["name"])
    if type == "DELETED":
        memo.signing_keys.forget(place)
        memo.key_deletions.forget(place)
    elif meta.get("deletionTimestamp"):
        memo.signing_keys.forget(place)  # the settlement of its key material takes over
        memo.key_deletions.seen(body)
    else:
        memo.signing_keys.seen(body)
    for listener in _KEY_EVENT_LISTENERS:
        try:
            await listener(body=body, type=type, memo=memo, **kwargs)
        except Exception:
            logger.exception("signing key %s/%s: %s failed on its event", meta.get("namespace"), meta.get("name"),
                             listener.__qualname__)

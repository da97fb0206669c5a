"""The SignRequest reconciler: from a request to its signatures, once the policies are satisfied.

A request's state follows from its spec (the digests, the authentic
approvals and build attestations), its SigningKey, the namespace's SigningPolicies and the clock;
``keyroom.policy.decide`` computes it and this module acts on it:

- Pending while it waits (AwaitingApproval, AwaitingBuilds, KeyOffline,
  RateLimited, KeyNotReady, KeyNotFound, NoPolicy), with a message that says
  what comes next;
- Signing while the signer works; the signer re-checks everything itself and
  signs each request at most once, so a retry after any crash is safe;
- Signed, Denied, Expired or Failed, which are final: a final request is never
  changed again, only removed once ``ttlAfterFinished`` has passed.

Everything is level-based. The reconciler runs on the request's own events, on
events of its key and of the namespace's policies (a window opening, a policy
changing), and at the one moment the clock alone changes the answer (expiry,
a window edge, a rate limit freeing up, removal after the TTL). It keeps
the requests it has seen in memory, so deciding costs no API read, and writes
the status only when it changes. It uses no finalizer and no Kopf
bookkeeping annotations: a request that needs no approval costs its creation,
one status write (Signed; Signing is written too when the signer takes longer
than a quarter of a second) and one event.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import os
from typing import Any, Callable, Iterable, Mapping

import kopf
import kubernetes

from keyroom import conditions, policy, schedule
from keyroom.api.common import GROUP, VERSION
from keyroom.api.signrequest import TERMINAL_PHASES
from keyroom.controllers import essence, kube, signingkey
from keyroom.controllers.notify import Notifier, transition
from keyroom.signer.client import SignerClient, SignerError, digests_fingerprint

logger = logging.getLogger("keyroom.signrequest")

#: how long a finished request is kept unless its annotation says otherwise
TTL_ANNOTATION = f"{GROUP}/ttl-after-finished"
DEFAULT_TTL_AFTER_FINISHED = "7d"
#: the longest a finished request is kept, whatever its annotation says
MAX_TTL_AFTER_FINISHED = datetime.timedelta(days=3650)
_MAX_BACKOFF = 60.0
#: how long the signer may take before a request shows the Signing phase
SIGNING_SHOWN_AFTER = 0.25
#: with more sign calls than this in flight, a slow call shows no Signing phase: the request goes straight to
#: Signed. Under load every call is slow, and a second status write per request, at the moment the API server
#: is busiest, turned a backlog into a collapse (1,463 of 1,800 requests written twice at 30 a second).
SIGNING_SHOWN_UP_TO = 8
#: signer refusals that mean "not yet" rather than "never": the views of operator and signer differed briefly
_WAIT_REASONS = {"KeyOffline", "RateLimited", "KeyNotReady", "AwaitingApproval", "AwaitingBuilds", "KeyNotFound",
                 "NoPolicy", "NoCertificate"}


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# ---------------------------------------------------------------- pure status

_CONDITIONS_BY_PHASE = {
    # phase: (Approved, Denied, Signed, Ready, Reconciling, Stalled)
    "Pending": (None, False, False, False, False, False),
    "Approved": (True, False, False, False, True, False),
    "Signing": (True, False, False, False, True, False),
    "Signed": (True, False, True, True, False, False),
    "Denied": (False, True, False, False, False, True),
    "Expired": (None, False, False, False, False, True),
    "Failed": (None, False, False, False, False, True),
}


def desired_status(*, decision: policy.Decision, phase: str, status: Mapping, generation: int,
                   at: datetime.datetime, reason: str | None = None, message: str | None = None) -> dict:
    """The request's status for a decision shown as ``phase`` (a reason/message may override the decision's)."""
    reason, message = reason or decision.reason, message or decision.message
    stamp = schedule.format_time(at)
    seen = {a["user"]: a.get("observedAt") for a in status.get("approvals") or []}
    seen_builds = {b["user"]: b.get("observedAt") for b in status.get("builds") or []}
    approved, denied, signed, ready, reconciling, stalled = _CONDITIONS_BY_PHASE[phase]
    approved = decision.approved if approved is None else approved
    approved_reason = "Approved" if approved else ("Denied" if phase == "Denied" else reason)
    approvers = [a["user"] for a in decision.approvals if a["counted"] and a["decision"] == "Approve"]
    approved_message = (f"approved by {', '.join(approvers)}" if approvers else "approved: no approval required")
    builders = [b["user"] for b in decision.builds if b["counted"]]
    if builders and decision.build_summary:
        approved_message += f"; builds of {', '.join(builders)} match"
    result: dict[str, Any] = {
        "observedGeneration": generation,
        "phase": phase,
        "message": message,
        "approvalSummary": decision.summary or None,
        "approvals": [{**a, "observedAt": seen.get(a["user"]) or stamp} for a in decision.approvals] or None,
        "buildSummary": decision.build_summary or None,
        "builds": [{**b, "observedAt": seen_builds.get(b["user"]) or stamp} for b in decision.builds] or None,
        "expiresAt": schedule.format_time(decision.expires_at) if decision.expires_at else None,
        "conditions": conditions.merge(status.get("conditions"), [
            conditions.condition("Approved", approved, approved_reason, approved_message if approved else message,
                                 generation=generation),
            conditions.condition("Denied", denied, "Denied" if denied else "NotDenied",
                                 message if denied else "", generation=generation),
            conditions.condition("Signed", signed, "Signed" if signed else reason, message if signed else "",
                                 generation=generation),
            conditions.condition("Ready", ready, reason, message, generation=generation),
            conditions.condition("Reconciling", reconciling, reason, message, generation=generation),
            conditions.condition("Stalled", stalled, reason, message, generation=generation),
        ], now=stamp),
    }
    if phase in TERMINAL_PHASES:
        result["finishedAt"] = status.get("finishedAt") or stamp
    return {k: v for k, v in result.items() if v is not None}


def status_patch(current: Mapping, desired: Mapping) -> dict | None:
    patch = {k: v for k, v in desired.items() if current.get(k) != v}
    return patch or None


def signature_of(request: Mapping) -> tuple[datetime.datetime | None, str, int] | None:
    """(when it signed, None while Signing; its key; its digests) for a request that signs or signed; else None."""
    status = request.get("status") or {}
    if status.get("phase") == "Signing" or (status.get("phase") == "Signed" and status.get("signedAt")):
        signed_at = schedule.parse_time(status["signedAt"]) if status.get("signedAt") else None
        return signed_at, request["spec"]["keyRef"]["name"], len(request["spec"]["digests"])
    return None


def in_window(signatures: Iterable[tuple[datetime.datetime | None, str, int]],
              at: datetime.datetime) -> list[policy.Signature]:
    """The signatures within the rate-limit window before ``at`` (one being made counts as made at ``at``)."""
    return [policy.Signature(signed_at or at, key, count) for signed_at, key, count in signatures
            if signed_at is None or signed_at > at - policy.RATE_WINDOW]


def recent_signatures(requests: list[Mapping], at: datetime.datetime) -> list[policy.Signature]:
    """Signatures the namespace's requests made (or are making) within the rate-limit window."""
    return in_window(filter(None, map(signature_of, requests)), at)


def removal_due(body: Mapping, *, default_ttl: str) -> datetime.datetime | None:
    """When a finished request is removed; None while it is not finished."""
    status = body.get("status") or {}
    if status.get("phase") not in TERMINAL_PHASES or not status.get("finishedAt"):
        return None
    finished = schedule.parse_time(status["finishedAt"])
    ttl = (body["metadata"].get("annotations") or {}).get(TTL_ANNOTATION) or default_ttl
    try:
        return finished + min(schedule.parse_duration(ttl), MAX_TTL_AFTER_FINISHED)
    except (ValueError, OverflowError):  # a typo or an absurd value in an annotation: the default applies
        return finished + schedule.parse_duration(default_ttl)


# ---------------------------------------------------------------- the requests the operator knows

def _revision(body: Mapping) -> int:
    try:
        return int(body["metadata"].get("resourceVersion") or 0)
    except ValueError:  # resourceVersions are opaque; etcd's are integers
        return 0


#: what the operator keeps of a final request's metadata and status (see Requests.remember)
FINAL_METADATA_KEPT = ("name", "namespace", "uid", "resourceVersion", "generation", "deletionTimestamp")
FINAL_STATUS_KEPT = ("phase", "finishedAt", "signedAt")


@dataclasses.dataclass
class Requests:
    """The SignRequests as last seen (from events or our own writes), with a lock and a timer each."""

    ttl_after_finished: str = DEFAULT_TTL_AFTER_FINISHED
    bodies: dict[tuple[str, str], dict] = dataclasses.field(default_factory=dict)
    #: namespace -> name -> body (the same bodies), so that a namespace's requests are found without a scan
    by_namespace: dict[str, dict[str, dict]] = dataclasses.field(default_factory=dict)
    #: namespace -> its signatures of the last hour, for the rate limits (see RateIndex)
    rates: dict[str, policy.RateIndex] = dataclasses.field(default_factory=dict)
    locks: dict[tuple[str, str], asyncio.Lock] = dataclasses.field(default_factory=dict)
    timers: dict[tuple[str, str], asyncio.TimerHandle] = dataclasses.field(default_factory=dict)
    #: (the delay of the next retry, when the retry now scheduled is due) of each request that is failing
    backoff: dict[tuple[str, str], tuple[float, datetime.datetime]] = dataclasses.field(default_factory=dict)
    tasks: set[asyncio.Task] = dataclasses.field(default_factory=set)
    #: UIDs the signer said it has not signed, with no sign call from this process since: only these may be
    #: settled without asking the signer (a previous operator process may have asked it to sign any other)
    unsigned: set[str] = dataclasses.field(default_factory=set)
    #: (namespace, key name) -> a hash of what decisions read of the SigningKey, as last seen
    key_views: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    #: sign calls to the signer in flight from this process
    signing: int = 0

    def remember(self, body: Mapping) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        known = self.bodies.get(key)
        if (known is None or known["metadata"]["uid"] != body["metadata"]["uid"]
                or _revision(body) >= _revision(known)):
            spec, status = dict(body["spec"]), dict(body.get("status") or {})
            meta = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
            if status.get("phase") in TERMINAL_PHASES:
                # A final request is kept only for the rate limits (its key, digest count and signing time), its
                # removal (its TTL and finishedAt) and the Events of its last write (its identity): thousands of
                # them are normal, so nothing else of it is kept (not its conditions, approvals or annotations).
                spec = {"keyRef": spec["keyRef"], "digests": [{"name": d["name"]} for d in spec["digests"]]}
                status = {k: status[k] for k in FINAL_STATUS_KEPT if k in status}
                annotations = meta.get("annotations") or {}
                meta = {k: meta[k] for k in FINAL_METADATA_KEPT if k in meta}
                if TTL_ANNOTATION in annotations:
                    meta["annotations"] = {TTL_ANNOTATION: annotations[TTL_ANNOTATION]}
            kept = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                    "metadata": meta, "spec": spec, "status": status}
            self.bodies[key] = kept
            self.by_namespace.setdefault(key[0], {})[key[1]] = kept
            self.rates.setdefault(key[0], policy.RateIndex()).put(key[1], signature_of(kept))

    def key_changed(self, namespace: str, name: str, body: Mapping | None) -> bool:
        """Whether what a decision reads of the SigningKey (see :func:`decision_view`) differs from its last view.

        ``body`` None: the key was deleted (a change).
        """
        place = (namespace, name)
        if body is None:
            self.key_views.pop(place, None)
            return True
        view = hash(json.dumps(decision_view(body), sort_keys=True, default=dict))
        if self.key_views.get(place) == view:
            return False
        self.key_views[place] = view
        return True

    def forget(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        body = self.bodies.pop(key, None)
        if body is not None:
            self.unsigned.discard(body["metadata"]["uid"])
        found = self.by_namespace.get(namespace)
        if found is not None:
            found.pop(name, None)
            if not found:
                del self.by_namespace[namespace]
        if namespace in self.rates:
            self.rates[namespace].drop(name)
        self.backoff.pop(key, None)
        timer = self.timers.pop(key, None)
        if timer:
            timer.cancel()

    def in_namespace(self, namespace: str) -> list[dict]:
        return list(self.by_namespace.get(namespace, {}).values())

    def rate_tally(self, namespace: str, at: datetime.datetime) -> policy.RateTally:
        """The namespace's signatures within the rate window before ``at``."""
        return self.rates.setdefault(namespace, policy.RateIndex()).at(at)

    def wake_at(self, namespace: str, name: str, when: datetime.datetime | None, run) -> None:
        """Run ``run(namespace, name)`` at ``when`` (replacing an earlier timer of the request)."""
        key = (namespace, name)
        timer = self.timers.pop(key, None)
        if timer:
            timer.cancel()
        if when is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, (when - now()).total_seconds()) + 0.05  # past the edge, not just before it
        # in a context of its own: the handler's context holds the whole body of the event being handled
        self.timers[key] = loop.call_later(delay, self.spawn, run, namespace, name,
                                           context=essence.detached_context())

    def spawn(self, run, namespace: str, name: str) -> None:
        self.timers.pop((namespace, name), None)
        task = asyncio.create_task(run(namespace, name))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


@kopf.on.startup()
def setup_requests(memo: kopf.Memo, **_: Any) -> None:
    ttl = os.environ.get("KEYROOM_TTL_AFTER_FINISHED", DEFAULT_TTL_AFTER_FINISHED)
    schedule.parse_duration(ttl)  # refuse to start on a bad setting rather than fail at the first removal
    memo.signrequests = Requests(ttl_after_finished=ttl)


def decision_view(body: Mapping) -> dict:
    """What a request's decision reads of a SigningKey: its labels, spec and what
    :class:`keyroom.policy.KeyState` reads of its status (not its conditions, messages, fingerprints or
    signature count): the operator holds one of these per key, thousands of them."""
    meta, status = body["metadata"], body.get("status") or {}
    kept = {"versions": [{k: v[k] for k in ("version", "state", "missing") if k in v}
                         for v in status.get("versions") or []]}
    kept.update({k: status[k] for k in ("phase", "consumedBy") if status.get(k)})
    return {"metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
                         "labels": dict(meta.get("labels") or {})},
            "spec": dict(body.get("spec") or {}), "status": kept}


@kopf.index(GROUP, VERSION, "signingkeys")
async def signing_keys(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    """Each SigningKey as last seen, as much of it as decisions read (:func:`decision_view`).

    async although it awaits nothing: Kopf runs plain functions in its thread pool, and a round trip there for
    each key event was a sixth of a restarted operator's time to catch up with 10,000 keys.
    """
    return {(namespace, name): decision_view(body)}


# ---------------------------------------------------------------- reconcile one request

class Reconciler:
    """Decides and acts for one request at a time (per-request lock); shared by all the triggers."""

    def __init__(self, *, requests: Requests, signer: SignerClient | None, keys: kopf.Index,
                 policies: kopf.Index, key_labels: kopf.Index, notifier: Notifier | None = None,
                 key_signed: Callable[[str, str], None] | None = None) -> None:
        self.requests, self.signer, self.notifier = requests, signer, notifier
        self.keys, self.policies, self.key_labels = keys, policies, key_labels
        #: called with (namespace, key name) once a request was signed (the key's signature count changed)
        self.key_signed = key_signed

    async def __call__(self, namespace: str, name: str) -> None:
        lock = self.requests.locks.setdefault((namespace, name), asyncio.Lock())
        async with lock:
            try:
                await self._reconcile(namespace, name)
            except kubernetes.client.ApiException as error:
                if error.status == 404:
                    return  # deleted meanwhile
                logger.warning("signrequest %s/%s: API error %s; retrying", namespace, name, error.status)
                self._retry(namespace, name)
            except Exception:
                logger.exception("signrequest %s/%s: unexpected error; retrying", namespace, name)
                self._retry(namespace, name)
            finally:
                if not lock._waiters:  # noqa: SLF001
                    self.requests.locks.pop((namespace, name), None)

    def _retry(self, namespace: str, name: str) -> None:
        """Try again later: 1 s, doubling to a minute with each retry that fell due, not with each failed attempt.

        Attempts that events bring before the retry is due (key events while
        the signer restarts, say) keep it where it is: doubling on each of
        them pushed the delay to a minute within a second, and the request
        then waited a minute after the signer was back.
        """
        key, at = (namespace, name), now()
        delay, due = self.requests.backoff.get(key, (1.0, at))
        if at >= due:
            due = at + datetime.timedelta(seconds=delay)
            self.requests.backoff[key] = (min(delay * 2, _MAX_BACKOFF), due)
        self.requests.wake_at(namespace, name, due, self)

    async def _write(self, body: dict, patch: dict | None) -> dict:
        if not patch:
            return body
        meta, status = body["metadata"], body.get("status") or {}
        written = None
        if status.get("phase") not in TERMINAL_PHASES and meta.get("resourceVersion"):
            # The whole status, on the version it was computed from: a signed 500-digest request's write costs
            # the API server much less as a replacement than as a merge patch (see kube.replace_status).
            try:
                written = await kube.replace_status(plural="signrequests", kind="SignRequest",
                                                    namespace=meta["namespace"], name=meta["name"],
                                                    resource_version=meta["resourceVersion"],
                                                    status={**status, **patch})
            except kube.Conflict:
                # Changed meanwhile (an approval appended): what changed is merged into the newer status, as
                # before; the newer version's own event decides again.
                pass
        if written is None:
            written = await kube.patch_status(plural="signrequests", namespace=meta["namespace"],
                                              name=meta["name"], status=patch)
        event = transition(status, written.get("status") or {})
        if event is not None and self.notifier is not None:
            self.notifier.notify(written, event=event)
        self.requests.remember(written)
        return self.requests.bodies[(meta["namespace"], meta["name"])]

    def _decide(self, body: Mapping, at: datetime.datetime) -> policy.Decision:
        namespace = body["metadata"]["namespace"]
        key = next(iter(self.keys.get((namespace, body["spec"]["keyRef"]["name"]), [])), None)
        policies = list(self.policies.get(namespace, []))
        labels = dict(self.key_labels.get(namespace, []))
        key_state = policy.KeyState.from_status(key.get("status") or {}) if key is not None else None
        return policy.decide(body, key=key, key_state=key_state, policies=policies, at=at, key_labels=labels,
                             recent=self.requests.rate_tally(namespace, at))

    async def _signer_record(self, body: Mapping) -> str | None:
        """Signed, Signing or Unsigned as the signer records the request; None when it cannot be asked."""
        uid = body["metadata"]["uid"]
        if uid in self.requests.unsigned or self.signer is None:
            return "Unsigned"
        meta = body["metadata"]
        try:
            state = (await self.signer.request_outcome(namespace=meta["namespace"], name=meta["name"],
                                                       uid=uid))["state"]
        except SignerError as error:
            logger.info("signrequest %s/%s: cannot ask the signer whether it signed: %s", meta["namespace"],
                        meta["name"], error)
            return None
        if state == "Unsigned":
            self.requests.unsigned.add(uid)
        return state

    async def _reconcile(self, namespace: str, name: str) -> None:
        body = self.requests.bodies.get((namespace, name))
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        status, generation, at = body["status"], body["metadata"].get("generation", 1), now()
        if status.get("phase") in TERMINAL_PHASES:
            await self._finished(body, at)
            return
        decision = self._decide(body, at)
        # A request the signer may already have signed is always settled by asking the signer: it returns
        # the signatures it made, or refuses with the reason it sees now (a Deny appended meanwhile...).
        # A request the signer may have signed is always settled by the signer: it is never shown as
        # Denied, Expired or Pending while an audited signature exists (a crash, a lost status write).
        resuming = status.get("phase") in ("Signing", "Approved")
        if decision.phase != "Approved" and not resuming:
            recorded = await self._signer_record(body)
            if recorded == "Unsigned" or (recorded is None and decision.phase not in TERMINAL_PHASES):
                await self._settle(body, decision, at)
                if recorded is None:
                    self._retry(namespace, name)
                return
            if recorded is None:
                self._retry(namespace, name)  # a final outcome waits until the signer confirms it signed nothing
                return
        if self.signer is None:
            await self._write(body, status_patch(status, desired_status(
                decision=decision, phase="Approved", status=status, generation=generation, at=at,
                reason="SignerNotConfigured", message="approved; the operator has no signer (KEYROOM_SIGNER_URL)")))
            return
        show_signing = None
        if status.get("phase") != "Signing" and decision.phase == "Approved":
            show_signing = lambda: self._write(body, status_patch(status, desired_status(  # noqa: E731
                decision=decision, phase="Signing", status=status, generation=generation, at=now())))
        await self._sign(body, decision, show_signing)

    async def _settle(self, body: dict, decision: policy.Decision, at: datetime.datetime) -> None:
        """Show a decision that is not 'sign now'; wake up when the clock may change it."""
        meta, status = body["metadata"], body["status"]
        before = status.get("phase"), status.get("conditions") and conditions.find(status["conditions"], "Ready")
        desired = desired_status(decision=decision, phase=decision.phase, status=status,
                                 generation=meta.get("generation", 1), at=at)
        body = await self._write(body, status_patch(status, desired))
        seen = {a["user"] for a in status.get("approvals") or []}
        for entry in decision.approvals:
            if entry["user"] not in seen:
                if entry["counted"]:
                    kopf.info(body, reason=f"{entry['decision']}Counted",
                              message=f"{entry['user']}: {entry['decision']} counts ({decision.summary})")
                else:
                    kopf.warn(body, reason="ApprovalIgnored", message=f"{entry['user']}: {entry['reason']}")
        seen_builds = {b["user"] for b in status.get("builds") or []}
        for entry in decision.builds:
            if entry["user"] not in seen_builds:
                if entry["counted"]:
                    kopf.info(body, reason="BuildCounted",
                              message=f"{entry['user']}: the build matches ({decision.build_summary})")
                elif entry["user"] not in {m.builder for m in decision.mismatches}:  # a mismatch: the final event
                    kopf.warn(body, reason="BuildIgnored", message=f"{entry['user']}: {entry['reason']}")
        if decision.phase in TERMINAL_PHASES:
            kopf.warn(body, reason=decision.reason, message=decision.message)
            await self._finished(body, at)
            return
        if before[0] is None or (before[1] or {}).get("reason") != decision.reason:
            kopf.info(body, reason=decision.reason, message=decision.message)
        self.requests.wake_at(meta["namespace"], meta["name"], decision.wake_at, self)

    async def _sign(self, body: dict, decision: policy.Decision, show_signing) -> None:
        """Ask the signer; if it takes longer than a moment, show the Signing phase meanwhile.

        A quick answer (most requests) goes straight to Signed: one status write
        instead of two, and no write competing with the signing for the API
        server. So does a slow one while many calls are in flight
        (:data:`SIGNING_SHOWN_UP_TO`): then the signer is slow because it is busy.
        """
        meta, spec = body["metadata"], body["spec"]
        namespace, name = meta["namespace"], meta["name"]
        self.requests.unsigned.discard(meta["uid"])
        call = asyncio.ensure_future(self.signer.sign_request(namespace=namespace, name=name, uid=meta["uid"],
                                                              digests=digests_fingerprint(spec)))
        self.requests.signing += 1
        call.add_done_callback(lambda _: setattr(self.requests, "signing", self.requests.signing - 1))
        try:
            if show_signing is not None:
                done, _ = await asyncio.wait({call}, timeout=SIGNING_SHOWN_AFTER)
                if not done and self.requests.signing <= SIGNING_SHOWN_UP_TO:
                    try:
                        body = await show_signing()
                    except BaseException:
                        call.cancel()  # safe: a retry gets what the signer made, if anything
                        raise
            result = await call
        except SignerError as error:
            at, status = now(), body["status"]
            if error.transient or error.reason in _WAIT_REASONS:
                phase = "Approved" if error.transient else "Pending"
                await self._write(body, status_patch(status, desired_status(
                    decision=decision, phase=phase, status=status, generation=meta.get("generation", 1), at=at,
                    reason=error.reason, message=f"{'approved; ' if error.transient else ''}{error}")))
                logger.info("signrequest %s/%s: the signer said %s: %s; retrying", namespace, name, error.reason,
                            error)
                self._retry(namespace, name)
                return
            phase = error.reason if error.reason in ("Denied", "Expired") else "Failed"
            desired = desired_status(decision=decision, phase=phase, status=status,
                                     generation=meta.get("generation", 1), at=at, reason=error.reason,
                                     message=f"the signer refused: {error}")
            if error.audit:
                desired["audit"] = error.audit
            body = await self._write(body, status_patch(status, desired))
            kopf.warn(body, reason=error.reason, message=f"the signer refused: {error}")
            await self._finished(body, at)
            return
        self.requests.backoff.pop((namespace, name), None)
        at, status = now(), body["status"]
        desired = desired_status(decision=decision, phase="Signed", status=status,
                                 generation=meta.get("generation", 1), at=at, reason="Signed",
                                 message=f"{len(result['signatures'])} signature(s) by {spec['keyRef']['name']} "
                                         f"version {result['keyVersion']}")
        desired.update(keyVersion=result["keyVersion"], signatures=result["signatures"],
                       signedAt=result["signedAt"], audit=result["audit"])
        if result.get("certificate"):
            desired["certificate"] = result["certificate"]
        body = await self._write(body, status_patch(status, desired))
        kopf.info(body, reason="Signed", message=f"{desired['message']}; audit entry {result['audit']['index']}")
        if self.key_signed is not None:
            self.key_signed(namespace, spec["keyRef"]["name"])
        key = next(iter(self.keys.get((namespace, spec["keyRef"]["name"]), [])), None)
        if key is not None and key["spec"].get("usage") == "OneTime" and not key["status"].get("consumedBy"):
            await kube.patch_status(plural="signingkeys", namespace=namespace, name=spec["keyRef"]["name"],
                                    status={"consumedBy": name})
        await self._finished(body, at)

    async def _finished(self, body: dict, at: datetime.datetime) -> None:
        """Remove a final request once its TTL has passed, or wake up then."""
        meta = body["metadata"]
        due = removal_due(body, default_ttl=self.requests.ttl_after_finished)
        if due is None:
            return
        if due > at:
            self.requests.wake_at(meta["namespace"], meta["name"], due, self)
            return
        await kube.delete(plural="signrequests", namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])
        logger.info("removed finished signrequest %s/%s", meta["namespace"], meta["name"])


def _reconciler(memo: kopf.Memo, signing_keys: kopf.Index, policies_by_namespace: kopf.Index,
                keys_by_namespace: kopf.Index) -> Reconciler:
    return Reconciler(requests=memo.signrequests, signer=memo.get("signer"), keys=signing_keys,
                      policies=policies_by_namespace, key_labels=keys_by_namespace, notifier=memo.get("notifier"),
                      key_signed=lambda namespace, key: signingkey.wake(memo, namespace, key))


# ---------------------------------------------------------------- triggers

@kopf.on.event(GROUP, VERSION, "signrequests")
async def request_changed(event: Mapping, body: kopf.Body, namespace: str, name: str, memo: kopf.Memo,
                          signing_keys: kopf.Index, policies_by_namespace: kopf.Index,
                          keys_by_namespace: kopf.Index, **_: Any) -> None:
    if event["type"] == "DELETED":
        memo.signrequests.forget(namespace, name)
        return
    memo.signrequests.remember(body)
    await _reconciler(memo, signing_keys, policies_by_namespace, keys_by_namespace)(namespace, name)


def _decide_again(memo: kopf.Memo, namespace: str, indexes: tuple[kopf.Index, ...], key: str | None = None) -> None:
    """Reconcile the namespace's unfinished requests (those naming ``key``, when given)."""
    reconcile = _reconciler(memo, *indexes)
    for body in memo.signrequests.in_namespace(namespace):
        if body["status"].get("phase") not in TERMINAL_PHASES and key in (None, body["spec"]["keyRef"]["name"]):
            memo.signrequests.spawn(reconcile, namespace, body["metadata"]["name"])


@signingkey.on_key_event
async def key_changed_for_requests(namespace: str, name: str, body: kopf.Body, type: str | None, memo: kopf.Memo,
                                   signing_keys: kopf.Index, policies_by_namespace: kopf.Index,
                                   keys_by_namespace: kopf.Index, **_: Any) -> None:
    """A key came online, got a version, was consumed: its waiting requests decide again.

    Only when what a decision reads of the key changed: most of a key's
    writes (its signature count after each signature, its conditions) change
    nothing a decision reads, and re-deciding every unfinished request of a
    busy key on each of them grew with the backlog until the operator fell behind.
    """
    if not memo.signrequests.key_changed(namespace, name, None if type == "DELETED" else body):
        return
    _decide_again(memo, namespace, (signing_keys, policies_by_namespace, keys_by_namespace), key=name)


@kopf.on.event(GROUP, VERSION, "signingpolicies")
async def policy_changed_for_requests(namespace: str, memo: kopf.Memo, signing_keys: kopf.Index,
                                      policies_by_namespace: kopf.Index, keys_by_namespace: kopf.Index,
                                      **_: Any) -> None:
    """A policy changed: every waiting request of the namespace decides again."""
    _decide_again(memo, namespace, (signing_keys, policies_by_namespace, keys_by_namespace))

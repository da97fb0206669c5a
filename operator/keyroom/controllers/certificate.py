"""The Certificate reconciler: a mirror of the signer's record, and the publisher of public material.

Like SigningKeys, a pass over a Certificate (one scheduler for all of them:
:class:`keyroom.controllers.daemon.Scheduler`) names it to the signer
("reconcile team-a/release-cert, uid U"). The signer reads the spec, the key,
the CA and the policies itself, issues, renews, revokes and publishes CRLs
(:mod:`keyroom.signer.issuing`) and answers with its record. The pass writes
that into status with conditions and events, publishes the certificate into
the Secret ``spec.secretName`` (``tls.crt``: the certificate and the CAs above
it, ``ca.crt``: the root) and a CA's CRL into the ConfigMap ``<name>-crl``; the
next pass comes at the next renewal, CRL refresh or expiry, or when the
Certificate, its key or its CA changes.
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import json
from typing import Any, Mapping

import kopf
import kubernetes

from keyroom import conditions, kubeclient, schedule
from keyroom.api.common import CERTIFICATE_LABEL, CERTIFICATE_SECRET_TYPE, GROUP, VERSION
from keyroom.controllers import daemon, kube, signingkey
from keyroom.signer.client import SignerClient, SignerError

_MAX_BACKOFF = 60.0
#: when a status computed from a stale body was refused, the next pass at the latest
_STALE_RETRY = datetime.timedelta(seconds=5)
#: failures only a change of the object fixes: its next pass waits for that change. Every other failure is
#: asked about again (1 s doubling to a minute), also the Stalled ones: a PIN, a token or RBAC fixed elsewhere
#: ends them without a change to the object.
_FIXED_BY_A_CHANGE = {"CertificateMismatch", "InvalidRequest"}
#: signer failures that only a change of configuration fixes
_STALLING = {"SignerUnauthenticated", "SignerForbidden", "SignerNotConfigured", "CertificateMismatch",
             "InvalidRequest", "PinIncorrect", "PinLocked", "TokenNotFound", "ModuleNotFound"}
#: why a certificate waits, as the Issuing condition shows it
_ISSUING = {"KeyNotReady", "IssuerNotReady", "AwaitingExternalCertificate", "InvalidExternalCertificate",
            "ProfileViolation", "KeyReplaced"}


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def crl_config_map_name(name: str) -> str:
    return f"{name}-crl"


def issuer_of(spec: Mapping) -> str:
    issuer = spec.get("issuerRef") or {}
    if "ca" in issuer:
        return f"ca/{issuer['ca']['name']}"
    return "external" if "external" in issuer else "selfSigned"


# ---------------------------------------------------------------- pure steps

def desired_status(*, spec: Mapping, status: Mapping, record: Mapping | None, generation: int,
                   at: datetime.datetime, name: str, error: SignerError | None = None) -> dict:
    """The whole status of a Certificate from the signer's record, the clock and the last error."""
    if record is None:  # the signer could not be asked: what is shown stays, conditions say why
        kept = {k: v for k, v in status.items() if k not in ("conditions", "message", "observedGeneration")}
        current = {"notAfter": status.get("notAfter")} if status.get("certificate") else None
        revoked = {"since": status["revokedAt"]} if status.get("revokedAt") else None
        waiting = None
    else:
        kept = {}
        current, revoked, waiting = record.get("current"), record.get("revoked"), record.get("waiting")
    expired = bool(current and current.get("notAfter") and schedule.parse_time(current["notAfter"]) <= at)
    updates = []
    if error is not None:
        stalled = error.reason in _STALLING
        message = f"{error} ({error.reason})"
        updates += [conditions.condition("Stalled", stalled, error.reason, message, generation=generation),
                    conditions.condition("Reconciling", not stalled, error.reason, message, generation=generation)]
    elif revoked:
        # final: nothing will make a revoked certificate usable again, so GitOps tools must not wait for it
        message = f"revoked ({revoked.get('reason', 'unspecified')}) since {revoked['since']}"
        updates += [conditions.condition("Stalled", True, "Revoked", message, generation=generation),
                    conditions.condition("Reconciling", False, "Revoked", "", generation=generation)]
    else:
        updates += [conditions.condition("Stalled", False, "Reconciled", "", generation=generation),
                    conditions.condition("Reconciling", False, "Reconciled", "", generation=generation)]
    if revoked:
        ready = ("Revoked", f"revoked ({revoked.get('reason', 'unspecified')}) since {revoked['since']}: no new "
                            "signature embeds it")
    elif current is None:
        ready = ((waiting or {}).get("reason") or (error.reason if error else "Issuing"),
                 (waiting or {}).get("message") or (str(error) if error else "issuing the first certificate"))
    elif expired:
        ready = ("Expired", f"the certificate expired at {current['notAfter']}"
                            + (f"; {waiting['message']}" if waiting else ""))
    else:
        ready = None
    if ready is None:
        message = f"valid until {current['notAfter']}, renewed from {current.get('renewalTime') or status.get('renewalTime')}"
        if waiting:
            message += f"; {waiting['message']}"
        updates.append(conditions.condition("Ready", True, "Issued", message, generation=generation))
    else:
        message = ready[1]
        updates.append(conditions.condition("Ready", False, ready[0], ready[1], generation=generation))
    issuing = waiting is not None and waiting.get("reason") in _ISSUING and not revoked
    updates += [
        conditions.condition("Issuing", issuing or (current is None and not revoked),
                             (waiting or {}).get("reason") or ("Issuing" if current is None else "Issued"),
                             (waiting or {}).get("message") or "", generation=generation),
        conditions.condition("Revoked", bool(revoked), "Revoked" if revoked else "NotRevoked",
                             f"since {revoked['since']}" if revoked else "", generation=generation),
        conditions.condition("Expired", expired, "Expired" if expired else "Valid",
                             f"at {current['notAfter']}" if expired else "", generation=generation),
    ]
    result: dict[str, Any] = {**kept, "observedGeneration": generation, "message": message,
                              "conditions": conditions.merge(status.get("conditions"), updates,
                                                             now=schedule.format_time(at))}
    if record is not None:
        shown = record.get("current") or {}
        result.update({field: shown.get(field) for field in
                       ("serialNumber", "notBefore", "notAfter", "renewalTime", "fingerprint", "keyVersion",
                        "certificate", "chain")})
        result.update(revision=record.get("revision", 0), csr=record.get("csr"),
                      issuer=issuer_of(spec), pool=record.get("pool") or None,
                      revokedAt=(revoked or {}).get("since"))
        if record.get("crl"):
            crl = record["crl"]
            result["crl"] = {"number": crl["number"], "thisUpdate": crl["thisUpdate"],
                             "nextUpdate": crl["nextUpdate"], "revoked": len(crl["revokedSerials"]),
                             "configMap": crl_config_map_name(name)}
    return {k: v for k, v in result.items() if v is not None}


def status_patch(current: Mapping, desired: Mapping) -> dict | None:
    patch = {k: v for k, v in desired.items() if current.get(k) != v}
    patch.update({k: None for k in current if k not in desired})
    return patch or None


def events(status: Mapping, desired: Mapping) -> list[tuple[str, str, str]]:
    """(type, reason, message) for what changed between the status shown and the new one."""
    found = []
    before, after = status.get("revision", 0), desired.get("revision", 0)
    if after > before:
        reason = "Issued" if before == 0 else "Renewed"
        found.append(("Normal", reason, f"certificate {desired.get('serialNumber')} for key version "
                                        f"{desired.get('keyVersion')}, valid until {desired.get('notAfter')} "
                                        f"(revision {after})"))
    if desired.get("revokedAt") and not status.get("revokedAt"):
        found.append(("Warning", "Revoked", f"revoked since {desired['revokedAt']}"))
    if desired.get("crl") and (status.get("crl") or {}).get("number") != desired["crl"]["number"]:
        found.append(("Normal", "CrlPublished", f"CRL {desired['crl']['number']} lists {desired['crl']['revoked']} "
                                                f"revoked certificate(s); in ConfigMap {desired['crl']['configMap']}"))
    ready_before = conditions.find(status.get("conditions") or [], "Ready") or {}
    ready_after = conditions.find(desired["conditions"], "Ready")
    if ready_after["status"] != "True" and ready_after["reason"] != ready_before.get("reason") \
            and ready_after["reason"] not in ("Revoked",):
        found.append(("Warning", ready_after["reason"], ready_after["message"]))
    return found


def secret_body(*, name: str, namespace: str, owner: Mapping, current: Mapping) -> dict:
    """The Secret of a Certificate: tls.crt (the certificate and the CAs below the root), ca.crt (the root)."""
    chain = current.get("chain") or ""
    root = current.get("root") or current["certificate"]
    intermediates = chain.replace(root, "") if chain else ""
    return {
        "apiVersion": "v1", "kind": "Secret", "type": CERTIFICATE_SECRET_TYPE,
        "metadata": {"name": name, "namespace": namespace, "labels": {CERTIFICATE_LABEL: owner["name"]},
                     "ownerReferences": [_owner(owner)]},
        "data": {"tls.crt": base64.b64encode((current["certificate"] + intermediates).encode()).decode(),
                 "ca.crt": base64.b64encode(root.encode()).decode()},
    }


def crl_config_map_body(*, namespace: str, owner: Mapping, crl: Mapping, current: Mapping | None) -> dict:
    data = {"ca.crl": crl["crl"]}
    if current is not None:
        data["ca.crt"] = current["certificate"]
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": crl_config_map_name(owner["name"]), "namespace": namespace,
                     "labels": {CERTIFICATE_LABEL: owner["name"]}, "ownerReferences": [_owner(owner)]},
        "data": data,
    }


def _owner(owner: Mapping) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Certificate", "name": owner["name"], "uid": owner["uid"],
            "controller": True, "blockOwnerDeletion": False}


def next_wakeup(record: Mapping | None, at: datetime.datetime) -> datetime.datetime | None:
    moments = []
    if record is not None:
        if record.get("nextChangeAt"):
            moments.append(schedule.parse_time(record["nextChangeAt"]))
        current = record.get("current") or {}
        if current.get("notAfter") and schedule.parse_time(current["notAfter"]) > at:
            moments.append(schedule.parse_time(current["notAfter"]))
    return min(moments, default=None)


# ---------------------------------------------------------------- I/O

def _apply(kind: str, body: dict) -> None:
    """Server-side apply of a Secret or ConfigMap the operator owns (it has no right to read them)."""
    core = kubernetes.client.CoreV1Api(kubeclient.api_client())
    call = core.patch_namespaced_secret if kind == "Secret" else core.patch_namespaced_config_map
    call(body["metadata"]["name"], body["metadata"]["namespace"], body, field_manager="keyroom-operator",
         force=True, _content_type="application/apply-patch+yaml", _preload_content=False)


async def publish(kind: str, body: dict) -> None:
    await asyncio.to_thread(_apply, kind, body)


async def reconcile(*, body: Mapping, signer: SignerClient | None, at: datetime.datetime,
                    logger: Any) -> tuple[datetime.datetime | None, Mapping | None]:
    """One pass over one Certificate; returns (when the next pass is due by the clock, the signer's record)."""
    meta, spec, status = body["metadata"], body["spec"], body.get("status") or {}
    record, error = None, None
    try:
        if signer is None:
            raise SignerError("SignerNotConfigured", "the operator has no signer: set KEYROOM_SIGNER_URL")
        record = await signer.reconcile_certificate(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])
    except SignerError as failure:
        error = failure
        logger.warning(f"certificate {meta['namespace']}/{meta['name']}: {failure} ({failure.reason})")
    owner = {"name": meta["name"], "uid": meta["uid"]}
    if record is not None:
        try:
            if spec.get("secretName") and record.get("current"):
                await publish("Secret", secret_body(name=spec["secretName"], namespace=meta["namespace"], owner=owner,
                                                    current=record["current"]))
            if record.get("crl"):
                await publish("ConfigMap", crl_config_map_body(namespace=meta["namespace"], owner=owner,
                                                               crl=record["crl"], current=record.get("current")))
        except kubernetes.client.ApiException as failure:
            reason = "PublishForbidden" if failure.status in (403, 422) else "PublishFailed"
            error = SignerError(reason, f"cannot publish the certificate or CRL: {failure.status} "
                                        f"{_api_message(failure)}")
    desired = desired_status(spec=spec, status=status, record=record, generation=meta["generation"], at=at,
                             name=meta["name"], error=error)
    patch = status_patch(status, desired)
    if patch:
        try:
            await kube.patch_status(plural="certificates", namespace=meta["namespace"], name=meta["name"],
                                    status=patch, resource_version=meta.get("resourceVersion"))
        except kube.Conflict:
            # Computed from a body that is no longer current: the newer version's event brings another pass.
            return at + _STALE_RETRY, record
        for kind, reason, message in events(status, desired):
            (kopf.warn if kind == "Warning" else kopf.info)(body, reason=reason, message=message)
    if error is not None:
        raise error
    return next_wakeup(record, at), record


def _api_message(failure: kubernetes.client.ApiException) -> str:
    try:
        return json.loads(failure.body).get("message", "")
    except (TypeError, ValueError):
        return str(failure.reason)


# ---------------------------------------------------------------- the passes and their wake-ups

@kopf.on.startup()
async def setup_certificates(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
    #: namespace -> name -> (its key's name, its CA's name or None, what of it the signer acts on)
    memo.certificate_refs = {}

    async def one_pass(body: dict) -> datetime.datetime | None:
        return await _pass(body, memo=memo, settings=settings)
    memo.certificates = daemon.Scheduler("certificate", one_pass, max_backoff=_MAX_BACKOFF)


@kopf.on.cleanup()
async def stop_certificates(memo: kopf.Memo, **_: Any) -> None:
    await memo.certificates.stop()


def _wake(memo: kopf.Memo, namespace: str, *, key: str | None = None, ca: str | None = None,
          name: str | None = None) -> None:
    for other, (key_name, ca_name, _) in list(memo.certificate_refs.get(namespace, {}).items()):
        if (name is not None and other == name) or (key is not None and key_name == key) or \
                (ca is not None and ca_name == ca):
            memo.certificates.wake((namespace, other))


async def _pass(body: dict, *, memo: kopf.Memo, settings: kopf.OperatorSettings) -> datetime.datetime | None:
    """One scheduled pass over one Certificate (see :class:`keyroom.controllers.daemon.Scheduler`)."""
    meta = body["metadata"]
    body = await daemon.write_first_status(plural="certificates", body=body,
                                           message="asking the signer for the certificate")
    shown = body.get("status") or {}
    try:
        due, record = await reconcile(body=body, signer=memo.get("signer"), at=now(),
                                      logger=kopf.ObjectLogger(body=kopf.Body(body), settings=settings))
    except SignerError as error:
        raise (daemon.Stalled if error.reason in _FIXED_BY_A_CHANGE else daemon.Retry)(str(error)) from None
    wake_issued, wake_issuer = follow_ups(spec=body["spec"], shown=shown, record=record)
    if wake_issued:
        _wake(memo, meta["namespace"], ca=meta["name"])
    if wake_issuer is not None:
        _wake(memo, meta["namespace"], name=wake_issuer)
    return due


def follow_ups(*, spec: Mapping, shown: Mapping, record: Mapping | None) -> tuple[bool, str | None]:
    """Whom a pass wakes, from what changed between the status shown before it and the signer's record (pure).

    A CA wakes the certificates it issued when its own certificate, its
    revocation or its CRL changed; a certificate wakes its CA when it was
    just revoked, so that the CA's next CRL lists it. Only changes wake: a
    CA woken by every pass of a revoked certificate it issued, which it
    woke in turn, made the two ask the signer and publish the CRL in a loop.
    """
    if record is None:
        return False, None
    crl_number = (record.get("crl") or {}).get("number")
    wake_issued = bool(spec.get("isCA")) and (
        record.get("revision", 0) != shown.get("revision", 0)
        or bool(record.get("revoked")) != bool(shown.get("revokedAt"))
        or (crl_number is not None and crl_number != (shown.get("crl") or {}).get("number")))
    issuer = (spec.get("issuerRef") or {}).get("ca")
    newly_revoked = bool(record.get("revoked")) and not shown.get("revokedAt")
    return wake_issued, issuer["name"] if issuer and newly_revoked else None


def _seen(body: Mapping) -> tuple:
    """What of a Certificate the signer acts on, besides the clock: its spec (generation), annotations, deletion."""
    meta = body["metadata"]
    return meta.get("generation"), json.dumps(meta.get("annotations") or {}, sort_keys=True), \
        meta.get("deletionTimestamp")


@kopf.on.event(GROUP, VERSION, "certificates")
async def certificate_changed(body: kopf.Body, type: str | None, namespace: str, name: str, memo: kopf.Memo,
                              **_: Any) -> None:
    # async on purpose: Kopf runs plain functions in worker threads, and the scheduler is not thread-safe
    place = (namespace, name)
    refs = memo.certificate_refs.setdefault(namespace, {})
    if type == "DELETED" or body["metadata"].get("deletionTimestamp"):
        memo.certificates.forget(place)
        refs.pop(name, None)
        if not refs:
            del memo.certificate_refs[namespace]
        _wake(memo, namespace, ca=name)  # the certificates a deleted CA issued show it
        return
    known = refs.get(name)
    seen = _seen(body)
    refs[name] = (body["spec"]["keyRef"]["name"], ((body["spec"].get("issuerRef") or {}).get("ca") or {}).get("name"),
                  seen)
    # a status write (a pass's own) changes nothing the signer acts on: the body is kept, no pass follows
    memo.certificates.seen(body, wake=known is None or known[2] != seen)
    if known is None or known[2] != seen:
        _wake(memo, namespace, ca=name)  # the certificates a CA issued follow its changes


@signingkey.on_key_event
async def key_changed_for_certificates(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    _wake(memo, namespace, key=name)

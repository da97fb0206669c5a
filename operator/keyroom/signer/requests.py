"""Signing SignRequests: the signer decides too, and signs each request at most once.

The operator names a request (namespace, name, UID) and the digests it saw.
The signer does not take its word for anything: it reads the SignRequest, its
SigningKey and the namespace's SigningPolicies from the API server with its
own read-only identity, checks that the UID and the digests are those the
operator named, and runs the same policy engine (``keyroom.policy.decide``).
Only when that says Approved does it sign. A compromised operator alone can
therefore not obtain a signature.

Exactly once: before the first ``C_Sign`` of a request the signer appends an
Intent entry to its audit log; after the last, it stores the signatures
(fsynced) and appends a Signed entry. A repeated call for the same UID
(an operator retry after a crash or a timeout, either side restarted) gets the
stored signatures back and nothing is signed again. An intent left open by a
crash is resolved at start-up, never re-signed blindly: if the signatures were
stored, the Signed entry is completed from them; if not, no signature left the
signer, and an Abandoned entry records that before the request may be tried
again. Calls for one request are serialised; one-time keys are serialised per
key, so two requests cannot both consume one.
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import pathlib
import time
from typing import Any, Awaitable, Callable

import kubernetes

from keyroom import kubeclient, policy
from keyroom.api.common import GROUP, VERSION
from keyroom.signer import audit, hsm
from keyroom.signer.client import digests_fingerprint

logger = logging.getLogger("keyroom.signer")

_CHECKPOINT_INTERVAL = 1.0


class Refused(Exception):
    """The signer will not sign this request; ``reason`` is a CamelCase code, ``entry`` the audit entry."""

    def __init__(self, reason: str, message: str, *, status: int = 403, entry: dict | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.entry = entry


class ClusterReader:
    """The signer's read-only view of the API server, and the checkpoint ConfigMap it writes."""

    def __init__(self, *, namespace: str) -> None:
        self.namespace = namespace
        self._custom: kubernetes.client.CustomObjectsApi | None = None
        self._core: kubernetes.client.CoreV1Api | None = None

    def _apis(self) -> tuple[kubernetes.client.CustomObjectsApi, kubernetes.client.CoreV1Api]:
        if self._custom is None:
            client = kubeclient.api_client()
            self._custom, self._core = kubernetes.client.CustomObjectsApi(client), kubernetes.client.CoreV1Api(client)
        return self._custom, self._core

    def _get(self, plural: str, namespace: str, name: str) -> dict | None:
        try:
            return self._apis()[0].get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    async def request_key_policies(self, namespace: str, name: str) -> tuple[dict | None, dict | None, list[dict]]:
        """The SignRequest, its SigningKey and the namespace's SigningPolicies, read fresh and concurrently."""
        request_read = asyncio.to_thread(self._get, "signrequests", namespace, name)
        policies_read = asyncio.to_thread(
            lambda: self._apis()[0].list_namespaced_custom_object(GROUP, VERSION, namespace,
                                                                  "signingpolicies")["items"])
        request, policies = await asyncio.gather(request_read, policies_read)
        key = None
        if request is not None:
            key = await asyncio.to_thread(self._get, "signingkeys", namespace, request["spec"]["keyRef"]["name"])
        return request, key, policies

    def read_checkpoint(self) -> audit.Head | None:
        try:
            found = self._apis()[1].read_namespaced_config_map(audit.CHECKPOINT_NAME, self.namespace)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise
        data = found.data or {}
        return audit.Head(int(data["index"]), data["entryHash"]) if "index" in data else None

    def write_checkpoint(self, head: audit.Head) -> None:
        body = {"metadata": {"name": audit.CHECKPOINT_NAME, "labels": {"app.kubernetes.io/part-of": "keyroom"}},
                "data": {"index": str(head.index), "entryHash": head.hash,
                         "updatedAt": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}
        core = self._apis()[1]
        try:
            core.patch_namespaced_config_map(audit.CHECKPOINT_NAME, self.namespace, body)
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise
            core.create_namespaced_config_map(self.namespace, body)


class RequestSigner:
    """Checks, signs and records SignRequests; one per signer process."""

    def __init__(self, *, state_dir: pathlib.Path, reader: ClusterReader,
                 in_token: Callable[[str, Callable[[hsm.Token], Any]], Awaitable[Any]],
                 keep_results: datetime.timedelta = datetime.timedelta(days=30)) -> None:
        self.state_dir = state_dir
        #: how long signatures are kept for retries (well beyond any finished request's TTL)
        self.keep_results = keep_results
        self.reader = reader
        self._in_token = in_token
        self.log: audit.AuditLog | None = None
        self.error: str | None = "the audit log is not open yet"
        self._locks: dict[str, asyncio.Lock] = {}
        self._head_changed = asyncio.Event()
        self._checkpointed: audit.Head | None = None

    # ------------------------------------------------------------ start-up and checkpoint

    async def open(self) -> None:
        """Verify the log against the checkpoint, then resolve intents a crash left open. Retries until done."""
        while self.log is None:
            try:
                checkpoint = await asyncio.to_thread(self.reader.read_checkpoint)
                self.log = await asyncio.to_thread(audit.AuditLog, self.state_dir, checkpoint=checkpoint)
                self._checkpointed = checkpoint
            except audit.AuditError as error:
                self.error = f"the audit log failed verification: {error}"
                logger.error("%s; refusing to sign until it is repaired", self.error)
                return
            except Exception as error:  # API server unreachable: cannot check the checkpoint yet
                self.error = f"cannot read the audit checkpoint: {type(error).__name__}"
                logger.warning("%s; retrying", self.error)
                await asyncio.sleep(2)
        for uid, record in list(self.log.requests.items()):
            if record.open_intent:
                self._resolve(uid, record)
        pruned = self.log.prune_results(self.keep_results)
        if pruned:
            logger.info("forgot the stored signatures of %d request(s) signed over %s ago", pruned, self.keep_results)
        self.error = None
        self._head_changed.set()
        logger.info("audit log verified: %s entries", self.log.head.index + 1 if self.log.head else 0)

    def _resolve(self, uid: str, record: audit.RequestRecord) -> None:
        """An intent without a result: complete it from stored signatures, or record that none left."""
        result = self.log.load_result(uid)
        if result is not None and result.get("intent") == record.intent["index"]:
            self._append_signed(record.intent, result)
            logger.info("completed the record of %s from its stored signatures", uid)
        else:
            self.log.append("Abandoned", request=record.intent["request"], intent=record.intent["index"],
                            message="the signer stopped between intent and result; no signature was stored "
                                    "or returned, so the request may be signed again")
            logger.warning("abandoned the unfinished attempt %d for %s", record.intent["index"], uid)

    async def keep_checkpoint(self) -> None:
        """Write the chain head to the checkpoint ConfigMap whenever it moved, at most once a second."""
        while True:
            await self._head_changed.wait()
            self._head_changed.clear()
            head = self.log.head if self.log else None
            if head is not None and head != self._checkpointed:
                try:
                    await asyncio.to_thread(self.reader.write_checkpoint, head)
                    self._checkpointed = head
                except Exception as error:
                    logger.warning("cannot write the audit checkpoint: %s", type(error).__name__)
                    self._head_changed.set()
            await asyncio.sleep(_CHECKPOINT_INTERVAL)

    # ------------------------------------------------------------ signing

    def _append_signed(self, intent: dict, result: dict) -> dict:
        entry = self.log.append(
            "Signed", request=intent["request"], key=intent["key"], intent=intent["index"],
            signatures=[{"name": s["name"], "hash": audit.digest_of(base64.b64decode(s["value"]))}
                        for s in result["signatures"]])
        self._head_changed.set()
        return entry

    def _refuse(self, reason: str, message: str, *, request_ref: dict, status: int = 403, **fields: Any) -> Refused:
        entry = self.log.append("Refused", request=request_ref, reason=reason, message=message, **fields)
        self._head_changed.set()
        logger.warning("refused %s/%s: %s (%s)", request_ref["namespace"], request_ref["name"], message, reason)
        return Refused(reason, message, status=status, entry=entry)

    @staticmethod
    def _answer(result: dict, entry: dict) -> dict:
        return {**result, "audit": {"index": entry["index"], "entryHash": entry["hash"]}}

    async def sign(self, *, namespace: str, name: str, uid: str, fingerprint: str) -> dict:
        """Sign the request once; repeated calls return the same signatures."""
        if self.log is None or self.error:
            raise Refused("AuditLogUnavailable", self.error or "the audit log is not open", status=503)
        lock = self._locks.setdefault(uid, asyncio.Lock())
        async with lock:
            try:
                return await self._sign_locked(namespace=namespace, name=name, uid=uid, fingerprint=fingerprint)
            finally:
                if not lock._waiters:  # noqa: SLF001  (drop idle locks so the dict stays small)
                    self._locks.pop(uid, None)

    async def _sign_locked(self, *, namespace: str, name: str, uid: str, fingerprint: str) -> dict:
        record = self.log.requests.get(uid)
        if record is not None and record.signed is not None:
            result = self.log.load_result(uid)
            if result is None:
                raise Refused("AlreadySigned", f"request {uid} was signed (audit entry {record.signed['index']}) "
                                               "and its signatures are no longer kept", status=409)
            return self._answer(result, record.signed)
        if record is not None and record.open_intent:
            self._resolve(uid, record)  # an earlier attempt failed half-way in this process
            if record.signed is not None:
                return self._answer(self.log.load_result(uid), record.signed)

        request_ref = {"namespace": namespace, "name": name, "uid": uid}
        try:
            request, key, policies = await self.reader.request_key_policies(namespace, name)
        except Exception as error:  # never sign on a view that could not be read
            raise Refused("ApiServerUnavailable", f"cannot read the request from the API server: "
                                                  f"{type(error).__name__}", status=503) from None
        if request is None or request["metadata"]["uid"] != uid:
            raise self._refuse("RequestNotFound", f"no SignRequest {namespace}/{name} with UID {uid}",
                               request_ref=request_ref, status=404)
        spec, status = request["spec"], request.get("status") or {}
        if digests_fingerprint(spec) != fingerprint:
            raise self._refuse("DigestsMismatch", "the digests the operator named differ from the SignRequest's",
                               request_ref=request_ref, status=409)
        if status.get("phase") in ("Signed", "Denied", "Expired", "Failed"):
            raise self._refuse("RequestFinished", f"the request is already {status['phase']}",
                               request_ref=request_ref, status=409)
        key_meta = (key or {}).get("metadata") or {}
        one_time = (key or {}).get("spec", {}).get("usage") == "OneTime"
        lock = self._locks.setdefault("key:" + key_meta["uid"], asyncio.Lock()) if one_time else None
        if lock is not None:
            await lock.acquire()
        try:
            now = datetime.datetime.now(datetime.timezone.utc)
            recent = [policy.Signature(at, key_name, count)
                      for at, key_name, count in self.log.recent_signatures(namespace, since=now - policy.RATE_WINDOW)]
            # The signer knows only this key's labels: signatures of other keys count under the key's own labels.
            decision = policy.decide(request, key=key, policies=policies, at=now, recent=recent)
            consumed_by = self.log.consumed.get(key_meta.get("uid", ""))
            if decision.phase == "Approved" and one_time and consumed_by not in (None, uid):
                decision = policy.Decision("Failed", "KeyConsumed", f"one-time key {key_meta['name']} already signed "
                                                                    f"request {consumed_by}")
            if decision.phase != "Approved":
                raise self._refuse(decision.reason, decision.message, request_ref=request_ref)
            key_info = {"name": key_meta["name"], "uid": key_meta["uid"], "version": decision.key_version,
                        "usage": key["spec"].get("usage", "Reusable")}
            intent = self.log.append(
                "Intent", request=request_ref, requester=spec["requester"]["username"],
                approvers=[a["user"] for a in decision.approvals if a["counted"] and a["decision"] == "Approve"],
                policies=list(decision.policies), key=key_info, reason=spec.get("reason", ""),
                digestAlgorithm=spec.get("digestAlgorithm", "SHA256"),
                digests=[{"name": d["name"], "value": d["value"].lower()} for d in spec["digests"]])
            handle = hsm.KeyHandle(namespace=namespace, name=key_meta["name"], uid=key_meta["uid"],
                                   version=decision.key_version)
            algorithm = spec.get("digestAlgorithm", "SHA256")
            values = [bytes.fromhex(d["value"]) for d in spec["digests"]]
            started = time.perf_counter()
            # One session signs the batch: SoftHSM2 serialises signing, so sessions in parallel only add overhead.
            signatures = await self._in_token("sign", lambda token: [
                token.sign(handle, digest=value, digest_algorithm=algorithm) for value in values])
            result = {"intent": intent["index"], "keyVersion": decision.key_version,
                      "signedAt": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                      "signatures": [{"name": d["name"], "value": base64.b64encode(s).decode()}
                                     for d, s in zip(spec["digests"], signatures)]}
            self.log.store_result(uid, result)
            entry = self._append_signed(intent, result)
            logger.info("signed %s/%s: %d digest(s) with %s v%d in %.0f ms (audit entry %d)", namespace, name,
                        len(values), key_meta["name"], decision.key_version, (time.perf_counter() - started) * 1e3,
                        entry["index"])
            return self._answer(result, entry)
        finally:
            if lock is not None:
                lock.release()

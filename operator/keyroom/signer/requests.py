"""The signer's authority: every private-key operation, derived from objects it reads itself.

The operator only names objects. For a SigningKey ("reconcile team-a/release,
uid U") the signer reads the key's spec and applies it to its own record
(:mod:`keyroom.signer.keys`): generation, rotation, the keepVersions trim,
destruction at its own ``destroyAt``. For a SignRequest (namespace, name, UID
and the digests the operator saw) it reads the request, the namespace's keys
and policies with its own read-only identity, checks the UID and the digests,
and runs the same policy engine as the operator (``keyroom.policy.decide``:
approvals, matching builds, windows, limits) on metadata and spec only, with what its own record says of the key's
material. Only when that says Approved does it sign. No status is read, so a
compromised operator alone cannot obtain a signature, a retired version or a
second use of a one-time key.

Exactly once: before the first ``C_Sign`` of a request the signer appends an
Intent entry to its audit log; after the last, it stores the signatures
(fsynced) and appends a Signed entry. A repeated call for the same UID
(an operator retry after a crash or a timeout, either side restarted) gets the
stored signatures back and nothing is signed again. An intent left open by a
crash is resolved at start-up, never re-signed blindly: if the signatures were
stored, the Signed entry is completed from them; if not, no signature left the
signer, and an Abandoned entry records that before the request may be tried
again. Calls for one request are serialised; everything touching one key
(one-time consumption, new versions, destruction) is serialised per key.

The log fails closed: it must match its checkpoint (a ConfigMap only the
signer writes), and signing stops when the checkpoint falls more than
``MAX_UNCHECKPOINTED`` entries behind. Only an administrator's explicit
new-chain instruction starts a new chain after a failure.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import datetime
import hashlib
import logging
import pathlib
import time
from typing import Any, Awaitable, Callable, Mapping

import kubernetes
from cryptography.hazmat.primitives import serialization

from keyroom import kubeclient, policy
from keyroom.api.common import GROUP, VERSION
from keyroom.api.signingpolicy import CERTIFICATE_FORMATS
from keyroom.signer import audit, certificates, formats, hsm, keys
from keyroom.signer.client import digests_fingerprint
from keyroom.signer.formats import apk, cosign

logger = logging.getLogger("keyroom.signer")

_CHECKPOINT_INTERVAL = 1.0
#: how far (in entries) the log may run ahead of its checkpoint before the signer stops signing: about two
#: minutes of a busy signer whose checkpoint writes fail, small enough that a cut is noticed
MAX_UNCHECKPOINTED = 256
#: a request's digests are signed in parts on several sessions at once, each part at least this many
#: (an ECDSA signature takes about 0.1 ms: a smaller part costs more in threads than it saves)
MIN_DIGESTS_PER_PART = 8
#: a key reconcile takes at most this many steps (each a token operation or a log entry) per call
_MAX_STEPS = 16
#: requests whose last "not yet" refusal is remembered (to audit a waiting request once per reason)
_MAX_WAITING = 100_000


def public_key_document(der: bytes) -> dict[str, str]:
    pem = serialization.load_der_public_key(der).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return {"publicKey": pem, "fingerprint": "sha256:" + hashlib.sha256(der).hexdigest()}




def _images(spec: Mapping) -> list[dict[str, str]]:
    """What a cosign request signs, for the audit log: each image's repository, tag (if named) and digest."""
    images = []
    for item in spec["digests"]:
        try:
            repository, tag = cosign.split_reference(item["name"])
        except formats.FormatError:
            repository, tag = item["name"], None  # refused when the payload is built; audited as named
        images.append({"reference": repository, **({"tag": tag} if tag else {}),
                       "digest": "sha256:" + item["value"].lower()})
    return images


class Refused(Exception):
    """The signer will not sign this request; ``reason`` is a CamelCase code, ``entry`` the audit entry."""

    def __init__(self, reason: str, message: str, *, status: int = 403, entry: dict | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.entry = entry


class ClusterReader:
    """The signer's read-only view of the API server, its checkpoint ConfigMap and the new-chain instruction."""

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

    def _list(self, plural: str, namespace: str, *, not_older_than: str | None = None) -> list[dict]:
        if not_older_than is None:
            return self._apis()[0].list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]
        return self._apis()[0].list_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, resource_version=not_older_than,
            resource_version_match="NotOlderThan")["items"]

    async def request_key_policies(self, namespace: str, name: str) -> tuple[dict | None, dict | None, list[dict]]:
        """The SignRequest and the SigningKey it names (quorum reads, the key's after the request's), then the
        namespace's SigningPolicies as the API server's cache holds them, at least as new as that read of the
        request.

        The policies are served from the watch cache (no etcd read) but never
        older than the request: any change to a policy made before the request
        was read is in them. Only the named key is read, not every key of the
        namespace: that list grew with the namespace (10,000 keys: megabytes
        per request); :meth:`keys` reads it when a rate limit needs it.
        """
        request = await asyncio.to_thread(self._get, "signrequests", namespace, name)
        if request is None:
            return None, None, []
        version = request.get("metadata", {}).get("resourceVersion") or None
        key_name = ((request.get("spec") or {}).get("keyRef") or {}).get("name")
        key, policies = await asyncio.gather(
            self.key(namespace, key_name) if key_name else _nothing(),
            asyncio.to_thread(self._list, "signingpolicies", namespace, not_older_than=version))
        return request, key, policies

    async def keys(self, namespace: str, *, not_older_than: str | None) -> list[dict]:
        """Every SigningKey of the namespace, as the API server's cache holds them, at least as new as a read."""
        return await asyncio.to_thread(self._list, "signingkeys", namespace, not_older_than=not_older_than)

    async def key(self, namespace: str, name: str) -> dict | None:
        return await asyncio.to_thread(self._get, "signingkeys", namespace, name)

    async def certificate(self, namespace: str, name: str) -> dict | None:
        return await asyncio.to_thread(self._get, "certificates", namespace, name)

    async def certificates(self, namespace: str) -> list[dict]:
        return await asyncio.to_thread(self._list, "certificates", namespace)

    async def policies(self, namespace: str) -> list[dict]:
        return await asyncio.to_thread(self._list, "signingpolicies", namespace)

    def _config_map(self, name: str) -> dict[str, str] | None:
        try:
            found = self._apis()[1].read_namespaced_config_map(name, self.namespace)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise
        return dict(found.data or {})

    def read_checkpoint(self) -> audit.Head | None:
        """The checkpointed head; None when there is no checkpoint. A checkpoint that says nothing fails."""
        data = self._config_map(audit.CHECKPOINT_NAME)
        if data is None:
            return None
        try:
            return audit.Head(int(data["index"]), str(data["entryHash"]))
        except (KeyError, ValueError):
            raise audit.AuditError(f"the checkpoint ConfigMap {audit.CHECKPOINT_NAME} holds no valid index and "
                                   "entryHash: it was emptied or edited") from None

    def read_new_chain(self) -> dict[str, str] | None:
        return self._config_map(audit.NEW_CHAIN_NAME)

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


async def _nothing() -> None:
    return None


def _strip_status(body: Mapping | None) -> dict | None:
    """An object as the signer may decide on it: metadata and spec, never status."""
    if body is None:
        return None
    return {"metadata": body.get("metadata") or {}, "spec": body.get("spec") or {}}


def _public_key_der(record: keys.KeyRecord | None, version: int | None) -> bytes | None:
    found = record.versions.get(version) if record is not None and version is not None else None
    if found is None:
        return None
    return serialization.load_pem_public_key(found.public_key.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_state(record: keys.KeyRecord | None) -> policy.KeyState:
    """What the signer's own record says of a key's material."""
    if record is None:
        return policy.KeyState(current_version=None)
    current = record.current
    consumed = record.consumed_by
    return policy.KeyState(
        current_version=current.version if current else None,
        consumed_by=(consumed["name"] or keys.UNKNOWN_CONSUMER, consumed["uid"]) if consumed else (),
        destroyed=bool(record.versions) and all(v.state == "Destroyed" and not v.missing
                                                for v in record.versions.values()),
        missing_versions=tuple(sorted(v.version for v in record.versions.values() if v.missing)))


class RequestSigner:
    """The signer's authority: its log, and every private-key operation derived from objects it reads itself."""

    def __init__(self, *, state_dir: pathlib.Path, reader: ClusterReader,
                 in_token: Callable[[str, Callable[[hsm.Token], Any]], Awaitable[Any]],
                 keep_results: datetime.timedelta = datetime.timedelta(days=30),
                 max_unchecked: int = MAX_UNCHECKPOINTED,
                 mac_source: Callable[[], audit.Mac | None] | None = None, parallelism: int = 1) -> None:
        self.state_dir = state_dir
        #: how many parts of one request's digests are signed at once (each needs a session and a thread)
        self.parallelism = max(1, parallelism)
        #: the HSM-backed MAC of the log's entries, once the token is open (None: entries carry no MAC)
        self._mac_source = mac_source
        #: how long signatures are kept for retries (well beyond any finished request's TTL)
        self.keep_results = keep_results
        #: how many entries the log may run ahead of its checkpoint before signing stops
        self.max_unchecked = max_unchecked
        self.reader = reader
        self._in_token = in_token
        self.log: audit.AuditLog | None = None
        self.error: str | None = "the audit log is not open yet"
        self._locks: dict[str, asyncio.Lock] = {}
        self._head_changed = asyncio.Event()
        self._checkpointed: audit.Head | None = None
        #: the last "not yet" refusal audited per request, so that retries do not grow the log
        self._waiting: collections.OrderedDict[str, str] = collections.OrderedDict()

    # ------------------------------------------------------------ start-up and checkpoint

    async def open(self, *, retry_seconds: float = 5.0) -> None:
        """Verify the log against its checkpoint, then resolve intents a crash left open.

        A log that fails verification keeps the signer refusing (health says
        why) until an administrator's new-chain instruction names the
        checkpoint it sees; the signer looks for one every few seconds.
        """
        while self.log is None:
            mac = self._mac_source() if self._mac_source is not None else None
            if self._mac_source is not None and mac is None:
                self.error = "waiting for the HSM token, which holds the audit log's MAC key"
                await asyncio.sleep(min(retry_seconds, 0.5))
                continue
            try:
                checkpoint = await asyncio.to_thread(self.reader.read_checkpoint)
                try:
                    self.log = await asyncio.to_thread(audit.AuditLog, self.state_dir, checkpoint=checkpoint, mac=mac)
                    self._checkpointed = checkpoint
                except audit.AuditError as failure:
                    if not await self._new_chain_if_instructed(checkpoint, failure, mac):
                        raise
            except audit.AuditError as failure:
                message = f"the audit log failed verification: {failure}"
                if message != self.error:
                    logger.error("%s; refusing to sign until an administrator starts a new chain", message)
                self.error = message
                await asyncio.sleep(retry_seconds)
            except Exception as failure:  # API server unreachable: cannot check the checkpoint yet
                self.error = f"cannot read the audit checkpoint: {type(failure).__name__}"
                logger.warning("%s; retrying", self.error)
                await asyncio.sleep(retry_seconds)
        for uid, record in list(self.log.requests.items()):
            if record.open_intent:
                await self._resolve(uid, record)
        pruned = self.log.prune_results(self.keep_results)
        if pruned:
            logger.info("forgot the stored signatures of %d request(s) signed over %s ago", pruned, self.keep_results)
        self.error = None
        self._head_changed.set()
        logger.info("audit log verified: %s entries", self.log.head.index + 1 if self.log.head else 0)

    async def _new_chain_if_instructed(self, checkpoint: audit.Head | None, failure: audit.AuditError,
                                       mac: audit.Mac | None) -> bool:
        instruction = await asyncio.to_thread(self.reader.read_new_chain)
        if not instruction or instruction.get("supersedes") != audit.checkpoint_text(checkpoint):
            return False
        log = await asyncio.to_thread(audit.start_new_chain, self.state_dir, checkpoint=checkpoint,
                                      reason=instruction.get("reason", ""),
                                      instruction={**instruction, "failure": str(failure)}, mac=mac)
        try:
            # The new chain counts only once its checkpoint is written: otherwise the next start would
            # see a log that does not match the old checkpoint and refuse again, which is the safe side.
            await asyncio.to_thread(self.reader.write_checkpoint, log.head)
        except Exception:
            log.close()
            raise
        self.log, self._checkpointed = log, log.head
        logger.warning("started a new audit chain as instructed (%s); the old log was kept aside",
                       instruction.get("reason", ""))
        return True

    async def _resolve(self, uid: str, record: audit.RequestRecord) -> None:
        """An intent without a result: complete it from stored signatures, or record that none left."""
        result = self.log.load_result(uid)
        if result is not None and result.get("intent") == record.intent["index"]:
            await self._append_signed(record.intent, result)
            logger.info("completed the record of %s from its stored signatures", uid)
        else:
            await self._abandon(record.intent, "the signer stopped between intent and result; no signature was stored "
                                         "or returned, so the request may be signed again")
            logger.warning("abandoned the unfinished attempt %d for %s", record.intent["index"], uid)

    async def _append(self, event: str, **fields: Any) -> dict:
        # fsync in a worker thread: the event loop keeps accepting and authenticating meanwhile
        entry = await asyncio.to_thread(self.log.append, event, **fields)
        self._head_changed.set()
        return entry

    async def _abandon(self, intent: dict, message: str) -> None:
        await self._append("Abandoned", request=intent["request"], intent=intent["index"], message=message)

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

    def _check_open(self) -> None:
        """Refuse while the log is not verified, or has run too far ahead of its checkpoint."""
        if self.log is None or self.error:
            raise Refused("AuditLogUnavailable", self.error or "the audit log is not open", status=503)
        head, checkpointed = self.log.head, self._checkpointed
        behind = (head.index if head else -1) - (checkpointed.index if checkpointed else -1)
        if behind > self.max_unchecked:
            raise Refused("CheckpointBehind", f"the audit log is {behind} entries ahead of its checkpoint (at most "
                                              f"{self.max_unchecked}); signing resumes once the checkpoint is "
                                              "written", status=503)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _unlock_idle(self, name: str, lock: asyncio.Lock) -> None:
        if not lock._waiters:  # noqa: SLF001  (drop idle locks so the dict stays small)
            self._locks.pop(name, None)

    # ------------------------------------------------------------ keys

    async def reconcile_key(self, *, namespace: str, name: str, uid: str) -> dict:
        """Bring the signer's record of one SigningKey in line with its spec and the clock; return the record."""
        self._check_open()
        lock_name = "key:" + uid
        lock = self._lock(lock_name)
        async with lock:
            try:
                return await self._reconcile_key_locked(namespace=namespace, name=name, uid=uid)
            finally:
                self._unlock_idle(lock_name, lock)

    async def _reconcile_key_locked(self, *, namespace: str, name: str, uid: str) -> dict:
        known = self.log.keys.get(uid)
        if known is not None and known.name and (known.namespace, known.name) != (namespace, name):
            # A UID names one key for good: another name would make the signer read another object's spec
            # (or none, as if the key were gone) and act on this key's versions by it.
            raise Refused("KeyMismatch", f"UID {uid} is SigningKey {known.namespace}/{known.name}, not "
                                         f"{namespace}/{name}", status=409)
        try:
            body = await self.reader.key(namespace, name)
        except Exception as error:
            raise Refused("ApiServerUnavailable", f"cannot read the SigningKey: {type(error).__name__}",
                          status=503) from None
        if body is not None and body["metadata"]["uid"] != uid:
            body = None  # another object under the same name: this UID's key is gone
        record = self.log.keys.get(uid)
        if body is None and record is None:
            raise Refused("KeyNotFound", f"no SigningKey {namespace}/{name} with UID {uid}", status=404)
        spec = (body or {}).get("spec")
        if record is None:
            record = keys.KeyRecord(namespace, name, uid)
            if self.log.restarted:
                await self._adopt(record, spec, (body or {}).get("metadata", {}).get("annotations") or {})
                record = self.log.keys.get(uid, record)
        if not record.name:  # a record carried over a new chain knows only the key's UID
            record.namespace, record.name = namespace, name
        meta = (body or {}).get("metadata") or {}
        deleted = body is None or bool(meta.get("deletionTimestamp"))
        annotations = meta.get("annotations") or {}
        for _ in range(_MAX_STEPS):
            action = keys.next_action(spec=spec, annotations=annotations, deleted=deleted, record=record,
                                      at=datetime.datetime.now(datetime.timezone.utc))
            if action is None:
                break
            await self._act(action, record, spec)
            record = self.log.keys[uid]
        await self._check_material(record)
        record = self.log.keys.get(uid, record)
        answer = keys.mirror(record, spec=spec)
        retained = deleted and (spec or {}).get("deletionPolicy") == "Retain"
        answer.update(deleted=deleted, finished=deleted and (retained or all(
            v.state == "Destroyed" for v in record.versions.values())))
        return answer

    def _key_ref(self, record: keys.KeyRecord) -> dict:
        return {"namespace": record.namespace, "name": record.name, "uid": record.uid}

    def _handle(self, record: keys.KeyRecord, version: int) -> hsm.KeyHandle:
        return hsm.KeyHandle(namespace=record.namespace, name=record.name, uid=record.uid, version=version)

    async def _act(self, action: keys.Action, record: keys.KeyRecord, spec: Mapping | None) -> None:
        ref, version = self._key_ref(record), action.version
        if action.kind == "generate":
            handle, algorithm = self._handle(record, version), spec["algorithm"]
            try:
                der = await self._in_token("generate", lambda token: token.generate(handle, algorithm=algorithm))
            except hsm.HSMError as error:
                if error.reason != "KeyExists":
                    raise
                # generated before a crash that came before its log entry: this number is ours, take it
                der = await self._in_token("public_key", lambda token: token.public_key(handle))
            document = public_key_document(der)
            await self._append("KeyVersionGenerated", key=ref, version=version, algorithm=algorithm,
                         usage=spec.get("usage", "Reusable"), reason=action.reason,
                         rotationRequest=action.rotation_request, **document)
            logger.info("generated %s (%s)", handle.label, action.reason)
        elif action.kind == "disable":
            await self._append("KeyVersionDisabled", key=ref, version=version, reason=action.reason)
        elif action.kind == "schedule":
            await self._append("KeyDestructionScheduled", key=ref, version=version, reason=action.reason,
                         delay=(spec or {}).get("destructionDelay") or keys.DEFAULT_DESTRUCTION_DELAY)
        elif action.kind == "cancel":
            await self._append("KeyDestructionCancelled", key=ref, version=version, reason=action.reason)
        elif action.kind == "destroy":
            handle = self._handle(record, version)
            destroyed = await self._in_token("destroy", lambda token: token.destroy(handle))
            await self._append("KeyVersionDestroyed", key=ref, version=version, found=destroyed)
            logger.info("destroyed %s (%s)", handle.label, action.reason)
        else:
            raise AssertionError(f"unknown action {action.kind}")

    async def _check_material(self, record: keys.KeyRecord) -> None:
        """The current version's private key must still be in the token; record it when it is not."""
        current = record.current
        if current is None:
            return
        handle = self._handle(record, current.version)
        try:
            await self._in_token("find", lambda token: token.key_attributes(handle))
        except hsm.HSMError as error:
            if error.reason != "KeyNotFound":
                raise
            await self._missing(record, current.version)

    async def _missing(self, record: keys.KeyRecord, version: int) -> None:
        await self._append("KeyVersionMissing", key=self._key_ref(record), version=version,
                     message="the private key is not in the token: it was destroyed outside keyroom")
        logger.error("%s is missing from the token", self._handle(record, version).label)

    async def _adopt(self, record: keys.KeyRecord, spec: Mapping | None, annotations: Mapping[str, str]) -> None:
        """After a new chain: take the key's versions from the token (newest enabled, the rest disabled).

        The rotation request standing now counts as acted on: the newest version may well be its answer, and
        rotating again would push a version out of keepVersions.
        """
        objects = await self._in_token("list", lambda token: token.list_objects())
        numbers = sorted({o.handle.version for o in objects
                          if o.handle is not None and o.handle.uid == record.uid and o.object_class == "private_key"})
        ref = self._key_ref(record)
        for number in numbers:
            handle = self._handle(record, number)
            der = await self._in_token("public_key", lambda token: token.public_key(handle))
            await self._append("KeyVersionGenerated", key=ref, version=number,
                               algorithm=(spec or {}).get("algorithm", ""), usage=(spec or {}).get("usage", "Reusable"),
                               reason="Adopted", **public_key_document(der),
                               rotationRequest=annotations.get(keys.ROTATE_ANNOTATION) if number == numbers[-1] else None)
        for number in numbers[:-1]:
            await self._append("KeyVersionDisabled", key=ref, version=number, reason="Adopted")
        if numbers and (spec or {}).get("usage") == "OneTime" and record.uid not in self.log.keys_consumed():
            # Whether it signed before the log was lost is unknown: a one-time key is taken as used (fail closed).
            await self._append("KeyConsumed", key=ref, reason="the audit log was lost; a one-time key whose use "
                                                               "cannot be ruled out is taken as used")

    # ------------------------------------------------------------ requests

    async def _embedded_certificate(self, spec: Mapping, key_uid: str, version: int, at: datetime.datetime,
                                    request_ref: dict) -> certificates.Usable | None:
        """The certificate (and chain) a cms, authenticode or jar signature embeds, from the signer's records.

        The namespace's Certificates are read now, so a revocation in spec counts before it was recorded;
        an expired or revoked certificate, or one under a revoked CA, is never used.
        """
        if spec.get("format", "raw") not in CERTIFICATE_FORMATS:
            return None
        try:
            bodies = await self.reader.certificates(request_ref["namespace"])
        except Exception as error:
            raise Refused("ApiServerUnavailable", f"cannot read the Certificates: {type(error).__name__}",
                          status=503) from None
        specs = {b["metadata"]["uid"]: b.get("spec") or {} for b in bodies
                 if not b["metadata"].get("deletionTimestamp")}
        wanted = (spec.get("certificateRef") or {}).get("name")
        found = certificates.usable_certificate(self.log.certificates, specs, key_uid=key_uid, version=version,
                                                at=at, name=wanted)
        if isinstance(found, str):
            raise await self._refuse("NoCertificate", found, request_ref=request_ref, waiting=True)
        return found

    @staticmethod
    def _manifest(spec: Mapping) -> bytes:
        try:
            return base64.b64decode(spec.get("manifest") or "", validate=True)
        except ValueError:
            raise Refused("ManifestMismatch", "spec.manifest is not base64", status=422) from None

    async def _apk_signed_data(self, spec: Mapping, embedded: certificates.Usable,
                               request_ref: dict) -> list[tuple[str, bytes]]:
        """spec.apk's signed data blocks, if each carries the request's content digest and the chosen certificate."""
        try:
            blocks = [(item["scheme"], base64.b64decode(item["value"], validate=True))
                      for item in (spec.get("apk") or {}).get("signedData") or []]
            apk.check(blocks, digest=bytes.fromhex(spec["digests"][0]["value"]),
                      digest_algorithm=spec.get("digestAlgorithm", "SHA256"), certificate_der=embedded.certificate.der)
        except (KeyError, ValueError) as error:  # FormatError is a ValueError, as a bad base64 or hex is
            raise await self._refuse("SignedDataMismatch", f"spec.apk cannot be signed: {error}",
                                     request_ref=request_ref, status=422) from None
        return blocks

    async def _append_signed(self, intent: dict, result: dict) -> dict:
        return await self._append(
            "Signed", request=intent["request"], key=intent["key"], intent=intent["index"],
            signatures=[{"name": s["name"], "hash": audit.digest_of(base64.b64decode(s["value"]))}
                        for s in result["signatures"]])

    async def _refuse(self, reason: str, message: str, *, request_ref: dict, status: int = 403, waiting: bool = False,
                **fields: Any) -> Refused:
        """A refusal, audited; a "not yet" refusal only when its reason changed since the last one audited."""
        uid = request_ref["uid"]
        if waiting and self._waiting.get(uid) == reason:
            return Refused(reason, message, status=status)
        entry = await self._append("Refused", request=request_ref, reason=reason, message=message, **fields)
        if waiting:
            self._waiting[uid] = reason
            self._waiting.move_to_end(uid)
            while len(self._waiting) > _MAX_WAITING:
                self._waiting.popitem(last=False)
        else:
            self._waiting.pop(uid, None)
        logger.warning("refused %s/%s: %s (%s)", request_ref["namespace"], request_ref["name"], message, reason)
        return Refused(reason, message, status=status, entry=entry)

    @staticmethod
    def _answer(result: dict, entry: dict) -> dict:
        return {**result, "audit": {"index": entry["index"], "entryHash": entry["hash"]}}

    def outcome(self, uid: str) -> dict:
        """What the signer's record says of a request: Signed (with the signatures), Signing or Unsigned."""
        self._check_open()
        record = self.log.requests.get(uid)
        if record is None or (record.signed is None and not record.open_intent):
            return {"state": "Unsigned"}
        if record.signed is None:
            return {"state": "Signing"}
        result = self._stored(uid, record)
        if result is None:
            return {"state": "Signed", "audit": {"index": record.signed["index"],
                                                 "entryHash": record.signed["hash"]}}
        return {"state": "Signed", **self._answer(result, record.signed)}

    def _stored(self, uid: str, record: audit.RequestRecord) -> dict | None:
        """The stored signatures of a signed request, checked against its Signed entry (None: no longer kept)."""
        result = self.log.load_result(uid)
        expected = record.signed.get("signatures")
        if result is not None and expected is not None and audit.result_digest(result) != expected:
            logger.error("the stored signatures of %s do not match audit entry %d", uid, record.signed["index"])
            raise Refused("StoredSignaturesCorrupt", f"the stored signatures of request {uid} do not match its "
                                                     f"audit entry {record.signed['index']}: the signer's volume "
                                                     "was written by someone else", status=500)
        return result

    async def sign(self, *, namespace: str, name: str, uid: str, fingerprint: str) -> dict:
        """Sign the request once; repeated calls return the same signatures."""
        self._check_open()
        lock = self._lock(uid)
        async with lock:
            try:
                return await self._sign_locked(namespace=namespace, name=name, uid=uid, fingerprint=fingerprint)
            finally:
                self._unlock_idle(uid, lock)

    async def _sign_locked(self, *, namespace: str, name: str, uid: str, fingerprint: str) -> dict:
        record = self.log.requests.get(uid)
        if record is not None and record.signed is not None:
            result = self._stored(uid, record)
            if result is None:
                raise Refused("AlreadySigned", f"request {uid} was signed (audit entry {record.signed['index']}) "
                                               "and its signatures are no longer kept", status=409)
            return self._answer(result, record.signed)
        if record is not None and record.open_intent:
            await self._resolve(uid, record)  # an earlier attempt failed half-way in this process
            if record.signed is not None:
                return self._answer(self._stored(uid, record), record.signed)

        request_ref = {"namespace": namespace, "name": name, "uid": uid}
        try:
            request, key, policies = await self.reader.request_key_policies(namespace, name)
        except Exception as error:  # never sign on a view that could not be read
            raise Refused("ApiServerUnavailable", f"cannot read the request from the API server: "
                                                  f"{type(error).__name__}", status=503) from None
        if request is None or request["metadata"]["uid"] != uid:
            raise await self._refuse("RequestNotFound", f"no SignRequest {namespace}/{name} with UID {uid}",
                               request_ref=request_ref, status=404)
        request = _strip_status(request)
        spec = request["spec"]
        if digests_fingerprint(spec) != fingerprint:
            raise await self._refuse("DigestsMismatch", "the digests the operator named differ from the SignRequest's",
                               request_ref=request_ref, status=409)
        version = request["metadata"].get("resourceVersion") or None
        key = _strip_status(key)
        key_meta = (key or {}).get("metadata") or {}
        key_lock_name = "key:" + key_meta.get("uid", "")
        key_lock = self._lock(key_lock_name)
        async with key_lock:  # one-time consumption and version changes are serialised per key
            try:
                return await self._sign_checked(request, key, policies, request_ref, version=version)
            finally:
                self._unlock_idle(key_lock_name, key_lock)

    async def _sign_in_parts(self, items: list, signing: Callable[[list], Callable[[hsm.Token], list[bytes]]]
                             ) -> list[bytes]:
        """``signing(part)`` for consecutive parts of ``items`` at once, each on a session of its own, in order.

        A batch is split into at most :attr:`parallelism` parts of at least
        :data:`MIN_DIGESTS_PER_PART`: the token signs on several sessions at
        once (SoftHSM2 made 1.8 times as many RSA_3072 signatures with two
        threads as with one on a 2-core machine). Every part ends before this
        returns or raises (the first error), so a failure is only recorded once
        nothing is signing any more.
        """
        count = max(1, min(self.parallelism, len(items) // MIN_DIGESTS_PER_PART))
        size = -(-len(items) // count)
        parts = [items[at:at + size] for at in range(0, len(items), size)]
        made = await asyncio.gather(*(self._in_token("sign", signing(part)) for part in parts),
                                    return_exceptions=True)
        for outcome in made:
            if isinstance(outcome, BaseException):
                raise outcome
        return [signature for part in made for signature in part]

    async def _key_labels(self, request: dict, key: dict | None, policies: list[dict], recent: policy.RateTally,
                          request_ref: dict, version: str | None) -> dict[str, dict[str, str]]:
        """The labels of the namespace's keys, read only when a rate limit counts by them.

        That is when a policy governing the request's key selects keys by label
        and another key of the namespace signed within the hour: whether the
        policy counts those signatures depends on that key's labels now.
        Otherwise no decision reads them (policies naming keys count by name).
        """
        key_name = request["spec"]["keyRef"]["name"]
        own = ((key or {}).get("metadata") or {}).get("labels") or {}
        by_labels = [p for p in policies if (p.get("spec") or {}).get("keys") is None
                     and policy.policy_selects(p.get("spec") or {}, key_name=key_name, key_labels=own)]
        if not by_labels or not any(name != key_name for name in recent.keys()):
            return {}
        try:
            keys_ = await self.reader.keys(request_ref["namespace"], not_older_than=version)
        except Exception as error:  # never count on a view that could not be read
            raise Refused("ApiServerUnavailable", f"cannot read the namespace's keys from the API server: "
                                                  f"{type(error).__name__}", status=503) from None
        return {k["metadata"]["name"]: dict(k["metadata"].get("labels") or {}) for k in keys_}

    async def _sign_checked(self, request: dict, key: dict | None, policies: list[dict], request_ref: dict, *,
                            version: str | None) -> dict:
        namespace, name, uid = request_ref["namespace"], request_ref["name"], request_ref["uid"]
        spec = request["spec"]
        now = datetime.datetime.now(datetime.timezone.utc)
        key_meta = (key or {}).get("metadata") or {}
        record = self.log.keys.get(key_meta.get("uid", "")) if key else None
        recent = self.log.rate_tally(namespace, now)
        labels = await self._key_labels(request, key, policies, recent, request_ref, version)
        decision = policy.decide(request, key=key, key_state=key_state(record), policies=policies, at=now,
                                 recent=recent, key_labels=labels)
        if decision.phase != "Approved":
            raise await self._refuse(decision.reason, decision.message, request_ref=request_ref,
                               waiting=decision.phase == "Pending")
        key_info = {"name": key_meta["name"], "uid": key_meta["uid"], "version": decision.key_version,
                    "usage": key["spec"].get("usage", "Reusable")}
        fmt = spec.get("format", "raw")
        embedded = await self._embedded_certificate(spec, key_meta["uid"], decision.key_version, now, request_ref)
        manifest = self._manifest(spec) if fmt == "jar" else None
        if manifest is not None and hashlib.new(spec.get("digestAlgorithm", "SHA256").lower(), manifest).hexdigest() \
                != spec["digests"][0]["value"].lower():
            raise await self._refuse("ManifestMismatch", "the digest is not the digest of spec.manifest",
                                     request_ref=request_ref)
        apk_signed_data = await self._apk_signed_data(spec, embedded, request_ref) if fmt == "apk" else None
        # what an APK signature covers: its content digest (in digests) and the exact blocks signed
        apk_info = [{"scheme": scheme, "signedData": audit.digest_of(data)} for scheme, data in apk_signed_data or []]
        certificate_info = ({"name": embedded.record.name, "serialNumber": format(embedded.certificate.serial, "x"),
                             "fingerprint": embedded.certificate.fingerprint} if embedded else None)
        intent = await self._append(
            "Intent", request=request_ref, requester=spec["requester"]["username"],
            approvers=[a["user"] for a in decision.approvals if a["counted"] and a["decision"] == "Approve"],
            builders=[{"user": b["user"], **({"build": b["build"]} if b.get("build") else {})}
                      for b in decision.builds if b["counted"]],
            policies=list(decision.policies), key=key_info, reason=spec.get("reason", ""),
            digestAlgorithm=spec.get("digestAlgorithm", "SHA256"), format=fmt, certificate=certificate_info,
            digests=[{"name": d["name"], "value": d["value"].lower()} for d in spec["digests"]],
            **({"apk": apk_info} if apk_info else {}),
            **({"images": _images(spec)} if fmt == "cosign" else {}))
        self._waiting.pop(uid, None)
        handle = hsm.KeyHandle(namespace=namespace, name=key_meta["name"], uid=key_meta["uid"],
                               version=decision.key_version)
        algorithm = spec.get("digestAlgorithm", "SHA256")
        values = [bytes.fromhex(d["value"]) for d in spec["digests"]]
        public_key_der = _public_key_der(record, decision.key_version)
        signing_time = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        started = time.perf_counter()

        def signing(part: list[tuple[dict, bytes]]) -> Callable[[hsm.Token], list[bytes]]:
            return lambda token: token.signing(handle, lambda sign: [
                formats.build(fmt, digest=value, digest_algorithm=algorithm, embedded=embedded, manifest=manifest,
                              public_key_der=public_key_der, signing_time=signing_time, sign=sign,
                              apk_signed_data=apk_signed_data, name=d["name"])
                for d, value in part])
        try:
            signatures = await self._sign_in_parts(list(zip(spec["digests"], values)), signing)
        except formats.FormatError as error:
            await self._abandon(intent, f"the {fmt} signature could not be built: {error}")
            raise await self._refuse("FormatError", f"the {fmt} signature could not be built: {error}",
                                     request_ref=request_ref, status=422) from None
        except hsm.HSMError as error:
            # Nothing left the signer: record that at once, so a retry starts cleanly.
            await self._abandon(intent, f"the HSM failed: {error.reason}; no signature was returned")
            if error.reason != "KeyNotFound":
                raise
            await self._missing(record, decision.key_version)
            raise await self._refuse("KeyMaterialMissing", f"key {key_meta['name']} version {decision.key_version} is "
                                                     "missing from the HSM (destroyed outside keyroom?); a platform "
                                                     "admin rotates the key to generate a new version",
                               request_ref=request_ref, status=409) from None
        result = {"intent": intent["index"], "keyVersion": decision.key_version, "request": request_ref, "key": key_info,
                  "format": fmt, **({"certificate": certificate_info} if certificate_info else {}),
                  "signedAt": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "signatures": [{"name": d["name"], "value": base64.b64encode(s).decode()}
                                 for d, s in zip(spec["digests"], signatures)]}
        await asyncio.to_thread(self.log.store_result, uid, result)
        entry = await self._append_signed(intent, result)
        logger.info("signed %s/%s: %d digest(s) with %s v%d in %.0f ms (audit entry %d)", namespace, name,
                    len(values), key_meta["name"], decision.key_version, (time.perf_counter() - started) * 1e3,
                    entry["index"])
        return self._answer(result, entry)

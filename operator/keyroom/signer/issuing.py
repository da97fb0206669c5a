"""The signer as a certificate authority: Certificates and CRLs, built from spec it reads itself.

The operator names a Certificate ("reconcile team-a/release-cert, uid U");
the signer reads that Certificate, its SigningKey, its CA Certificate and the
namespace's policies, decides the next step with
:func:`keyroom.signer.certificates.next_action` and carries it out: it builds
the TBSCertificate (or CSR, or CRL) from the spec and its own records and has
the key sign its digest in the HSM. No route signs a TBS, CSR or CRL the
caller supplied; an externally issued certificate is only accepted after it
was checked against the key version and the CSR. Every step is an audit
entry, and the answer is the signer's record for the operator to mirror.
"""
from __future__ import annotations

import base64
import datetime
import logging
from typing import Any, Mapping

from cryptography import x509 as crypto_x509
from cryptography.hazmat.primitives import serialization

from keyroom import policy
from keyroom.api.common import ISSUED_CERTIFICATE_ANNOTATION
from keyroom.signer import certificates, hsm, keys, x509
from keyroom.signer.requests import Refused, RequestSigner, _strip_status

logger = logging.getLogger("keyroom.signer")

#: a certificate starts this long before it is issued, for verifiers whose clocks run behind
CLOCK_SKEW = datetime.timedelta(minutes=5)
_MAX_STEPS = 8


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def _pem_public_key_der(pem: str) -> bytes:
    return serialization.load_pem_public_key(pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def certificate_public_key_der(der: bytes) -> bytes:
    return crypto_x509.load_der_x509_certificate(der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_supplied(text: str) -> list[bytes]:
    """The certificates of a PEM bundle (the issued certificate first, then its chain)."""
    try:
        return [c.public_bytes(serialization.Encoding.DER)
                for c in crypto_x509.load_pem_x509_certificates(text.encode())]
    except ValueError as error:
        raise x509.X509Error(f"the supplied certificate is not PEM: {error}") from None


class CertificateAuthority:
    """Issues, renews and revokes certificates and publishes CRLs, in the signer's process and log."""

    def __init__(self, signer: RequestSigner) -> None:
        self.signer = signer

    @property
    def _log(self):
        return self.signer.log

    async def reconcile(self, *, namespace: str, name: str, uid: str) -> dict:
        """Bring the signer's record of one Certificate in line with its spec and the clock; return the record."""
        self.signer._check_open()
        lock_name = "certificates:" + namespace  # a CA and the certificates it issues change together
        lock = self.signer._lock(lock_name)
        async with lock:
            try:
                return await self._reconcile_locked(namespace, name, uid)
            finally:
                self.signer._unlock_idle(lock_name, lock)

    async def _read(self, what: str, call):
        try:
            return await call
        except Exception as error:
            raise Refused("ApiServerUnavailable", f"cannot read {what}: {type(error).__name__}", status=503) from None

    async def _reconcile_locked(self, namespace: str, name: str, uid: str) -> dict:
        reader = self.signer.reader
        known = self._log.certificates.get(uid)
        if known is not None and (known.namespace, known.name) != (namespace, name):
            raise Refused("CertificateMismatch", f"UID {uid} is Certificate {known.namespace}/{known.name}, not "
                                                 f"{namespace}/{name}", status=409)
        body = _strip_status(await self._read("the Certificate", reader.certificate(namespace, name)))
        if body is not None and body["metadata"].get("uid") != uid:
            body = None
        if body is None and known is None:
            raise Refused("CertificateNotFound", f"no Certificate {namespace}/{name} with UID {uid}", status=404)
        spec = body["spec"] if body is not None and not body["metadata"].get("deletionTimestamp") else None
        record = known or certificates.CertificateRecord(namespace, name, uid)
        read = await self._read_related(namespace, spec, record) if spec is not None else {}
        waiting: certificates.Waiting | None = None
        for _ in range(_MAX_STEPS):
            context = self._context(spec, body, record, **read)
            step = context.pop("step")
            if isinstance(step, certificates.Waiting) or step is None:
                waiting = step
                break
            await self._act(step, record, spec, **context)
            record = self._log.certificates.get(uid, record)
        return self.mirror(record, spec, waiting)

    async def _read_related(self, namespace: str, spec: Mapping, record: certificates.CertificateRecord) -> dict:
        """What the Certificate's next steps depend on, read once per reconcile: its key, its CA, the policies."""
        reader = self.signer.reader
        key_body = await self._read("the SigningKey", reader.key(namespace, spec["keyRef"]["name"]))
        ca_name = ((spec.get("issuerRef") or {}).get("ca") or {}).get("name")
        ca_body = (await self._read("the CA Certificate", reader.certificate(namespace, ca_name))
                   if ca_name and ca_name != record.name else None)
        policies = await self._read("the SigningPolicies", reader.policies(namespace)) if key_body else []
        return {"key_body": key_body, "ca_body": ca_body, "policies": policies}

    def _context(self, spec: Mapping | None, body: Mapping | None, record: certificates.CertificateRecord, *,
                 key_body: Mapping | None = None, ca_body: Mapping | None = None,
                 policies: list[Mapping] = ()) -> dict[str, Any]:
        """The next step from what was read and the signer's records now: the key, the CA, a supplied certificate."""
        at = _now()
        if spec is None:
            return {"step": None, "key": None, "issuer": None, "external": None, "ca_spec": None}
        key = self._log.keys.get(key_body["metadata"]["uid"]) if key_body else None
        if record.key_uid and key_body is not None and key_body["metadata"]["uid"] != record.key_uid:
            return {"step": certificates.Waiting("KeyReplaced", f"SigningKey {spec['keyRef']['name']} was deleted and "
                                                               "created again: its new key pairs need a new "
                                                               "Certificate"), "key": None, "issuer": None,
                    "external": None, "ca_spec": None}
        issuer, ca_spec, external, problem = None, None, None, None
        kind = certificates.issuer_kind(spec)
        if kind == "ca":
            ca_name = spec["issuerRef"]["ca"]["name"]
            ca_spec = (ca_body or {}).get("spec")
            ca_record = self._log.certificates.get(ca_body["metadata"]["uid"]) if ca_body else None
            ca_key = self._log.keys.get(ca_record.key_uid) if ca_record and ca_record.key_uid else None
            issuer = certificates.issuing_certificate(ca_spec, ca_record, ca_key, at, name=ca_name)
            if ca_name == record.name:
                issuer = certificates.Issuer(problem="a Certificate cannot be its own CA: use selfSigned")
        elif kind == "external":
            external, problem = self._supplied(body, record, key)
        profile: list[str] = []
        if key_body is not None:
            selecting = [p.get("spec") or {} for p in policies
                         if policy.policy_selects(p.get("spec") or {}, key_name=key_body["metadata"]["name"],
                                                  key_labels=key_body["metadata"].get("labels"))]
            profile = certificates.profile_problems(selecting, key_algorithm=key_body["spec"].get("algorithm", ""),
                                                    spec=spec)
        step = certificates.next_action(spec=spec, record=record, key=key, issuer=issuer, external=external, at=at,
                                        profile=profile)
        if step is None and spec.get("isCA") and record.crl is not None and record.revoked is None:
            serials = certificates.revoked_serials(self._log.certificates.values(), record.uid, at)
            if certificates.crl_outdated(record, serials):
                step = certificates.Action("crl", "RevocationsChanged")
        if problem and (step is None or isinstance(step, certificates.Waiting)):
            step = certificates.Waiting("InvalidExternalCertificate", problem)
        return {"step": step, "key": key, "issuer": issuer, "external": external, "ca_spec": ca_spec}

    def _supplied(self, body: Mapping | None, record: certificates.CertificateRecord,
                  key: keys.KeyRecord | None) -> tuple[certificates.Issued | None, str | None]:
        """A certificate supplied back for the CSR, checked; (None, why) when it does not fit."""
        text = ((body or {}).get("metadata", {}).get("annotations") or {}).get(ISSUED_CERTIFICATE_ANNOTATION)
        if not text or record.csr is None or key is None:
            return None, None
        try:
            supplied = parse_supplied(text)
        except x509.X509Error as error:
            return None, str(error)
        if not supplied:
            return None, f"the {ISSUED_CERTIFICATE_ANNOTATION} annotation holds no certificate"
        der = supplied[0]
        if any(c.fingerprint == x509.fingerprint(der) for c in record.issued):
            return None, None  # already accepted
        version = key.versions.get(record.csr["version"])
        if version is None:
            return None, "the key version of the CSR is gone"
        problems = x509.check_issued(der, public_key_der=_pem_public_key_der(version.public_key),
                                     csr_der=record.csr["der"], now=_now())
        if problems:
            return None, "the supplied certificate was not accepted: " + "; ".join(problems)
        described = x509.describe(der)
        return certificates.Issued(
            serial=int(described["serialNumber"], 16), der=der, key_version=record.csr["version"],
            not_before=certificates._time(described["notBefore"]), not_after=certificates._time(described["notAfter"]),
            fingerprint=described["fingerprint"], spec_hash=record.csr["specHash"],
            external_chain=tuple(supplied[1:])), None

    # ------------------------------------------------------------ the steps

    def _ref(self, record: certificates.CertificateRecord) -> dict:
        return {"namespace": record.namespace, "name": record.name, "uid": record.uid}

    async def _sign_with(self, key: keys.KeyRecord, version: int, build):
        """Run ``build(sign)`` in the token with ``key`` version ``version`` as the signing key."""
        handle = hsm.KeyHandle(namespace=key.namespace, name=key.name, uid=key.uid, version=version)
        key_lock_name = "key:" + key.uid
        lock = self.signer._lock(key_lock_name)
        async with lock:  # never while the key is rotated, trimmed or destroyed
            try:
                return await self.signer._in_token("issue", lambda token: build(
                    lambda digest, algorithm: token.sign(handle, digest=digest, digest_algorithm=algorithm)))
            except hsm.HSMError as error:
                raise Refused(error.reason, f"the HSM refused to sign with {handle.label}: {error.message}",
                              status=409 if error.reason == "KeyNotFound" else 503) from None
            finally:
                self.signer._unlock_idle(key_lock_name, lock)

    async def _act(self, step: certificates.Action, record: certificates.CertificateRecord, spec: Mapping,
                   *, key: keys.KeyRecord | None, issuer: certificates.Issuer | None,
                   external: certificates.Issued | None, ca_spec: Mapping | None) -> None:
        ref = self._ref(record)
        if step.kind == "issue":
            await self._issue(step, record, spec, key, issuer, ca_spec)
        elif step.kind == "request":
            public = _pem_public_key_der(key.versions[step.version].public_key)
            algorithm = x509.key_algorithm_of(public)
            der = await self._sign_with(key, step.version, lambda sign: x509.build_csr(
                subject=spec["subject"], public_key_der=public, sign=sign, key_algorithm=algorithm))
            await self.signer._append("CertificateRequested", certificate=ref,
                                      key={"uid": key.uid, "name": key.name, "version": step.version},
                                      csr=base64.b64encode(der).decode(), specHash=certificates.spec_hash(spec))
        elif step.kind == "accept":
            await self.signer._append(
                "CertificateIssued", certificate=ref, key={"uid": key.uid, "name": key.name, "version": step.version},
                issuer={"kind": "external"}, serial=format(external.serial, "x"),
                notBefore=_time(external.not_before), notAfter=_time(external.not_after),
                fingerprint=external.fingerprint, specHash=external.spec_hash, reason=step.reason,
                der=base64.b64encode(external.der).decode(),
                externalChain=[base64.b64encode(c).decode() for c in external.external_chain])
            logger.info("accepted the external certificate %s for %s/%s", external.fingerprint, record.namespace,
                        record.name)
        elif step.kind == "revoke":
            revocation = spec["revocation"]
            since = revocation.get("since") or _time(_now())
            await self.signer._append("CertificateRevoked", certificate=ref,
                                      reason=revocation.get("reason", "unspecified"), since=since)
            logger.warning("revoked Certificate %s/%s from %s", record.namespace, record.name, since)
            for ca_uid in sorted({c.issuer_uid for c in record.issued if c.issuer_uid}):
                ca = self._log.certificates.get(ca_uid)
                if ca is not None:
                    await self._publish_crl(ca, "RevocationsChanged")
        elif step.kind == "crl":
            await self._publish_crl(record, step.reason)
        else:
            raise AssertionError(f"unknown step {step.kind}")

    async def _issue(self, step: certificates.Action, record: certificates.CertificateRecord, spec: Mapping,
                     key: keys.KeyRecord, issuer: certificates.Issuer | None, ca_spec: Mapping | None) -> None:
        at = _now()
        subject_public = _pem_public_key_der(key.versions[step.version].public_key)
        if issuer is None:  # self-signed: the key certifies itself
            signing_key, signing_version = key, step.version
            issuer_der, issuer_public = None, subject_public
            issuer_ref: dict[str, Any] = {"kind": "selfSigned"}
            distribution_point = spec.get("crlDistributionPoint") if spec.get("isCA") else None
        else:
            signing_key = self._log.keys[issuer.record.key_uid]
            signing_version = issuer.certificate.key_version
            issuer_der = issuer.certificate.der
            issuer_public = certificate_public_key_der(issuer_der)
            issuer_ref = {"kind": "ca", "uid": issuer.record.uid, "name": issuer.record.name,
                          "serial": format(issuer.certificate.serial, "x")}
            distribution_point = (ca_spec or {}).get("crlDistributionPoint")
        serial = x509.new_serial()
        not_after = certificates.not_after(spec, issuer, at)
        algorithm = x509.key_algorithm_of(issuer_public)
        der = await self._sign_with(signing_key, signing_version, lambda sign: x509.build_certificate(
            subject=spec["subject"], subject_public_key_der=subject_public, issuer_certificate_der=issuer_der,
            issuer_public_key_der=issuer_public, not_before=at - CLOCK_SKEW, not_after=not_after, serial=serial,
            is_ca=bool(spec.get("isCA")), usages=spec.get("usages"), crl_distribution_point=distribution_point,
            sign=sign, key_algorithm=algorithm))
        await self.signer._append(
            "CertificateIssued", certificate=self._ref(record),
            key={"uid": key.uid, "name": key.name, "version": step.version}, issuer=issuer_ref,
            serial=format(serial, "x"), notBefore=_time(at - CLOCK_SKEW), notAfter=_time(not_after),
            fingerprint=x509.fingerprint(der), specHash=certificates.spec_hash(spec), reason=step.reason,
            der=base64.b64encode(der).decode())
        logger.info("issued a certificate for %s/%s (key version %d, serial %x, %s)", record.namespace, record.name,
                    step.version, serial, step.reason)

    async def _publish_crl(self, ca: certificates.CertificateRecord, reason: str) -> None:
        at = _now()
        signing = ca.latest
        ca_key = self._log.keys.get(ca.key_uid)
        version = ca_key.versions.get(signing.key_version) if ca_key and signing else None
        if signing is None or not signing.valid_at(at) or version is None or version.state == "Destroyed":
            logger.warning("cannot publish a CRL for CA %s/%s: it has no valid certificate with a key in the token",
                           ca.namespace, ca.name)
            return
        serials = certificates.revoked_serials(self._log.certificates.values(), ca.uid, at)
        number = ca.crl.number + 1 if ca.crl else 1
        next_update = at + certificates.CRL_VALIDITY
        algorithm = x509.key_algorithm_of(certificate_public_key_der(signing.der))
        der = await self._sign_with(ca_key, signing.key_version, lambda sign: x509.build_crl(
            issuer_certificate_der=signing.der, revoked=serials, this_update=at, next_update=next_update,
            crl_number=number, sign=sign, key_algorithm=algorithm))
        await self.signer._append("CrlIssued", certificate=self._ref(ca), crlNumber=number, thisUpdate=_time(at),
                                  nextUpdate=_time(next_update), der=base64.b64encode(der).decode(),
                                  serials=[format(s, "x") for s, _, _ in serials], signedBy=format(signing.serial, "x"),
                                  reason=reason)
        logger.info("published CRL %d of CA %s/%s (%d revoked)", number, ca.namespace, ca.name, len(serials))

    # ------------------------------------------------------------ the answer

    def mirror(self, record: certificates.CertificateRecord, spec: Mapping | None,
               waiting: certificates.Waiting | None) -> dict:
        """The record as the operator shows it: the current certificate, its chain, the pool, the CRL."""
        at = _now()
        records = self._log.certificates
        answer: dict[str, Any] = {"uid": record.uid, "revision": len(record.issued), "current": None, "pool": [],
                                  "csr": x509.to_pem(record.csr["der"], "CERTIFICATE REQUEST") if record.csr else None,
                                  "revoked": ({"reason": record.revoked["reason"],
                                               "since": _time(record.revoked["since"])} if record.revoked else None),
                                  "crl": None, "waiting": None, "deleted": spec is None}
        if waiting is not None:
            answer["waiting"] = {"reason": waiting.reason, "message": waiting.message}
        latest = record.latest
        if latest is not None:
            above = certificates.chain(records, latest)
            chain_der = [c.der for c in above] or list(latest.external_chain)
            answer["current"] = {
                "serialNumber": format(latest.serial, "x"), "notBefore": _time(latest.not_before),
                "notAfter": _time(latest.not_after), "fingerprint": latest.fingerprint,
                "renewalTime": _time(certificates.renewal_time(spec, latest)) if spec else None,
                "keyVersion": latest.key_version, "certificate": x509.to_pem(latest.der),
                "chain": "".join(x509.to_pem(c) for c in chain_der),
                "root": x509.to_pem(chain_der[-1] if chain_der else latest.der),
                "issuer": x509.describe(latest.der)["issuer"]}
        answer["pool"] = [{"keyVersion": c.key_version, "serialNumber": format(c.serial, "x"),
                           "notAfter": _time(c.not_after), "fingerprint": c.fingerprint}
                          for c in reversed(record.issued) if c.not_after > at][:16]
        if record.crl is not None:
            answer["crl"] = {"number": record.crl.number, "thisUpdate": _time(record.crl.this_update),
                             "nextUpdate": _time(record.crl.next_update), "crl": x509.to_pem(record.crl.der, "X509 CRL"),
                             "revokedSerials": [format(s, "x") for s in record.crl.serials]}
        change = certificates.next_change_at(spec, record)
        answer["nextChangeAt"] = _time(change) if change else None
        return answer

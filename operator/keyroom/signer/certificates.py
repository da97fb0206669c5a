"""The signer's record of Certificates, and what to issue next (pure: no I/O, no token).

Like key versions (:mod:`keyroom.signer.keys`), certificates are facts of the
signer's audit log: ``CertificateIssued`` (the DER, its serial, the key
version it certifies and the CA certificate that signed it),
``CertificateRequested`` (an external issuer's CSR), ``CertificateRevoked``
and ``CrlIssued``. :func:`apply` replays them into :class:`CertificateRecord`;
:func:`next_action` compares a Certificate's spec, its key's record and its
issuer with that record and the clock, and names the one next step. The chain
a signature embeds and the serials a CRL lists come from these records only,
never from status.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import json
from typing import Iterable, Mapping

from keyroom import schedule
from keyroom.signer import keys

EVENTS = ("CertificateIssued", "CertificateRequested", "CertificateRevoked", "CrlIssued")
#: how long a CRL is valid, and when (before its nextUpdate) the signer publishes the next one
CRL_VALIDITY = datetime.timedelta(days=7)
CRL_REFRESH_BEFORE = datetime.timedelta(days=3)
#: the CA/Browser Forum code-signing baseline: key algorithms and the longest validity
PROFILES = {"CABForumCodeSigning": {"algorithms": ("RSA_3072", "RSA_4096", "ECDSA_P256", "ECDSA_P384"),
                                    "max_validity": datetime.timedelta(days=460)}}
#: the spec fields that shape an issued certificate: a change of any of them re-issues it
_SHAPING = ("subject", "duration", "isCA", "usages", "issuerRef")


def _time(text: str) -> datetime.datetime:
    return schedule.parse_time(text)


@dataclasses.dataclass
class Issued:
    """One certificate the signer issued (or accepted from an external CA)."""

    serial: int
    der: bytes
    key_version: int
    not_before: datetime.datetime
    not_after: datetime.datetime
    fingerprint: str
    spec_hash: str
    #: the CA Certificate (UID) and the serial of its certificate that signed this one; None: self-signed/external
    issuer_uid: str | None = None
    issuer_serial: int | None = None
    #: the external CA's chain, DER, as supplied with the certificate
    external_chain: tuple[bytes, ...] = ()

    def valid_at(self, at: datetime.datetime) -> bool:
        return self.not_before <= at < self.not_after


@dataclasses.dataclass
class Crl:
    number: int
    this_update: datetime.datetime
    next_update: datetime.datetime
    der: bytes
    serials: tuple[int, ...]
    #: the CA certificate (serial) that signed it
    signed_by: int


@dataclasses.dataclass
class CertificateRecord:
    namespace: str
    name: str
    uid: str
    key_uid: str = ""
    issued: list[Issued] = dataclasses.field(default_factory=list)
    #: the external issuer's CSR: {"version", "der", "specHash"}
    csr: dict | None = None
    #: {"reason", "since"} once the spec asked for revocation
    revoked: dict | None = None
    crl: Crl | None = None

    @property
    def latest(self) -> Issued | None:
        return self.issued[-1] if self.issued else None

    def latest_for(self, version: int) -> Issued | None:
        return next((c for c in reversed(self.issued) if c.key_version == version), None)

    def by_serial(self, serial: int | None) -> Issued | None:
        return next((c for c in self.issued if c.serial == serial), None)


def apply(records: dict[str, CertificateRecord], entry: Mapping) -> None:
    """Replay one audit entry into the certificate records (entries of other kinds are ignored)."""
    event = entry.get("event")
    if event not in EVENTS:
        return
    ref = entry["certificate"]
    record = records.get(ref["uid"])
    if record is None:
        record = records[ref["uid"]] = CertificateRecord(ref["namespace"], ref["name"], ref["uid"])
    if event == "CertificateIssued":
        record.key_uid = entry["key"]["uid"]
        issuer = entry.get("issuer") or {}
        record.issued.append(Issued(
            serial=int(entry["serial"], 16), der=_b64(entry["der"]), key_version=entry["key"]["version"],
            not_before=_time(entry["notBefore"]), not_after=_time(entry["notAfter"]),
            fingerprint=entry["fingerprint"], spec_hash=entry["specHash"],
            issuer_uid=issuer.get("uid"), issuer_serial=int(issuer["serial"], 16) if issuer.get("serial") else None,
            external_chain=tuple(_b64(c) for c in entry.get("externalChain") or ())))
    elif event == "CertificateRequested":
        record.key_uid = entry["key"]["uid"]
        record.csr = {"version": entry["key"]["version"], "der": _b64(entry["csr"]), "specHash": entry["specHash"]}
    elif event == "CertificateRevoked":
        record.revoked = {"reason": entry["reason"], "since": _time(entry["since"])}
    elif event == "CrlIssued":
        record.crl = Crl(number=entry["crlNumber"], this_update=_time(entry["thisUpdate"]),
                         next_update=_time(entry["nextUpdate"]), der=_b64(entry["der"]),
                         serials=tuple(int(s, 16) for s in entry["serials"]), signed_by=int(entry["signedBy"], 16))


def _b64(text: str) -> bytes:
    return base64.b64decode(text)


def spec_hash(spec: Mapping) -> str:
    """A digest of the spec fields that shape the certificate (renewBefore, secretName and the like do not)."""
    shaping = {field: spec.get(field) for field in _SHAPING}
    issuer = dict(spec.get("issuerRef") or {})
    shaping["issuerRef"] = {kind: issuer[kind] for kind in sorted(issuer)}
    return "sha256:" + hashlib.sha256(json.dumps(shaping, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def issuer_kind(spec: Mapping) -> str:
    issuer = spec.get("issuerRef") or {}
    return next((kind for kind in ("selfSigned", "ca", "external") if kind in issuer), "")


def duration(spec: Mapping) -> datetime.timedelta:
    return schedule.parse_duration(spec.get("duration") or "90d")


def renew_before(spec: Mapping) -> datetime.timedelta:
    return schedule.parse_duration(spec.get("renewBefore") or "30d")


def profile_problems(policy_specs: Iterable[Mapping], *, key_algorithm: str, spec: Mapping) -> list[str]:
    """Why the policies' certificate profiles refuse this certificate (empty: they allow it)."""
    problems = []
    for profile_name in sorted({p.get("certificateProfile") for p in policy_specs if p.get("certificateProfile")}):
        profile = PROFILES.get(profile_name)
        if profile is None:
            problems.append(f"unknown certificate profile {profile_name}")
            continue
        if key_algorithm not in profile["algorithms"]:
            problems.append(f"{profile_name} needs a key of {', '.join(profile['algorithms'])}, not {key_algorithm}")
        if duration(spec) > profile["max_validity"]:
            problems.append(f"{profile_name} allows at most {profile['max_validity'].days} days of validity, "
                            f"not {spec.get('duration')}")
    return problems


@dataclasses.dataclass
class Issuer:
    """A CA as the signer resolved it: its record and the certificate that signs now, or why none can."""

    record: CertificateRecord | None = None
    certificate: Issued | None = None
    problem: str | None = None


def issuing_certificate(ca_spec: Mapping | None, ca_record: CertificateRecord | None,
                        ca_key: keys.KeyRecord | None, at: datetime.datetime, *, name: str) -> Issuer:
    """The CA certificate that may sign now: valid, not revoked, its key version still in the token."""
    if ca_spec is None:
        return Issuer(problem=f"the CA Certificate {name} does not exist")
    if not ca_spec.get("isCA"):
        return Issuer(problem=f"Certificate {name} is not a CA (isCA: false)")
    if ca_spec.get("revocation") or (ca_record is not None and ca_record.revoked):
        return Issuer(record=ca_record, problem=f"the CA Certificate {name} is revoked")
    if ca_record is None or ca_record.latest is None:
        return Issuer(record=ca_record, problem=f"the CA Certificate {name} has no certificate yet")
    certificate = ca_record.latest
    if not certificate.valid_at(at):
        return Issuer(record=ca_record, problem=f"the CA Certificate {name} has no valid certificate now")
    version = (ca_key.versions.get(certificate.key_version) if ca_key else None)
    if version is None or version.state == "Destroyed" or version.missing:
        return Issuer(record=ca_record, problem=f"the key version {certificate.key_version} of CA {name} is gone")
    return Issuer(record=ca_record, certificate=certificate)


def target_version(spec: Mapping, key: keys.KeyRecord, record: CertificateRecord) -> int | None:
    """The key version the certificate should certify now.

    With followRotation (the default) it is the key's current version; without,
    the certificate stays on the version it was first issued for while that
    version's private key is in the token.
    """
    current = key.current
    latest = record.latest
    if not spec.get("followRotation", True) and latest is not None:
        version = key.versions.get(latest.key_version)
        if version is not None and version.state in ("Enabled", "Disabled") and not version.missing:
            return latest.key_version
    return current.version if current else None


@dataclasses.dataclass(frozen=True)
class Action:
    kind: str  # issue, request, accept, revoke, crl
    reason: str
    version: int | None = None


@dataclasses.dataclass(frozen=True)
class Waiting:
    reason: str
    message: str


def not_after(spec: Mapping, issuer: Issuer | None, at: datetime.datetime) -> datetime.datetime:
    """The end of a certificate issued now: its duration, never beyond its CA's certificate."""
    end = at + duration(spec)
    if issuer is not None and issuer.certificate is not None:
        end = min(end, issuer.certificate.not_after)
    return end


def renewal_time(spec: Mapping, certificate: Issued) -> datetime.datetime:
    return max(certificate.not_before, certificate.not_after - renew_before(spec))


def next_action(*, spec: Mapping | None, record: CertificateRecord, key: keys.KeyRecord | None,
                issuer: Issuer | None, external: Issued | None, at: datetime.datetime,
                profile: list[str] | None = None) -> Action | Waiting | None:
    """The one next step for a Certificate, a reason it waits, or None when nothing is due.

    ``issuer`` is the resolved CA for ``issuerRef.ca`` (None otherwise);
    ``external`` an externally issued certificate supplied back and already
    checked against the key and the CSR (None when none is new).
    """
    if spec is None:
        return None  # deleted: issued certificates simply expire; nothing more is signed for it
    if spec.get("revocation") and record.revoked is None:
        return Action("revoke", spec["revocation"].get("reason", "unspecified"))
    if record.revoked is None:
        step = _issuance(spec, record, key, issuer, external, at, profile or [])
        if step is not None:
            return step
    if spec.get("isCA") and record.latest is not None:
        return _crl_step(record, at)
    return None


def _issuance(spec: Mapping, record: CertificateRecord, key: keys.KeyRecord | None, issuer: Issuer | None,
              external: Issued | None, at: datetime.datetime, profile: list[str]) -> Action | Waiting | None:
    key_name = spec["keyRef"]["name"]
    if key is None or key.current is None and not record.issued:
        return Waiting("KeyNotReady", f"waiting for SigningKey {key_name} to have a key version")
    if profile:
        return Waiting("ProfileViolation", "the signing policy's certificate profile refuses this certificate: "
                                           + "; ".join(profile))
    version = target_version(spec, key, record)
    if version is None:
        return Waiting("KeyNotReady", f"SigningKey {key_name} has no enabled version to certify")
    wanted = spec_hash(spec)
    latest = record.latest_for(version)
    kind = issuer_kind(spec)
    if kind == "external":
        if record.csr is None or record.csr["version"] != version or record.csr["specHash"] != wanted:
            return Action("request", "CsrCreated", version)
        if external is not None and external.key_version == version:
            return Action("accept", "ExternalCertificate", version)
        if latest is None or latest.spec_hash != wanted:
            return Waiting("AwaitingExternalCertificate", "the CSR is in status.csr: have the outside CA sign it and "
                                                          "supply the certificate in the keyroom.dev/issued-"
                                                          "certificate annotation")
        if at >= renewal_time(spec, latest):
            return Waiting("AwaitingExternalCertificate", f"renewal is due since "
                                                          f"{schedule.format_time(renewal_time(spec, latest))}: "
                                                          "supply a new certificate for the CSR in status.csr")
        return None
    if kind == "ca":
        if issuer is None or issuer.certificate is None:
            return Waiting("IssuerNotReady", (issuer.problem if issuer else None) or "the CA is not ready")
    if latest is None:
        return Action("issue", "KeyRotated" if record.issued else "Issued", version)
    if latest.spec_hash != wanted:
        return Action("issue", "SpecChanged", version)
    if kind == "ca" and latest.issuer_uid == issuer.record.uid:
        signing_ca = issuer.record.by_serial(latest.issuer_serial)
        if signing_ca is None or signing_ca.key_version != issuer.certificate.key_version:
            return Action("issue", "IssuerRekeyed", version)
    if kind == "ca" and latest.issuer_uid != issuer.record.uid:
        return Action("issue", "SpecChanged", version)
    if at >= renewal_time(spec, latest) and not_after(spec, issuer, at) > latest.not_after:
        return Action("issue", "Renewed", version)
    return None


def revoked_serials(records: Iterable[CertificateRecord], ca_uid: str,
                    at: datetime.datetime) -> list[tuple[int, datetime.datetime, str]]:
    """(serial, since, reason) of every unexpired certificate the CA issued under a revoked Certificate."""
    found = []
    for record in records:
        if record.revoked is None:
            continue
        for certificate in record.issued:
            if (certificate.issuer_uid == ca_uid and certificate.not_after > at
                    and certificate.not_after > record.revoked["since"]):
                found.append((certificate.serial, record.revoked["since"], record.revoked["reason"]))
    return sorted(found)


def _crl_step(record: CertificateRecord, at: datetime.datetime) -> Action | None:
    # The serials are compared by the caller (it sees every record); here: none yet, or due by the clock.
    if record.crl is None:
        return Action("crl", "CrlIssued")
    if at >= record.crl.next_update - CRL_REFRESH_BEFORE:
        return Action("crl", "CrlRefreshed")
    if record.crl.signed_by != record.latest.serial:
        return Action("crl", "CaRenewed")
    return None


def crl_outdated(record: CertificateRecord, serials: list[tuple[int, datetime.datetime, str]]) -> bool:
    """Whether the published CRL lists other serials than those revoked now."""
    return record.crl is not None and tuple(serial for serial, _, _ in serials) != record.crl.serials


def chain(records: Mapping[str, CertificateRecord], certificate: Issued) -> list[Issued]:
    """The CA certificates above ``certificate``, from the records, nearest first (the root last)."""
    found: list[Issued] = []
    current = certificate
    for _ in range(8):
        if current.issuer_uid is None:
            break
        ca = records.get(current.issuer_uid)
        parent = ca.by_serial(current.issuer_serial) if ca else None
        if parent is None:
            break
        found.append(parent)
        current = parent
    return found


def next_change_at(spec: Mapping | None, record: CertificateRecord) -> datetime.datetime | None:
    """When the clock alone next changes something: a renewal, a CRL refresh, an expiry."""
    if spec is None:
        return None
    moments = []
    latest = record.latest
    if latest is not None:
        moments.append(latest.not_after)
        if record.revoked is None:
            moments.append(renewal_time(spec, latest))
    if record.crl is not None:
        moments.append(record.crl.next_update - CRL_REFRESH_BEFORE)
    return min(moments, default=None)


@dataclasses.dataclass(frozen=True)
class Usable:
    """The certificate a signature embeds, its chain (nearest CA first) and the Certificate it belongs to."""

    record: CertificateRecord
    certificate: Issued
    chain: tuple[Issued, ...]


def _revoked(record: CertificateRecord | None, spec: Mapping | None) -> bool:
    return record is None or spec is None or record.revoked is not None or bool(spec.get("revocation"))


def usable_certificate(records: Mapping[str, CertificateRecord], specs: Mapping[str, Mapping], *, key_uid: str,
                       version: int, at: datetime.datetime, name: str | None = None) -> Usable | str:
    """The certificate that may go into a new signature by ``key_uid`` version ``version``, or why none may.

    ``specs`` are the namespace's Certificate specs by UID, read by the signer
    at signing time: a revocation in spec counts even before it was recorded.
    A certificate is usable when it certifies that very key version, is valid
    now, is not revoked, and neither is any CA above it. A leaf is preferred to
    a CA certificate, then the newest.
    """
    found: list[Usable] = []
    problems: list[str] = []
    for uid, record in records.items():
        spec = specs.get(uid)
        if record.key_uid != key_uid or spec is None or (name is not None and record.name != name):
            continue
        if _revoked(record, spec):
            problems.append(f"Certificate {record.name} is revoked")
            continue
        issued = record.latest_for(version)
        if issued is None:
            problems.append(f"Certificate {record.name} has no certificate for key version {version}")
            continue
        if not issued.valid_at(at):
            problems.append(f"Certificate {record.name}'s certificate for version {version} expired "
                            f"{schedule.format_time(issued.not_after)}" if at >= issued.not_after else
                            f"Certificate {record.name}'s certificate is not valid yet")
            continue
        above = chain(records, issued)
        broken = None
        for child, parent in zip([issued, *above], above):
            ca = records.get(child.issuer_uid)
            if _revoked(ca, specs.get(child.issuer_uid)) or not parent.valid_at(at):
                broken = f"Certificate {record.name}'s CA {ca.name if ca else child.issuer_uid} is revoked or expired"
                break
        if issued.issuer_uid is not None and len(above) == 0:
            broken = f"Certificate {record.name}'s CA certificate is no longer known"
        if broken:
            problems.append(broken)
            continue
        found.append(Usable(record, issued, tuple(above)))
    if not found:
        what = f"Certificate {name}" if name else "no Certificate"
        detail = "; ".join(problems) if problems else f"{what} certifies this key"
        return (f"key version {version} has no usable certificate: {detail}. Create a Certificate with this keyRef "
                "(or wait for its renewal)")
    leaves = [u for u in found if not _is_ca(specs.get(u.record.uid))] or found
    return max(leaves, key=lambda u: u.certificate.not_before)


def _is_ca(spec: Mapping | None) -> bool:
    return bool(spec and spec.get("isCA"))

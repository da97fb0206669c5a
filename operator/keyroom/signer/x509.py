"""Certificates, CRLs and CSRs built by the signer, signed by a key that never leaves the HSM.

The trust rule (``API.md``) says the signer offers no operation that signs
bytes a caller chose. For X.509 that means: the to-be-signed structure (the
TBSCertificate, TBSCertList or CertificationRequestInfo) is assembled here,
field by field, from typed arguments that the signer took from spec it read
itself and from its own key records. The only private-key operation is the
``sign`` callback, which gets the *digest* of that structure and the digest
algorithm's name (``"SHA256"`` or ``"SHA384"``) and returns the signature
exactly as :meth:`keyroom.signer.hsm.Token.sign` does (a DER ECDSA-Sig-Value
for EC keys, PKCS#1 v1.5 for RSA keys)::

    sign = lambda digest, digest_algorithm: token.sign(handle, digest=digest,
                                                        digest_algorithm=digest_algorithm)

There is deliberately no function that signs a TBS handed in from outside.
Every signature the callback returns is checked against the issuer's public
key before the result is assembled, so a wrong key version or a faulty token
raises :class:`X509Error` instead of publishing a certificate nobody can verify.

What gets built (the profile in ``FORMATS.md``, checked with OpenSSL 3.0):

- a code-signing leaf: v3, random positive serial (:func:`new_serial`),
  keyUsage digitalSignature (critical), basicConstraints CA:FALSE (critical),
  extendedKeyUsage codeSigning, subjectKeyIdentifier and authorityKeyIdentifier;
- a CA: basicConstraints CA:TRUE (critical), keyUsage keyCertSign + cRLSign
  (critical; OpenSSL needs cRLSign to accept the CA's CRLs), SKI and AKI;
- a CRL v2 with crlNumber and AKI, a reasonCode per entry, and no
  ``revokedCertificates`` at all when nothing is revoked;
- a PKCS#10 request for an external issuer, asking for the leaf's extensions.

Key identifiers are RFC 5280's method 1: the SHA-1 of the subjectPublicKey
BIT STRING's value. Signature algorithms follow the issuer's key:
ecdsa-with-SHA256 (P-256) and ecdsa-with-SHA384 (P-384) without parameters,
sha256WithRSAEncryption with NULL parameters (RSA-3072 and RSA-4096).

Everything here is pure: no I/O, no clock (times are arguments), no
Kubernetes. :func:`check_issued` looks at a certificate an external issuer
sent back; :func:`describe` and :func:`fingerprint` give what status shows.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import re
import secrets
from typing import Callable, Iterable, Mapping, Sequence

from asn1crypto import algos, core, crl, csr, keys, pem
from asn1crypto import x509 as asn1_x509
from cryptography import x509 as crypto_x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

#: the signing callback: (digest, digest algorithm name) -> signature, as hsm.Token.sign returns it
SignDigest = Callable[[bytes, str], bytes]

KEY_ALGORITHMS = ("ECDSA_P256", "ECDSA_P384", "RSA_3072", "RSA_4096")
#: key algorithm -> (digest algorithm as hsm.Token.sign names it, asn1crypto signature algorithm)
_SIGNATURE = {
    "ECDSA_P256": ("SHA256", "sha256_ecdsa"),
    "ECDSA_P384": ("SHA384", "sha384_ecdsa"),
    "RSA_3072": ("SHA256", "sha256_rsa"),
    "RSA_4096": ("SHA256", "sha256_rsa"),
}
_HASHES = {"SHA256": (hashlib.sha256, hashes.SHA256), "SHA384": (hashlib.sha384, hashes.SHA384)}
_CURVES = {"secp256r1": "ECDSA_P256", "secp384r1": "ECDSA_P384"}
_RSA_SIZES = {3072: "RSA_3072", 4096: "RSA_4096"}

#: what ``usages`` may name: extended key usages and key usages, in the API's spelling
EXTENDED_KEY_USAGES = {"codeSigning": "code_signing"}
KEY_USAGES = {"digitalSignature": "digital_signature", "keyCertSign": "key_cert_sign", "cRLSign": "crl_sign"}
USAGES = tuple(EXTENDED_KEY_USAGES) + tuple(KEY_USAGES)
DEFAULT_LEAF_USAGES = ("codeSigning",)
DEFAULT_CA_USAGES = ("keyCertSign", "cRLSign")

#: CRL reasons in the API's spelling (RFC 5280 CRLReason) -> asn1crypto's names. ``unspecified`` is
#: written as no reasonCode at all (RFC 5280 5.3.1); removeFromCRL belongs to delta CRLs only.
REVOCATION_REASONS = {
    "unspecified": None,
    "keyCompromise": "key_compromise",
    "cACompromise": "ca_compromise",
    "affiliationChanged": "affiliation_changed",
    "superseded": "superseded",
    "cessationOfOperation": "cessation_of_operation",
    "certificateHold": "certificate_hold",
    "privilegeWithdrawn": "privilege_withdrawn",
    "aACompromise": "aa_compromise",
}

#: subject fields (API spelling) -> (asn1crypto attribute, upper bound from RFC 5280 Appendix A)
_SUBJECT_LISTS = {
    "country": ("country_name", 2),
    "organization": ("organization_name", 64),
    "organizationalUnit": ("organizational_unit_name", 64),
}
_COUNTRY = re.compile(r"[A-Z]{2}")
#: RFC 5280 4.1.2.2: a serial is at most 20 octets; a positive one therefore below 2**159
_MAX_SERIAL = 2 ** 159
#: RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050
_UTC_TIME_UNTIL = 2050
_WEAK_SIGNATURE_HASHES = {"md2", "md5", "sha1"}


class X509Error(ValueError):
    """Arguments that cannot make a valid certificate, CRL or CSR, or a signature that does not verify."""


# --------------------------------------------------------------------------- small helpers


def new_serial() -> int:
    """A random positive serial number of at most 127 bits (16 octets in DER, no sign byte)."""
    serial = 0
    while serial == 0:
        serial = secrets.randbits(127)
    return serial


def to_pem(der: bytes, label: str = "CERTIFICATE") -> str:
    """``der`` armored as PEM with ``label`` (CERTIFICATE, X509 CRL, CERTIFICATE REQUEST, PUBLIC KEY)."""
    return pem.armor(label, der).decode("ascii")


def fingerprint(der: bytes) -> str:
    """``sha256:<hex>`` of a DER object (a certificate, or a SubjectPublicKeyInfo as SigningKey status shows)."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def key_algorithm_of(public_key_der: bytes) -> str:
    """The keyroom algorithm name of a DER SubjectPublicKeyInfo; X509Error for any other kind of key."""
    try:
        key = serialization.load_der_public_key(public_key_der)
    except (ValueError, TypeError) as error:
        raise X509Error(f"not a DER SubjectPublicKeyInfo: {error}") from None
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVES:
        algorithm = _CURVES[key.curve.name]
    elif isinstance(key, rsa.RSAPublicKey) and key.key_size in _RSA_SIZES:
        algorithm = _RSA_SIZES[key.key_size]
    else:
        raise X509Error(f"unsupported public key ({type(key).__name__}); keyroom keys are "
                        + ", ".join(KEY_ALGORITHMS))
    canonical = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if canonical != bytes(public_key_der):
        raise X509Error("the SubjectPublicKeyInfo is not in its canonical DER form")
    return algorithm


def key_identifier(public_key_der: bytes) -> bytes:
    """RFC 5280 4.2.1.2 method 1: SHA-1 of the subjectPublicKey BIT STRING's value (no tag, length, unused-bits)."""
    bits = keys.PublicKeyInfo.load(public_key_der)["public_key"].contents
    if not bits or bits[0] != 0:
        raise X509Error("the subjectPublicKey BIT STRING has unused bits")
    return hashlib.sha1(bits[1:]).digest()


def _utc(moment: datetime.datetime, what: str) -> datetime.datetime:
    """``moment`` in UTC, whole seconds (RFC 5280 allows no fractions); X509Error if it has no timezone."""
    if not isinstance(moment, datetime.datetime) or moment.tzinfo is None or moment.utcoffset() is None:
        raise X509Error(f"{what} must be a timezone-aware datetime, not {moment!r}")
    return moment.astimezone(datetime.timezone.utc).replace(microsecond=0)


def _time(moment: datetime.datetime) -> asn1_x509.Time:
    """RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050."""
    if moment.year < _UTC_TIME_UNTIL:
        return asn1_x509.Time({"utc_time": moment})
    return asn1_x509.Time({"general_time": moment})


def _serial(serial: int, what: str = "serial") -> int:
    if isinstance(serial, bool) or not isinstance(serial, int) or not 0 < serial < _MAX_SERIAL:
        raise X509Error(f"a {what} is a positive integer of at most 20 octets (RFC 5280), not {serial!r}")
    return serial


def _signature_algorithm(key_algorithm: str) -> tuple[str, algos.SignedDigestAlgorithm]:
    if key_algorithm not in _SIGNATURE:
        raise X509Error(f"unknown key algorithm {key_algorithm!r}; use one of {', '.join(KEY_ALGORITHMS)}")
    digest_algorithm, name = _SIGNATURE[key_algorithm]
    if name.endswith("_rsa"):
        # sha256WithRSAEncryption carries an explicit NULL; ecdsa-with-SHAx carries no parameters at all.
        return digest_algorithm, algos.SignedDigestAlgorithm({"algorithm": name, "parameters": core.Null()})
    return digest_algorithm, algos.SignedDigestAlgorithm({"algorithm": name})


def _check_key(public_key_der: bytes, key_algorithm: str, whose: str) -> None:
    """The signing key's public key is of ``key_algorithm``, one that keyroom signs with."""
    _signature_algorithm(key_algorithm)
    actual = key_algorithm_of(public_key_der)
    if actual != key_algorithm:
        raise X509Error(f"{whose} key is {actual}, not {key_algorithm}")


def _signed(tbs_der: bytes, *, key_algorithm: str, public_key_der: bytes, sign: SignDigest) -> bytes:
    """Have ``sign`` sign the digest of ``tbs_der`` and check the signature with ``public_key_der``.

    Private on purpose: its callers pass only a TBS they have just built from their own arguments.
    """
    digest_algorithm, _ = _signature_algorithm(key_algorithm)
    hashlib_hash, crypto_hash = _HASHES[digest_algorithm]
    signature = sign(hashlib_hash(tbs_der).digest(), digest_algorithm)
    if not isinstance(signature, bytes | bytearray):
        raise X509Error(f"the signing callback returned {type(signature).__name__}, not bytes")
    signature = bytes(signature)
    key = serialization.load_der_public_key(public_key_der)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, tbs_der, ec.ECDSA(crypto_hash()))
        else:
            key.verify(signature, tbs_der, padding.PKCS1v15(), crypto_hash())
    except InvalidSignature:
        raise X509Error("the signature the key returned does not verify with the issuer's public key "
                        "(a different key version, or a faulty token)") from None
    return signature


# --------------------------------------------------------------------------- names


def build_name(subject: Mapping[str, object]) -> asn1_x509.Name:
    """An X.509 Name from the API's subject: ``{commonName, organization[], organizationalUnit[], country[]}``.

    RDNs go from the most significant down (C, O, OU, CN), one attribute each;
    countries are PrintableString, everything else UTF8String.
    """
    if not isinstance(subject, Mapping):
        raise X509Error(f"a subject is a mapping, not {type(subject).__name__}")
    unknown = set(subject) - {"commonName", *_SUBJECT_LISTS}
    if unknown:
        raise X509Error(f"unknown subject field(s) {', '.join(sorted(map(str, unknown)))}; use commonName, "
                        + ", ".join(_SUBJECT_LISTS))
    common_name = subject.get("commonName")
    if not isinstance(common_name, str) or not common_name.strip() or len(common_name) > 64:
        raise X509Error("subject.commonName is required: a non-blank string of at most 64 characters")
    rdns = []

    def add(attribute: str, value: core.Asn1Value) -> None:
        rdns.append(asn1_x509.RelativeDistinguishedName([asn1_x509.NameTypeAndValue({"type": attribute,
                                                                                     "value": value})]))

    for field, (attribute, bound) in _SUBJECT_LISTS.items():
        values = subject.get(field, [])
        if values is None:
            values = []
        if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
            raise X509Error(f"subject.{field} is a list of strings")
        for value in values:
            if field == "country":
                if not _COUNTRY.fullmatch(value):
                    raise X509Error(f"subject.country {value!r} is not an ISO 3166 two-letter code (like DE)")
                add(attribute, asn1_x509.DirectoryString(name="printable_string",
                                                         value=core.PrintableString(value)))
            else:
                if not value.strip() or len(value) > bound:
                    raise X509Error(f"subject.{field} {value!r} must be non-blank and at most {bound} characters")
                add(attribute, asn1_x509.DirectoryString(name="utf8_string", value=core.UTF8String(value)))
    add("common_name", asn1_x509.DirectoryString(name="utf8_string", value=core.UTF8String(common_name)))
    return asn1_x509.Name(name="", value=asn1_x509.RDNSequence(rdns))


# --------------------------------------------------------------------------- extensions


def _extension(extn_id: str, value: object, *, critical: bool = False) -> asn1_x509.Extension:
    # DER leaves out a DEFAULT value: "critical" is only written when True.
    fields = {"extn_id": extn_id, "extn_value": value}
    if critical:
        fields["critical"] = True
    return asn1_x509.Extension(fields)


def _usages(usages: Iterable[str] | None, *, is_ca: bool) -> tuple[set[str], list[str]]:
    """(key usages, extended key usages) in asn1crypto's names, for ``usages`` in the API's names."""
    chosen = list(usages) if usages is not None else list(DEFAULT_CA_USAGES if is_ca else DEFAULT_LEAF_USAGES)
    unknown = [u for u in chosen if u not in USAGES]
    if unknown:
        raise X509Error(f"unknown usage(s) {', '.join(map(str, unknown))}; use {', '.join(USAGES)}")
    if is_ca:
        key_usage = {"key_cert_sign", "crl_sign"}
    else:
        if "codeSigning" not in chosen:
            raise X509Error("a leaf certificate is for code signing: its usages must include codeSigning")
        issuing = [u for u in chosen if u in ("keyCertSign", "cRLSign")]
        if issuing:
            raise X509Error(f"{' and '.join(issuing)} belong to a CA certificate (isCA: true), not a leaf")
        key_usage = {"digital_signature"}
    key_usage |= {KEY_USAGES[u] for u in chosen if u in KEY_USAGES}
    extended = [EXTENDED_KEY_USAGES[u] for u in EXTENDED_KEY_USAGES if u in chosen]
    return key_usage, extended


def _authority_key_identifier(identifier: bytes) -> asn1_x509.AuthorityKeyIdentifier:
    return asn1_x509.AuthorityKeyIdentifier({"key_identifier": identifier})


# --------------------------------------------------------------------------- parsed certificates


@dataclasses.dataclass(frozen=True)
class _Issuer:
    name: asn1_x509.Name
    key_identifier: bytes
    not_before: datetime.datetime
    not_after: datetime.datetime
    path_length: int | None


def _load_certificate(der: bytes, what: str) -> asn1_x509.Certificate:
    try:
        certificate = asn1_x509.Certificate.load(bytes(der), strict=True)
        certificate.native  # parse every field now, so a broken one fails here and not later
    except (ValueError, TypeError) as error:
        raise X509Error(f"{what} is not a DER X.509 certificate: {error}") from None
    return certificate


def _issuing_ca(issuer_certificate_der: bytes, issuer_public_key_der: bytes, *, for_crl: bool) -> _Issuer:
    """The parts of the issuer's certificate a certificate or CRL under it needs, after checking it may issue."""
    certificate = _load_certificate(issuer_certificate_der, "the issuer certificate")
    tbs = certificate["tbs_certificate"]
    if tbs["subject_public_key_info"].dump() != bytes(issuer_public_key_der):
        raise X509Error("the issuer certificate is for another key than the one that would sign "
                        "(re-issue the CA certificate for the CA key's current version)")
    constraints = certificate.basic_constraints_value
    if constraints is None or not constraints["ca"].native:
        raise X509Error(f"the issuer certificate ({certificate.subject.human_friendly}) is not a CA "
                        "certificate (basicConstraints CA:TRUE)")
    needed = "crl_sign" if for_crl else "key_cert_sign"
    key_usage = certificate.key_usage_value
    if key_usage is not None and needed not in key_usage.native:
        raise X509Error(f"the issuer certificate's keyUsage lacks {'cRLSign' if for_crl else 'keyCertSign'}")
    identifier = certificate.key_identifier or key_identifier(issuer_public_key_der)
    validity = tbs["validity"]
    return _Issuer(name=asn1_x509.Name.load(tbs["subject"].dump()), key_identifier=identifier,
                   not_before=validity["not_before"].native, not_after=validity["not_after"].native,
                   path_length=constraints["path_len_constraint"].native)


# --------------------------------------------------------------------------- certificates


def build_certificate(*, subject: Mapping[str, object], subject_public_key_der: bytes,
                      issuer_certificate_der: bytes | None, issuer_public_key_der: bytes,
                      not_before: datetime.datetime, not_after: datetime.datetime, serial: int,
                      is_ca: bool = False, usages: Sequence[str] | None = None,
                      path_length: int | None = None, crl_distribution_point: str | None = None,
                      sign: SignDigest, key_algorithm: str) -> bytes:
    """A DER X.509 v3 certificate for ``subject_public_key_der``, signed through ``sign`` by the issuer's key.

    ``issuer_certificate_der`` is the CA certificate it is issued under, or
    None for a self-signed certificate (the subject's own key signs, so
    ``issuer_public_key_der`` must be the subject's key). ``key_algorithm`` is
    the issuing key's algorithm and must match ``issuer_public_key_der``.
    ``usages`` defaults to codeSigning for a leaf; a CA always gets
    keyCertSign and cRLSign. ``path_length`` (CA only) limits the CAs below it.
    ``crl_distribution_point`` is a URL where the issuer's CRL is published.
    """
    name = build_name(subject)
    key_algorithm_of(subject_public_key_der)  # one of keyroom's key kinds, in canonical DER
    _check_key(issuer_public_key_der, key_algorithm, "the issuer's")
    serial = _serial(serial)
    start, end = _utc(not_before, "not_before"), _utc(not_after, "not_after")
    if end <= start:
        raise X509Error(f"not_after ({end.isoformat()}) must come after not_before ({start.isoformat()})")
    if path_length is not None and (not is_ca or isinstance(path_length, bool) or not isinstance(path_length, int)
                                    or path_length < 0):
        raise X509Error("path_length is a non-negative integer, and only for a CA certificate")
    key_usage, extended = _usages(usages, is_ca=is_ca)
    subject_identifier = key_identifier(subject_public_key_der)

    if issuer_certificate_der is None:
        if bytes(issuer_public_key_der) != bytes(subject_public_key_der):
            raise X509Error("a self-signed certificate is signed by its own key: issuer_public_key_der must be "
                            "the subject's public key")
        issuer_name, authority_identifier = name, subject_identifier
    else:
        issuer = _issuing_ca(issuer_certificate_der, issuer_public_key_der, for_crl=False)
        if is_ca and issuer.path_length == 0:
            raise X509Error("the issuer's pathLenConstraint is 0: it may not issue CA certificates")
        if start < issuer.not_before or end > issuer.not_after:
            raise X509Error(f"the validity {start.isoformat()} .. {end.isoformat()} must lie within the issuer's "
                            f"({issuer.not_before.isoformat()} .. {issuer.not_after.isoformat()}); "
                            "shorten the duration or renew the CA first")
        issuer_name, authority_identifier = issuer.name, issuer.key_identifier

    constraints: dict[str, object] = {"ca": bool(is_ca)}
    if path_length is not None:
        constraints["path_len_constraint"] = path_length
    extensions = [
        _extension("basic_constraints", constraints, critical=True),
        _extension("key_usage", asn1_x509.KeyUsage(key_usage), critical=True),
    ]
    if extended:
        extensions.append(_extension("extended_key_usage", extended))
    extensions += [
        _extension("key_identifier", subject_identifier),
        _extension("authority_key_identifier", _authority_key_identifier(authority_identifier)),
    ]
    if crl_distribution_point is not None:
        extensions.append(_extension("crl_distribution_points", [_distribution_point(crl_distribution_point)]))

    _, signature_algorithm = _signature_algorithm(key_algorithm)
    tbs = asn1_x509.TbsCertificate({
        "version": "v3",
        "serial_number": serial,
        "signature": signature_algorithm,
        "issuer": issuer_name,
        "validity": {"not_before": _time(start), "not_after": _time(end)},
        "subject": name,
        "subject_public_key_info": keys.PublicKeyInfo.load(bytes(subject_public_key_der)),
        "extensions": extensions,
    })
    tbs_der = tbs.dump()
    signature = _signed(tbs_der, key_algorithm=key_algorithm, public_key_der=issuer_public_key_der, sign=sign)
    return asn1_x509.Certificate({
        "tbs_certificate": asn1_x509.TbsCertificate.load(tbs_der),
        "signature_algorithm": _signature_algorithm(key_algorithm)[1],
        "signature_value": signature,
    }).dump()


def _distribution_point(url: str) -> asn1_x509.DistributionPoint:
    if not isinstance(url, str) or not re.fullmatch(r"(?i)(https?|ldap)://[\x21-\x7e]+", url):
        raise X509Error(f"the CRL distribution point must be an http(s) or ldap URL of printable ASCII, not {url!r}")
    return asn1_x509.DistributionPoint({
        "distribution_point": asn1_x509.DistributionPointName(
            name="full_name", value=[asn1_x509.GeneralName(name="uniform_resource_identifier", value=url)]),
    })


# --------------------------------------------------------------------------- CRLs


def build_crl(*, issuer_certificate_der: bytes,
              revoked: Iterable[tuple[int, datetime.datetime, str | None]],
              this_update: datetime.datetime, next_update: datetime.datetime, crl_number: int,
              sign: SignDigest, key_algorithm: str) -> bytes:
    """A DER CRL v2 of the CA ``issuer_certificate_der``, signed through ``sign`` by the CA's key.

    ``revoked`` holds ``(serial, revocation time, reason)``; the reason is a
    RFC 5280 CRLReason in the API's spelling (``keyCompromise``...) or None.
    ``crl_number`` must grow with every CRL the CA publishes.
    """
    issuer_public_key_der = _load_certificate(issuer_certificate_der, "the issuer certificate")[
        "tbs_certificate"]["subject_public_key_info"].dump()
    _check_key(issuer_public_key_der, key_algorithm, "the issuer's")
    issuer = _issuing_ca(issuer_certificate_der, issuer_public_key_der, for_crl=True)
    crl_number = _serial(crl_number, "CRL number")
    start, end = _utc(this_update, "this_update"), _utc(next_update, "next_update")
    if end <= start:
        raise X509Error(f"next_update ({end.isoformat()}) must come after this_update ({start.isoformat()})")

    entries: dict[int, crl.RevokedCertificate] = {}
    for item in revoked:
        try:
            serial, when, reason = item
        except (TypeError, ValueError):
            raise X509Error(f"a revoked entry is (serial, revocation time, reason), not {item!r}") from None
        serial = _serial(serial)
        if serial in entries:
            raise X509Error(f"serial {serial:x} is listed twice")
        if reason is not None and reason not in REVOCATION_REASONS:
            raise X509Error(f"unknown revocation reason {reason!r}; use one of {', '.join(REVOCATION_REASONS)}")
        when = _utc(when, "a revocation time")
        if when > start:
            raise X509Error(f"serial {serial:x} is revoked from {when.isoformat()}, after this CRL's this_update "
                            f"({start.isoformat()}); list it in a CRL issued from that moment on")
        entry: dict[str, object] = {"user_certificate": serial, "revocation_date": _time(when)}
        code = REVOCATION_REASONS.get(reason)
        if code is not None:
            entry["crl_entry_extensions"] = [crl.CRLEntryExtension({"extn_id": "crl_reason",
                                                                    "extn_value": crl.CRLReason(code)})]
        entries[serial] = crl.RevokedCertificate(entry)

    _, signature_algorithm = _signature_algorithm(key_algorithm)
    fields: dict[str, object] = {
        "version": "v2",
        "signature": signature_algorithm,
        "issuer": issuer.name,
        "this_update": _time(start),
        "next_update": _time(end),
        "crl_extensions": [
            crl.TBSCertListExtension({"extn_id": "authority_key_identifier",
                                      "extn_value": _authority_key_identifier(issuer.key_identifier)}),
            crl.TBSCertListExtension({"extn_id": "crl_number", "extn_value": crl_number}),
        ],
    }
    if entries:  # an empty revokedCertificates SEQUENCE is not allowed: leave the field out
        fields["revoked_certificates"] = [entries[serial] for serial in sorted(entries)]
    tbs_der = crl.TbsCertList(fields).dump()
    signature = _signed(tbs_der, key_algorithm=key_algorithm, public_key_der=issuer_public_key_der, sign=sign)
    return crl.CertificateList({
        "tbs_cert_list": crl.TbsCertList.load(tbs_der),
        "signature_algorithm": _signature_algorithm(key_algorithm)[1],
        "signature": signature,
    }).dump()


# --------------------------------------------------------------------------- CSRs (external issuer)


def build_csr(*, subject: Mapping[str, object], public_key_der: bytes, sign: SignDigest, key_algorithm: str) -> bytes:
    """A DER PKCS#10 request for a code-signing leaf, signed through ``sign`` by the key it is for.

    It asks for the leaf's extensions (basicConstraints CA:FALSE,
    keyUsage digitalSignature, extendedKeyUsage codeSigning); an issuer may
    ignore the request, which is why :func:`check_issued` looks at the result.
    """
    name = build_name(subject)
    _check_key(public_key_der, key_algorithm, "the requesting")
    requested = asn1_x509.Extensions([
        _extension("basic_constraints", {"ca": False}, critical=True),
        _extension("key_usage", asn1_x509.KeyUsage({"digital_signature"}), critical=True),
        _extension("extended_key_usage", ["code_signing"]),
    ])
    info_der = csr.CertificationRequestInfo({
        "version": "v1",
        "subject": name,
        "subject_pk_info": keys.PublicKeyInfo.load(bytes(public_key_der)),
        "attributes": [csr.CRIAttribute({"type": "extension_request", "values": [requested]})],
    }).dump()
    signature = _signed(info_der, key_algorithm=key_algorithm, public_key_der=public_key_der, sign=sign)
    return csr.CertificationRequest({
        "certification_request_info": csr.CertificationRequestInfo.load(info_der),
        "signature_algorithm": _signature_algorithm(key_algorithm)[1],
        "signature": signature,
    }).dump()


def check_issued(certificate_der: bytes, *, public_key_der: bytes, csr_der: bytes,
                 now: datetime.datetime | None = None) -> list[str]:
    """What is wrong with a certificate an external issuer returned for ``csr_der``; empty when nothing is.

    It must be for ``public_key_der`` (the key version the CSR was made for)
    and carry the CSR's subject, and be a usable code-signing leaf: v3, not a
    CA, keyUsage digitalSignature without CA usages, extendedKeyUsage
    codeSigning, no critical extension a verifier would not know, not signed
    with MD5 or SHA-1, and (given ``now``) valid at ``now``. The chain up to a
    trusted root is the verifier's business, not checked here.
    """
    try:
        certificate = _load_certificate(certificate_der, "the issued certificate")
    except X509Error as error:
        return [str(error)]
    try:
        request = csr.CertificationRequest.load(bytes(csr_der), strict=True)
        request.native
    except (ValueError, TypeError) as error:
        return [f"the CSR is not a DER PKCS#10 request: {error}"]
    problems = []
    tbs = certificate["tbs_certificate"]
    request_info = request["certification_request_info"]
    if request_info["subject_pk_info"].dump() != bytes(public_key_der):
        problems.append("the CSR is for another public key than this key version")
    if tbs["subject_public_key_info"].dump() != bytes(public_key_der):
        problems.append("the certificate is for another public key than the one the CSR asked for")
    if not tbs["subject"] == request_info["subject"]:  # RFC 5280 7.1 comparison (case, spaces)
        problems.append(f"the subject differs: the certificate names {tbs['subject'].human_friendly!r}, "
                        f"the CSR asked for {request_info['subject'].human_friendly!r}")
    if tbs["version"].native != "v3":
        problems.append(f"the certificate is {tbs['version'].native}, not v3 (a code-signing leaf needs extensions)")
    constraints = certificate.basic_constraints_value
    if constraints is not None and constraints["ca"].native:
        problems.append("the certificate is a CA certificate (basicConstraints CA:TRUE), not a code-signing leaf")
    key_usage = certificate.key_usage_value
    if key_usage is None or "digital_signature" not in key_usage.native:
        problems.append("keyUsage lacks digitalSignature: it cannot sign code")
    elif key_usage.native & {"key_cert_sign", "crl_sign"}:
        problems.append("keyUsage grants keyCertSign or cRLSign, which a code-signing leaf must not have")
    extended = certificate.extended_key_usage_value
    if extended is None or "code_signing" not in extended.native:
        problems.append("extendedKeyUsage lacks codeSigning: verifiers will not accept it for code")
    unknown_critical = sorted(certificate.critical_extensions - _KNOWN_CRITICAL)
    if unknown_critical:
        problems.append(f"critical extension(s) verifiers may not know: {', '.join(map(str, unknown_critical))}")
    hash_algorithm = certificate["signature_algorithm"].hash_algo
    if hash_algorithm in _WEAK_SIGNATURE_HASHES:
        problems.append(f"the certificate is signed with {hash_algorithm.upper()}, which verifiers reject")
    validity = tbs["validity"]
    not_before, not_after = validity["not_before"].native, validity["not_after"].native
    if not_after <= not_before:
        problems.append("the validity period is empty (notAfter is not after notBefore)")
    elif now is not None:
        if now < not_before:
            problems.append(f"the certificate is not valid before {not_before.isoformat()}")
        elif now > not_after:
            problems.append(f"the certificate expired at {not_after.isoformat()}")
    return problems


_KNOWN_CRITICAL = {"basic_constraints", "key_usage", "extended_key_usage", "subject_alt_name", "name_constraints",
                   "policy_constraints", "certificate_policies", "inhibit_any_policy", "policy_mappings"}


# --------------------------------------------------------------------------- status


def describe(certificate_der: bytes) -> dict[str, str]:
    """What status shows of a certificate: serialNumber (hex), notBefore, notAfter, subject, issuer, fingerprint."""
    try:
        certificate = crypto_x509.load_der_x509_certificate(bytes(certificate_der))
    except ValueError as error:
        raise X509Error(f"not a DER X.509 certificate: {error}") from None
    return {
        "serialNumber": format(certificate.serial_number, "x"),
        "notBefore": _rfc3339(certificate.not_valid_before_utc),
        "notAfter": _rfc3339(certificate.not_valid_after_utc),
        "subject": certificate.subject.rfc4514_string(),
        "issuer": certificate.issuer.rfc4514_string(),
        "fingerprint": fingerprint(bytes(certificate_der)),
    }


def _rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

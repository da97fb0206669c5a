"""Offline verification of what the signer produces, with nothing but exported public material.

A verifier holds an artifact, its signature and what ``kubectl keyroom
export`` wrote: the key versions' public keys, the certificates, the chain up
to the root, and the CRLs. No cluster is needed. Verification answers one
question, *does this signature prove that a key I trust signed exactly these
bytes?*, and so it is built from checks that each either pass or raise
:class:`NotVerified`; nothing is reported as verified that was not checked.
What a format cannot prove (a trusted time, a transparency log) is listed in
the report as not checked, never silently skipped.

Trust comes in two forms, and at least one must be given:

- public keys (a key version's ``publicKey``): the signature must verify with
  one of them; for the certificate formats, the signing certificate must
  carry one of them;
- trusted roots (``--ca``), with optional intermediates and CRLs: the signing
  certificate must chain to a root, each link signed by its issuer, issuers
  being CAs, the leaf being for code signing, every certificate valid at the
  verification time and, where a CRL of its issuer is given, not revoked.

Per format, the digest is recomputed from the artifact the way the client
computes it for a SignRequest (the file's hash; the Authenticode digest of a
PE, :func:`keyroom.cli.pe.authenticode_digest`; the manifest and every entry
of a JAR, :mod:`keyroom.cli.jar`; the content digest of an APK,
:mod:`keyroom.cli.apk`) and compared with what the signature signs.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import hmac
import json
import re
import zipfile

from asn1crypto import algos
from asn1crypto import cms as asn1_cms
from asn1crypto import core as asn1_core
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import ExtendedKeyUsageOID

from keyroom.cli import apk as cli_apk
from keyroom.cli import jar as cli_jar
from keyroom.cli import pe
from keyroom.signer.formats import FormatError
from keyroom.signer.formats import apk as apk_format
from keyroom.signer.formats import jar as jar_format
from keyroom.signer.formats import sigstore

FORMATS = ("raw", "cms", "authenticode", "jar", "sigstore", "apk")
HASHES = {"SHA256": hashes.SHA256, "SHA384": hashes.SHA384, "SHA512": hashes.SHA512}
_ASN1_HASHES = {"sha256": "SHA256", "sha384": "SHA384", "sha512": "SHA512"}
_SIGSTORE_HASHES = {"SHA2_256": "SHA256", "SHA2_384": "SHA384", "SHA2_512": "SHA512"}
_SPC_INDIRECT_DATA = "1.3.6.1.4.1.311.2.1.4"
_SPC_PE_IMAGE_DATA = "1.3.6.1.4.1.311.2.1.15"
_MAX_CHAIN = 8
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.S)


class NotVerified(Exception):
    """The signature does not prove what it should; the message says which check failed."""


class TrustError(ValueError):
    """The trust material given cannot be used (no key and no root, or a file that is not what it should be)."""


@dataclasses.dataclass
class Trust:
    """What the verifier trusts, from exported files."""

    public_keys: list = dataclasses.field(default_factory=list)
    roots: list[x509.Certificate] = dataclasses.field(default_factory=list)
    intermediates: list[x509.Certificate] = dataclasses.field(default_factory=list)
    crls: list[x509.CertificateRevocationList] = dataclasses.field(default_factory=list)

    def check_usable(self) -> None:
        if not self.public_keys and not self.roots:
            raise TrustError("nothing to trust: give the key version's public key (--key) or the root certificate "
                             "(--ca); kubectl keyroom export KEY writes both")


@dataclasses.dataclass
class Report:
    """What was verified, what was not, and who signed."""

    format: str
    artifact: str
    checked: list[str] = dataclasses.field(default_factory=list)
    not_checked: list[str] = dataclasses.field(default_factory=list)
    signer: dict = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"verified": True, **dataclasses.asdict(self)}


# ---------------------------------------------------------------- loading trust material

def pem_blocks(data: bytes, label: str) -> list[bytes]:
    """The DER of each PEM block labelled ``label`` in ``data``."""
    blocks = []
    for match in _PEM.finditer(data):
        if match.group(1).decode() == label:
            body = b"".join(match.group(0).splitlines()[1:-1])
            blocks.append(base64.b64decode(body))
    return blocks


def load_public_keys(data: bytes, source: str) -> list:
    keys = [serialization.load_der_public_key(der) for der in pem_blocks(data, "PUBLIC KEY")]
    if not keys:
        raise TrustError(f"{source} holds no PEM public key (-----BEGIN PUBLIC KEY-----)")
    return keys


def load_certificates(data: bytes, source: str) -> list[x509.Certificate]:
    try:
        found = [x509.load_der_x509_certificate(der) for der in pem_blocks(data, "CERTIFICATE")]
        if not found and data[:1] == b"\x30":
            found = [x509.load_der_x509_certificate(data)]
    except ValueError as error:
        raise TrustError(f"{source}: not a certificate: {error}") from None
    if not found:
        raise TrustError(f"{source} holds no certificate (PEM or DER)")
    return found


def load_crls(data: bytes, source: str) -> list[x509.CertificateRevocationList]:
    try:
        found = [x509.load_der_x509_crl(der) for der in pem_blocks(data, "X509 CRL")]
        if not found and data[:1] == b"\x30":
            found = [x509.load_der_x509_crl(data)]
    except ValueError as error:
        raise TrustError(f"{source}: not a CRL: {error}") from None
    if not found:
        raise TrustError(f"{source} holds no CRL (PEM or DER)")
    return found


def spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_fingerprint(key) -> str:
    """As SigningKey status shows it: sha256 of the DER SubjectPublicKeyInfo."""
    return "sha256:" + hashlib.sha256(spki(key)).hexdigest()


# ---------------------------------------------------------------- primitives

def _verify_digest_signature(key, signature: bytes, digest: bytes, algorithm: str) -> bool:
    """Whether ``signature`` is ``key``'s signature over the prehashed ``digest`` (ECDSA, or RSA PKCS#1 v1.5)."""
    prehashed = utils.Prehashed(HASHES[algorithm]())
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, digest, ec.ECDSA(prehashed))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, digest, padding.PKCS1v15(), prehashed)
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def _describe_key(key) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__


def _name(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string() or f"serial {certificate.serial_number:x}"


def _at(certificate: x509.Certificate, moment: datetime.datetime) -> None:
    if not certificate.not_valid_before_utc <= moment <= certificate.not_valid_after_utc:
        raise NotVerified(f"certificate {_name(certificate)} is valid from {certificate.not_valid_before_utc} to "
                          f"{certificate.not_valid_after_utc}, not at {moment:%Y-%m-%dT%H:%M:%SZ}")


def _extension(certificate: x509.Certificate, kind):
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _is_ca(certificate: x509.Certificate) -> bool:
    constraints = _extension(certificate, x509.BasicConstraints)
    usage = _extension(certificate, x509.KeyUsage)
    return bool(constraints and constraints.ca) and (usage is None or usage.key_cert_sign)


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def validate_chain(leaf: x509.Certificate, *, pool: list[x509.Certificate], trust: Trust,
                   at: datetime.datetime, report: Report) -> list[x509.Certificate]:
    """The path from ``leaf`` to a trusted root, each link checked; NotVerified where any check fails."""
    usage = _extension(leaf, x509.ExtendedKeyUsage)
    if usage is None or not ({ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
                             & set(usage)):
        raise NotVerified(f"the signing certificate {_name(leaf)} is not for code signing (no extendedKeyUsage "
                          "codeSigning)")
    key_usage = _extension(leaf, x509.KeyUsage)
    if key_usage is not None and not key_usage.digital_signature:
        raise NotVerified(f"the signing certificate {_name(leaf)} lacks keyUsage digitalSignature")
    roots = {root.public_bytes(serialization.Encoding.DER) for root in trust.roots}
    path, current = [leaf], leaf
    while current.public_bytes(serialization.Encoding.DER) not in roots:
        if len(path) > _MAX_CHAIN:
            raise NotVerified(f"no trusted root within {_MAX_CHAIN} certificates of {_name(leaf)}")
        candidates = [c for c in [*trust.roots, *trust.intermediates, *pool]
                      if c.subject == current.issuer and c is not current and c not in path]
        issuer = next((c for c in candidates if _issued_by(current, c)), None)
        if issuer is None:
            if current.issuer == current.subject and _issued_by(current, current):
                raise NotVerified(f"the chain ends at the self-signed {_name(current)}, which is not a root you "
                                  "trust (--ca)")
            raise NotVerified(f"no certificate that issued {_name(current)} (issuer {current.issuer.rfc4514_string()}) "
                              "verifies its signature; give the chain (--chain) or the right root (--ca)")
        if not _is_ca(issuer):
            raise NotVerified(f"{_name(issuer)} signed {_name(current)} but is no CA (basicConstraints CA:TRUE, "
                              "keyUsage keyCertSign)")
        path.append(issuer)
        current = issuer
    for certificate in path:
        _at(certificate, at)
    report.checked.append(f"certificate chain: {' <- '.join(_name(c) for c in reversed(path))}, each signed by the "
                          f"next, valid at {at:%Y-%m-%dT%H:%M:%SZ}, ending at a root you trust")
    _check_revocation(path, trust=trust, at=at, report=report)
    return path


def _check_revocation(path: list[x509.Certificate], *, trust: Trust, at: datetime.datetime, report: Report) -> None:
    if not trust.crls:
        report.not_checked.append("revocation: no CRL given (--crl)")
        return
    for certificate, issuer in zip(path, path[1:]):
        crls = [crl for crl in trust.crls if crl.issuer == issuer.subject]
        if not crls:
            report.not_checked.append(f"revocation of {_name(certificate)}: no CRL of {_name(issuer)} given")
            continue
        valid = [crl for crl in crls if crl.is_signature_valid(issuer.public_key())]
        if not valid:
            raise NotVerified(f"the CRL of {_name(issuer)} is not signed by {_name(issuer)}: it was altered or is "
                              "another CA's")
        crl = max(valid, key=lambda c: c.last_update_utc)
        revoked = crl.get_revoked_certificate_by_serial_number(certificate.serial_number)
        if revoked is not None:
            raise NotVerified(f"certificate {_name(certificate)} (serial {certificate.serial_number:x}) is revoked "
                              f"since {revoked.revocation_date_utc:%Y-%m-%dT%H:%M:%SZ} by the CRL of {_name(issuer)}")
        report.checked.append(f"revocation: {_name(certificate)} is not on the CRL of {_name(issuer)} issued "
                              f"{crl.last_update_utc:%Y-%m-%dT%H:%M:%SZ}")
        if crl.next_update_utc is not None and crl.next_update_utc < at:
            report.not_checked.append(f"the CRL of {_name(issuer)} was due for renewal at "
                                      f"{crl.next_update_utc:%Y-%m-%dT%H:%M:%SZ}: a later revocation would not show; "
                                      "export a fresh one")


def _trusted_key(key, trust: Trust) -> bool:
    return any(spki(key) == spki(trusted) for trusted in trust.public_keys)


# ---------------------------------------------------------------- PKCS#7 / CMS SignedData

@dataclasses.dataclass
class _Signed:
    content_type: str
    content: bytes | None  # contents octets of the encapsulated content (PKCS#7 style)
    digest_algorithm: str
    certificate: x509.Certificate
    signing_time: datetime.datetime | None


def _signed_attribute(attributes, name: str):
    values = [a["values"] for a in attributes if a["type"].native == name]
    if len(values) != 1 or len(values[0]) != 1:
        raise NotVerified(f"the signature has {len(values)} {name} attributes, not exactly one with one value")
    return values[0][0]


def check_signed_data(der: bytes, *, message_digest, trust: Trust, report: Report,
                      at: datetime.datetime | None) -> _Signed:
    """Check a PKCS#7 SignedData with one signer: its signature over its signed attributes, the messageDigest
    against ``message_digest(signed)`` (the digest the artifact must have), and who signed (key or chain)."""
    try:
        info = asn1_cms.ContentInfo.load(der)
        if info["content_type"].native != "signed_data":
            raise NotVerified(f"the signature is a {info['content_type'].native}, not a SignedData")
        data = info["content"]
        signer_infos = data["signer_infos"]
        if len(signer_infos) != 1:
            raise NotVerified(f"the signature has {len(signer_infos)} signers; exactly one is verified")
        signer = signer_infos[0]
        algorithm = _ASN1_HASHES.get(signer["digest_algorithm"]["algorithm"].native)
        if algorithm is None:
            raise NotVerified(f"digest algorithm {signer['digest_algorithm']['algorithm'].native} is not accepted")
        attributes = signer["signed_attrs"]
        if not attributes.contents:
            raise NotVerified("the signature has no signed attributes, so it does not name the content's digest")
        encapsulated = data["encap_content_info"]
        content_type = encapsulated["content_type"].dotted
        if _signed_attribute(attributes, "content_type").dotted != content_type:
            raise NotVerified("the signed contentType differs from the encapsulated content's type")
        content = None
        if not isinstance(encapsulated["content"], asn1_core.Void) and encapsulated["content"].contents:
            # PKCS#7 style: [0] EXPLICIT holds the content's own DER; asn1crypto gives its contents octets, which
            # are what the messageDigest covers
            content = encapsulated["content"].contents
        claimed_digest = _signed_attribute(attributes, "message_digest").native
        time_value = [a["values"][0].native for a in attributes if a["type"].native == "signing_time"]
        signing_time = time_value[0] if time_value else None
        sid = signer["sid"]
        certificates = [x509.load_der_x509_certificate(c.chosen.dump()) for c in data["certificates"] or []
                        if c.name == "certificate"]
        if sid.name == "issuer_and_serial_number":
            issuer = sid.chosen["issuer"].dump()
            serial = sid.chosen["serial_number"].native
            found = [c for c in [*certificates, *trust.intermediates]
                     if c.serial_number == serial and c.issuer.public_bytes() == issuer]
        else:
            identifier = sid.chosen.native
            found = [c for c in [*certificates, *trust.intermediates]
                     if (e := _extension(c, x509.SubjectKeyIdentifier)) is not None and e.digest == identifier]
        if not found:
            raise NotVerified("the signing certificate is not in the signature (nor in --chain)")
        certificate = found[0]
        signed_bytes = b"\x31" + attributes.dump()[1:]  # RFC 5652 5.4: the attributes' DER as a SET OF
        signature = signer["signature"].native
    except (ValueError, TypeError, KeyError) as error:
        raise NotVerified(f"the signature is not a readable PKCS#7 SignedData: {error}") from None

    signed = _Signed(content_type=content_type, content=content, digest_algorithm=algorithm,
                     certificate=certificate, signing_time=signing_time)
    expected = message_digest(signed)
    if not hmac.compare_digest(bytes(claimed_digest), expected):
        raise NotVerified("the signature is over another content: its messageDigest is not the digest of this "
                          "artifact (the file was changed, or this is another file's signature)")
    report.checked.append(f"content digest: the signed messageDigest equals the {algorithm} digest computed here")
    key = certificate.public_key()
    digest = hashlib.new(algorithm.lower(), signed_bytes).digest()
    if not _verify_digest_signature(key, signature, digest, algorithm):
        raise NotVerified(f"the signature over the signed attributes does not verify with the signing "
                          f"certificate's key ({_name(certificate)})")
    report.checked.append(f"signature: valid, {_describe_key(key)} with {algorithm}, by certificate "
                          f"{_name(certificate)} (serial {certificate.serial_number:x})")
    report.signer.update(certificate=_name(certificate), serialNumber=format(certificate.serial_number, "x"),
                         keyFingerprint=key_fingerprint(key),
                         certificateFingerprint="sha256:" + certificate.fingerprint(hashes.SHA256()).hex())
    if signing_time is not None:
        report.signer["signingTime"] = signing_time.isoformat()
        report.not_checked.append("signing time: as the signer claims it (no trusted timestamp)")
    _check_signer(certificate, pool=certificates, trust=trust, report=report,
                  at=at or datetime.datetime.now(datetime.timezone.utc))
    return signed


def _check_signer(certificate: x509.Certificate, *, pool, trust: Trust, report: Report,
                  at: datetime.datetime) -> None:
    key = certificate.public_key()
    if trust.public_keys:
        if not _trusted_key(key, trust):
            raise NotVerified(f"the signing certificate's key ({key_fingerprint(key)}) is none of the public keys "
                              "you trust (--key)")
        report.checked.append(f"key: the signing certificate carries a public key you trust ({key_fingerprint(key)})")
    if trust.roots:
        validate_chain(certificate, pool=pool, trust=trust, at=at, report=report)
    else:
        report.not_checked.append("certificate chain: no root given (--ca); the certificate is trusted only for "
                                  "carrying a key you gave")


# ---------------------------------------------------------------- formats

def _file_digest(data: bytes, algorithm: str) -> bytes:
    return hashlib.new(algorithm.lower(), data).digest()


def _keys_to_try(trust: Trust, certificate: x509.Certificate | None, *, pool, report: Report,
                 at: datetime.datetime) -> list:
    """The keys a raw signature or sigstore bundle may be by: --key's, or --cert's after its chain is checked."""
    if certificate is not None:
        _check_signer(certificate, pool=pool, trust=trust, report=report, at=at)
        return [certificate.public_key()]
    if not trust.public_keys:
        raise TrustError("a raw signature or sigstore bundle names no certificate: give the public key (--key), or "
                         "the signing certificate (--cert) with its root (--ca)")
    return list(trust.public_keys)


def verify_raw(artifact: bytes, signature: bytes, *, algorithm: str, trust: Trust, report: Report,
               certificate: x509.Certificate | None = None, at: datetime.datetime) -> None:
    digest = _file_digest(artifact, algorithm)
    keys = _keys_to_try(trust, certificate, pool=trust.intermediates, report=report, at=at)
    key = next((k for k in keys if _verify_digest_signature(k, signature, digest, algorithm)), None)
    if key is None:
        raise NotVerified(f"the signature does not verify over the {algorithm} digest of this file with "
                          f"{'the certificate' if certificate is not None else 'any key you gave'} (another file, "
                          "another key, or another digest algorithm: --digest)")
    report.checked.append(f"signature: valid over the {algorithm} digest of the file, {_describe_key(key)}, key "
                          f"{key_fingerprint(key)}")
    report.signer["keyFingerprint"] = key_fingerprint(key)


def verify_sigstore(artifact: bytes, bundle_bytes: bytes, *, trust: Trust, report: Report,
                    certificate: x509.Certificate | None = None, at: datetime.datetime) -> None:
    try:
        bundle = json.loads(bundle_bytes)
        if not str(bundle.get("mediaType", "")).startswith("application/vnd.dev.sigstore.bundle"):
            raise NotVerified(f"not a Sigstore bundle (mediaType {bundle.get('mediaType')!r})")
        material = bundle.get("verificationMaterial") or {}
        if "publicKey" not in material:
            raise NotVerified("the bundle is not of the public-key kind keyroom writes (it names a certificate); "
                              "verify it with cosign or sigstore")
        message = bundle["messageSignature"]
        algorithm = _SIGSTORE_HASHES.get(message["messageDigest"]["algorithm"])
        if algorithm is None:
            raise NotVerified(f"digest algorithm {message['messageDigest']['algorithm']} is not accepted")
        claimed = base64.b64decode(message["messageDigest"]["digest"], validate=True)
        signature = base64.b64decode(message["signature"], validate=True)
        hint = material["publicKey"].get("hint")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise NotVerified(f"the bundle is not readable: {error}") from None
    digest = _file_digest(artifact, algorithm)
    if not hmac.compare_digest(claimed, digest):
        raise NotVerified("the bundle is for another content: its message digest is not this file's")
    report.checked.append(f"content digest: the bundle's {algorithm} message digest equals this file's")
    keys = _keys_to_try(trust, certificate, pool=trust.intermediates, report=report, at=at)
    key = next((k for k in keys if _verify_digest_signature(k, signature, digest, algorithm)), None)
    if key is None:
        raise NotVerified("the bundle's signature does not verify with any key you gave")
    report.checked.append(f"signature: valid, {_describe_key(key)}, key {key_fingerprint(key)}")
    if hint and hint != sigstore.key_hint(spki(key)):
        report.not_checked.append("the bundle's key hint names another key than the one that verified (unsigned "
                                  "metadata; ignored)")
    report.signer["keyFingerprint"] = key_fingerprint(key)
    report.not_checked.append("transparency log: keyroom bundles carry none")


def verify_cms(artifact: bytes, signature: bytes, *, trust: Trust, report: Report,
               at: datetime.datetime | None) -> None:
    def message_digest(signed: _Signed) -> bytes:
        if signed.content_type != "1.2.840.113549.1.7.1" or signed.content is not None:
            raise NotVerified("not a detached signature of data (it encapsulates content or another type)")
        return _file_digest(artifact, signed.digest_algorithm)
    check_signed_data(signature, message_digest=message_digest, trust=trust, report=report, at=at)


def verify_authenticode(artifact: bytes, signature: bytes | None, *, trust: Trust, report: Report,
                        at: datetime.datetime | None) -> None:
    try:
        der = signature if signature is not None else pe.embedded_signature(artifact)
    except pe.PEError as error:
        raise NotVerified(f"the PE file: {error}") from None
    if der is None:
        raise NotVerified("the PE file carries no signature (no certificate table); give a detached one with --sig")

    def message_digest(signed: _Signed) -> bytes:
        if signed.content_type != _SPC_INDIRECT_DATA or signed.content is None:
            raise NotVerified("not an Authenticode signature: the content is not SpcIndirectDataContent")
        try:
            indirect = _AnySequence.load(b"\x30" + _der_length(len(signed.content)) + signed.content)
            image = _AnySequence.load(indirect[0].dump())
            if asn1_core.ObjectIdentifier.load(image[0].dump()).dotted != _SPC_PE_IMAGE_DATA:
                raise NotVerified("the Authenticode content is not for a PE image")
            digest_info = algos.DigestInfo.load(indirect[1].dump())
            algorithm = _ASN1_HASHES.get(digest_info["digest_algorithm"]["algorithm"].native)
            signed_digest = digest_info["digest"].native
        except (ValueError, TypeError, IndexError, KeyError) as error:
            raise NotVerified(f"the SpcIndirectDataContent is not readable: {error}") from None
        if algorithm is None:
            raise NotVerified("the Authenticode digest uses an algorithm that is not accepted")
        try:
            computed = pe.authenticode_digest(artifact, algorithm)
        except pe.PEError as error:
            raise NotVerified(f"the PE file: {error}") from None
        if not hmac.compare_digest(bytes(signed_digest), computed):
            raise NotVerified("the signature is for another executable: its Authenticode digest is not this file's "
                              "(the file was changed after signing)")
        report.checked.append(f"Authenticode digest: the signed {algorithm} digest equals this file's, computed as "
                              "the client computes it (checksum, security directory and certificate table skipped)")
        report.signer["authenticodeDigest"] = computed.hex()
        return _file_digest(signed.content, signed.digest_algorithm)
    check_signed_data(der, message_digest=message_digest, trust=trust, report=report, at=at)


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


class _AnySequence(asn1_core.SequenceOf):
    _child_spec = asn1_core.Any


def verify_jar(path, *, trust: Trust, report: Report, at: datetime.datetime | None) -> None:
    """A signed JAR: its block over its .SF, the .SF over the manifest, the manifest over every entry."""
    try:
        with zipfile.ZipFile(path) as archive:
            try:
                entries = cli_jar._entries(archive)
            except cli_jar.JarError as error:
                raise NotVerified(str(error)) from None
            names = archive.namelist()
            signature_files = [n for n in names if cli_jar.is_signature_related(n) and n.upper().endswith(".SF")]
            if len(signature_files) != 1:
                raise NotVerified(f"the JAR has {len(signature_files)} signature files (META-INF/*.SF); exactly one "
                                  "is verified")
            base = signature_files[0][:-3]
            blocks = [n for n in names if n.upper() in (f"{base.upper()}.EC", f"{base.upper()}.RSA")]
            if len(blocks) != 1:
                raise NotVerified(f"no signature block (.EC or .RSA) beside {signature_files[0]}")
            if cli_jar.MANIFEST_NAME not in names:
                raise NotVerified("the JAR has no META-INF/MANIFEST.MF")
            manifest = archive.read(cli_jar.MANIFEST_NAME)
            signature_file = archive.read(signature_files[0])
            block = archive.read(blocks[0])
            check_signed_data(block, message_digest=lambda signed: _detached_data(signed, signature_file),
                              trust=trust, report=report, at=at)
            _check_signature_file(signature_file, manifest, report)
            _check_entries(archive, entries, manifest, report)
    except (zipfile.BadZipFile, OSError) as error:
        raise NotVerified(f"not a readable JAR: {error}") from None


def _detached_data(signed: _Signed, content: bytes) -> bytes:
    if signed.content_type != "1.2.840.113549.1.7.1" or signed.content is not None:
        raise NotVerified("the JAR block is not a detached signature of data")
    return _file_digest(content, signed.digest_algorithm)


def _check_signature_file(signature_file: bytes, manifest: bytes, report: Report) -> None:
    try:
        parsed = jar_format.parse_manifest(signature_file, version_header="Signature-Version")
    except FormatError as error:
        raise NotVerified(f"the .SF is malformed: {error}") from None
    for algorithm, (label, hash_function) in jar_format.DIGESTS.items():
        claimed = parsed.main.get(f"{label}-Digest-Manifest")
        if claimed is None:
            continue
        if claimed != base64.b64encode(hash_function(manifest).digest()).decode():
            raise NotVerified("the manifest was changed after signing: the .SF's digest of MANIFEST.MF differs")
        report.checked.append(f"manifest: the signed .SF holds its {algorithm} digest")
        report.signer["requestDigest"] = hash_function(manifest).hexdigest()
        return
    raise NotVerified("the .SF carries no digest of the whole manifest (<ALG>-Digest-Manifest); keyroom always "
                      "writes one, so this JAR was not signed by keyroom")


def _check_entries(archive: zipfile.ZipFile, entries, manifest: bytes, report: Report) -> None:
    try:
        parsed = jar_format.parse_manifest(manifest)
    except FormatError as error:
        raise NotVerified(f"the manifest is malformed: {error}") from None
    sections = {section.name: section for section in parsed.sections}
    for info in entries:
        section = sections.get(info.filename)
        found = [(algorithm, section.get(f"{label}-Digest")) for algorithm, (label, _) in jar_format.DIGESTS.items()
                 if section is not None and section.get(f"{label}-Digest")]
        if not found:
            raise NotVerified(f"entry {info.filename} is not covered by the signature (no digest in the manifest)")
        algorithm, claimed = found[0]
        if cli_jar._entry_digest(archive, info, algorithm) != claimed:
            raise NotVerified(f"entry {info.filename} was changed after signing (its digest differs from the "
                              "manifest's)")
    present = {info.filename for info in entries}
    listed = [name for name, section in sections.items()
              if any(section.get(f"{label}-Digest") for label, _ in jar_format.DIGESTS.values())]
    missing = [name for name in listed if name not in present]
    if missing:
        raise NotVerified(f"the manifest signs entries the JAR does not hold: {', '.join(missing[:5])}")
    report.checked.append(f"entries: all {len(entries)} entries match their signed digests; none is unsigned")


def verify_apk(artifact_path, artifact: bytes, *, trust: Trust, report: Report, at: datetime.datetime) -> None:
    """A signed APK's v2 and v3 blocks: each one signer, whose signature verifies over its signed data, whose
    content digest is this APK's, and whose certificate carries its key and is trusted."""
    try:
        parts = cli_apk.sections(artifact, artifact_path, replace_signature=True)
        if not parts.old_block:
            raise NotVerified("the APK has no APK Signing Block: it is not signed with v2 or v3")
        pairs = apk_format.parse_block(parts.old_block)
        schemes = {scheme: pairs[identifier] for scheme, identifier in apk_format.SCHEME_IDS.items()
                   if identifier in pairs}
        if not schemes:
            raise NotVerified("the APK Signing Block holds no v2 or v3 signature")
        signers = {scheme: apk_format.signers(scheme, value) for scheme, value in schemes.items()}
    except (cli_apk.ApkError, FormatError) as error:
        raise NotVerified(f"not a readable signed APK: {error}") from None
    certificates = set()
    for scheme, found in signers.items():
        if len(found) != 1:
            raise NotVerified(f"the {scheme} block has {len(found)} signers; exactly one is verified")
        signer = found[0]
        signed = signer.signed_data
        known = [(apk_format.ALGORITHMS[i], value) for i, value in signer.signatures if i in apk_format.ALGORITHMS]
        if not known:
            raise NotVerified(f"the {scheme} signer has no signature of an algorithm keyroom makes")
        for algorithm, value in known:
            if not apk_format.verifies(signer.public_key, value, signed.raw, algorithm):
                raise NotVerified(f"the {scheme} signature ({algorithm.jca}) does not verify over its signed data")
            digest = dict(signed.digests).get(algorithm.id)
            content = apk_format.content_digest(parts.digested(), algorithm.digest_algorithm)
            if digest is None or not hmac.compare_digest(digest, content):
                raise NotVerified(f"the APK was changed after signing: its content digest differs from the "
                                  f"{scheme} signed data's")
        if scheme == "v3" and (signer.min_sdk, signer.max_sdk) != (signed.min_sdk, signed.max_sdk):
            raise NotVerified("the v3 signer's SDK range differs from its signed data's")
        if scheme == "v2" and (apk_format.STRIPPING_PROTECTION_ID, (3).to_bytes(4, "little")) in signed.attributes \
                and "v3" not in signers:
            raise NotVerified("the v2 signed data says the APK was signed with v3 too, but the v3 block is gone")
        if not signed.certificates:
            raise NotVerified(f"the {scheme} signed data carries no certificate")
        try:
            certificate = x509.load_der_x509_certificate(signed.certificates[0])
        except ValueError as error:
            raise NotVerified(f"the {scheme} certificate cannot be read: {error}") from None
        if spki(certificate.public_key()) != signer.public_key:
            raise NotVerified(f"the {scheme} certificate does not carry the key that signed")
        certificates.add(signed.certificates[0])
        report.checked.append(f"{scheme}: the signature verifies over the signed data, which holds this APK's "
                              f"content digest ({content.hex()})")
        report.signer["requestDigest"] = content.hex()
    if len(certificates) != 1:
        raise NotVerified("the v2 and v3 blocks name different certificates")
    pool = [x509.load_der_x509_certificate(der) for der in signed.certificates[1:]]
    _check_signer(certificate, pool=pool, trust=trust, report=report, at=at)
    report.signer["certificate"] = {"subject": certificate.subject.rfc4514_string(),
                                    "fingerprint": "sha256:" + hashlib.sha256(signed.certificates[0]).hexdigest()}


def verify(fmt: str, *, artifact_path, artifact: bytes, signature: bytes | None, trust: Trust,
           algorithm: str = "SHA256", certificate: x509.Certificate | None = None,
           at: datetime.datetime | None = None) -> Report:
    """Verify ``signature`` of ``artifact`` in format ``fmt``; the report of what was checked, or NotVerified."""
    trust.check_usable()
    report = Report(format=fmt, artifact=str(artifact_path))
    now = datetime.datetime.now(datetime.timezone.utc)
    if fmt in ("raw", "sigstore", "cms") and signature is None:
        raise TrustError(f"format {fmt} has a detached signature: give it with --sig")
    if fmt == "raw":
        verify_raw(artifact, signature, algorithm=algorithm, trust=trust, report=report, certificate=certificate,
                   at=at or now)
    elif fmt == "sigstore":
        verify_sigstore(artifact, signature, trust=trust, report=report, certificate=certificate, at=at or now)
    elif fmt == "cms":
        verify_cms(artifact, signature, trust=trust, report=report, at=at)
    elif fmt == "authenticode":
        verify_authenticode(artifact, signature, trust=trust, report=report, at=at)
    elif fmt == "jar":
        if signature is not None:
            raise TrustError("a JAR carries its signature inside; verify the signed JAR without --sig")
        verify_jar(artifact_path, trust=trust, report=report, at=at)
    elif fmt == "apk":
        if signature is not None:
            raise TrustError("an APK carries its signature inside; verify the signed APK without --sig")
        verify_apk(artifact_path, artifact, trust=trust, report=report, at=at or now)
    else:
        raise TrustError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if not report.checked:  # never report success for nothing checked
        raise NotVerified("nothing was checked")
    return report


def guess_format(path: str, signature_path: str | None) -> str:
    """The format from the file names export and sign write: .sig raw, .p7s cms, .sigstore.json sigstore,
    a PE (.exe, .dll, .sys, .efi) authenticode, .jar jar, .apk apk."""
    if signature_path:
        for suffix, fmt in ((".sigstore.json", "sigstore"), (".p7s", "cms"), (".sig", "raw")):
            if signature_path.endswith(suffix):
                return fmt
    lowered = path.lower()
    if lowered.endswith((".jar", ".war", ".ear")):
        return "jar"
    if lowered.endswith(".apk"):
        return "apk"
    if lowered.endswith((".exe", ".dll", ".sys", ".efi", ".msi", ".ocx", ".scr")):
        return "authenticode"
    raise TrustError("cannot tell the format from the file names; give --format")

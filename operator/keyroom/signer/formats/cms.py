"""Detached CMS signatures: a SignedData that names the content only by its digest.

A detached CMS signature (RFC 5652) carries no content: its SignerInfo signs a
small set of *signed attributes*, and one of them, messageDigest, is the
digest of the content. So the signer can sign an artifact it never sees: it is
given the artifact's digest and builds the attributes around it (contentType
data, signingTime, messageDigest), and what the key signs is the digest of
those attributes' DER re-tagged as a SET OF (RFC 5652 5.4), never bytes a
caller chose. ``openssl cms -verify -binary -content F`` checks the result.

:func:`signed_data` is the SignedData shared with the other PKCS#7 formats
(Authenticode signs its SpcIndirectDataContent the same way); it is meant for
the builders of this package, which pass content they have just built.

The signature algorithm follows the signing certificate's key: ecdsa-with-SHAx
(no parameters) for EC keys, rsaEncryption (NULL parameters) with PKCS#1 v1.5
for RSA keys, where x is the content's digest algorithm, which also hashes the
signed attributes. Every signature is checked against the certificate's public
key, on the finished structure, before it is returned.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
from typing import Callable, Sequence

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from keyroom.signer import x509
from keyroom.signer.formats import FormatError
from keyroom.signer.x509 import SignDigest


@dataclasses.dataclass(frozen=True)
class _Digest:
    asn1_name: str
    length: int
    hashlib: Callable
    cryptography: type[hashes.HashAlgorithm]


#: digest algorithm, as hsm.Token.sign names it -> how asn1crypto, hashlib and cryptography name it
DIGEST_ALGORITHMS = {
    "SHA256": _Digest("sha256", 32, hashlib.sha256, hashes.SHA256),
    "SHA384": _Digest("sha384", 48, hashlib.sha384, hashes.SHA384),
    "SHA512": _Digest("sha512", 64, hashlib.sha512, hashes.SHA512),
}
#: RFC 5652 11.3 and RFC 5280 4.1.2.5: signingTime is UTCTime through 2049, GeneralizedTime from 2050
_UTC_TIME_UNTIL = 2050


class _CertificatesInOrder(cms.CertificateSet):
    """The certificates of a SignedData in the order given (leaf first, then up the chain).

    asn1crypto sorts every SET OF by its encodings, as DER asks; PKCS#7 signers
    (OpenSSL, signtool) write the leaf first, and some verifiers look for it there.
    """

    def _set_contents(self, force: bool = False) -> None:
        core.SequenceOf._set_contents(self, force)


def tlv(tag: int, contents: bytes) -> bytes:
    """One DER element: the tag byte ``tag``, the definite length of ``contents``, ``contents``."""
    if len(contents) < 0x80:
        return bytes([tag, len(contents)]) + contents
    length = len(contents).to_bytes((len(contents).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + contents


def digest_of(digest_algorithm: str) -> _Digest:
    """The digest algorithm named ``digest_algorithm`` (SHA256, SHA384, SHA512); FormatError for any other."""
    if digest_algorithm not in DIGEST_ALGORITHMS:
        raise FormatError(f"unknown digest algorithm {digest_algorithm!r}; use one of {', '.join(DIGEST_ALGORITHMS)}")
    return DIGEST_ALGORITHMS[digest_algorithm]


def check_digest(digest: bytes, digest_algorithm: str, what: str = "the digest") -> bytes:
    """``digest`` as bytes, after checking it is as long as a ``digest_algorithm`` digest."""
    algorithm = digest_of(digest_algorithm)
    if not isinstance(digest, bytes | bytearray):
        raise FormatError(f"{what} is bytes, not {type(digest).__name__}")
    if len(digest) != algorithm.length:
        raise FormatError(f"{what} is {len(digest)} bytes, but a {digest_algorithm} digest is {algorithm.length} "
                          f"(was it computed with another algorithm?)")
    return bytes(digest)


def signing_time_attribute(signing_time: datetime.datetime) -> cms.CMSAttribute:
    """The signingTime attribute for the timezone-aware ``signing_time``, in UTC and whole seconds."""
    if (not isinstance(signing_time, datetime.datetime) or signing_time.tzinfo is None
            or signing_time.utcoffset() is None):
        raise FormatError(f"signing_time must be a timezone-aware datetime, not {signing_time!r}")
    moment = signing_time.astimezone(datetime.timezone.utc).replace(microsecond=0)
    time = cms.Time({"utc_time": moment} if moment.year < _UTC_TIME_UNTIL else {"generalized_time": moment})
    return cms.CMSAttribute({"type": "signing_time", "values": [time]})


def _certificate(der: bytes, what: str) -> asn1_x509.Certificate:
    if not isinstance(der, bytes | bytearray):
        raise FormatError(f"{what} is DER bytes, not {type(der).__name__}")
    try:
        certificate = asn1_x509.Certificate.load(bytes(der), strict=True)
        certificate.native  # parse every field now, so a broken one fails here and not in a verifier
    except (ValueError, TypeError) as error:
        raise FormatError(f"{what} is not a DER X.509 certificate: {error}") from None
    return certificate


def _signature_algorithm(key_algorithm: str, digest: _Digest) -> algos.SignedDigestAlgorithm:
    if key_algorithm.startswith("ECDSA_"):
        return algos.SignedDigestAlgorithm({"algorithm": f"{digest.asn1_name}_ecdsa"})
    # PKCS#7 and Authenticode name an RSA signer's algorithm rsaEncryption; the hash is the digestAlgorithm.
    return algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15", "parameters": core.Null()})


def signed_data(*, content_type: str, content_der: bytes | None, message_digest: bytes,
                digest_algorithm: str, attributes: Sequence[cms.CMSAttribute] = (),
                certificate_der: bytes, chain_der: Sequence[bytes], sign: SignDigest) -> bytes:
    """A DER ContentInfo(SignedData v1) with one SignerInfo, signed through ``sign`` by the certificate's key.

    ``content_type`` (an OID, dotted or as asn1crypto names it) is the
    encapsulated content's type and ``content_der`` the DER of the content
    itself (PKCS#7 style, ``[0] EXPLICIT`` without an OCTET STRING around it), or
    None for a detached signature. The signed attributes are contentType,
    messageDigest (``message_digest``) and ``attributes``; the SignerInfo
    names the signer by the certificate's issuer and serial number, and the
    certificates are ``certificate_der`` followed by ``chain_der``.

    For the builders of this package: they pass content and attributes they
    have just built from checked inputs.
    """
    digest = digest_of(digest_algorithm)
    message_digest = check_digest(message_digest, digest_algorithm, "the message digest")
    certificate = _certificate(certificate_der, "the signing certificate")
    if isinstance(chain_der, bytes | bytearray) or not isinstance(chain_der, Sequence):
        raise FormatError("chain_der is a sequence of DER certificates (the issuing CAs, nearest first)")
    chain = [_certificate(der, f"chain certificate {number}") for number, der in enumerate(chain_der, 1)]
    public_key_der = certificate.public_key.dump()
    try:
        key_algorithm = x509.key_algorithm_of(public_key_der)
    except x509.X509Error as error:
        raise FormatError(f"the signing certificate's key: {error}") from None

    signed_attributes = cms.CMSAttributes([
        cms.CMSAttribute({"type": "content_type", "values": [cms.ContentType(content_type)]}),
        *attributes,
        cms.CMSAttribute({"type": "message_digest", "values": [core.OctetString(message_digest)]}),
    ])
    # RFC 5652 5.4: the key signs the DER of the attributes as a SET OF (tag 0x31), not as [0] IMPLICIT.
    attributes_der = signed_attributes.dump()
    signature = sign(digest.hashlib(attributes_der).digest(), digest_algorithm)
    if not isinstance(signature, bytes | bytearray):
        raise FormatError(f"the signing callback returned {type(signature).__name__}, not bytes")

    digest_identifier = algos.DigestAlgorithm({"algorithm": digest.asn1_name})
    signer_info = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier(name="issuer_and_serial_number", value=cms.IssuerAndSerialNumber({
            "issuer": certificate.issuer, "serial_number": certificate.serial_number})),
        "digest_algorithm": digest_identifier,
        "signed_attrs": cms.CMSAttributes.load(attributes_der),
        "signature_algorithm": _signature_algorithm(key_algorithm, digest),
        "signature": bytes(signature),
    })
    # Built by hand: asn1crypto drops the [0] EXPLICIT tag of a content assigned to ContentInfo's ANY field.
    encapsulated = cms.ContentType(content_type).dump()
    if content_der is not None:
        encapsulated += tlv(0xA0, bytes(content_der))
    data = cms.SignedData({
        "version": "v1",
        "digest_algorithms": [digest_identifier],
        "encap_content_info": cms.ContentInfo.load(tlv(0x30, encapsulated)),
        "certificates": _CertificatesInOrder([certificate, *chain]),
        "signer_infos": [signer_info],
    })
    der = cms.ContentInfo({"content_type": "signed_data", "content": data}).dump()
    _check_signature(der, public_key_der=public_key_der, digest=digest)
    return der


def _check_signature(der: bytes, *, public_key_der: bytes, digest: _Digest) -> None:
    """The finished SignedData's signature verifies with the signing certificate's public key.

    It is checked on the encoded result, so an attribute that encodes differently
    inside the SignerInfo than it did when it was signed fails here too.
    """
    signer_info = cms.ContentInfo.load(der)["content"]["signer_infos"][0]
    signed = b"\x31" + signer_info["signed_attrs"].dump()[1:]  # as a verifier re-tags the bytes it got
    signature = signer_info["signature"].native
    key = serialization.load_der_public_key(public_key_der)
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, signed, ec.ECDSA(digest.cryptography()))
        else:
            key.verify(signature, signed, padding.PKCS1v15(), digest.cryptography())
    except InvalidSignature:
        raise FormatError("the signature the key returned does not verify with the signing certificate's public "
                          "key (a certificate of another key version, or a faulty token)") from None


def detached(*, digest: bytes, digest_algorithm: str, certificate_der: bytes, chain_der: Sequence[bytes],
             signing_time: datetime.datetime, sign: SignDigest) -> bytes:
    """A DER ContentInfo(SignedData) for content whose digest is ``digest``: eContentType data, no eContent,
    signed attributes contentType, signingTime, messageDigest; certificates leaf then chain."""
    return signed_data(content_type="data", content_der=None, message_digest=digest, digest_algorithm=digest_algorithm,
                       attributes=[signing_time_attribute(signing_time)], certificate_der=certificate_der,
                       chain_der=chain_der, sign=sign)

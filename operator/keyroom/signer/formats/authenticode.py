"""Authenticode signatures for PE files (Windows executables, DLLs, EFI binaries), built from the file's digest.

An Authenticode signature is a PKCS#7 SignedData whose content is an
``SpcIndirectDataContent``: "this is a PE image, and its Authenticode digest
is D". The Authenticode digest is not the hash of the file; it skips the
header fields the signature itself changes (the checksum, the security
directory entry and the certificate table), so the client computes it
(:func:`keyroom.cli.pe.authenticode_digest`) and the signer gets only
``{digest algorithm, digest}``. From that pair the content is a fixed template
(the one osslsigncode and signtool write: SpcPeImageData with the obsolete
empty file link), so the signer rebuilds it and knows exactly what it signs.

The signed attributes are contentType SPC_INDIRECT_DATA, SpcStatementType
"individual" (the key belongs to a person or team, not a commercial publisher),
SpcSpOpusInfo when a program name or URL is given, signingTime, and
messageDigest, which is the hash of the SpcIndirectDataContent's *contents
octets*, without its SEQUENCE tag and length (PKCS#7 digests the content that
way; over the full DER every verifier fails). The client puts the result into
the file's certificate table (:func:`keyroom.cli.pe.attach_signature`), and
``osslsigncode verify`` checks it.
"""
from __future__ import annotations

import datetime
import re
from typing import Sequence

from asn1crypto import algos, cms, core

from keyroom.signer.formats import FormatError
from keyroom.signer.formats.cms import check_digest, digest_of, signed_data, signing_time_attribute, tlv
from keyroom.signer.x509 import SignDigest

SPC_INDIRECT_DATA = "1.3.6.1.4.1.311.2.1.4"
SPC_PE_IMAGE_DATA = "1.3.6.1.4.1.311.2.1.15"
SPC_STATEMENT_TYPE = "1.3.6.1.4.1.311.2.1.11"
SPC_SP_OPUS_INFO = "1.3.6.1.4.1.311.2.1.12"
SPC_INDIVIDUAL_SP_KEY_PURPOSE = "1.3.6.1.4.1.311.2.1.21"

#: SpcPeImageData as osslsigncode writes it: flags includeResources (a BIT STRING with bit 0 set), and
#: file = SpcLink.file ([2]) holding SpcString.unicode ([0] IMPLICIT BMPString) "<<<Obsolete>>>"
_PE_IMAGE_DATA = tlv(0x30, bytes.fromhex("03020780") + tlv(0xA0, tlv(0xA2, tlv(0x80, "<<<Obsolete>>>".encode(
    "utf-16-be")))))
_PROGRAM_NAME_LIMIT = 256
_URL = re.compile(r"https?://[\x21-\x7e]{1,2000}")


def _oid(dotted: str) -> bytes:
    return core.ObjectIdentifier(dotted).dump()


def indirect_data_content(*, digest: bytes, digest_algorithm: str) -> bytes:
    """The DER SpcIndirectDataContent for a PE image whose Authenticode digest is ``digest``."""
    digest = check_digest(digest, digest_algorithm, "the Authenticode digest")
    # DigestInfo's AlgorithmIdentifier carries NULL parameters, as signtool and osslsigncode write it.
    digest_info = algos.DigestInfo({
        "digest_algorithm": algos.DigestAlgorithm({"algorithm": digest_of(digest_algorithm).asn1_name,
                                                   "parameters": core.Null()}),
        "digest": digest,
    }).dump()
    return tlv(0x30, tlv(0x30, _oid(SPC_PE_IMAGE_DATA) + _PE_IMAGE_DATA) + digest_info)


def _attribute(oid: str, value_der: bytes) -> cms.CMSAttribute:
    return cms.CMSAttribute.load(tlv(0x30, _oid(oid) + tlv(0x31, value_der)))


def _opus_info(program_name: str | None, url: str | None) -> bytes:
    """SpcSpOpusInfo: programName [0] EXPLICIT SpcString, moreInfo [1] EXPLICIT SpcLink, both optional."""
    fields = b""
    if program_name is not None:
        if (not isinstance(program_name, str) or not program_name.strip() or len(program_name) > _PROGRAM_NAME_LIMIT
                or not program_name.isprintable() or any(ord(c) > 0xFFFF for c in program_name)):
            raise FormatError(f"program_name must be printable text of 1 to {_PROGRAM_NAME_LIMIT} characters "
                              f"from the Basic Multilingual Plane, not {program_name!r}")
        fields += tlv(0xA0, tlv(0x80, program_name.encode("utf-16-be")))
    if url is not None:
        if not isinstance(url, str) or not _URL.fullmatch(url):
            raise FormatError(f"url must be an http(s) URL of printable ASCII, not {url!r}")
        fields += tlv(0xA1, tlv(0x80, url.encode("ascii")))
    return tlv(0x30, fields)


def signature(*, digest: bytes, digest_algorithm: str, certificate_der: bytes, chain_der: Sequence[bytes],
              signing_time: datetime.datetime, sign: SignDigest, program_name: str | None = None,
              url: str | None = None) -> bytes:
    """The PKCS#7 SignedData (DER ContentInfo) for a PE file whose Authenticode digest is ``digest``.

    ``program_name`` and ``url`` (both optional) go into SpcSpOpusInfo, which
    Windows shows as the program's description and "more information" link.
    """
    content = indirect_data_content(digest=digest, digest_algorithm=digest_algorithm)
    algorithm = digest_of(digest_algorithm)
    # PKCS#7 6.3: the message digest covers the content's contents octets, not its tag and length.
    header_length = len(content) - len(core.Sequence.load(content).contents)
    attributes = [_attribute(SPC_STATEMENT_TYPE, tlv(0x30, _oid(SPC_INDIVIDUAL_SP_KEY_PURPOSE)))]
    if program_name is not None or url is not None:
        attributes.append(_attribute(SPC_SP_OPUS_INFO, _opus_info(program_name, url)))
    attributes.append(signing_time_attribute(signing_time))
    return signed_data(content_type=SPC_INDIRECT_DATA, content_der=content,
                       message_digest=algorithm.hashlib(content[header_length:]).digest(),
                       digest_algorithm=digest_algorithm, attributes=attributes, certificate_der=certificate_der,
                       chain_der=chain_der, sign=sign)

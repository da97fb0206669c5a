"""The client's half of Authenticode: the digest a PE file is signed by, and the signed file.

The signer never sees the executable. The client computes its *Authenticode
digest* here and asks keyroom to sign that; it gets back a PKCS#7 SignedData
(:mod:`keyroom.signer.formats.authenticode`) and writes it into the file's
certificate table. The digest is not the file's hash: it covers every byte
except the three things signing changes, the optional header's CheckSum, the
security directory entry (where the certificate table is) and the certificate
table itself. A file whose length is not a multiple of 8 is hashed as if
zero-padded to one, because the certificate table is appended at an 8-byte
boundary and the padding then belongs to the signed file.

Both PE32 and PE32+ images work (the optional header differs only in where the
data directories start). A file that is already signed is digested without
its certificate table, so a signature can be replaced; :func:`attach_signature`
does that only when asked. Pure Python, no osslsigncode at run time.
"""
from __future__ import annotations

import array
import dataclasses
import hashlib
import struct
import sys

DIGEST_ALGORITHMS = {"SHA256": hashlib.sha256, "SHA384": hashlib.sha384, "SHA512": hashlib.sha512}

_PE32, _PE32_PLUS = 0x10B, 0x20B
#: optional header magic -> offset of the data directories in the optional header
_DIRECTORIES_AT = {_PE32: 96, _PE32_PLUS: 112}
_CHECKSUM_AT = 64  # in the optional header, the same for PE32 and PE32+
_SECURITY_DIRECTORY = 4  # IMAGE_DIRECTORY_ENTRY_SECURITY
_WIN_CERT_REVISION_2_0 = 0x0200
_WIN_CERT_TYPE_PKCS_SIGNED_DATA = 0x0002
_ALIGNMENT = 8


class PEError(ValueError):
    """The bytes are not a PE file this module can digest or sign, or the signing request makes no sense."""


@dataclasses.dataclass(frozen=True)
class _Layout:
    checksum_offset: int
    security_directory_offset: int
    #: (file offset, size) of the certificate table, or None for an unsigned file
    certificate_table: tuple[int, int] | None


def _u16(data: bytes, offset: int) -> int:
    return struct.unpack_from("<H", data, offset)[0]


def _u32(data: bytes, offset: int) -> int:
    return struct.unpack_from("<I", data, offset)[0]


def _layout(data: bytes) -> _Layout:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PEError(f"a PE file is bytes, not {type(data).__name__}")
    if len(data) < 0x40 or data[:2] != b"MZ":
        raise PEError("not a PE file: no MZ header")
    pe_offset = _u32(data, 0x3C)
    if pe_offset + 24 > len(data) or data[pe_offset:pe_offset + 4] != b"PE\0\0":
        raise PEError("not a PE file: an MZ header without a PE signature (a DOS program?)")
    optional_size = _u16(data, pe_offset + 20)
    optional = pe_offset + 24
    if optional_size < 2 or optional + optional_size > len(data):
        raise PEError("a truncated PE file: the optional header runs past the end of the file")
    magic = _u16(data, optional)
    if magic not in _DIRECTORIES_AT:
        raise PEError(f"unknown optional header magic 0x{magic:x}: neither PE32 (0x10b) nor PE32+ (0x20b)")
    directories = optional + _DIRECTORIES_AT[magic]
    count_offset = directories - 4  # NumberOfRvaAndSizes sits right before the directories
    security = directories + _SECURITY_DIRECTORY * 8
    if security + 8 > optional + optional_size or _u32(data, count_offset) <= _SECURITY_DIRECTORY:
        raise PEError("the PE file has no security directory entry (too few data directories), "
                      "so it cannot carry a signature")
    table_offset, table_size = _u32(data, security), _u32(data, security + 4)
    table = None
    if table_offset or table_size:
        if table_size < 8 or table_offset < security + 8 or table_offset + table_size > len(data):
            raise PEError(f"the security directory points outside the file ({table_size} bytes at {table_offset}); "
                          "the file is damaged")
        if table_offset + table_size != len(data):
            raise PEError(f"{len(data) - table_offset - table_size} bytes follow the certificate table; Authenticode "
                          "expects it at the end of the file")
        table = (table_offset, table_size)
    return _Layout(checksum_offset=optional + _CHECKSUM_AT, security_directory_offset=security,
                   certificate_table=table)


def _padding(length: int) -> bytes:
    return b"\0" * (-length % _ALIGNMENT)


def is_signed(data: bytes) -> bool:
    """Whether the PE file has a certificate table."""
    return _layout(data).certificate_table is not None


def authenticode_digest(data: bytes, digest_algorithm: str = "SHA256") -> bytes:
    """The Authenticode digest of the PE file ``data`` with ``digest_algorithm`` (SHA256, SHA384, SHA512)."""
    if digest_algorithm not in DIGEST_ALGORITHMS:
        raise PEError(f"unknown digest algorithm {digest_algorithm!r}; use one of {', '.join(DIGEST_ALGORITHMS)}")
    layout = _layout(data)
    view = memoryview(data)
    end = layout.certificate_table[0] if layout.certificate_table else len(data)
    digest = DIGEST_ALGORITHMS[digest_algorithm]()
    digest.update(view[:layout.checksum_offset])
    digest.update(view[layout.checksum_offset + 4:layout.security_directory_offset])
    digest.update(view[layout.security_directory_offset + 8:end])
    if layout.certificate_table is None:
        digest.update(_padding(len(data)))
    return digest.digest()


def checksum(data: bytes) -> int:
    """The PE image checksum of ``data`` (as imagehlp's CheckSumMappedFile computes it), ignoring its CheckSum field.

    A 16-bit one's complement sum of the file's little-endian words, with the
    CheckSum field read as zero, plus the file's length.
    """
    layout = _layout(data)
    padded = bytes(data) + b"\0" * (len(data) % 2)
    words = array.array("H", padded)
    if sys.byteorder == "big":
        words.byteswap()
    total = sum(words) - _u16(data, layout.checksum_offset) - _u16(data, layout.checksum_offset + 2)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (total + len(data)) & 0xFFFFFFFF


def attach_signature(data: bytes, pkcs7_der: bytes, *, replace: bool = False) -> bytes:
    """The signed PE: ``data`` with ``pkcs7_der`` as its certificate table, security directory and checksum updated.

    The certificate table is one WIN_CERTIFICATE (revision 2.0, type
    PKCS_SIGNED_DATA) at an 8-byte boundary, padded to a multiple of 8 bytes.
    A file that already has a certificate table is refused unless
    ``replace`` is true; then its old table is dropped.
    """
    layout = _layout(data)
    if not isinstance(pkcs7_der, bytes | bytearray) or len(pkcs7_der) < 2 or pkcs7_der[0] != 0x30:
        raise PEError("the signature must be a DER PKCS#7 ContentInfo (a SEQUENCE)")
    if layout.certificate_table is not None and not replace:
        raise PEError("the PE file is already signed; sign the unsigned file, or pass replace=True "
                      "(--replace) to drop the existing signature")
    unsigned = bytes(data[:layout.certificate_table[0]] if layout.certificate_table else data)
    base = unsigned + _padding(len(unsigned))
    certificate = bytes(pkcs7_der) + _padding(len(pkcs7_der))
    table = struct.pack("<IHH", 8 + len(certificate), _WIN_CERT_REVISION_2_0,
                        _WIN_CERT_TYPE_PKCS_SIGNED_DATA) + certificate
    signed = bytearray(base + table)
    struct.pack_into("<II", signed, layout.security_directory_offset, len(base), len(table))
    struct.pack_into("<I", signed, layout.checksum_offset, checksum(signed))
    return bytes(signed)


def embedded_signature(data: bytes) -> bytes | None:
    """The PKCS#7 of the first WIN_CERTIFICATE in the file's certificate table, None for an unsigned file.

    Only a revision 2.0 PKCS_SIGNED_DATA entry is taken; anything else in the
    table is refused, since a verifier that skipped it would check less than
    Windows reads.
    """
    layout = _layout(data)
    if layout.certificate_table is None:
        return None
    offset, size = layout.certificate_table
    length, revision, kind = struct.unpack_from("<IHH", data, offset)
    if length < 8 or length > size:
        raise PEError(f"the certificate table's first entry claims {length} bytes of {size}; the file is damaged")
    if revision != _WIN_CERT_REVISION_2_0 or kind != _WIN_CERT_TYPE_PKCS_SIGNED_DATA:
        raise PEError(f"the certificate table holds a WIN_CERTIFICATE of revision 0x{revision:x}, type 0x{kind:x}; "
                      "only an Authenticode PKCS#7 (revision 2.0, type 2) is verified")
    if size - length >= 8 + _ALIGNMENT:
        raise PEError("the certificate table holds more than one signature; only one is verified, so none is")
    return bytes(data[offset + 8:offset + length])

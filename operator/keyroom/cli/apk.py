"""Signing an APK from the client: its content digest and signed data, then the signing block put in place.

The signer never sees the APK. The client splits it into the three sections
APK Signature Scheme v2/v3 digest (the zip entries, the central directory, the
end of central directory record), computes their chunked content digest
(:func:`keyroom.signer.formats.apk.content_digest`) and writes the v2 and v3
signed data around it and the signing certificate (:func:`signed_data`). The
signer checks those blocks and returns a whole APK Signing Block;
:func:`write_signed` puts it between the entries and the central directory and
moves the end record's central directory offset past it. Nothing else of the
APK changes, so its content digest still holds.

An APK that already has a signing block is refused unless the caller asks to
replace it; the old block is then left out of the digest and of the output.
A v1 (JAR) signature inside the APK is not touched: Android reads v2/v3 from
Android 7 (SDK 24) on, so such APKs are signed for ``--min-sdk-version 24`` and later.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import struct

from keyroom.signer.formats import FormatError
from keyroom.signer.formats import apk as apk_format

_EOCD_SIGNATURE = b"PK\x05\x06"
_EOCD_SIZE = 22
_ZIP64_LOCATOR = b"PK\x06\x07"


class ApkError(Exception):
    """An APK that cannot be signed as asked; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Sections:
    """An APK split where a signing block goes: entries, (old block,) central directory, end record."""

    entries: bytes
    old_block: bytes
    central_directory: bytes
    end_record: bytes

    def digested(self) -> tuple[bytes, bytes, bytes]:
        """What the content digest covers: the end record as if the central directory followed the entries."""
        return self.entries, self.central_directory, _with_offset(self.end_record, len(self.entries))


def _with_offset(end_record: bytes, offset: int) -> bytes:
    return end_record[:16] + struct.pack("<I", offset) + end_record[20:]


def sections(data: bytes, path, *, replace_signature: bool = False) -> Sections:
    """``data`` (the APK ``path``) in its sections; ApkError for what is no zip, a ZIP64 one, or already signed."""
    start = data.rfind(_EOCD_SIGNATURE, max(0, len(data) - _EOCD_SIZE - 0xFFFF))
    while start >= 0 and start + _EOCD_SIZE + struct.unpack_from("<H", data, start + 20)[0] != len(data):
        start = data.rfind(_EOCD_SIGNATURE, max(0, len(data) - _EOCD_SIZE - 0xFFFF), start)
    if start < 0:
        raise ApkError(f"{path} is not a zip file (no end of central directory record): build the APK again")
    size, offset = struct.unpack_from("<II", data, start + 12)
    if offset == 0xFFFFFFFF or (start >= 20 and data[start - 20:start - 16] == _ZIP64_LOCATOR):
        raise ApkError(f"{path} is a ZIP64 archive, which APK signatures do not cover")
    if offset + size != start:
        raise ApkError(f"{path}: the central directory does not end where the end record starts "
                       "(data between them, or a broken zip); build the APK again")
    entries_end = offset
    if data[:offset].endswith(apk_format.MAGIC):
        block_size, = struct.unpack_from("<Q", data, offset - 24)
        entries_end = offset - 8 - block_size
        if entries_end < 0:
            raise ApkError(f"{path} holds a broken APK Signing Block")
        if not replace_signature:
            raise ApkError(f"{path} is already signed (it holds an APK Signing Block); signing it again replaces "
                           f"that signature: ask to replace it")
    return Sections(entries=data[:entries_end], old_block=data[entries_end:offset],
                    central_directory=data[offset:start], end_record=data[start:])


def read(path, *, replace_signature: bool = False) -> Sections:
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as error:
        raise ApkError(f"cannot read {path}: {error}") from None
    return sections(data, path, replace_signature=replace_signature)


def content_digest(path, digest_algorithm: str = "SHA256", *, replace_signature: bool = False) -> bytes:
    """The APK's v2/v3 content digest (the digest a request for it carries)."""
    try:
        return apk_format.content_digest(read(path, replace_signature=replace_signature).digested(),
                                         digest_algorithm)
    except FormatError as error:
        raise ApkError(str(error)) from None


def signed_data(path, *, certificate_der: bytes, replace_signature: bool = False) -> tuple[str, bytes, list]:
    """(digest algorithm, content digest, [(scheme, signed data)] for v2 and v3) to sign ``path`` with the
    certificate ``certificate_der``."""
    try:
        algorithm = apk_format.algorithm_for(apk_format.certificate_public_key(certificate_der))
        digest = apk_format.content_digest(read(path, replace_signature=replace_signature).digested(),
                                           algorithm.digest_algorithm)
        blocks = [(scheme, apk_format.signed_data(scheme, digest=digest, algorithm=algorithm,
                                                  certificate_der=certificate_der, also_v3=True))
                  for scheme in ("v2", "v3")]
    except FormatError as error:
        raise ApkError(f"{path}: {error}") from None
    return algorithm.digest_algorithm, digest, blocks


def signed_apk(data: bytes, block: bytes, path="the APK", *, replace_signature: bool = False) -> bytes:
    """``data`` with the APK Signing Block ``block`` before its central directory (an old block replaced).

    The block must sign this APK: its signed data must carry the APK's content digest.
    """
    parts = sections(data, path, replace_signature=replace_signature)
    try:
        found = apk_format.signed_data_of(block)
        for scheme, raw in found.items():
            parsed = apk_format.parse_signed_data(scheme, raw)
            for identifier, value in parsed.digests:
                known = apk_format.ALGORITHMS.get(identifier)
                if known is None or value != apk_format.content_digest(parts.digested(), known.digest_algorithm):
                    raise ApkError(f"{path} changed since its request was made: the signature is for other "
                                   f"content; sign it again")
    except FormatError as error:
        raise ApkError(f"the signer's answer for {path} is no valid APK Signing Block: {error}") from None
    if not found:
        raise ApkError(f"the signer's answer for {path} holds no v2 or v3 signature")
    offset = len(parts.entries) + len(block)
    return parts.entries + bytes(block) + parts.central_directory + _with_offset(parts.end_record, offset)


def write_signed(source, out_path, block: bytes, *, overwrite: bool = False) -> None:
    """Write ``out_path``: the APK ``source`` signed with ``block``; with ``overwrite`` it may be ``source`` itself."""
    out_path = pathlib.Path(out_path)
    if out_path.exists() and not overwrite:
        raise ApkError(f"{out_path} exists; name another output or ask to overwrite it")
    try:
        data = pathlib.Path(source).read_bytes()
    except OSError as error:
        raise ApkError(f"cannot read {source}: {error}") from None
    signed = signed_apk(data, block, source, replace_signature=overwrite)
    temporary = out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")
    try:
        temporary.write_bytes(signed)
        os.replace(temporary, out_path)
    finally:
        temporary.unlink(missing_ok=True)


#: what apksigner hands a JCA provider for a v1 (JAR) signature: the signature file's text
_V1_SIGNATURE_FILE = b"Signature-Version:"
#: the v3 signer's minimum SDK apksig (31.0.2) writes without key rotation, whatever --min-sdk-version says
APKSIG_V3_MIN_SDK = 24


def apksigner_blocks(data: bytes, *, certificate_der: bytes, min_sdk: int = APKSIG_V3_MIN_SDK,
                     max_sdk: int = apk_format.V3_MAX_SDK) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    """(digest algorithm, content digest, [(scheme, signed data)]): what one request signs when apksigner,
    through keyroom's provider, asks to sign ``data``.

    apksigner signs v2 first, then v3, one ``Signature.sign()`` each. When the
    v2 signed data says a v3 signature follows, the v3 signed data is built
    here as apksig builds it (the same digest and certificate, the SDK range
    ``min_sdk``..``max_sdk``), so that one request with its approvals covers
    both; the provider answers the v3 call from that request. Should apksigner
    build other v3 signed data, the provider's v3 call finds no signature and
    asks again with that block alone.
    ``data`` must be exactly v2 or v3 signed data keyroom signs, over exactly
    ``certificate_der``; anything else (a v1 signature file, v4, key rotation)
    is an ApkError naming the apksigner option that avoids it.
    """
    if data.startswith(_V1_SIGNATURE_FILE):
        raise ApkError("apksigner asks to sign a v1 (JAR) signature file; keyroom signs APKs with v2 and v3 only: "
                       "add --v1-signing-enabled false (Android 7, SDK 24, and later read v2)")
    try:
        algorithm = apk_format.algorithm_for(apk_format.certificate_public_key(certificate_der))
    except FormatError as error:
        raise ApkError(str(error)) from None
    found = None
    for scheme in ("v2", "v3"):
        try:
            parsed = apk_format.parse_signed_data(scheme, data)
        except FormatError:
            continue
        if len(parsed.digests) != 1:
            continue
        identifier, digest = parsed.digests[0]
        if identifier not in apk_format.ALGORITHMS:
            continue
        rebuilt = apk_format.signed_data(scheme, digest=digest, algorithm=apk_format.ALGORITHMS[identifier],
                                         certificate_der=parsed.certificates[0] if parsed.certificates else b"",
                                         min_sdk=parsed.min_sdk or 0, max_sdk=parsed.max_sdk or 0,
                                         also_v3=bool(parsed.attributes), padded=parsed.padded)
        if rebuilt == data and len(parsed.certificates) == 1:
            found = parsed
            break
    if found is None:
        raise ApkError("apksigner asks to sign data that is no v2 or v3 signed data keyroom signs (one signer, one "
                       "certificate, no key rotation): add --v4-signing-enabled false, and sign without --lineage "
                       "or --next-signer")
    identifier, digest = found.digests[0]
    if found.certificates[0] != bytes(certificate_der):
        raise ApkError("apksigner's signed data carries another certificate than the Certificate's current one")
    if identifier != algorithm.id:
        raise ApkError(f"apksigner chose signature algorithm 0x{identifier:04x}; keyroom signs this key's APKs with "
                       f"{algorithm.jca} (0x{algorithm.id:04x})")
    blocks = [(found.scheme, found.raw)]
    if found.scheme == "v2" and found.attributes:
        blocks.append(("v3", apk_format.signed_data("v3", digest=digest, algorithm=algorithm,
                                                    certificate_der=certificate_der, min_sdk=min_sdk,
                                                    max_sdk=max_sdk)))
    return algorithm.digest_algorithm, digest, blocks


def signatures_by_data(block: bytes) -> dict[str, bytes]:
    """{sha256 hex of a signer's signed data: its signature} for each scheme of an APK Signing Block."""
    import hashlib

    found = {}
    try:
        for scheme, identifier in apk_format.SCHEME_IDS.items():
            value = apk_format.parse_block(block).get(identifier)
            for signer in apk_format.signers(scheme, value) if value is not None else []:
                if len(signer.signatures) == 1:
                    found[hashlib.sha256(signer.signed_data.raw).hexdigest()] = signer.signatures[0][1]
    except FormatError as error:
        raise ApkError(f"the signer's answer is no valid APK Signing Block: {error}") from None
    return found

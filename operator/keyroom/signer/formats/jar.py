"""JAR signatures: the signature file (``.SF``) derived from a manifest, and the block that signs it.

A signed JAR (the JAR File Specification, "Signed JAR File") is three files
in ``META-INF/``:

- ``MANIFEST.MF``: a main section of attributes, then one section per entry
  with the digest of that entry's bytes (written by the client, which has
  the JAR);
- ``<ALIAS>.SF``, the *signature file*: the digest of the whole manifest, the
  digest of its main section, and one section per manifest section with the
  digest of that section's raw bytes, blank line included;
- ``<ALIAS>.EC`` or ``<ALIAS>.RSA``, the *block*: a detached CMS SignedData
  over the ``.SF`` (:func:`keyroom.signer.formats.cms.detached`).

The signer never signs a ``.SF`` a caller wrote: it is given the manifest,
parses it strictly and derives the ``.SF`` itself (:func:`signature_file`),
then signs the ``.SF``'s digest. The derivation is deterministic, so the
client regenerates the very same ``.SF`` from the same manifest and writes it
into the JAR next to the block (:mod:`keyroom.cli.jar`); a verifier
(``jarsigner -verify``) recomputes every digest from the bytes in the JAR.

The manifest grammar: lines end in CRLF, LF or CR; no line is longer than 72
bytes, and a longer value goes on in lines that start with one space; a
header is ``Name: value`` with a name of ``[A-Za-z0-9][A-Za-z0-9_-]*``;
sections are separated by one blank line; the main section comes first and
starts with ``Manifest-Version``; every other section starts with ``Name``.
Anything else, duplicate headers in a section and duplicate section names
are refused with :class:`~keyroom.signer.formats.FormatError`: two parsers
that disagree on what a manifest says are how signed JARs get forged.

:func:`manifest_bytes` writes a manifest in the same grammar (CRLF, lines
wrapped at 72 bytes), for the client.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import re
from typing import Callable, Sequence

from asn1crypto import x509 as asn1_x509

from keyroom.signer.formats import FormatError, cms
from keyroom.signer.x509 import SignDigest

#: digest algorithm, as hsm.Token.sign names it -> (the JAR spec's name in ``<name>-Digest``, hash)
DIGESTS: dict[str, tuple[str, Callable]] = {
    "SHA256": ("SHA-256", hashlib.sha256),
    "SHA384": ("SHA-384", hashlib.sha384),
    "SHA512": ("SHA-512", hashlib.sha512),
}
#: the longest line of a manifest or signature file, in bytes, line end excluded
LINE_LIMIT = 72
_HEADER_NAME = re.compile(rb"[A-Za-z0-9][A-Za-z0-9_-]{0,69}")
_LINE_END = re.compile(rb"\r\n|\n|\r")
_CRLF = b"\r\n"


@dataclasses.dataclass(frozen=True)
class Section:
    """One section of a manifest: its headers in order, and the raw bytes it was read from."""

    headers: tuple[tuple[str, str], ...]
    raw: bytes
    """the section's bytes as they stand in the manifest, its blank line included (what the .SF digests)"""

    @property
    def name(self) -> str | None:
        """The value of ``Name`` for an entry's section; None for the main section."""
        first, value = self.headers[0]
        return value if first.lower() == "name" else None

    def get(self, header: str) -> str | None:
        return next((value for name, value in self.headers if name.lower() == header.lower()), None)


@dataclasses.dataclass(frozen=True)
class Manifest:
    main: Section
    sections: tuple[Section, ...]


def _digest(digest_algorithm: str) -> tuple[str, Callable]:
    if digest_algorithm not in DIGESTS:
        raise FormatError(f"unknown digest algorithm {digest_algorithm!r}; use one of {', '.join(DIGESTS)}")
    return DIGESTS[digest_algorithm]


def _lines(manifest: bytes) -> list[tuple[bytes, int]]:
    """``(line without its end, offset just after its end)`` for each line; the last line must be ended too."""
    lines, position = [], 0
    while position < len(manifest):
        end = _LINE_END.search(manifest, position)
        if end is None:
            raise FormatError("the manifest's last line has no line end (a JAR reader would drop that line)")
        line = manifest[position:end.start()]
        if len(line) > LINE_LIMIT:
            raise FormatError(f"line {len(lines) + 1} of the manifest is {len(line)} bytes long; "
                              f"the limit is {LINE_LIMIT} (continue longer values on lines starting with a space)")
        lines.append((line, end.end()))
        position = end.end()
    return lines


def _headers(lines: list[bytes], first_line: int) -> tuple[tuple[str, str], ...]:
    """The headers of one section's lines, continuations joined, names and values checked."""
    joined: list[bytearray] = []
    for number, line in enumerate(lines, first_line):
        if line.startswith(b" "):
            if not joined:
                raise FormatError(f"line {number} of the manifest continues a header, but none came before it")
            joined[-1] += line[1:]
        else:
            joined.append(bytearray(line))
    headers, seen = [], set()
    for raw in joined:
        name, separator, value = bytes(raw).partition(b": ")
        if not separator or not _HEADER_NAME.fullmatch(name):
            shown = bytes(raw)[:60].decode("utf-8", "replace")
            raise FormatError(f"the manifest line {shown!r} is not a header 'Name: value' with a name of letters, "
                              f"digits, '-' and '_'")
        if b"\x00" in value:
            raise FormatError(f"the manifest header {name.decode()} holds a NUL byte")
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"the manifest header {name.decode()} is not UTF-8") from None
        key = name.decode("ascii")
        if key.lower() in seen:
            raise FormatError(f"the manifest names the header {key} twice in one section")
        seen.add(key.lower())
        headers.append((key, text))
    return tuple(headers)


def parse_manifest(manifest: bytes, *, version_header: str = "Manifest-Version") -> Manifest:
    """The sections of ``manifest`` (JAR File Specification grammar, strictly); FormatError if it is malformed.

    A signature file has the same grammar with ``version_header="Signature-Version"``.
    """
    if not isinstance(manifest, bytes | bytearray):
        raise FormatError(f"a manifest is bytes, not {type(manifest).__name__}")
    manifest = bytes(manifest)
    lines = _lines(manifest)
    sections: list[Section] = []
    start, body, first_line = 0, [], 1
    for number, (line, after) in enumerate(lines, 1):
        if line:
            if not body:
                first_line = number
            body.append(line)
            continue
        if not body:
            raise FormatError(f"line {number} of the manifest is an empty section "
                              f"(sections are separated by exactly one blank line)")
        sections.append(Section(_headers(body, first_line), manifest[start:after]))
        start, body = after, []
    if body:
        sections.append(Section(_headers(body, first_line), manifest[start:]))
    if not sections:
        raise FormatError("the manifest is empty; it needs at least the main section (Manifest-Version: 1.0)")
    main, *entries = sections
    if main.name is not None:
        raise FormatError(f"the manifest has no main section: its first section starts with Name, "
                          f"where {version_header} belongs")
    if main.headers[0][0].lower() != version_header.lower():
        raise FormatError(f"the manifest's main section starts with {main.headers[0][0]}; "
                          f"it must start with {version_header}")
    names = set()
    for section in entries:
        if section.name is None:
            raise FormatError(f"a manifest section starts with {section.headers[0][0]}; every section after "
                              f"the main one starts with Name")
        if not section.name:
            raise FormatError("a manifest section has an empty Name")
        if section.name in names:
            raise FormatError(f"the manifest has two sections named {section.name!r}")
        names.add(section.name)
    return Manifest(main=main, sections=tuple(entries))


def header_lines(name: str, value: str) -> bytes:
    """``name: value`` as manifest lines: CRLF, at most 72 bytes each, continued with one space.

    Lines are cut between characters, never inside one (a reader joins the bytes, but people read them too).
    """
    if not _HEADER_NAME.fullmatch(name.encode("ascii", "replace")):
        raise FormatError(f"{name!r} is not a manifest header name (letters, digits, '-' and '_')")
    if any(character in value for character in "\r\n\x00"):
        raise FormatError(f"the value of {name} holds a line break or a NUL, which a manifest cannot carry")
    remaining = f"{name}: {value}"
    lines, room = [], LINE_LIMIT
    while True:
        taken, size = 0, 0
        for character in remaining:
            width = len(character.encode("utf-8"))
            if size + width > room:
                break
            taken, size = taken + 1, size + width
        lines.append(remaining[:taken].encode("utf-8"))
        remaining = remaining[taken:]
        if not remaining:
            break
        room = LINE_LIMIT - 1  # a continuation line spends one byte on its leading space
    return b"".join((b" " if number else b"") + line + _CRLF for number, line in enumerate(lines))


def manifest_bytes(sections: Sequence[Sequence[tuple[str, str]]]) -> bytes:
    """A manifest (or signature file) of ``sections`` of headers, each section followed by a blank line."""
    return b"".join(b"".join(header_lines(name, value) for name, value in section) + _CRLF for section in sections)


def signature_file(manifest: bytes, *, digest_algorithm: str = "SHA256") -> bytes:
    """The ``.SF`` for ``manifest``: its digests as the JAR File Specification lays them out.

    ``Signature-Version: 1.0``, ``Created-By: keyroom``,
    ``<ALG>-Digest-Manifest`` (the whole manifest),
    ``<ALG>-Digest-Manifest-Main-Attributes`` (the main section, its blank
    line included), then for each manifest section ``Name`` and
    ``<ALG>-Digest`` of that section's raw bytes, blank line included, in the
    manifest's order. The same manifest always gives the same bytes.
    """
    label, hash_function = _digest(digest_algorithm)
    parsed = parse_manifest(manifest)

    def digest(data: bytes) -> str:
        return base64.b64encode(hash_function(data).digest()).decode("ascii")

    main = [("Signature-Version", "1.0"), ("Created-By", "keyroom"),
            (f"{label}-Digest-Manifest", digest(bytes(manifest))),
            (f"{label}-Digest-Manifest-Main-Attributes", digest(parsed.main.raw))]
    return manifest_bytes([main] + [[("Name", section.name), (f"{label}-Digest", digest(section.raw))]
                                    for section in parsed.sections])


def block_extension(certificate_der: bytes) -> str:
    """The block's file extension for the signing certificate's key: ``EC`` or ``RSA``."""
    try:
        algorithm = asn1_x509.Certificate.load(bytes(certificate_der), strict=True).public_key.algorithm
    except (ValueError, TypeError) as error:
        raise FormatError(f"the signing certificate is not a DER X.509 certificate: {error}") from None
    extensions = {"ec": "EC", "rsa": "RSA"}
    if algorithm not in extensions:
        raise FormatError(f"a JAR block is signed with an EC or RSA key, not {algorithm}")
    return extensions[algorithm]


def block(*, manifest: bytes, digest_algorithm: str, certificate_der: bytes, chain_der: Sequence[bytes],
          signing_time: datetime.datetime, sign: SignDigest) -> bytes:
    """The ``.EC``/``.RSA`` block: a detached CMS SignedData over :func:`signature_file` of ``manifest``.

    ``digest_algorithm`` names both the digests in the ``.SF`` and the CMS
    digest; the key signs only the digest of the signed attributes built
    around the ``.SF``'s digest.
    """
    block_extension(certificate_der)
    _, hash_function = _digest(digest_algorithm)
    signed = signature_file(manifest, digest_algorithm=digest_algorithm)
    return cms.detached(digest=hash_function(signed).digest(), digest_algorithm=digest_algorithm,
                        certificate_der=certificate_der, chain_der=chain_der, signing_time=signing_time, sign=sign)

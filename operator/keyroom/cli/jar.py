"""Signing a JAR from the client: write its manifest, then write the signed JAR around the signer's block.

The signer never sees the JAR. The client hashes every entry into a
``META-INF/MANIFEST.MF`` (:func:`manifest`) and sends that manifest; the
signer derives the signature file (``.SF``) from it and returns the block, a
detached CMS signature over the ``.SF``. The client regenerates the same
``.SF`` from the same manifest (:func:`keyroom.signer.formats.jar.signature_file`
is deterministic) and writes the signed JAR (:func:`write_signed`): manifest,
``.SF`` and block first, as JAR readers that stream the file expect, then
every entry of the original JAR unchanged.

An existing manifest's main attributes (Main-Class, Class-Path, ...) and the
non-digest attributes of its sections (Sealed, ...) are kept; its digests are
replaced. A JAR that is already signed is refused unless the caller asks to
replace its signatures, because adding a manifest of new digests breaks
every signature that was there.
"""
from __future__ import annotations

import base64
import os
import pathlib
import re
import zipfile

from keyroom.signer.formats import FormatError
from keyroom.signer.formats import jar as jar_format

MANIFEST_NAME = "META-INF/MANIFEST.MF"
#: the JAR spec's signature file names: one to eight of these characters (jarsigner upper-cases its alias)
_ALIAS = re.compile(r"[A-Z0-9_-]{1,8}")
_BLOCK_EXTENSIONS = ("EC", "RSA")
_SIGNATURE_SUFFIXES = (".SF", ".DSA", ".RSA", ".EC")
_MSDOS_DIRECTORY, _MSDOS_ARCHIVE = 0x10, 0x20


class JarError(Exception):
    """A JAR that cannot be signed as asked; the message says what to do."""


def is_signature_related(name: str) -> bool:
    """The manifest and the signature files directly in META-INF, which no manifest section covers."""
    upper = name.upper()
    if not upper.startswith("META-INF/") or "/" in upper[len("META-INF/"):]:
        return False
    base = upper[len("META-INF/"):]
    return base == "MANIFEST.MF" or base.endswith(_SIGNATURE_SUFFIXES) or base.startswith("SIG-")


def _signature_files(archive: zipfile.ZipFile) -> list[str]:
    return [info.filename for info in archive.infolist()
            if is_signature_related(info.filename) and info.filename.upper() != MANIFEST_NAME]


def _entries(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The entries a manifest covers: files, in the JAR's order, not the manifest or signature files."""
    entries, seen = [], set()
    for info in archive.infolist():
        if info.filename in seen:
            raise JarError(f"the JAR holds {info.filename!r} twice; rebuild it with each entry once")
        seen.add(info.filename)
        if info.is_dir() or is_signature_related(info.filename):
            continue
        if any(character in info.filename for character in "\r\n\x00"):
            raise JarError(f"the JAR entry {info.filename!r} has a line break or NUL in its name, "
                           f"which a manifest cannot name")
        entries.append(info)
    return entries


def _entry_digest(archive: zipfile.ZipFile, info: zipfile.ZipInfo, digest_algorithm: str) -> str:
    _, hash_function = jar_format.DIGESTS[digest_algorithm]
    digest = hash_function()
    with archive.open(info) as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode("ascii")


def manifest(jar_path, digest_algorithm: str = "SHA256", *, replace_signatures: bool = False) -> bytes:
    """The MANIFEST.MF to sign ``jar_path`` with: a ``<ALG>-Digest`` section per file entry, CRLF, 72-byte lines.

    Main attributes of an existing manifest are kept (Manifest-Version first,
    added as 1.0 when missing, with ``Created-By: keyroom`` for a new one);
    so are the other attributes of its sections, whose digest attributes are
    replaced. A JAR that is already signed is refused unless
    ``replace_signatures`` (its signatures are then left out by :func:`write_signed`).
    """
    if digest_algorithm not in jar_format.DIGESTS:
        raise JarError(f"unknown digest algorithm {digest_algorithm!r}; use one of {', '.join(jar_format.DIGESTS)}")
    try:
        with zipfile.ZipFile(jar_path) as archive:
            signatures = _signature_files(archive)
            if signatures and not replace_signatures:
                raise JarError(f"{jar_path} is already signed ({', '.join(signatures)}); signing it again "
                               f"replaces those signatures: ask to replace them")
            entries = _entries(archive)
            existing = None
            if MANIFEST_NAME in archive.namelist():
                try:
                    existing = jar_format.parse_manifest(archive.read(MANIFEST_NAME))
                except FormatError as error:
                    raise JarError(f"{jar_path} has a malformed {MANIFEST_NAME}: {error}") from None
            digests = {info.filename: _entry_digest(archive, info, digest_algorithm) for info in entries}
    except (zipfile.BadZipFile, OSError) as error:
        raise JarError(f"{jar_path} is not a readable JAR: {error}") from None

    if existing is None:
        main = [("Manifest-Version", "1.0"), ("Created-By", "keyroom")]
        kept: dict[str, list[tuple[str, str]]] = {}
    else:
        main = list(existing.main.headers)
        kept = {section.name: [(name, value) for name, value in section.headers[1:]
                               if not name.lower().endswith("-digest")]
                for section in existing.sections}
    label = jar_format.DIGESTS[digest_algorithm][0]
    sections = [[("Name", name), *kept.pop(name, []), (f"{label}-Digest", digest)] for name, digest in digests.items()]
    # sections of names that are no file of the JAR (packages: Sealed, ...) stay when they say more than a digest
    sections += [[("Name", name), *headers] for name, headers in kept.items() if headers]
    try:
        return jar_format.manifest_bytes([main, *sections])
    except FormatError as error:
        raise JarError(f"cannot write a manifest for {jar_path}: {error}") from None


def write_signed(jar_path, out_path, *, manifest: bytes, signature_file: bytes, block: bytes, block_name: str,
                 alias: str = "KEYROOM", overwrite: bool = False) -> None:
    """Write ``out_path``: the JAR ``jar_path`` signed with ``manifest``, its ``signature_file`` and ``block``.

    ``block_name`` is the block's extension, ``EC`` or ``RSA``
    (:func:`keyroom.signer.formats.jar.block_extension`). Zip order:
    ``META-INF/MANIFEST.MF``, ``META-INF/<ALIAS>.SF``,
    ``META-INF/<ALIAS>.<EC|RSA>``, then the original entries in their order,
    without the old manifest and signature files. Entries carry no Unix mode
    bits (jarsigner warns about POSIX permissions in signed JARs). The
    manifest must be the one :func:`manifest` wrote for this JAR: every
    entry's digest is checked, so a JAR that changed since is refused rather
    than written with a signature that fails. ``out_path`` is never
    overwritten unless ``overwrite``; with it, ``out_path`` may be
    ``jar_path`` itself (signing in place): the signed JAR is written beside
    it and moved over it only when complete.
    """
    if not _ALIAS.fullmatch(alias or ""):
        raise JarError(f"the alias {alias!r} must be 1 to 8 characters of A-Z, 0-9, '_' and '-'")
    if block_name not in _BLOCK_EXTENSIONS:
        raise JarError(f"block_name is the block's extension, EC or RSA, not {block_name!r}")
    try:
        parsed = jar_format.parse_manifest(manifest)
    except FormatError as error:
        raise JarError(f"the manifest to write is malformed: {error}") from None
    if not isinstance(signature_file, bytes | bytearray) or not isinstance(block, bytes | bytearray) or not block:
        raise JarError("signature_file and block are the bytes of the .SF and of the block")
    out_path = pathlib.Path(out_path)
    if out_path.exists() and not overwrite:
        raise JarError(f"{out_path} exists; name another output or ask to overwrite it")

    temporary = out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(jar_path) as source:
            entries = _entries(source)
            _check_manifest(source, entries, parsed, jar_path)
            with zipfile.ZipFile(temporary, "w") as target:
                for name, data in ((MANIFEST_NAME, bytes(manifest)), (f"META-INF/{alias}.SF", bytes(signature_file)),
                                   (f"META-INF/{alias}.{block_name}", bytes(block))):
                    target.writestr(_plain(zipfile.ZipInfo(name, date_time=_first_time(source)),
                                           zipfile.ZIP_DEFLATED), data)
                for info in source.infolist():
                    if is_signature_related(info.filename):
                        continue
                    copied = _plain(zipfile.ZipInfo(info.filename, date_time=info.date_time), info.compress_type)
                    copied.comment = info.comment
                    target.writestr(copied, source.read(info))
        if overwrite:
            os.replace(temporary, out_path)
        else:
            _move_new(temporary, out_path)
    except (zipfile.BadZipFile, OSError) as error:
        raise JarError(f"cannot write {out_path} from {jar_path}: {error}") from None
    finally:
        temporary.unlink(missing_ok=True)


def _plain(info: zipfile.ZipInfo, compress_type: int) -> zipfile.ZipInfo:
    """``info`` made by "MS-DOS": no Unix mode bits for a reader to take as POSIX permissions.

    The attributes are MS-DOS ones, "archive" for a file, "directory" for a directory: zipfile writes
    Unix permissions (0600) for a file whose attributes are zero.
    """
    info.create_system = 0
    info.external_attr = _MSDOS_DIRECTORY if info.is_dir() else _MSDOS_ARCHIVE
    info.compress_type = compress_type
    return info


def _first_time(archive: zipfile.ZipFile) -> tuple[int, int, int, int, int, int]:
    """The signature files' timestamp: the JAR's first entry's, so the same input gives the same output."""
    infos = archive.infolist()
    return infos[0].date_time if infos else (1980, 1, 1, 0, 0, 0)


def _move_new(temporary: pathlib.Path, out_path: pathlib.Path) -> None:
    """Move ``temporary`` to ``out_path`` only if nothing is there (a link fails on an existing name)."""
    try:
        os.link(temporary, out_path)
    except FileExistsError:
        raise JarError(f"{out_path} exists; name another output or ask to overwrite it") from None


def _check_manifest(archive: zipfile.ZipFile, entries: list[zipfile.ZipInfo], manifest: jar_format.Manifest,
                    jar_path) -> None:
    """Every file entry has a section with a digest, and every digest there matches the entry's bytes."""
    sections = {section.name: section for section in manifest.sections}
    for info in entries:
        section = sections.get(info.filename)
        checked = False
        for algorithm, (label, _) in jar_format.DIGESTS.items():
            recorded = section.get(f"{label}-Digest") if section else None
            if recorded is not None:
                if recorded != _entry_digest(archive, info, algorithm):
                    raise JarError(f"{info.filename} in {jar_path} changed since its manifest was written; "
                                   f"write the manifest again and sign that")
                checked = True
        if not checked:
            raise JarError(f"the manifest has no digest of {info.filename} in {jar_path}; write the manifest of "
                           f"this JAR again and sign that")

"""Sample artifacts for the `make dev` walkthrough: a text file, a small PE executable and a JAR.

They are made here, byte by byte, so the walkthrough needs no compiler and no
download: the PE is a minimal valid PE32+ image (one .text section), the JAR a
zip with a manifest and two entries.
"""
from __future__ import annotations

import pathlib
import struct
import zipfile


def minimal_pe() -> bytes:
    """A small valid PE32+ image: headers and one .text section of 0x200 bytes."""
    dos = bytearray(0x80)
    dos[:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 0x80)
    coff = struct.pack("<HHIIIHH", 0x8664, 1, 0, 0, 0, 240, 0x22)
    optional = struct.pack("<HBBIIIII", 0x20B, 14, 0, 0x200, 0, 0, 0x1000, 0x1000)
    optional += struct.pack("<QIIHHHHHHIIIIHHQQQQII", 0x140000000, 0x1000, 0x200, 6, 0, 0, 0, 6, 0, 0,
                            0x2000, 0x200, 0, 3, 0x8160, 0x100000, 0x1000, 0x100000, 0x1000, 0, 16)
    optional += b"\0" * (16 * 8)
    section = struct.pack("<8sIIIIIIHHI", b".text", 0x10, 0x1000, 0x200, 0x200, 0, 0, 0, 0, 0x60000020)
    headers = bytes(dos) + b"PE\0\0" + coff + optional + section
    text = b"\xc3" + bytes(range(1, 256)) + b"\0" * 0x100
    return headers + b"\0" * (0x200 - len(headers)) + text


def write(directory: pathlib.Path) -> list[pathlib.Path]:
    directory.mkdir(parents=True, exist_ok=True)
    notes = directory / "release-notes.txt"
    notes.write_text("keyroom sample release 1.4.2\n")
    executable = directory / "app.exe"
    executable.write_bytes(minimal_pe())
    archive = directory / "app.jar"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as jar:
        jar.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\r\nCreated-By: keyroom samples\r\n\r\n")
        jar.writestr("com/example/App.class", bytes(range(256)) * 4)
        jar.writestr("com/example/app.properties", "version=1.4.2\n")
    return [notes, executable, archive]

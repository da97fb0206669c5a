"""The Android tools the APK tests verify with: Debian's apksigner, and a small APK to sign.

apksigner (Debian package ``apksigner``, 31.0.2) is run through its classes
(``com.android.apksigner.ApkSignerTool``) with both jars on the class path, the
way that works whatever the ``apksigner`` wrapper script does with ``java -jar``.
The APK is a zip with a plain-text ``AndroidManifest.xml`` (so apksigner needs
``--min-sdk-version``: it cannot read a minimum SDK from it), a ``classes.dex``
stub and, by default, a stored resource larger than one 1 MiB digest chunk.
"""
from __future__ import annotations

import pathlib
import subprocess
import zipfile

import pytest

APKSIGNER_CLASSPATH = "/usr/share/java/apksigner.jar:/usr/share/java/apksig.jar"
RESOURCE = bytes(range(256)) * 6000


def apksigner(*args: str | pathlib.Path) -> subprocess.CompletedProcess:
    if not pathlib.Path(APKSIGNER_CLASSPATH.split(":")[0]).exists():
        pytest.fail("apksigner is required for the APK tests: apt-get install -y apksigner")
    return subprocess.run(["java", "-cp", APKSIGNER_CLASSPATH, "com.android.apksigner.ApkSignerTool",
                           *map(str, args)], capture_output=True, text=True, timeout=120)


def verify(path: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    """``apksigner verify -v --min-sdk-version 24``: v2 and v3 only (Android 7 and later need no v1 signature)."""
    return apksigner("verify", "-v", "--min-sdk-version", "24", *extra, path)


def make_apk(path: pathlib.Path, *, resource: bytes = RESOURCE) -> pathlib.Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("AndroidManifest.xml", '<manifest package="dev.keyroom.example"/>\n')
        archive.writestr("classes.dex", b"dex\n035\x00" + bytes(range(112)) * 8)
        archive.writestr(zipfile.ZipInfo("res/raw/data.bin"), resource, compress_type=zipfile.ZIP_STORED)
    return path

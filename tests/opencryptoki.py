"""openCryptoki's software token: a second PKCS#11 implementation for the HSM tests, because production HSMs
are not SoftHSM2.

Debian's ``opencryptoki`` package brings the module (``libopencryptoki.so``), its
slot daemon ``pkcsslotd`` (root; the module talks to it) and ``pkcsconf``. The
software token ("IBM SoftTok") is one of the slots its default configuration
declares; :func:`ensure` starts the daemon when it is not running and
initialises that token once, with keyroom's test label and PINs (4 to 8
characters, as the token requires). The token does RSA only: it has no EC
mechanisms, which keyroom must report rather than fail obscurely on.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shutil
import subprocess

import pytest

MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/libopencryptoki.so"
LABEL, SO_PIN, PIN = "keyroom-ock", "91827364", "87651234"
DEFAULT_SO_PIN = "87654321"  # a fresh openCryptoki token's SO PIN


@dataclasses.dataclass(frozen=True)
class SoftTok:
    module_path: str
    token_label: str
    pin: str
    slot: int


def _pkcsconf(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["pkcsconf", *args], input=input, capture_output=True, text=True, timeout=60)


def _soft_token() -> tuple[int, str, bool]:
    """(slot, label, initialised) of the software token, from ``pkcsconf -t``."""
    listed = _pkcsconf("-t")
    for block in re.split(r"(?m)^Token #", listed.stdout)[1:]:
        slot = int(block.split(" ", 1)[0])
        model = re.search(r"Model: (.*)", block)
        if model and model.group(1).strip().startswith("IBM SoftTok"):
            label = re.search(r"Label: (.*)", block).group(1).strip()
            return slot, label, "TOKEN_INITIALIZED" in block
    pytest.fail(f"openCryptoki lists no software token (IBM SoftTok): {listed.stdout}{listed.stderr}")


def ensure() -> SoftTok:
    """The software token, initialised for keyroom's tests, with its slot daemon running."""
    if not pathlib.Path(MODULE).exists() or not shutil.which("pkcsslotd"):
        pytest.fail("openCryptoki is required for the second-module HSM tests: apt-get install -y opencryptoki")
    if subprocess.run(["pgrep", "-x", "pkcsslotd"], capture_output=True).returncode != 0:
        if os.geteuid() != 0:
            pytest.skip("openCryptoki's slot daemon pkcsslotd is not running and only root can start it: "
                        "run the tests as root, or start it (sudo pkcsslotd)")
        started = subprocess.run(["pkcsslotd"], capture_output=True, text=True, timeout=60)
        assert started.returncode == 0, f"pkcsslotd failed: {started.stderr}"
    slot, label, initialised = _soft_token()
    if not initialised:
        steps = [(("-c", str(slot), "-I", "-S", DEFAULT_SO_PIN), LABEL + "\n"),
                 (("-c", str(slot), "-P", "-S", DEFAULT_SO_PIN, "-n", SO_PIN), None),
                 (("-c", str(slot), "-u", "-S", SO_PIN, "-n", PIN), None)]
        for args, given in steps:
            done = _pkcsconf(*args, input=given)
            assert done.returncode == 0, f"pkcsconf {' '.join(args[:3])} failed: {done.stdout}{done.stderr}"
        slot, label, initialised = _soft_token()
    if label != LABEL:
        pytest.fail(f"openCryptoki's software token is initialised as {label!r}, not for keyroom's tests "
                    f"({LABEL!r}); its PIN is unknown here")
    return SoftTok(module_path=MODULE, token_label=LABEL, pin=PIN, slot=slot)

"""A SoftHSM2 token kept in a directory: the HSM of the tests and of the local dev environment.

SoftHSM2 is a PKCS#11 module that keeps its tokens in files. Which files is
decided by a configuration file named in the ``SOFTHSM2_CONF`` environment
variable, read once when a process initialises the module. So a token here is
a directory holding

- ``softhsm2.conf``, pointing SoftHSM at
- ``tokens/``, the token's object store (keys are encrypted with the PINs),

and every process that uses the token (the signer, a test, ``pkcs11-tool``)
must run with ``SOFTHSM2_CONF`` set to that configuration file:
:meth:`SoftHSMToken.env` gives the variable to add to its environment.

Nothing else in keyroom depends on SoftHSM: the signer talks to any PKCS#11
module (:mod:`keyroom.signer.hsm`), SoftHSM is only the default module path.
This module is for development and tests; a production token is initialised
with its vendor's tools and procedures, never with this code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

MODULE_ENV = "KEYROOM_PKCS11_MODULE"
#: where the distributions' packages put the module: Debian and Ubuntu, Fedora, Homebrew (macOS), a source build
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
#: how to install SoftHSM2, for the one line a user sees when it is missing
INSTALL_HINT = "apt-get install softhsm2 (Debian/Ubuntu), dnf install softhsm (Fedora), brew install softhsm (macOS)"


class SoftHSMNotFound(FileNotFoundError):
    """The SoftHSM2 PKCS#11 module is not installed where we look."""


@dataclasses.dataclass(frozen=True)
class SoftHSMToken:
    """An initialised SoftHSM2 token (the PINs are not kept here)."""

    module_path: str
    """Path of ``libsofthsm2.so``."""
    config_path: pathlib.Path
    """``softhsm2.conf``; the process using the token must have ``SOFTHSM2_CONF`` set to it."""
    token_label: str

    def env(self) -> dict[str, str]:
        """The environment variables a process needs to see this token."""
        return {"SOFTHSM2_CONF": str(self.config_path)}


def find_module() -> str:
    """The SoftHSM2 PKCS#11 module: ``$KEYROOM_PKCS11_MODULE`` or the first installed one of the usual paths."""
    configured = os.environ.get(MODULE_ENV)
    if configured:
        if not os.path.exists(configured):
            raise SoftHSMNotFound(f"{MODULE_ENV} is {configured!r}, which does not exist")
        return configured
    for candidate in MODULE_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    raise SoftHSMNotFound(f"SoftHSM2 is not installed: {INSTALL_HINT}; or set {MODULE_ENV} to its libsofthsm2.so")


def write_config(directory: pathlib.Path) -> pathlib.Path:
    """Write ``directory/softhsm2.conf`` keeping tokens in ``directory/tokens``; return its path."""
    directory = directory.resolve()
    tokens = directory / "tokens"
    tokens.mkdir(mode=0o700, parents=True, exist_ok=True)
    config = directory / "softhsm2.conf"
    config.write_text(
        "# SoftHSM2 token store written by keyroom (development and tests only)\n"
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n")
    return config


def init_token(directory: pathlib.Path, *, label: str, pin: str, so_pin: str,
               module_path: str | None = None) -> SoftHSMToken:
    """Initialise a token labelled ``label`` in ``directory`` with the given user and SO PINs.

    Creates ``directory/tokens/`` and ``directory/softhsm2.conf`` if needed; a
    directory may hold several tokens with distinct labels. The PINs never
    reach a command line (where ``ps`` would show them) nor an error message:
    a short-lived child process gets them on its stdin and calls
    ``C_InitToken`` and ``C_InitPIN`` itself. python-pkcs11 has no
    ``C_InitToken``, and initialising in a child keeps this process from
    loading SoftHSM with this directory's configuration (a process reads
    ``SOFTHSM2_CONF`` only once).
    """
    if not label or len(label.encode()) > 32:
        raise ValueError("a PKCS#11 token label is 1 to 32 bytes long")
    for name, value in (("user PIN", pin), ("SO PIN", so_pin)):
        if not 4 <= len(value.encode()) <= 255:
            raise ValueError(f"the {name} must be 4 to 255 bytes long (SoftHSM's limits)")
    module = module_path or find_module()
    token = SoftHSMToken(module_path=module, config_path=write_config(pathlib.Path(directory)), token_label=label)
    env = dict(os.environ, **token.env())
    try:
        result = subprocess.run([sys.executable, "-c", _INIT_TOKEN_SCRIPT],
                                input=json.dumps({"module": module, "label": label, "pin": pin, "so_pin": so_pin}),
                                env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"initialising the SoftHSM token {label!r} timed out") from None
    if result.returncode != 0:
        # The child reports only its own messages, which never contain a PIN.
        raise RuntimeError(f"initialising the SoftHSM token {label!r} in {directory} failed: "
                           f"{result.stderr.strip() or 'exit status %d' % result.returncode}")
    return token


# Run by ``init_token`` in a child process with SOFTHSM2_CONF set; reads
# {"module", "label", "pin", "so_pin"} as JSON on stdin. It calls the module's
# exported C_* functions with ctypes (SoftHSM exports them all), so it needs
# nothing but the standard library. For dev/test tokens only.
_INIT_TOKEN_SCRIPT = r'''
import ctypes, json, sys

ULONG = ctypes.c_ulong
CKF_RW_SESSION, CKF_SERIAL_SESSION, CKF_TOKEN_INITIALIZED = 0x2, 0x4, 0x400
CKU_SO = 0


class Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class TokenInfo(ctypes.Structure):
    _fields_ = [("label", ctypes.c_ubyte * 32), ("manufacturerID", ctypes.c_ubyte * 32),
                ("model", ctypes.c_ubyte * 16), ("serialNumber", ctypes.c_ubyte * 16), ("flags", ULONG)] + [
        (name, ULONG) for name in (
            "ulMaxSessionCount", "ulSessionCount", "ulMaxRwSessionCount", "ulRwSessionCount", "ulMaxPinLen",
            "ulMinPinLen", "ulTotalPublicMemory", "ulFreePublicMemory", "ulTotalPrivateMemory",
            "ulFreePrivateMemory")] + [
        ("hardwareVersion", Version), ("firmwareVersion", Version), ("utcTime", ctypes.c_ubyte * 16)]


def main():
    request = json.loads(sys.stdin.read())
    p11 = ctypes.CDLL(request["module"])

    def call(function, *args):
        entry = getattr(p11, function)
        entry.restype = ULONG
        rv = entry(*args)
        if rv != 0:
            raise SystemExit(f"{function} returned CKR 0x{rv:08x}")

    label = request["label"].encode()
    so_pin, pin = request["so_pin"].encode(), request["pin"].encode()
    call("C_Initialize", None)
    try:
        count = ULONG(0)
        call("C_GetSlotList", ctypes.c_ubyte(1), None, ctypes.byref(count))
        slots = (ULONG * max(count.value, 1))()
        call("C_GetSlotList", ctypes.c_ubyte(1), slots, ctypes.byref(count))
        free = None
        for slot in slots[:count.value]:
            info = TokenInfo()
            call("C_GetTokenInfo", ULONG(slot), ctypes.byref(info))
            if not info.flags & CKF_TOKEN_INITIALIZED:
                free = slot if free is None else free
            elif bytes(info.label).rstrip(b" ") == label:
                raise SystemExit(f"a token labelled {request['label']!r} already exists in this token directory")
        if free is None:
            raise SystemExit("SoftHSM offers no free slot")
        call("C_InitToken", ULONG(free), so_pin, ULONG(len(so_pin)), label.ljust(32, b" "))
        session = ULONG(0)
        call("C_OpenSession", ULONG(free), ULONG(CKF_SERIAL_SESSION | CKF_RW_SESSION), None, None,
             ctypes.byref(session))
        call("C_Login", session, ULONG(CKU_SO), so_pin, ULONG(len(so_pin)))
        call("C_InitPIN", session, pin, ULONG(len(pin)))
        call("C_Logout", session)
        call("C_CloseSession", session)
    finally:
        p11.C_Finalize(None)


main()
'''

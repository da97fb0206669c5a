"""Fixtures shared by the unit tests of the signer: one SoftHSM2 token per session, opened in this process.

SoftHSM reads ``SOFTHSM2_CONF`` once, when the process initialises it, so every
module that uses a token in-process shares this one; tests keep apart by using
keys with fresh UIDs. (Tests of pure builders that want their own token use
:mod:`tests.token_process`, a token in a child process.)
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tempfile

import pytest

from keyroom.signer import hsm, softhsm
from tests.token_process import TokenProcess

TOKEN_LABEL = "keyroom-unit"
PIN = "unit-user-pin-4b7e"
SO_PIN = "unit-so-pin-c81d"
#: the token of the format builders' tests, in a child process (see tests.token_process)
FORMAT_TOKEN_LABEL = "keyroom-formats"
FORMAT_PIN = "formats-user-pin-5c1e"
FORMAT_SO_PIN = "formats-so-pin-93b0"


def _fresh_token(module: str, directory: pathlib.Path) -> softhsm.SoftHSMToken:
    """A copy of an initialised, still empty token (initialising one takes a process; `make mutation` runs the
    tests once per mutant, so the empty token is made once per machine and copied)."""
    key = hashlib.sha256(f"{module}\0{TOKEN_LABEL}\0{PIN}\0{SO_PIN}".encode()).hexdigest()[:16]
    template = pathlib.Path(tempfile.gettempdir()) / f"keyroom-unit-empty-token-{os.getuid()}-{key}"
    if not (template / "ready").exists():
        staging = pathlib.Path(tempfile.mkdtemp(prefix="keyroom-unit-empty-token-"))
        softhsm.init_token(staging, label=TOKEN_LABEL, pin=PIN, so_pin=SO_PIN, module_path=module)
        (staging / "ready").touch()
        try:
            os.rename(staging, template)  # atomic: a concurrent run either wins or uses the winner's
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(template / "tokens", directory / "tokens")
    return softhsm.SoftHSMToken(module_path=module, config_path=softhsm.write_config(directory),
                                token_label=TOKEN_LABEL)


@pytest.fixture(scope="session")
def token():
    """A fresh SoftHSM2 token opened in this process, SOFTHSM2_CONF set before the module is loaded."""
    module = softhsm.find_module()  # SoftHSM2 is a requirement: fail with its install hint, never skip
    import pkcs11

    directory = pathlib.Path(tempfile.mkdtemp(prefix="keyroom-softhsm-"))
    try:
        made = _fresh_token(module, directory)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in made.env().items():
                patch.setenv(name, value)
            pkcs11.unload(module)  # an earlier test may have left it initialised with another configuration
            opened = hsm.Token(module_path=module, token_label=TOKEN_LABEL, pin=PIN, sessions=2)
            opened.open()
            opened.ensure_audit_key()  # as the signer does: its audit log entries carry an HMAC keyed in the token
            try:
                yield opened
            finally:
                opened.close()
                pkcs11.unload(module)  # SoftHSM reads SOFTHSM2_CONF when initialised: leave it unloaded
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def format_token(tmp_path_factory) -> TokenProcess:
    """One SoftHSM2 token in a child process for the tests of every signature format: keys by name, made once."""
    softhsm.find_module()  # SoftHSM2 is a requirement: fail with its install hint, never skip
    made = softhsm.init_token(tmp_path_factory.mktemp("formats-softhsm"), label=FORMAT_TOKEN_LABEL, pin=FORMAT_PIN,
                              so_pin=FORMAT_SO_PIN)
    process = TokenProcess(made, pin=FORMAT_PIN)
    yield process
    process.close()

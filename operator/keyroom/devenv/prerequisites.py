"""What the local keyroom needs from the machine besides Python, checked before anything starts.

``make dev`` builds the control plane with Go (once), runs the signer on a
SoftHSM2 token and verifies its sample signatures with openssl. Finding out
that one of them is missing after minutes of building, or from a traceback
deep inside the signer's start, helps nobody: :func:`check` looks for all of
them first and names, in one line each, what to install.
"""
from __future__ import annotations

import shutil
from typing import Iterable

from keyroom.devenv import binaries
from keyroom.signer import softhsm

#: commands the walkthrough runs, and how to install each
COMMANDS = {
    "openssl": "apt-get install openssl (Debian/Ubuntu), dnf install openssl (Fedora), brew install openssl (macOS)",
}


def problems(*, signer: bool = True, commands: Iterable[str] = ()) -> list[str]:
    """One line per missing prerequisite, saying what to install; empty when everything is there."""
    found: list[str] = []
    if binaries.to_build() and shutil.which("go") is None:
        found.append("Go is not installed and the control-plane binaries are not cached: install Go >= 1.26 "
                     "(https://go.dev/doc/install), or set KEYROOM_K8S_BIN_DIR to a directory with "
                     "kube-apiserver, kube-controller-manager, etcd and kubectl")
    if signer:
        try:
            softhsm.find_module()
        except softhsm.SoftHSMNotFound as error:
            found.append(str(error))
    for command in commands:
        if shutil.which(command) is None:
            found.append(f"{command} is not installed: {COMMANDS.get(command, 'install it')}")
    return found

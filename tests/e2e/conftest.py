"""End-to-end fixtures: the local control plane with a local node, so that real pods run.

The node needs root (containerd, runc and the kubelet run rootful) and takes a
minute to start, several on the first run that builds its binaries; tests that
use it run only with ``KEYROOM_E2E=1`` and are skipped, with the reason, otherwise.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import time

import pytest

from keyroom.devenv import controlplane, node


def node_skip_reason() -> str | None:
    """Why the node tests cannot run here, or None."""
    if os.environ.get("KEYROOM_E2E") != "1":
        return "end-to-end tests with a local node run only with KEYROOM_E2E=1"
    if os.geteuid() != 0:
        return "the local node needs root (containerd, runc and the kubelet run rootful)"
    return None


def _leftovers(state_dir: pathlib.Path) -> list[str]:
    """What a stopped node must not leave on the host."""
    found = []
    mounts = [line.split()[4] for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines()
              if line.split()[4].startswith(str(state_dir))]
    found += [f"mount {point}" for point in mounts]
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(state_dir) in command:
                found.append(f"process {entry.name}: {command[:120]}")
    if pathlib.Path(f"/sys/class/net/{node.BRIDGE}").exists():
        found.append(f"bridge {node.BRIDGE}")
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    found += [f"iptables rule {line}" for line in rules.splitlines()
              if "keyroom local node" in line or line.startswith(("-A KUBE-SERVICES", "-A KUBE-SVC-"))]
    return found


@pytest.fixture(scope="session")
def node_environment(tmp_path_factory) -> controlplane.Environment:
    """A local control plane (no operator or signer processes: in end-to-end tests they run as pods) with a
    Ready local node; stopped, and checked to leave nothing behind, at the end of the session."""
    reason = node_skip_reason()
    if reason:
        pytest.skip(reason)
    state_dir = tmp_path_factory.mktemp("keyroom-e2e") / "env"
    started = time.monotonic()
    try:
        environment = controlplane.up(state_dir, operator=False, signer=False, node=True, log=print)
    except BaseException:
        if state_dir.exists():
            controlplane.down(state_dir, log=print)
        raise
    print(f"control plane and node up in {time.monotonic() - started:.1f}s: "
          f"{json.dumps(environment.node.to_state())}")
    yield environment
    controlplane.down(state_dir, log=print)
    left = _leftovers(state_dir)
    assert not left, "the stopped node left behind:\n" + "\n".join(left)

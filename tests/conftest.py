"""Shared test fixtures.

Integration tests run against one real local control plane per session
(kube-apiserver, etcd, kube-controller-manager and the keyroom operator as
local processes), started by the same code as ``python -m keyroom.devenv up``.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import time
import uuid
from typing import Callable

import pytest
import yaml

from keyroom.devenv import controlplane

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> controlplane.Environment:
    state_dir = tmp_path_factory.mktemp("keyroom") / "env"
    started = time.monotonic()
    environment = controlplane.up(state_dir, operator=True, log=print)
    print(f"control plane for the tests up in {time.monotonic() - started:.1f}s")
    yield environment
    controlplane.down(state_dir, log=print)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Object names that no other test uses."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:8]}"


def kubectl(cluster: controlplane.Environment, *args: str, identity: str = "admin",
            input: str | None = None) -> subprocess.CompletedProcess:
    return cluster.run_kubectl(*args, identity=identity, input=input, check=False)


def apply(cluster: controlplane.Environment, document: dict | str, *,
          identity: str = "admin") -> subprocess.CompletedProcess:
    text = document if isinstance(document, str) else yaml.safe_dump(document)
    return kubectl(cluster, "apply", "-f", "-", identity=identity, input=text)


def get(cluster: controlplane.Environment, kind: str, name: str, *, namespace: str,
        identity: str = "admin") -> dict:
    result = kubectl(cluster, "get", kind, name, "-n", namespace, "-o", "json", identity=identity)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_for(predicate: Callable[[], object], *, timeout: float = 30.0, what: str = "condition") -> object:
    """Poll until ``predicate`` returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last value: {last!r})")

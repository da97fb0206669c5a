"""The local control plane's front door: `python -m keyroom.devenv up/down`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from keyroom.devenv import controlplane

pytestmark = pytest.mark.integration


def devenv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keyroom.devenv", *args], capture_output=True, text=True,
                          timeout=180)


def _pids(state_dir) -> list[int]:
    state = json.loads((state_dir / controlplane.STATE_FILE).read_text())
    return [process["pid"] for process in state["processes"].values()]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def state_dir(tmp_path):
    state_dir = tmp_path / "dev"
    yield state_dir
    if state_dir.exists():  # a failed test still stops what it started
        controlplane.down(state_dir, log=lambda _: None)


def test_up_detach_then_down_leaves_nothing_behind(state_dir):
    up = devenv("up", "--state-dir", str(state_dir), "--detach")
    assert up.returncode == 0, up.stderr
    assert "local control plane up in" in up.stderr
    assert f"export KUBECONFIG={state_dir / 'kubeconfig-alice'}" in up.stdout
    pids = _pids(state_dir)
    assert len(pids) == 5 and all(_running(pid) for pid in pids)

    environment = controlplane.load(state_dir)
    result = environment.run_kubectl("-n", "team-a", "get", "keyroom", identity="alice", check=False)
    assert result.returncode == 0, result.stderr

    again = devenv("up", "--state-dir", str(state_dir), "--detach")
    assert again.returncode == 1 and "already runs in" in again.stderr

    down = devenv("down", "--state-dir", str(state_dir))
    assert down.returncode == 0, down.stderr
    assert not any(_running(pid) for pid in pids)
    assert not state_dir.exists()


def test_a_stale_state_dir_is_reported(state_dir):
    state_dir.mkdir()
    (state_dir / controlplane.STATE_FILE).write_text(json.dumps(
        {"processes": {"etcd": {"pid": 2 ** 22 + 1, "started": "1", "log": ""}}, "ready": True}))
    result = devenv("up", "--state-dir", str(state_dir), "--detach")
    assert result.returncode == 1
    assert "holds a stopped environment from an earlier run" in result.stderr
    assert devenv("down", "--state-dir", str(state_dir)).returncode == 0
    assert not state_dir.exists()


def test_missing_go_is_a_clear_error(tmp_path, monkeypatch):
    env = dict(os.environ, PATH="/nonexistent", KEYROOM_CACHE_DIR=str(tmp_path / "empty-cache"))
    env.pop("KEYROOM_K8S_BIN_DIR", None)
    result = subprocess.run([sys.executable, "-m", "keyroom.devenv", "binaries"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert "Go is not installed" in result.stderr and "KEYROOM_K8S_BIN_DIR" in result.stderr

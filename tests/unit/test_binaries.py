"""Locating and naming the control-plane binaries."""
from __future__ import annotations

import pytest

from keyroom.devenv import binaries


def test_pinned_versions_come_from_the_toolchain_go_mod_files():
    versions = binaries.pinned_versions()
    assert versions["kubernetes"].startswith("v1.") and versions["etcd"].startswith("v3.")
    assert versions["kubernetes"] in binaries.build_dir().name


def test_go_output_names():
    assert binaries._go_output_name("k8s.io/kubernetes/cmd/kube-apiserver") == "kube-apiserver"
    assert binaries._go_output_name("go.etcd.io/etcd/server/v3") == "server"


def test_environment_variables_point_at_existing_binaries(tmp_path, monkeypatch):
    for name in ("kube-apiserver", "kube-controller-manager", "etcd", "kubectl"):
        path = tmp_path / name
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    monkeypatch.setenv("KEYROOM_K8S_BIN_DIR", str(tmp_path))
    found = binaries.ensure(log=lambda _: None)
    assert found.etcd == tmp_path / "etcd" and found.kubectl == tmp_path / "kubectl"


def test_a_non_executable_override_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "etcd"
    path.write_text("")
    monkeypatch.setenv("KEYROOM_ETCD", str(path))
    with pytest.raises(binaries.BinariesError, match="not an executable"):
        binaries.ensure(log=lambda _: None)

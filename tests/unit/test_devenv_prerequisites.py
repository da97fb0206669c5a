"""`make dev` on a machine without SoftHSM2, openssl or Go says what to install, in one line each, before it starts."""
from __future__ import annotations

import os
import subprocess
import sys

from keyroom.devenv import __main__ as devenv
from keyroom.devenv import binaries
from keyroom.signer import softhsm
from tests.conftest import REPO

SOFTHSM_LINE = ("error: SoftHSM2 is not installed: apt-get install softhsm2 (Debian/Ubuntu), dnf install softhsm "
                "(Fedora), brew install softhsm (macOS); or set KEYROOM_PKCS11_MODULE to its libsofthsm2.so\n")


def test_up_without_softhsm_says_what_to_install_before_building_or_starting_anything(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.delenv(softhsm.MODULE_ENV, raising=False)
    monkeypatch.setattr(softhsm, "MODULE_CANDIDATES", (str(empty / "libsofthsm2.so"),))
    monkeypatch.setattr(binaries, "to_build", lambda: [])

    def must_not_build(**_):
        raise AssertionError("the control plane was being built although SoftHSM2 is missing")

    monkeypatch.setattr(binaries, "ensure", must_not_build)
    assert devenv.main(["up", "--state-dir", str(tmp_path / "dev"), "--detach"]) == 1
    captured = capsys.readouterr()
    assert captured.err == SOFTHSM_LINE
    assert captured.out == ""
    assert not (tmp_path / "dev").exists()


def test_up_without_a_signer_needs_no_softhsm(tmp_path, monkeypatch):
    monkeypatch.delenv(softhsm.MODULE_ENV, raising=False)
    monkeypatch.setattr(softhsm, "MODULE_CANDIDATES", (str(tmp_path / "libsofthsm2.so"),))
    monkeypatch.setattr(binaries, "to_build", lambda: [])
    from keyroom.devenv import prerequisites

    assert prerequisites.problems(signer=False) == []
    assert prerequisites.problems(signer=True) == [SOFTHSM_LINE.removeprefix("error: ").rstrip("\n")]


def test_a_module_path_that_does_not_exist_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(softhsm.MODULE_ENV, str(tmp_path / "libsofthsm2.so"))
    from keyroom.devenv import prerequisites

    monkeypatch.setattr(binaries, "to_build", lambda: [])
    assert prerequisites.problems() == [f"{softhsm.MODULE_ENV} is '{tmp_path / 'libsofthsm2.so'}', which does not exist"]


def test_check_with_an_empty_path_names_go_and_openssl_one_line_each_without_a_traceback(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("KEYROOM_")}
    env.update(PATH=str(empty), KEYROOM_CACHE_DIR=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-m", "keyroom.devenv", "check", "--no-signer", "openssl"],
                            env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and "Traceback" not in result.stderr
    assert lines[0].startswith("error: Go is not installed and the control-plane binaries are not cached: "
                               "install Go >= 1.26")
    assert lines[1] == ("error: openssl is not installed: apt-get install openssl (Debian/Ubuntu), "
                        "dnf install openssl (Fedora), brew install openssl (macOS)")


def test_make_dev_checks_before_it_builds_or_starts_anything():
    makefile = (REPO / "Makefile").read_text()
    dev = next(line for line in makefile.splitlines() if line.startswith("dev:"))
    prerequisites = dev.split(":", 1)[1].split()
    assert prerequisites.index("check") < prerequisites.index("binaries")
    check = makefile.split("\ncheck:", 1)[1].split("\n\n", 1)[0]
    assert "-m keyroom.devenv check" in check and "openssl" in check

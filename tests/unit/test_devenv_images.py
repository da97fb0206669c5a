"""keyroom.devenv.images without podman: names, the mirror, the slim trimming, the podman configuration."""
from __future__ import annotations

import pathlib

import pytest

from keyroom.devenv import images


def test_image_names_carry_the_project_version():
    assert images.version() == "0.1.0"
    assert images.image_name("operator") == "ghcr.io/keyroom/keyroom-operator:0.1.0"
    assert images.image_name("signer", "dev") == "ghcr.io/keyroom/keyroom-signer:dev"
    with pytest.raises(images.ImageError, match="operator, signer"):
        images.image_name("keyroom")


def test_the_dockerfile_names_the_base_that_ensure_base_makes():
    dockerfile = images.DOCKERFILE.read_text()
    assert f"ARG DEBIAN_IMAGE={images.BASE_IMAGE}\n" in dockerfile
    for target in images.TARGETS:
        assert f" AS {target}\n" in dockerfile
        assert f'ENTRYPOINT ["python", "-m", "keyroom.{target}"]' in dockerfile


def test_every_podman_call_reads_limits_the_shell_can_grant(tmp_path, monkeypatch):
    monkeypatch.setenv("KEYROOM_CACHE_DIR", str(tmp_path))
    environment = images.podman_environment()
    conf = pathlib.Path(environment["CONTAINERS_CONF"])
    assert conf == tmp_path / "images" / "containers.conf"
    assert 'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]' in conf.read_text()


def test_a_missing_podman_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KEYROOM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(images.ImageError, match="apt-get install podman"):
        images.image_exists(images.BASE_IMAGE)


def test_the_mirror_comes_from_the_environment_first(monkeypatch):
    monkeypatch.setenv("KEYROOM_DEBIAN_MIRROR", "http://mirror.example/debian")
    assert images.debian_mirror() == "http://mirror.example/debian"


def test_trim_leaves_a_slim_tree(tmp_path):
    rootfs = tmp_path / "rootfs"
    for path in ("usr/share/doc/bash/copyright", "usr/share/doc/bash/README.gz", "usr/share/man/man1/ls.1.gz",
                 "usr/share/locale/de/LC_MESSAGES/apt.mo", "usr/share/locale/locale.alias",
                 "var/lib/apt/lists/deb.debian.org_dists_bookworm_InRelease", "var/log/apt/history.log",
                 "etc/apt/sources.list", "etc/resolv.conf", "usr/bin/bash"):
        (rootfs / path).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / path).write_text("x")
    (rootfs / "etc/apt/apt.conf.d").mkdir()
    (rootfs / "etc/apt/sources.list.d").mkdir()

    images._trim(rootfs, "http://deb.debian.org/debian")

    remaining = sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*") if p.is_file())
    assert "usr/share/doc/bash/copyright" in remaining
    assert "usr/share/locale/locale.alias" in remaining
    assert "usr/bin/bash" in remaining
    for gone in ("usr/share/doc/bash/README.gz", "usr/share/man/man1/ls.1.gz",
                 "usr/share/locale/de/LC_MESSAGES/apt.mo",
                 "var/lib/apt/lists/deb.debian.org_dists_bookworm_InRelease", "var/log/apt/history.log",
                 "etc/apt/sources.list", "etc/resolv.conf"):
        assert gone not in remaining
    assert (rootfs / "var/log/apt").is_dir()
    assert "path-exclude /usr/share/doc/*" in (rootfs / "etc/dpkg/dpkg.cfg.d/docker").read_text()
    sources = (rootfs / "etc/apt/sources.list.d/debian.sources").read_text()
    assert "URIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n" in sources
    assert "URIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n" in sources

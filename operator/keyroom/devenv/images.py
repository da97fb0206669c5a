"""The operator and signer container images, built with podman from one Dockerfile.

``images/Dockerfile`` builds both images from a Debian slim base that it names
by a pinned tag. Where a registry is reachable that tag is pulled as usual;
where none is (no Docker engine, no registry), :func:`ensure_base` makes an
image of that very name locally: ``debootstrap --variant=minbase`` from the
machine's Debian mirror, trimmed the way Debian's slim images are (no docs, man
pages or locales, and a dpkg configuration that keeps them out of later
installs), then ``podman import``. The Dockerfile is the same in both cases.

Rootful podman starts every container with default ulimits that a shell whose
own hard limits are lower cannot grant (``nofile=1048576``); so every podman
call made here reads a containers.conf, written into the image cache, whose
limits fit, through ``CONTAINERS_CONF``.

``python -m keyroom.devenv.images build`` makes the base (once) and both images;
``python -m keyroom.devenv.images save --out DIR`` writes each as an OCI archive.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib

from keyroom.devenv import binaries

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
DOCKERFILE = REPO_ROOT / "images" / "Dockerfile"
#: the base the Dockerfile names (its DEBIAN_IMAGE argument); made locally when it cannot be pulled
BASE_IMAGE = "docker.io/library/debian:bookworm-20261110-slim"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
REGISTRY = "ghcr.io/keyroom"
TARGETS = ("operator", "signer")
SOURCE_URL = "https://github.com/keyroom/keyroom"

# What Debian's slim images leave out, and the dpkg rules that keep it out of later installs.
_DPKG_EXCLUDES = """\
# Like Debian's slim images: no documentation, manual pages or translations.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""
_APT_SETTINGS = {
    "docker-clean": "".join(f'{hook} {{ "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; }};\n'
                            for hook in ("DPkg::Post-Invoke", "APT::Update::Post-Invoke"))
                    + 'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";\n',
    "docker-no-languages": 'Acquire::Languages "none";\n',
    "docker-gzip-indexes": 'Acquire::GzipIndexes "true";\nAcquire::CompressionTypes::Order:: "gz";\n',
    "docker-autoremove-suggests": 'Apt::AutoRemove::SuggestsImportant "false";\n',
}
_CONTAINERS_CONF = """\
# Written by keyroom.devenv.images: limits that a shell with lower hard limits can grant.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
"""


class ImageError(RuntimeError):
    """An image cannot be built or saved; the message says why and what to do."""


def version() -> str:
    """The project version (pyproject.toml), which tags both images."""
    with open(REPO_ROOT / "pyproject.toml", "rb") as project:
        return tomllib.load(project)["project"]["version"]


def image_name(target: str, tag: str | None = None) -> str:
    if target not in TARGETS:
        raise ImageError(f"unknown image {target!r}: the Dockerfile's targets are {', '.join(TARGETS)}")
    return f"{REGISTRY}/keyroom-{target}:{tag or version()}"


def cache_dir() -> pathlib.Path:
    directory = binaries.cache_root() / "images"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def containers_conf() -> pathlib.Path:
    """The containers.conf every podman and buildah call made here reads (written once)."""
    path = cache_dir() / "containers.conf"
    if not path.exists() or path.read_text() != _CONTAINERS_CONF:
        path.write_text(_CONTAINERS_CONF)
    return path


def podman_environment() -> dict[str, str]:
    return dict(os.environ, CONTAINERS_CONF=str(containers_conf()))


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ImageError(f"{tool} is not installed: run `apt-get install {package}` (as root)")
    return path


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise ImageError(f"{what} needs root (rootful podman and debootstrap): run it with sudo or as root")


def podman(*args: str, capture: bool = False, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run podman with this module's containers.conf."""
    command = [_require("podman", "podman"), *args]
    result = subprocess.run(command, env=podman_environment(), text=True,
                            stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.PIPE if capture else None, **kwargs)
    if check and result.returncode != 0:
        detail = f":\n{result.stderr.strip()}" if capture and result.stderr else ""
        raise ImageError(f"`podman {' '.join(args)}` failed with exit code {result.returncode}{detail}")
    return result


def image_exists(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


def image_size(image: str) -> int:
    """The image's size in bytes, as podman counts it (all layers, uncompressed)."""
    return int(podman("image", "inspect", "--format", "{{.Size}}", image, capture=True).stdout.strip())


def debian_mirror() -> str:
    """``$KEYROOM_DEBIAN_MIRROR``, else the Debian mirror this machine's apt uses, else deb.debian.org."""
    if os.environ.get("KEYROOM_DEBIAN_MIRROR"):
        return os.environ["KEYROOM_DEBIAN_MIRROR"]
    sources = [pathlib.Path("/etc/apt/sources.list"), *sorted(pathlib.Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        try:
            text = source.read_text()
        except OSError:
            continue
        for url in re.findall(r"^(?:deb\s+(?:\[[^]]*\]\s+)?|URIs:\s*)(\S+)", text, re.M):
            if re.search(r"/debian/?$", url):
                return url.rstrip("/")
    return DEFAULT_MIRROR


def _trim(rootfs: pathlib.Path, mirror: str) -> None:
    """Make a debootstrap tree look like Debian's slim image."""
    def remove(path: pathlib.Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()

    documentation = rootfs / "usr/share/doc"
    for package in documentation.iterdir() if documentation.is_dir() else ():  # each keeps its copyright
        for path in package.iterdir() if package.is_dir() and not package.is_symlink() else [package]:
            if path.name != "copyright":
                remove(path)
    for pattern in ("usr/share/man/*", "usr/share/info/*", "usr/share/groff/*", "usr/share/lintian/*",
                    "usr/share/linda/*", "usr/share/locale/*", "var/cache/man/*", "var/cache/apt/*.bin",
                    "var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "dev/*", "tmp/*", "var/tmp/*"):
        for path in rootfs.glob(pattern):
            if path.name not in ("locale.alias", "partial", "lock"):
                remove(path)
    for path in (rootfs / "var/log").rglob("*"):  # the logs of the installation, not their directories
        if path.is_file():
            path.unlink()
    (rootfs / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/dpkg/dpkg.cfg.d/docker").write_text(_DPKG_EXCLUDES)
    for name, text in _APT_SETTINGS.items():
        (rootfs / "etc/apt/apt.conf.d" / name).write_text(text)
    (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
    security = re.sub(r"/debian$", "/debian-security", mirror)
    (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(
        f"Types: deb\nURIs: {mirror}\nSuites: {SUITE} {SUITE}-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: {security}\nSuites: {SUITE}-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    # the runtime provides these
    (rootfs / "etc/resolv.conf").unlink(missing_ok=True)
    (rootfs / "etc/hostname").write_text("localhost\n")


def ensure_base(image: str = BASE_IMAGE, *, mirror: str | None = None) -> str:
    """Make the Debian slim base image locally under the name the Dockerfile pulls (skipped when present)."""
    if image_exists(image):
        return image
    _require_root("making the Debian base image")
    debootstrap = _require("debootstrap", "debootstrap")
    mirror = mirror or debian_mirror()
    print(f"== making {image}: debootstrap --variant=minbase {SUITE} from {mirror}", flush=True)
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=cache_dir()) as scratch:
        rootfs = pathlib.Path(scratch) / "rootfs"
        result = subprocess.run([debootstrap, "--variant=minbase", SUITE, str(rootfs), mirror],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            raise ImageError(f"debootstrap failed (exit code {result.returncode}); its last lines:\n"
                             + "\n".join(result.stdout.splitlines()[-15:]))
        _trim(rootfs, mirror)
        tar = subprocess.Popen(["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-c", "."],
                               stdout=subprocess.PIPE)
        try:
            podman("import", "--change", 'CMD ["bash"]', "--message", f"debootstrap --variant=minbase {SUITE}",
                   "-", image, stdin=tar.stdout, capture=True)
        finally:
            tar.stdout.close()
            tar.wait()
    return image


def revision() -> str:
    """The git commit the build context is at ("unknown" outside a git checkout)."""
    result = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def ca_bundle() -> pathlib.Path | None:
    """The CA bundle that pip in the build trusts: ``$KEYROOM_BUILD_CA_BUNDLE``, pip's, or the system's.

    The machine's own bundle also trusts a TLS-inspecting proxy between it and PyPI, which the
    base image's (none: it has no ca-certificates) does not.
    """
    for candidate in (os.environ.get("KEYROOM_BUILD_CA_BUNDLE"), os.environ.get("PIP_CERT"),
                      os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and os.path.isfile(candidate):
            return pathlib.Path(candidate)
    return None


def build(target: str, tag: str | None = None, *, base: str = BASE_IMAGE) -> str:
    """Build one target of images/Dockerfile (the repository is the context); return the image name."""
    name = tag or image_name(target)
    _require_root("building the images")
    bundle = ca_bundle()
    podman("build", "--target", target, "--tag", name, "--file", str(DOCKERFILE),
           *(("--secret", f"id=ca-certificates,src={bundle}") if bundle else ()),
           "--build-arg", f"DEBIAN_IMAGE={base}", "--build-arg", f"VERSION={version()}",
           "--build-arg", f"REVISION={revision()}", "--build-arg", f"SOURCE={SOURCE_URL}",
           "--pull=never" if image_exists(base) else "--pull=missing", str(REPO_ROOT))
    return name


def save(image: str, path: pathlib.Path) -> pathlib.Path:
    """Write an image as an OCI archive (what ``ctr images import`` and ``podman load`` read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    podman("save", "--format", "oci-archive", "--output", str(path), image)
    return path


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyroom.devenv.images",
                                     description="Build keyroom's operator and signer images with podman.")
    commands = parser.add_subparsers(dest="command", required=True)
    build_command = commands.add_parser("build", help="make the Debian base if missing, then build the images")
    build_command.add_argument("--target", choices=TARGETS, action="append",
                               help="build only this image (repeatable; default: both)")
    save_command = commands.add_parser("save", help="write the images as OCI archives into a directory")
    save_command.add_argument("--out", type=pathlib.Path, required=True)
    save_command.add_argument("--target", choices=TARGETS, action="append")
    commands.add_parser("names", help="print the image names")
    args = parser.parse_args(argv)
    targets = getattr(args, "target", None) or list(TARGETS)
    try:
        if args.command == "names":
            for target in TARGETS:
                print(f"{target}={image_name(target)}")
        elif args.command == "build":
            started = time.monotonic()
            ensure_base()
            for target in targets:
                name = build(target)
                print(f"{name}  {_megabytes(image_size(name))}", flush=True)
            print(f"built in {time.monotonic() - started:.0f}s")
        else:
            for target in targets:
                name = image_name(target)
                if not image_exists(name):
                    raise ImageError(f"{name} is not built: run `python -m keyroom.devenv.images build` first")
                archive = save(name, args.out / f"keyroom-{target}.oci.tar")
                print(f"{archive}  {_megabytes(archive.stat().st_size)}  ({name})")
    except ImageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the control plane's binaries come from.

The local control plane runs the real ``kube-apiserver``, ``kube-controller-manager``,
``etcd`` and ``kubectl``. They are built from pinned Go modules: the two
``go.mod`` files under ``toolchain/`` are the one place that names the
Kubernetes and etcd releases. A build lands in a cache directory keyed by the
hash of those files, so a changed pin builds afresh and an unchanged one is
reused across runs, checkouts and virtualenvs.

Users who already have the binaries (from setup-envtest, a distribution, an
earlier build) point at them instead:

- ``KEYROOM_K8S_BIN_DIR``: one directory holding all of them, or
- ``KEYROOM_KUBE_APISERVER``, ``KEYROOM_KUBE_CONTROLLER_MANAGER``,
  ``KEYROOM_ETCD``, ``KEYROOM_KUBECTL``: one path each (these win).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

TOOLCHAIN_DIR = pathlib.Path(__file__).parent / "toolchain"

#: binary name -> (toolchain module, Go package to build)
_PACKAGES = {
    "kube-apiserver": ("kubernetes", "k8s.io/kubernetes/cmd/kube-apiserver"),
    "kube-controller-manager": ("kubernetes", "k8s.io/kubernetes/cmd/kube-controller-manager"),
    "kubectl": ("kubernetes", "k8s.io/kubernetes/cmd/kubectl"),
    "etcd": ("etcd", "go.etcd.io/etcd/server/v3"),
}

_ENV_NAMES = {
    "kube-apiserver": "KEYROOM_KUBE_APISERVER",
    "kube-controller-manager": "KEYROOM_KUBE_CONTROLLER_MANAGER",
    "etcd": "KEYROOM_ETCD",
    "kubectl": "KEYROOM_KUBECTL",
}


class BinariesError(RuntimeError):
    """The control-plane binaries can be neither found nor built."""


@dataclasses.dataclass(frozen=True)
class Binaries:
    kube_apiserver: pathlib.Path
    kube_controller_manager: pathlib.Path
    etcd: pathlib.Path
    kubectl: pathlib.Path


def pinned_versions() -> dict[str, str]:
    """The Kubernetes and etcd releases named by the toolchain go.mod files."""
    k8s = re.search(r"^\s*k8s\.io/kubernetes (v\S+)", (TOOLCHAIN_DIR / "kubernetes" / "go.mod").read_text(), re.M)
    etcd = re.search(r"^\s*go\.etcd\.io/etcd/server/v3 (v\S+)", (TOOLCHAIN_DIR / "etcd" / "go.mod").read_text(), re.M)
    if not k8s or not etcd:
        raise BinariesError(f"cannot read the pinned versions from {TOOLCHAIN_DIR}/*/go.mod")
    return {"kubernetes": k8s.group(1), "etcd": etcd.group(1)}


def cache_root() -> pathlib.Path:
    if os.environ.get("KEYROOM_CACHE_DIR"):
        return pathlib.Path(os.environ["KEYROOM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return pathlib.Path(base) / "keyroom"


def build_dir() -> pathlib.Path:
    """The cache directory for the pinned versions (exists only once built)."""
    digest = hashlib.sha256()
    for module in ("kubernetes", "etcd"):
        for name in ("go.mod", "go.sum"):
            digest.update((TOOLCHAIN_DIR / module / name).read_bytes())
    versions = pinned_versions()
    key = f"k8s-{versions['kubernetes']}-etcd-{versions['etcd']}-{digest.hexdigest()[:12]}"
    return cache_root() / "bin" / key


def _from_environment() -> dict[str, pathlib.Path]:
    found: dict[str, pathlib.Path] = {}
    if os.environ.get("KEYROOM_K8S_BIN_DIR"):
        directory = pathlib.Path(os.environ["KEYROOM_K8S_BIN_DIR"])
        for name in _PACKAGES:
            if (directory / name).exists():
                found[name] = directory / name
    for name, variable in _ENV_NAMES.items():
        if os.environ.get(variable):
            found[name] = pathlib.Path(os.environ[variable])
    for name, path in found.items():
        if not os.access(path, os.X_OK):
            raise BinariesError(f"{name} at {path} (from the environment) is not an executable file")
    return found


def ensure(*, log=print) -> Binaries:
    """Return the binaries, building the missing ones into the cache first."""
    paths = _from_environment()
    missing = [name for name in _PACKAGES if name not in paths]
    if missing:
        target = build_dir()
        still_missing = [name for name in missing if not (target / name).exists()]
        if still_missing:
            build(still_missing, target=target, log=log)
        paths.update({name: target / name for name in missing})
    return Binaries(
        kube_apiserver=paths["kube-apiserver"],
        kube_controller_manager=paths["kube-controller-manager"],
        etcd=paths["etcd"],
        kubectl=paths["kubectl"],
    )


def _go_output_name(package: str) -> str:
    """The file name `go build -o DIR/` gives a main package: its last path
    element, skipping a major-version suffix (go.etcd.io/etcd/server/v3 -> server)."""
    parts = package.split("/")
    return parts[-2] if re.fullmatch(r"v[0-9]+", parts[-1]) else parts[-1]


def build(names: list[str], *, target: pathlib.Path, log=print) -> None:
    """Build the named binaries from the pinned modules into ``target``."""
    go = shutil.which("go")
    if go is None:
        raise BinariesError(
            "Go is not installed, and the control-plane binaries are not cached.\n"
            "Install Go >= 1.26 (https://go.dev/doc/install), or point KEYROOM_K8S_BIN_DIR "
            "at a directory with kube-apiserver, kube-controller-manager, etcd and kubectl."
        )
    target.mkdir(parents=True, exist_ok=True)
    versions = pinned_versions()
    by_module: dict[str, list[str]] = {}
    for name in names:
        module, package = _PACKAGES[name]
        by_module.setdefault(module, []).append(package)
    for module, packages in by_module.items():
        started = time.monotonic()
        log(f"building {', '.join(n for n in names if _PACKAGES[n][0] == module)} "
            f"({module} {versions[module]}) into {target}; a first build takes several minutes")
        with tempfile.TemporaryDirectory(prefix="keyroom-gobuild-") as workdir:
            # Build from a copy: the package directory may be read-only (site-packages).
            for name in ("go.mod", "go.sum"):
                shutil.copy(TOOLCHAIN_DIR / module / name, pathlib.Path(workdir) / name)
            staging = pathlib.Path(tempfile.mkdtemp(prefix=".staging-", dir=target))
            env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=mod")
            command = [go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(staging) + "/", *packages]
            result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                shutil.rmtree(staging, ignore_errors=True)
                raise BinariesError(
                    f"building the {module} binaries failed (go build exited {result.returncode}):\n"
                    + result.stderr[-4000:]
                )
            for name in names:
                if _PACKAGES[name][0] == module:
                    os.replace(staging / _go_output_name(_PACKAGES[name][1]), target / name)
            shutil.rmtree(staging, ignore_errors=True)
        log(f"built {module} in {time.monotonic() - started:.0f}s")


def main() -> int:
    try:
        binaries = ensure(log=lambda message: print(message, file=sys.stderr))
    except BinariesError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for field in dataclasses.fields(binaries):
        print(f"{field.name}={getattr(binaries, field.name)}")
    return 0

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

The local node (:mod:`keyroom.devenv.node`) is a separate group with its own
cache directory, built only when a node is asked for: ``kubelet``,
``kube-scheduler`` and ``kube-proxy`` from the same Kubernetes module,
``containerd``, its runc shim and ``ctr`` from ``toolchain/containerd``,
``crictl`` from ``toolchain/cri-tools`` and CoreDNS from ``toolchain/coredns``.
``KEYROOM_NODE_BIN_DIR`` (one directory) or ``KEYROOM_KUBELET``,
``KEYROOM_CONTAINERD``, ... (one path each, named after the binary) point at
binaries of your own.
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


#: the node's binaries, built by :func:`ensure_node` only
_NODE_PACKAGES = {
    "kubelet": ("kubernetes", "k8s.io/kubernetes/cmd/kubelet"),
    "kube-scheduler": ("kubernetes", "k8s.io/kubernetes/cmd/kube-scheduler"),
    "kube-proxy": ("kubernetes", "k8s.io/kubernetes/cmd/kube-proxy"),
    "containerd": ("containerd", "github.com/containerd/containerd/v2/cmd/containerd"),
    "containerd-shim-runc-v2": ("containerd", "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"),
    "ctr": ("containerd", "github.com/containerd/containerd/v2/cmd/ctr"),
    "crictl": ("cri-tools", "sigs.k8s.io/cri-tools/cmd/crictl"),
    "coredns": ("coredns", "github.com/coredns/coredns"),
}

#: toolchain module -> the module path whose required version names the release
_MODULE_PINS = {
    "kubernetes": "k8s.io/kubernetes",
    "etcd": "go.etcd.io/etcd/server/v3",
    "containerd": "github.com/containerd/containerd/v2",
    "cri-tools": "sigs.k8s.io/cri-tools",
    "coredns": "github.com/coredns/coredns",
}


class BinariesError(RuntimeError):
    """The control-plane binaries can be neither found nor built."""


@dataclasses.dataclass(frozen=True)
class Binaries:
    kube_apiserver: pathlib.Path
    kube_controller_manager: pathlib.Path
    etcd: pathlib.Path
    kubectl: pathlib.Path


@dataclasses.dataclass(frozen=True)
class NodeBinaries:
    kubelet: pathlib.Path
    kube_scheduler: pathlib.Path
    kube_proxy: pathlib.Path
    containerd: pathlib.Path
    containerd_shim_runc_v2: pathlib.Path
    ctr: pathlib.Path
    crictl: pathlib.Path
    coredns: pathlib.Path

    @property
    def directory(self) -> pathlib.Path:
        """Where containerd finds its shim (it looks the shim up on PATH)."""
        return self.containerd_shim_runc_v2.parent


def _module_version(module: str) -> str:
    path = TOOLCHAIN_DIR / module / "go.mod"
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(_MODULE_PINS[module])} (v\S+)", path.read_text(), re.M)
    if not match:
        raise BinariesError(f"cannot read the pinned {_MODULE_PINS[module]} version from {path}")
    return match.group(1)


def pinned_versions() -> dict[str, str]:
    """The Kubernetes and etcd releases named by the toolchain go.mod files."""
    return {module: _module_version(module) for module in ("kubernetes", "etcd")}


def node_versions() -> dict[str, str]:
    """The releases the local node's binaries are built from."""
    return {module: _module_version(module) for module in ("kubernetes", "containerd", "cri-tools", "coredns")}


def cache_root() -> pathlib.Path:
    if os.environ.get("KEYROOM_CACHE_DIR"):
        return pathlib.Path(os.environ["KEYROOM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return pathlib.Path(base) / "keyroom"


def _modules_digest(modules: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for module in modules:
        for name in ("go.mod", "go.sum"):
            digest.update((TOOLCHAIN_DIR / module / name).read_bytes())
    return digest.hexdigest()[:12]


def build_dir() -> pathlib.Path:
    """The cache directory for the pinned versions (exists only once built)."""
    versions = pinned_versions()
    key = f"k8s-{versions['kubernetes']}-etcd-{versions['etcd']}-{_modules_digest(('kubernetes', 'etcd'))}"
    return cache_root() / "bin" / key


def node_build_dir() -> pathlib.Path:
    """The cache directory for the node's binaries (exists only once built)."""
    versions = node_versions()
    key = (f"node-k8s-{versions['kubernetes']}-containerd-{versions['containerd']}-"
           f"coredns-{versions['coredns']}-{_modules_digest(('kubernetes', 'containerd', 'cri-tools', 'coredns'))}")
    return cache_root() / "bin" / key


def _from_environment(packages: dict = _PACKAGES, env_names: dict | None = None,
                      dir_variable: str = "KEYROOM_K8S_BIN_DIR") -> dict[str, pathlib.Path]:
    if env_names is None:
        env_names = _ENV_NAMES
    found: dict[str, pathlib.Path] = {}
    if os.environ.get(dir_variable):
        directory = pathlib.Path(os.environ[dir_variable])
        for name in packages:
            if (directory / name).exists():
                found[name] = directory / name
    for name, variable in env_names.items():
        if os.environ.get(variable):
            found[name] = pathlib.Path(os.environ[variable])
    for name, path in found.items():
        if not os.access(path, os.X_OK):
            raise BinariesError(f"{name} at {path} (from the environment) is not an executable file")
    return found


def to_build() -> list[str]:
    """The control-plane binaries that neither the environment names nor the cache holds: ``ensure`` builds them."""
    paths = _from_environment()
    return [name for name in _PACKAGES if name not in paths and not (build_dir() / name).exists()]


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


def ensure_node(*, log=print) -> NodeBinaries:
    """Return the node's binaries, building the missing ones into their own cache first."""
    env_names = {name: "KEYROOM_" + name.upper().replace("-", "_") for name in _NODE_PACKAGES}
    paths = _from_environment(_NODE_PACKAGES, env_names, "KEYROOM_NODE_BIN_DIR")
    missing = [name for name in _NODE_PACKAGES if name not in paths]
    if missing:
        target = node_build_dir()
        still_missing = [name for name in missing if not (target / name).exists()]
        if still_missing:
            build(still_missing, target=target, log=log, packages=_NODE_PACKAGES, versions=node_versions())
        paths.update({name: target / name for name in missing})
    return NodeBinaries(**{name.replace("-", "_"): path for name, path in paths.items()})


def _go_output_name(package: str) -> str:
    """The file name `go build -o DIR/` gives a main package: its last path
    element, skipping a major-version suffix (go.etcd.io/etcd/server/v3 -> server)."""
    parts = package.split("/")
    return parts[-2] if re.fullmatch(r"v[0-9]+", parts[-1]) else parts[-1]


def build(names: list[str], *, target: pathlib.Path, log=print, packages: dict | None = None,
          versions: dict[str, str] | None = None) -> None:
    """Build the named binaries from the pinned modules into ``target``."""
    if packages is None:
        packages = _PACKAGES
    if versions is None:
        versions = pinned_versions()
    go = shutil.which("go")
    if go is None:
        if packages is _NODE_PACKAGES:
            raise BinariesError(
                "Go is not installed, and the local node's binaries are not cached.\n"
                "Install Go >= 1.26 (https://go.dev/doc/install), or point KEYROOM_NODE_BIN_DIR "
                f"at a directory with {', '.join(_NODE_PACKAGES)}."
            )
        raise BinariesError(
            "Go is not installed, and the control-plane binaries are not cached.\n"
            "Install Go >= 1.26 (https://go.dev/doc/install), or point KEYROOM_K8S_BIN_DIR "
            "at a directory with kube-apiserver, kube-controller-manager, etcd and kubectl."
        )
    target.mkdir(parents=True, exist_ok=True)
    by_module: dict[str, list[str]] = {}
    for name in names:
        module, package = packages[name]
        by_module.setdefault(module, []).append(package)
    for module, module_packages in by_module.items():
        started = time.monotonic()
        log(f"building {', '.join(n for n in names if packages[n][0] == module)} "
            f"({module} {versions[module]}) into {target}; a first build takes several minutes")
        with tempfile.TemporaryDirectory(prefix="keyroom-gobuild-") as workdir:
            # Build from a copy: the package directory may be read-only (site-packages).
            for name in ("go.mod", "go.sum"):
                shutil.copy(TOOLCHAIN_DIR / module / name, pathlib.Path(workdir) / name)
            staging = pathlib.Path(tempfile.mkdtemp(prefix=".staging-", dir=target))
            env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=mod")
            command = [go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(staging) + "/", *module_packages]
            result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                shutil.rmtree(staging, ignore_errors=True)
                raise BinariesError(
                    f"building the {module} binaries failed (go build exited {result.returncode}):\n"
                    + result.stderr[-4000:]
                )
            for name in names:
                if packages[name][0] == module:
                    os.replace(staging / _go_output_name(packages[name][1]), target / name)
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

"""The Go tools the image-signature tests run, built once from pinned modules.

``tests/tools/go.mod`` (with its go.sum) pins cosign v2.6.5, the distribution
registry v3.1.2 and go-containerregistry's crane; ``tests/tools/policy-controller/``
pins Sigstore's policy-controller v0.13.1 for its ``policy-tester`` and
``tests/tools/kyverno/`` Kyverno v1.19.1 for its command-line tool (each its own
module: their dependencies differ from cosign's). ``tools.go`` in each names
the commands.
They are built with the Go toolchain through the module proxy into
``~/.cache/keyroom/bin/tools-<hash of go.mod and go.sum>/``, so a change of a
pin builds afresh and an unchanged one is reused (cosign takes a few minutes
the first time). ``KEYROOM_TOOLS_BIN`` points at a directory that already holds
the binaries instead. :class:`Registry` runs the registry (on 127.0.0.1 unless told otherwise);
:func:`module_dir` fetches a pinned module's sources (for the CRDs the
admission controllers ship).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import time

import pytest

MODULE = pathlib.Path(__file__).parent / "tools"
#: tool -> (its pinning module, its command's package)
COMMANDS = {
    "cosign": (MODULE, "github.com/sigstore/cosign/v2/cmd/cosign"),
    "registry": (MODULE, "github.com/distribution/distribution/v3/cmd/registry"),
    "crane": (MODULE, "github.com/google/go-containerregistry/cmd/crane"),
    "policy-tester": (MODULE / "policy-controller", "github.com/sigstore/policy-controller/cmd/tester"),
    "kyverno": (MODULE / "kyverno", "github.com/kyverno/kyverno/cmd/cli/kubectl-kyverno"),
}
#: the admission controllers whose CRDs the admission guide's policies are checked against
KYVERNO = ("github.com/kyverno/kyverno", "v1.19.1")
POLICY_CONTROLLER = ("github.com/sigstore/policy-controller", "v0.13.1")


def _go() -> str:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not pathlib.Path(go).exists():
        pytest.fail("the image-signature tests build their tools with Go (1.26): install Go, or point "
                    "KEYROOM_TOOLS_BIN at a directory holding cosign, registry, crane, policy-tester and kyverno")
    return go


def _cache(module: pathlib.Path) -> pathlib.Path:
    pins = hashlib.sha256((module / "go.mod").read_bytes() + (module / "go.sum").read_bytes()).hexdigest()[:12]
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "keyroom" / "bin" / \
        f"tools-{pins}"


def binary(name: str) -> pathlib.Path:
    """The path of tool ``name``, built from its pinned module the first time it is asked for."""
    given = os.environ.get("KEYROOM_TOOLS_BIN")
    if given:
        return pathlib.Path(given) / name
    module, package = COMMANDS[name]
    target = _cache(module) / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{name}.partial"
    built = subprocess.run([_go(), "build", "-trimpath", "-o", str(partial), package], cwd=module,
                           capture_output=True, text=True, env={**os.environ, "CGO_ENABLED": "0"})
    if built.returncode != 0:
        pytest.fail(f"building {name} from {package} failed:\n{built.stderr[-3000:]}")
    partial.rename(target)
    return target


def module_dir(path: str, version: str) -> pathlib.Path:
    """The sources of module ``path`` at ``version``, from the Go module cache (downloaded and checked once)."""
    # run outside any module (tests/ has no go.mod), so no go.mod or go.sum of the repository changes
    found = subprocess.run([_go(), "mod", "download", "-json", f"{path}@{version}"], capture_output=True, text=True,
                           cwd=pathlib.Path(__file__).parent, env={**os.environ, "GOFLAGS": "-mod=mod"}, timeout=600)
    if found.returncode != 0:
        pytest.fail(f"cannot download {path}@{version}: {found.stdout[-2000:]}{found.stderr[-2000:]}")
    return pathlib.Path(json.loads(found.stdout)["Dir"])


def run(name: str, *args: str | pathlib.Path, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary(name)), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def _free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


class Registry:
    """The distribution registry with storage under ``root``; ``host`` is address:port.

    By default it listens on 127.0.0.1 over plain HTTP and lets anyone in.
    ``address`` is the address to listen on, ``tls`` (certificate path, key
    path) serves HTTPS, and ``auth`` is the registry's ``auth:`` section (e.g.
    ``{"token": {"realm": ..., "service": ..., "issuer": ..., "rootcertbundle": ...}}``).
    """

    def __init__(self, root: pathlib.Path, *, address: str = "127.0.0.1",
                 tls: tuple[pathlib.Path, pathlib.Path] | None = None, auth: dict | None = None) -> None:
        self.address = address
        self.port = _free_port(address)
        self.host = f"{address}:{self.port}"
        config = root / "config.yml"
        # JSON is YAML: the optional sections are written as flow mappings
        extra = ""
        if tls:
            extra += f"  tls: {json.dumps({'certificate': str(tls[0]), 'key': str(tls[1])})}\n"
        if auth:
            extra += f"auth: {json.dumps(auth)}\n"
        config.write_text(f"""version: 0.1
log: {{level: warn}}
storage:
  filesystem: {{rootdirectory: {root / 'data'}}}
  delete: {{enabled: true}}
http:
  addr: {address}:{self.port}
""" + extra)
        self._log = open(root / "registry.log", "w")
        self.process = subprocess.Popen([str(binary("registry")), "serve", str(config)], stdout=self._log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                socket.create_connection((address, self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        pytest.fail(f"the registry did not listen on {self.host}: {(root / 'registry.log').read_text()[-2000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def main() -> int:
    """Build every Go tool the tests run (``make test-tools``), before pytest and its per-test timeouts."""
    from keyroom.devenv import helm
    from tests import gitops

    for name, started in ((name, time.monotonic()) for name in COMMANDS):
        path = binary(name)
        print(f"{name}: {path} ({time.monotonic() - started:.0f}s)", flush=True)
    started = time.monotonic()
    print(f"kstatus: {gitops.kstatus_binary()} ({time.monotonic() - started:.0f}s)", flush=True)
    started = time.monotonic()
    print(f"helm: {helm.ensure(log=print)} ({time.monotonic() - started:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Helm for the chart tests and ``make e2e``, built from its pinned Go module.

``toolchain/helm/go.mod`` names the Helm release. Like the control-plane
binaries, the build lands in a cache directory keyed by the hash of that
module's files, so an unchanged pin is built once per machine. ``KEYROOM_HELM``
points at a helm binary of your own instead.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

from keyroom.devenv.binaries import TOOLCHAIN_DIR, BinariesError, cache_root

MODULE_DIR = TOOLCHAIN_DIR / "helm"
PACKAGE = "helm.sh/helm/v3/cmd/helm"


def pinned_version() -> str:
    match = re.search(r"^\s*require helm\.sh/helm/v3 (v\S+)|^\s*helm\.sh/helm/v3 (v\S+)",
                      (MODULE_DIR / "go.mod").read_text(), re.M)
    if not match:
        raise BinariesError(f"cannot read the pinned Helm release from {MODULE_DIR / 'go.mod'}")
    return match.group(1) or match.group(2)


def build_dir() -> pathlib.Path:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum"):
        digest.update((MODULE_DIR / name).read_bytes())
    return cache_root() / "bin" / f"helm-{pinned_version()}-{digest.hexdigest()[:12]}"


def ensure(*, log=print) -> pathlib.Path:
    """The helm binary: ``KEYROOM_HELM``, or the cached build of the pinned release (built first if missing)."""
    if os.environ.get("KEYROOM_HELM"):
        path = pathlib.Path(os.environ["KEYROOM_HELM"])
        if not os.access(path, os.X_OK):
            raise BinariesError(f"KEYROOM_HELM={path} is not an executable file")
        return path
    target = build_dir() / "helm"
    if target.exists():
        return target
    go = shutil.which("go")
    if go is None:
        raise BinariesError("Go is not installed and helm is not cached: install Go >= 1.26, "
                            "or point KEYROOM_HELM at a helm v3 binary")
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log(f"building helm {pinned_version()} into {target.parent}; a first build takes a few minutes")
    with tempfile.TemporaryDirectory(prefix="keyroom-helmbuild-") as workdir:
        for name in ("go.mod", "go.sum"):
            shutil.copy(MODULE_DIR / name, pathlib.Path(workdir) / name)
        staging = target.parent / f".helm-{os.getpid()}"
        env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=mod")
        result = subprocess.run([go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(staging), PACKAGE],
                                cwd=workdir, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            staging.unlink(missing_ok=True)
            raise BinariesError(f"building helm failed (go build exited {result.returncode}):\n"
                                + result.stderr[-4000:])
        os.replace(staging, target)
    log(f"built helm in {time.monotonic() - started:.0f}s")
    return target


def main() -> int:
    try:
        print(ensure(log=lambda message: print(message, file=sys.stderr)))
    except BinariesError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

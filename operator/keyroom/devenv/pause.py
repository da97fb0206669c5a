"""The local node's pause image, made on the machine itself.

Every pod starts with a sandbox container that holds its namespaces: the
"pause" container. Clusters pull it from a registry; the local node cannot, so
it compiles an equivalent of Kubernetes' ``build/pause/linux/pause.c`` into a
static binary with the system C compiler and wraps that one file into an OCI
image archive, which :mod:`keyroom.devenv.node` imports into containerd and
names as the CRI sandbox image. The archive is cached beside the node's
binaries, keyed by the source, so it is compiled once per machine.

:func:`write_oci_archive` is the general form: an OCI image archive with one
layer made of the given files, ready for ``ctr images import``.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import tarfile
import tempfile

from keyroom.devenv import binaries

#: the name the node's containerd knows the pause image by
IMAGE = "localhost/keyroom/pause:3.10"

PAUSE_C = r"""
/* A pod's sandbox process: it holds the pod's namespaces, reaps the zombies
 * it inherits as PID 1 and exits when asked to stop. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int signo) {
  (void)signo;
  _exit(0);
}

static void reap(int signo) {
  (void)signo;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "-v") == 0) {
    printf("pause (keyroom local node)\n");
    return 0;
  }
  if (getpid() != 1) {
    fprintf(stderr, "Warning: pause should be the first process\n");
  }
  struct sigaction stop_action = {.sa_handler = stop};
  struct sigaction reap_action = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
  if (sigaction(SIGINT, &stop_action, NULL) < 0 || sigaction(SIGTERM, &stop_action, NULL) < 0 ||
      sigaction(SIGCHLD, &reap_action, NULL) < 0) {
    perror("sigaction");
    return 1;
  }
  for (;;) {
    pause();
  }
  return 42;
}
"""


class ImageError(RuntimeError):
    """The pause image cannot be made; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class File:
    """One file of an image layer."""

    path: str  # inside the image, absolute
    data: bytes
    mode: int = 0o755


def _tar_layer(files: list[File]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directories: set[str] = set()
        for file in files:
            parts = file.path.strip("/").split("/")
            for depth in range(1, len(parts)):
                directory = "/".join(parts[:depth])
                if directory not in directories:
                    directories.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            info = tarfile.TarInfo("/".join(parts))
            info.size, info.mode = len(file.data), file.mode
            tar.addfile(info, io.BytesIO(file.data))
    return buffer.getvalue()


def write_oci_archive(path: pathlib.Path, *, name: str, files: list[File], entrypoint: list[str],
                      user: str = "") -> pathlib.Path:
    """Write an OCI image archive (linux/amd64-style, of this machine's architecture) with one layer."""
    layer = _tar_layer(files)
    compressed = gzip.compress(layer, mtime=0)
    architecture = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    config = json.dumps({
        "architecture": architecture, "os": "linux",
        "config": {"Entrypoint": entrypoint, "User": user, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }, sort_keys=True).encode()
    blobs = {hashlib.sha256(data).hexdigest(): data for data in (compressed, config)}
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": "sha256:" + hashlib.sha256(compressed).hexdigest(), "size": len(compressed)}],
    }, sort_keys=True).encode()
    blobs[hashlib.sha256(manifest).hexdigest()] = manifest
    index = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": "sha256:" + hashlib.sha256(manifest).hexdigest(), "size": len(manifest),
            "platform": {"architecture": architecture, "os": "linux"},
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
        }],
    }, sort_keys=True).encode()
    entries = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index}
    entries.update({f"blobs/sha256/{digest}": data for digest, data in blobs.items()})
    temporary = path.with_name(path.name + ".tmp")
    with tarfile.open(temporary, mode="w") as tar:
        for directory in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for entry, data in entries.items():
            info = tarfile.TarInfo(entry)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(temporary, path)
    return path


def ensure_image(*, log=print) -> pathlib.Path:
    """The pause image as an OCI archive (named :data:`IMAGE`), compiled on first use."""
    key = hashlib.sha256((PAUSE_C + IMAGE).encode()).hexdigest()[:12]
    archive = binaries.cache_root() / "pause" / key / "pause.oci.tar"
    if archive.exists():
        return archive
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise ImageError("no C compiler to build the pause image: apt-get install gcc libc6-dev")
    archive.parent.mkdir(parents=True, exist_ok=True)
    log(f"compiling the pause image into {archive}")
    with tempfile.TemporaryDirectory(prefix="keyroom-pause-") as workdir:
        source, binary = pathlib.Path(workdir) / "pause.c", pathlib.Path(workdir) / "pause"
        source.write_text(PAUSE_C)
        result = subprocess.run([compiler, "-Os", "-Wall", "-static", "-o", str(binary), str(source)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise ImageError(f"compiling the pause binary failed ({compiler} exited {result.returncode}; "
                             f"a static build needs libc6-dev):\n{result.stderr[-2000:]}")
        subprocess.run(["strip", str(binary)], capture_output=True)
        write_oci_archive(archive, name=IMAGE, files=[File("/pause", binary.read_bytes())],
                          entrypoint=["/pause"], user="65535:65535")
    return archive

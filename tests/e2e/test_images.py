"""The operator and signer images: what they contain, the user they run as, and a real signer run.

Each container runs as the pods do: uid 10001, a read-only root file system,
every capability dropped. The signer run initialises a SoftHSM2 token on a
mounted state volume (as the chart's init container does), starts
``python -m keyroom.signer`` with the chart's environment and asks /healthz over
HTTPS from the host. The signer reads its audit checkpoint from the API server
before it reports healthy; a stub API server on loopback answers that there is
no checkpoint yet.

These tests build the images (``keyroom.devenv.images``; cached after the first
time) and need root and podman; they run only with KEYROOM_E2E=1.
"""
from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest

from keyroom.devenv import images, pki


def _skip_reason() -> str | None:
    if os.environ.get("KEYROOM_E2E") != "1":
        return "end-to-end image tests run only with KEYROOM_E2E=1"
    if os.geteuid() != 0:
        return "the image tests need root (rootful podman)"
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman)"
    return None


pytestmark = [pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
              pytest.mark.timeout(3600)]  # the first run makes the base image and both images

SIGNER_UID = "10001"
TOKEN_LABEL = "keyroom"
PIN, SO_PIN = "4213", "87654321"


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], env=images.podman_environment(), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def run(image: str, *command: str, entrypoint: str | None = None, options: tuple[str, ...] = (),
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in a throw-away container the way the pods run: uid 10001, read-only root, no capabilities."""
    return podman("run", "--rm", "--read-only", "--user", f"{SIGNER_UID}:{SIGNER_UID}", "--cap-drop", "ALL",
                  "--security-opt", "no-new-privileges", "--network", "none", *options,
                  *(("--entrypoint", entrypoint) if entrypoint else ()), image, *command, check=check)


@pytest.fixture(scope="module")
def built() -> dict[str, str]:
    started = time.monotonic()
    images.ensure_base()
    names = {target: images.build(target) for target in images.TARGETS}
    print(f"images ready in {time.monotonic() - started:.0f}s: "
          + ", ".join(f"{name} ({images.image_size(name) / 1e6:.0f} MB)" for name in names.values()))
    return names


@pytest.mark.parametrize("target", images.TARGETS)
def test_runs_as_10001_on_a_read_only_root(built, target):
    result = run(built[target], "-c", "id -u; id -g; touch /probe 2>/dev/null && echo writable || echo read-only",
                 entrypoint="sh")
    assert result.stdout.split() == [SIGNER_UID, SIGNER_UID, "read-only"]
    config = json.loads(podman("image", "inspect", built[target]).stdout)[0]["Config"]
    assert config["User"] == f"{SIGNER_UID}:{SIGNER_UID}"
    assert config["Entrypoint"] == ["python", "-m", f"keyroom.{target}"]
    assert "PYTHONDONTWRITEBYTECODE=1" in config["Env"]


@pytest.mark.parametrize("target", images.TARGETS)
def test_the_component_imports_from_byte_compiled_sources(built, target):
    script = (f"import importlib.util, os, sys, keyroom.{target} as m; "
              "assert sys.executable.startswith('/opt/keyroom/'), sys.executable; "
              "assert sys.version_info[:2] == (3, 11), sys.version; "
              "assert os.path.exists(importlib.util.cache_from_source(m.__file__)), m.__file__; "
              "print(m.__file__)")
    result = run(built[target], "-c", script, entrypoint="python")
    assert result.stdout.strip().startswith("/opt/keyroom/lib/python3.11/site-packages/keyroom/")


def test_the_entrypoints_start_the_components(built):
    operator = run(built["operator"], "--help")
    assert "--liveness URL" in operator.stdout
    # the signer names what it misses when started without its configuration
    signer = run(built["signer"], check=False)
    assert signer.returncode == 2
    assert "error: set KEYROOM_PIN_FILE" in signer.stderr


def test_the_signer_image_has_the_token_tools(built):
    result = run(built["signer"], "-c", "for t in softhsm2-util pkcs11-tool; do command -v $t; done; "
                 "ls -L /usr/lib/softhsm/libsofthsm2.so; python -c 'import pkcs11, cryptography'", entrypoint="sh")
    assert result.stdout.split() == ["/usr/bin/softhsm2-util", "/usr/bin/pkcs11-tool",
                                     "/usr/lib/softhsm/libsofthsm2.so"]


def test_the_operator_image_has_no_pkcs11_module(built):
    result = run(built["operator"], "-c", "find / -xdev -name 'libsofthsm2*' -o -xdev -name 'opensc-pkcs11*'; "
                 "for t in softhsm2-util pkcs11-tool; do command -v $t; done; true", entrypoint="sh")
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("target", images.TARGETS)
def test_no_compiler(built, target):
    result = run(built[target], "-c", "for c in cc gcc c++ g++ clang x86_64-linux-gnu-gcc-12 ld; do "
                 "command -v $c; done; true", entrypoint="sh")
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("target", images.TARGETS)
def test_oci_labels(built, target):
    labels = json.loads(podman("image", "inspect", built[target]).stdout)[0]["Labels"]
    assert labels["org.opencontainers.image.title"] == f"keyroom-{target}"
    assert labels["org.opencontainers.image.version"] == images.version()
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.description"]
    assert labels["org.opencontainers.image.revision"] not in ("", "unknown")


# ------------------------------------------------------------------ a real signer run


class _NoCheckpointYet(http.server.BaseHTTPRequestHandler):
    """The API server as a first signer start sees it: the audit checkpoint ConfigMap does not exist yet."""

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802  (the handler's protocol names it)
        self.server.paths.append(self.path)
        self._answer(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                           "code": 404, "message": f"{self.path} not found"})

    def log_message(self, *args) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def stub_api_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoCheckpointYet)
    server.paths = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_signer_serves_healthz_from_a_token_on_its_volume(built, tmp_path, stub_api_server):
    image = built["signer"]
    state, config, pin, tls, kube = (tmp_path / name for name in ("state", "softhsm", "pin", "tls", "kube"))
    for directory in (state, config, pin, tls, kube):
        directory.mkdir()
    os.chown(state, int(SIGNER_UID), int(SIGNER_UID))
    (config / "softhsm2.conf").write_text("directories.tokendir = /var/lib/keyroom/softhsm-tokens\n"
                                          "objectstore.backend = file\nlog.level = ERROR\n")
    (pin / "pin").write_text(PIN)
    authority = pki.CertificateAuthority()
    serving = authority.issue(common_name="keyroom-signer", server_hosts=("127.0.0.1", "localhost"))
    (tls / "tls.crt").write_bytes(serving.cert_pem)
    (tls / "tls.key").write_bytes(serving.key_pem)
    (tmp_path / "ca.crt").write_bytes(authority.cert_pem)
    (kube / "config").write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "stub",
        "clusters": [{"name": "stub", "cluster": {"server": f"http://127.0.0.1:{stub_api_server.server_port}"}}],
        "users": [{"name": "signer", "user": {"token": "not-checked"}}],
        "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "signer"}}]}))
    for path in (pin / "pin", tls / "tls.key", kube / "config"):
        os.chown(path, int(SIGNER_UID), int(SIGNER_UID))
        path.chmod(0o400)
    mounts = ("-v", f"{state}:/var/lib/keyroom", "-v", f"{config}:/etc/keyroom/softhsm:ro",
              "-e", "SOFTHSM2_CONF=/etc/keyroom/softhsm/softhsm2.conf")

    # the chart's init container: a token on the state volume, made with softhsm2-util
    run(image, "-ec", f"mkdir -p /var/lib/keyroom/softhsm-tokens && softhsm2-util --init-token --free "
                      f"--label {TOKEN_LABEL} --pin {PIN} --so-pin {SO_PIN}", entrypoint="sh", options=mounts)
    slots = run(image, "--module", "/usr/lib/softhsm/libsofthsm2.so", "--list-slots", entrypoint="pkcs11-tool",
                options=mounts)
    assert f"token label        : {TOKEN_LABEL}" in slots.stdout

    port = _free_port()
    name = f"keyroom-signer-test-{uuid.uuid4().hex[:8]}"
    podman("run", "--detach", "--name", name, "--read-only", "--user", f"{SIGNER_UID}:{SIGNER_UID}",
           "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--network", "host", *mounts,
           "-v", f"{pin}:/var/run/secrets/keyroom.dev/pin:ro", "-v", f"{tls}:/var/run/secrets/keyroom.dev/tls:ro",
           "-v", f"{kube}:/var/run/keyroom/kube:ro",
           "-e", "KUBECONFIG=/var/run/keyroom/kube/config",
           "-e", f"KEYROOM_TOKEN_LABEL={TOKEN_LABEL}",
           "-e", "KEYROOM_PIN_FILE=/var/run/secrets/keyroom.dev/pin/pin",
           "-e", "KEYROOM_SIGNER_SESSIONS=2",
           "-e", f"KEYROOM_SIGNER_LISTEN=127.0.0.1:{port}",
           "-e", "KEYROOM_SIGNER_TLS_CERT=/var/run/secrets/keyroom.dev/tls/tls.crt",
           "-e", "KEYROOM_SIGNER_TLS_KEY=/var/run/secrets/keyroom.dev/tls/tls.key",
           "-e", "KEYROOM_SIGNER_ALLOWED_CALLERS=system:serviceaccount:keyroom-system:keyroom-operator",
           "-e", "KEYROOM_SIGNER_NAMESPACE=keyroom-system",
           image)
    try:
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        deadline, answer = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=context,
                                            timeout=2) as response:
                    answer = (response.status, json.load(response))
                    break
            except urllib.error.HTTPError as error:  # 503 until the token and the audit log are open
                answer = (error.code, error.read().decode())
            except OSError as error:
                answer = (None, repr(error))
            if podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip() != "true":
                break
            time.sleep(0.5)
        logs = podman("logs", name).stderr + podman("logs", name).stdout
        assert answer == (200, {"status": "ok", "token": TOKEN_LABEL, "algorithms": ["ECDSA_P256", "ECDSA_P384",
                                                                                  "RSA_3072", "RSA_4096"],
                                "lacking": {}}), f"last answer {answer}; logs:\n{logs}"
        assert f"keyroom signer listening on https://127.0.0.1:{port}" in logs
        assert "/api/v1/namespaces/keyroom-system/configmaps/keyroom-audit-checkpoint" in stub_api_server.paths
    finally:
        podman("rm", "--force", "--time", "5", name, check=False)
    # the signer wrote its state (audit log, token objects) on the volume, as uid 10001
    owners = {path.stat().st_uid for path in state.rglob("*")}
    assert owners == {int(SIGNER_UID)}

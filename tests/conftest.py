"""Shared test fixtures.

Integration tests run against one real local control plane per session
(kube-apiserver, etcd, kube-controller-manager and the keyroom operator as
local processes), started by the same code as ``python -m keyroom.devenv up``.
"""
from __future__ import annotations

import http.server
import json
import os
import pathlib
import subprocess
import threading
import time
import uuid
from typing import Callable

import pytest
import yaml

from keyroom.controllers import notify
from keyroom.devenv import controlplane, fixtures

REPO = pathlib.Path(__file__).resolve().parent.parent


class WebhookServer:
    """A local HTTP server standing in for the approvers' webhook: it records every post the operator makes.

    Per request name a test may script it: answer the next posts with given statuses (``respond``) or hold
    the next post open until released (``hang``).
    """

    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.respond: dict[str, list[int]] = {}
        self.hang: dict[str, threading.Event] = {}
        self.hanging: set[str] = set()
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                name = body["request"]["name"]
                with server.lock:
                    held = server.hang.pop(name, None)
                    statuses = server.respond.get(name) or []
                    status = statuses.pop(0) if statuses else 200
                if held is not None:
                    server.hanging.add(name)
                    held.wait(60)
                    server.hanging.discard(name)
                with server.lock:
                    server.posts.append({"payload": body, "status": status,
                                         "authorization": self.headers.get("Authorization")})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/keyroom"

    def received(self, name: str, event: str | None = None) -> list[dict]:
        """The posts about request ``name`` (of ``event``), in the order they arrived."""
        with self.lock:
            return [p for p in self.posts if p["payload"]["request"]["name"] == name
                    and event in (None, p["payload"]["event"])]

    def stop(self) -> None:
        for held in list(self.hang.values()):
            held.set()
        self.server.shutdown()
        self.server.server_close()


WEBHOOK_TOKEN = "webhook-token-for-the-tests"


@pytest.fixture(scope="session")
def webhook() -> WebhookServer:
    server = WebhookServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, webhook) -> controlplane.Environment:
    state_dir = tmp_path_factory.mktemp("keyroom") / "env"
    started = time.monotonic()
    # the operator (a local process, also when a test restarts it) inherits the environment; it reads the
    # Secret only when it has news, so the Secret may follow once the API server is up
    os.environ[notify.SECRET_ENV] = f"{fixtures.SYSTEM_NAMESPACE}/{notify.DEFAULT_SECRET_NAME}"
    environment = controlplane.up(state_dir, operator=True, log=print)
    environment.run_kubectl("create", "secret", "generic", notify.DEFAULT_SECRET_NAME, "-n",
                            fixtures.SYSTEM_NAMESPACE, f"--from-literal=url={webhook.url}",
                            f"--from-literal=token={WEBHOOK_TOKEN}")
    print(f"control plane for the tests up in {time.monotonic() - started:.1f}s")
    yield environment
    controlplane.down(state_dir, log=print)
    os.environ.pop(notify.SECRET_ENV, None)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Object names that no other test uses."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:8]}"


def kubectl(cluster: controlplane.Environment, *args: str, identity: str = "admin",
            input: str | None = None) -> subprocess.CompletedProcess:
    return cluster.run_kubectl(*args, identity=identity, input=input, check=False)


def apply(cluster: controlplane.Environment, document: dict | str, *,
          identity: str = "admin") -> subprocess.CompletedProcess:
    text = document if isinstance(document, str) else yaml.safe_dump(document)
    return kubectl(cluster, "apply", "-f", "-", identity=identity, input=text)


def get(cluster: controlplane.Environment, kind: str, name: str, *, namespace: str,
        identity: str = "admin") -> dict:
    result = kubectl(cluster, "get", kind, name, "-n", namespace, "-o", "json", identity=identity)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def identity(user: str) -> dict:
    """A fixture user as the API server authenticates them (what spec.requester and approvals must say)."""
    return {"username": user, "groups": [*fixtures.IDENTITIES[user], "system:authenticated"]}


def approve(cluster: controlplane.Environment, name: str, user: str, decision: str = "Approve", *,
            namespace: str = "team-a") -> subprocess.CompletedProcess:
    """Append ``user``'s own decision to a SignRequest, as kubectl keyroom approve does."""
    current = get(cluster, "signrequest", name, namespace=namespace)["spec"].get("approvals")
    entry = {"user": user, "groups": identity(user)["groups"], "decision": decision}
    ops = ([{"op": "test", "path": "/spec/approvals", "value": current},
            {"op": "add", "path": "/spec/approvals/-", "value": entry}] if current is not None
           else [{"op": "add", "path": "/spec/approvals", "value": [entry]}])
    return kubectl(cluster, "patch", "signrequest", name, "-n", namespace, "--type=json", "-p", json.dumps(ops),
                   identity=user)


def wait_for(predicate: Callable[[], object], *, timeout: float = 30.0, what: str = "condition") -> object:
    """Poll until ``predicate`` returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last value: {last!r})")


# ---------------------------------------------------------------- the token, seen from outside the signer

def _pkcs11_tool(cluster: controlplane.Environment, *args: str) -> subprocess.CompletedProcess:
    """OpenSC's pkcs11-tool on the dev token: an independent reader (and writer) of the HSM, not keyroom's code."""
    from keyroom.signer import softhsm

    hsm_dir = cluster.state_dir / "hsm"
    env = {"SOFTHSM2_CONF": str(hsm_dir / "softhsm2.conf"), "PATH": "/usr/bin:/bin"}
    return subprocess.run(["pkcs11-tool", "--module", softhsm.find_module(), "--token-label", "keyroom-dev",
                           "--login", "--pin", (hsm_dir / "pin").read_text().strip(), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def token_labels(cluster: controlplane.Environment) -> set[str]:
    """The labels of the private keys on the dev token."""
    listed = _pkcs11_tool(cluster, "--list-objects", "--type", "privkey")
    assert listed.returncode == 0, listed.stderr
    return {line.split(":", 1)[1].strip() for line in listed.stdout.splitlines() if line.strip().startswith("label:")}


def key_label(cluster: controlplane.Environment, name: str, version: int, *, namespace: str = "team-a") -> str:
    uid = get(cluster, "signingkey", name, namespace=namespace)["metadata"]["uid"]
    return f"keyroom:{namespace}/{name}:v{version}:{uid}"


def plant_key(cluster: controlplane.Environment, *, label: str, object_id: bytes) -> None:
    """Generate a key pair on the token behind keyroom's back (as another tool, or an intruder with the PIN)."""
    made = _pkcs11_tool(cluster, "--keypairgen", "--key-type", "EC:prime256v1", "--label", label,
                        "--id", object_id.hex())
    assert made.returncode == 0, made.stderr


def remove_key(cluster: controlplane.Environment, *, label: str) -> None:
    """Destroy a private key behind keyroom's back (an HSM administrator's mistake)."""
    removed = _pkcs11_tool(cluster, "--delete-object", "--type", "privkey", "--label", label)
    assert removed.returncode == 0, removed.stderr

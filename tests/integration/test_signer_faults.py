"""HSM faults seen from a running signer: a clear reason on /healthz, no crash, recovery once the fault is fixed.

Each test starts a second signer process of its own (its own SoftHSM2
configuration, state directory and audit checkpoint namespace, the
environment's TLS files and signer identity) and watches ``/healthz``, which is what the chart's readiness probe
reads. The signer keeps running through every fault (its liveness is its
port), so a fault is reported, never restarted in a loop.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from keyroom.api import rbac
from keyroom.signer import softhsm
from tests.conftest import apply, kubectl, wait_for

pytestmark = pytest.mark.integration

PIN, SO_PIN = "fault-user-pin-4b1e", "fault-so-pin-77c3"


@pytest.fixture
def checkpoint_namespace(cluster, unique) -> str:
    """A namespace where the signer's identity keeps the second signer's audit checkpoint (the environment's
    signer has its own in keyroom-system, which a new audit log would not match)."""
    namespace = unique("signer-faults")
    assert kubectl(cluster, "create", "namespace", namespace).returncode == 0
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": rbac.SIGNER, "namespace": namespace},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": rbac.SIGNER},
               "subjects": [{"kind": "ServiceAccount", "name": rbac.SIGNER, "namespace": "keyroom-system"}]}
    for document in (rbac.signer_role(namespace), binding):
        created = apply(cluster, document)
        assert created.returncode == 0, created.stderr
    yield namespace
    kubectl(cluster, "delete", "namespace", namespace, "--wait=false")


class SecondSigner:
    """A signer process on ``hsm_dir``'s SoftHSM2 configuration, its health read over HTTPS."""

    def __init__(self, cluster, tmp_path: pathlib.Path, hsm_dir: pathlib.Path, namespace: str, *,
                 pin: str = PIN, **overrides: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        (tmp_path / "pin").write_text(pin)
        env = dict(os.environ, SOFTHSM2_CONF=str(hsm_dir / "softhsm2.conf"), KEYROOM_TOKEN_LABEL="faults",
                   KEYROOM_PIN_FILE=str(tmp_path / "pin"), KEYROOM_SIGNER_LISTEN=f"127.0.0.1:{self.port}",
                   KEYROOM_SIGNER_TLS_CERT=str(cluster.state_dir / "pki" / "signer.crt"),
                   KEYROOM_SIGNER_TLS_KEY=str(cluster.state_dir / "pki" / "signer.key"),
                   KEYROOM_SIGNER_STATE_DIR=str(tmp_path / "state"), KUBECONFIG=str(cluster.kubeconfig("signer")),
                   KEYROOM_SIGNER_NAMESPACE=namespace, **overrides)
        env.pop("KEYROOM_PIN", None)
        self.log = tmp_path / "signer.log"
        with open(self.log, "wb") as output:
            self.process = subprocess.Popen([sys.executable, "-m", "keyroom.signer"], env=env, stdout=output,
                                            stderr=subprocess.STDOUT)
        self.context = ssl.create_default_context(cafile=str(cluster.state_dir / "pki" / "ca.crt"))

    def health(self) -> dict | None:
        """/healthz's answer, its HTTP status as "http"; None while nothing listens."""
        assert self.process.poll() is None, f"the signer exited ({self.process.returncode}): {self.log.read_text()}"
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/healthz", context=self.context,
                                        timeout=2) as answer:
                return {**json.loads(answer.read() or b"{}"), "http": answer.status}
        except urllib.error.HTTPError as error:
            return {**json.loads(error.read() or b"{}"), "http": error.code}
        except OSError:
            return None

    def call(self, path: str, token: str, method: str = "GET") -> tuple[int, dict]:
        """(HTTP status, JSON answer) of an authenticated call to the signer."""
        request = urllib.request.Request(f"https://127.0.0.1:{self.port}{path}", method=method,
                                         headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def reason(self, wanted: str, timeout: float = 30) -> dict:
        return wait_for(lambda: (h := self.health()) and h.get("reason") == wanted and h, timeout=timeout,
                        what=f"the signer to report {wanted} (log: {self.log})")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def test_a_token_that_appears_later_is_opened_without_a_restart(cluster, tmp_path, checkpoint_namespace):
    hsm_dir = tmp_path / "hsm"
    softhsm.write_config(hsm_dir)  # SoftHSM2 configured, but no token labelled "faults" yet
    signer = SecondSigner(cluster, tmp_path, hsm_dir, checkpoint_namespace)
    try:
        missing = signer.reason("TokenNotFound")
        assert missing["http"] == 503 and "faults" in missing["message"]
        softhsm.init_token(hsm_dir, label="faults", pin=PIN, so_pin=SO_PIN)  # the fault fixed
        healthy = wait_for(lambda: (h := signer.health()) and h["http"] == 200 and h, timeout=40,
                           what="the signer to open the token on its own")
        assert signer.process.poll() is None and healthy["http"] == 200
        assert "PKCS#11 token 'faults' is open" in signer.log.read_text()
    finally:
        signer.stop()
    assert PIN not in signer.log.read_text()


def test_a_wrong_pin_is_tried_once_and_the_corrected_pin_file_opens_the_token_without_a_restart(
        cluster, tmp_path, checkpoint_namespace):
    hsm_dir = tmp_path / "hsm"
    softhsm.init_token(hsm_dir, label="faults", pin=PIN, so_pin=SO_PIN)
    wrong = "wrong-pin-0a9f"
    signer = SecondSigner(cluster, tmp_path, hsm_dir, checkpoint_namespace, pin=wrong)
    try:
        refused = signer.reason("PinIncorrect")
        assert refused["http"] == 503
        # the same wrong PIN is never tried again (that would lock the token), however long the signer runs
        wait_for(lambda: "waiting for another PIN" in signer.log.read_text(), timeout=20,
                 what="the signer to wait for another PIN")
        (tmp_path / "pin").write_text(wrong + "\n")  # rewritten, same PIN: still nothing tried
        time.sleep(5)  # the absence of a retry over 2 of the signer's polls is what is asserted
        assert signer.log.read_text().count("cannot open the PKCS#11 token") == 1
        (tmp_path / "pin.new").write_text(PIN)  # the Secret corrected: a mounted file changes by a rename
        (tmp_path / "pin.new").rename(tmp_path / "pin")
        healthy = wait_for(lambda: (h := signer.health()) and h["http"] == 200 and h, timeout=30,
                           what="the signer to open the token with the corrected PIN")
        assert healthy["http"] == 200 and signer.process.poll() is None
        assert "the PIN file changed; opening the token again" in signer.log.read_text()
    finally:
        signer.stop()
    log = signer.log.read_text()
    assert PIN not in log and wrong not in log


def test_a_wrong_module_path_is_reported_and_the_signer_keeps_running(cluster, tmp_path, checkpoint_namespace):
    hsm_dir = tmp_path / "hsm"
    softhsm.init_token(hsm_dir, label="faults", pin=PIN, so_pin=SO_PIN)
    signer = SecondSigner(cluster, tmp_path, hsm_dir, checkpoint_namespace,
                          KEYROOM_PKCS11_MODULE=str(tmp_path / "no-such-module.so"))
    try:
        answer = signer.reason("ModuleNotFound")
        assert answer["http"] == 503 and "no-such-module.so" in answer["message"]
        assert signer.process.poll() is None
    finally:
        signer.stop()


def test_a_token_removed_under_a_running_signer_is_a_clear_refusal_not_a_crash(cluster, tmp_path,
                                                                                checkpoint_namespace):
    from tests.integration.test_signingkey import _token

    hsm_dir = tmp_path / "hsm"
    softhsm.init_token(hsm_dir, label="faults", pin=PIN, so_pin=SO_PIN)
    signer = SecondSigner(cluster, tmp_path, hsm_dir, checkpoint_namespace)
    token = _token(cluster, "keyroom-operator", "keyroom-signer")
    try:
        wait_for(lambda: (h := signer.health()) and h["http"] == 200, timeout=40, what="the signer to be healthy")
        assert signer.call("/v1/keys", token)[0] == 200  # the token's objects, listed
        for token_dir in (hsm_dir / "tokens").iterdir():  # the token pulled out
            subprocess.run(["rm", "-rf", str(token_dir)], check=True)
        status, answer = signer.call("/v1/keys", token)
        assert signer.process.poll() is None, "the signer died"
        assert status in (200, 503), answer  # SoftHSM2 may still answer from memory; never a 500
        if status == 503:
            assert answer["reason"] in ("DeviceError", "TokenNotFound") and answer["message"]
    finally:
        signer.stop()


def test_a_full_token_refuses_new_keys_clearly_keeps_signing_and_recovers_when_room_is_made(
        cluster, tmp_path, checkpoint_namespace, unique):
    """The token's storage fills up (a tmpfs of 160 KiB): generation fails with a reason and a message, the
    signer keeps serving what it has, nothing half-made is left, and the same call succeeds once there is room."""
    from tests.integration.test_signingkey import _token

    hsm_dir = tmp_path / "hsm"
    storage = hsm_dir / "tokens"
    storage.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(storage)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small tmpfs is needed to fill a token and could not be mounted: {mounted.stderr.strip()}")
    signer = None
    try:
        softhsm.init_token(hsm_dir, label="faults", pin=PIN, so_pin=SO_PIN)
        signer = SecondSigner(cluster, tmp_path, hsm_dir, checkpoint_namespace)
        token = _token(cluster, "keyroom-operator", "keyroom-signer")
        wait_for(lambda: (h := signer.health()) and h["http"] == 200, timeout=40, what="the signer to be healthy")
        namespace = checkpoint_namespace
        answers, made = [], []
        for n in range(60):
            name = unique("full")
            created = apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningKey",
                                      "metadata": {"name": name, "namespace": namespace},
                                      "spec": {"algorithm": "ECDSA_P256"}})
            assert created.returncode == 0, created.stderr
            uid = kubectl(cluster, "get", "signingkey", name, "-n", namespace, "-o", "jsonpath={.metadata.uid}").stdout
            status, answer = signer.call(f"/v1/keys/{namespace}/{name}/{uid}/reconcile", token, method="POST")
            if status != 200:
                refused = (name, uid, status, answer)
                break
            made.append(name)
            answers.append(answer)
        else:
            pytest.fail("60 keys fit in 160 KiB: the token never filled up")
        name, uid, status, answer = refused
        assert made, "not even one key fitted"
        assert status in (503, 507), answer
        assert answer["reason"] in ("TokenFull", "DeviceError") and "generate" in answer["message"], answer
        assert "could not store the key pair" in answer["message"] or answer["reason"] == "TokenFull", answer
        assert PIN not in json.dumps(answer)
        assert signer.process.poll() is None, "the signer died"
        listed_status, listed = signer.call("/v1/keys", token)  # what it has is still served
        assert listed_status == 200
        ids = [o["label"] for o in listed["objects"]]
        assert not any(name in label for label in ids), "a half-made key pair was left in the token"
        assert all(sum(made_name in label for label in ids) == 2 for made_name in made), ids

        grown = subprocess.run(["mount", "-o", "remount,size=4m", str(storage)], capture_output=True, text=True)
        assert grown.returncode == 0, grown.stderr
        status, answer = signer.call(f"/v1/keys/{namespace}/{name}/{uid}/reconcile", token, method="POST")
        assert status == 200, answer
        assert answer["currentVersion"] == 1 and answer["versions"][0]["state"] == "Enabled"
    finally:
        if signer is not None:
            signer.stop()
        subprocess.run(["umount", str(storage)], capture_output=True)

"""SigningKeys on the real control plane, with the signer on a real SoftHSM token.

Time-based behaviour (rotation, windows, destruction) uses schedules of a few
seconds rather than a fake clock: the operator sleeps until the exact edge, so
these tests also show that it does.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import uuid

import pytest
from cryptography.hazmat.primitives import serialization

from keyroom.devenv import controlplane
from keyroom.schedule import format_time, parse_time
from keyroom.signer.hsm import KeyHandle
from tests.conftest import apply, get, key_label, kubectl, plant_key, remove_key, token_labels, wait_for
from tests.integration.test_signrequest import _kill

pytestmark = pytest.mark.integration

NAMESPACE = "team-a"


def _key(name: str, **spec) -> dict:
    return {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningKey",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"algorithm": "ECDSA_P256", **spec}}


def _status(cluster, name: str, namespace: str = NAMESPACE) -> dict:
    return get(cluster, "signingkey", name, namespace=namespace).get("status", {})


def _condition(status: dict, type: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == type), {})


def _ready_key(cluster, unique, **spec) -> tuple[str, dict]:
    name = unique("key")
    assert apply(cluster, _key(name, **spec)).returncode == 0
    status = wait_for(lambda: (s := _status(cluster, name)).get("currentVersion") and s,
                      what=f"{name} to get its first version")
    return name, status


@pytest.mark.parametrize("algorithm", [
    "ECDSA_P256",
    "RSA_3072",
])
def test_a_new_key_is_generated_in_the_token_and_its_public_key_published(cluster, unique, algorithm):
    name, status = _ready_key(cluster, unique, algorithm=algorithm)
    assert status["phase"] == "Active" and status["online"] is True
    assert _condition(status, "Ready")["status"] == "True"
    assert _condition(status, "Online")["status"] == "True"
    assert status["observedGeneration"] == 1
    [version] = status["versions"]
    assert version["state"] == "Enabled" and version["version"] == 1
    der = serialization.load_pem_public_key(version["publicKey"].encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert version["fingerprint"] == "sha256:" + hashlib.sha256(der).hexdigest()

    assert key_label(cluster, name, 1) in token_labels(cluster)  # generated in the token, seen by pkcs11-tool
    events = kubectl(cluster, "get", "events", "-n", NAMESPACE, f"--field-selector=involvedObject.name={name}")
    assert "KeyGenerated" in events.stdout


def test_manual_rotation_is_declarative_and_idempotent(cluster, unique):
    name, _ = _ready_key(cluster, unique)
    annotate = lambda value: kubectl(cluster, "annotate", "--overwrite", "signingkey", name, "-n", NAMESPACE,
                                     f"keyroom.dev/rotate={value}")
    assert annotate("2026-12-01").returncode == 0
    status = wait_for(lambda: (s := _status(cluster, name)).get("currentVersion") == 2 and s, what="version 2")
    assert [(v["version"], v["state"]) for v in status["versions"]] == [(2, "Enabled"), (1, "Disabled")]
    assert status["versions"][0]["publicKey"] != status["versions"][1]["publicKey"]
    assert status["lastRotationRequest"] == "2026-12-01"

    # Touching the object again without a new value rotates nothing.
    assert kubectl(cluster, "label", "signingkey", name, "-n", NAMESPACE, "touched=yes").returncode == 0
    assert annotate("2026-12-01").returncode == 0
    assert annotate("2026-12-02").returncode == 0
    status = wait_for(lambda: (s := _status(cluster, name)).get("currentVersion") == 3 and s, what="version 3")
    assert len(status["versions"]) == 3


def test_scheduled_rotation_trims_and_destroys_old_versions(cluster, unique):
    name, _ = _ready_key(cluster, unique, rotation={"every": "3s", "keepVersions": 1}, destructionDelay="2s")
    status = wait_for(lambda: (s := _status(cluster, name)).get("versions")
                      and any(v["version"] == 1 and v["state"] == "Destroyed" for v in s["versions"]) and s,
                      timeout=40, what="version 1 to be rotated out and destroyed")
    states = {v["version"]: v["state"] for v in status["versions"]}
    assert states[1] == "Destroyed" and status["currentVersion"] >= 3
    assert states[status["currentVersion"]] == "Enabled"
    assert status["nextRotationAt"]
    assert key_label(cluster, name, 1) not in token_labels(cluster)
    assert key_label(cluster, name, status["currentVersion"]) in token_labels(cluster)
    # The destroyed version's public key stays published for verifying old signatures.
    assert next(v for v in status["versions"] if v["version"] == 1)["publicKey"].startswith("-----BEGIN PUBLIC KEY")
    # Stop rotating: a key that rotates every 3 s would keep changing the token under later tests.
    stopped = kubectl(cluster, "patch", "signingkey", name, "-n", NAMESPACE, "--type=json",
                      "-p", json.dumps([{"op": "remove", "path": "/spec/rotation"}]))
    assert stopped.returncode == 0, stopped.stderr


def test_online_flips_at_the_window_edges(cluster, unique):
    start = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) + datetime.timedelta(seconds=5)
    end = start + datetime.timedelta(seconds=4)
    name, status = _ready_key(cluster, unique, offline={"enabled": True, "windows": [
        {"start": format_time(start), "end": format_time(end)}]})
    assert status["online"] is False and status["phase"] == "Offline"
    assert status["nextWindowAt"] == format_time(start)
    assert "offline until" in _condition(status, "Online")["message"]

    opened = wait_for(lambda: (s := _status(cluster, name)).get("online") and s, timeout=20, what="the window to open")
    flipped = parse_time(_condition(opened, "Online")["lastTransitionTime"])
    assert abs((flipped - start).total_seconds()) <= 1.0
    assert opened["phase"] == "Active"
    closed = wait_for(lambda: (s := _status(cluster, name)).get("online") is False and s, timeout=20,
                      what="the window to close")
    assert abs((parse_time(_condition(closed, "Online")["lastTransitionTime"]) - end).total_seconds()) <= 1.0


def test_deleting_a_key_destroys_its_material_only_after_the_delay(cluster, unique):
    name, _ = _ready_key(cluster, unique, destructionDelay="3s")
    label = key_label(cluster, name, 1)
    held = json.loads(kubectl(cluster, "get", "signingkey", name, "-n", NAMESPACE, "-o", "json").stdout)["metadata"]
    assert held["finalizers"] == ["keyroom.dev/key-material"]  # what holds it until its material is settled
    assert kubectl(cluster, "delete", "signingkey", name, "-n", NAMESPACE, "--wait=false").returncode == 0
    pending = wait_for(lambda: (s := _status(cluster, name)).get("versions", [{}])[0].get("state")
                       == "PendingDestruction" and s, what="destruction to be scheduled")
    assert pending["versions"][0]["destroyAt"]
    assert label in token_labels(cluster)  # not destroyed yet
    wait_for(lambda: kubectl(cluster, "get", "signingkey", name, "-n", NAMESPACE).returncode != 0, timeout=30,
             what="the SigningKey to be gone")
    assert label not in token_labels(cluster)


def test_a_scheduled_destruction_is_cancelled_by_retain(cluster, unique):
    name, _ = _ready_key(cluster, unique, destructionDelay="1h")
    label = key_label(cluster, name, 1)
    assert kubectl(cluster, "delete", "signingkey", name, "-n", NAMESPACE, "--wait=false").returncode == 0
    wait_for(lambda: _status(cluster, name).get("versions", [{}])[0].get("state") == "PendingDestruction",
             what="destruction to be scheduled")
    patch = kubectl(cluster, "patch", "signingkey", name, "-n", NAMESPACE, "--type=merge",
                    "-p", json.dumps({"spec": {"deletionPolicy": "Retain"}}))
    assert patch.returncode == 0, patch.stderr
    wait_for(lambda: kubectl(cluster, "get", "signingkey", name, "-n", NAMESPACE).returncode != 0, timeout=30,
             what="the SigningKey to be released")
    assert label in token_labels(cluster)


def test_a_key_deleted_while_an_earlier_version_held_it_is_settled_before_it_goes(cluster, unique):
    """Upgrade: earlier versions held keys with Kopf's finalizer. A key deleted under that finalizer alone cannot
    get keyroom.dev/key-material any more; it must still be kept until its material is destroyed, not let go with
    its material left in the HSM, unscheduled."""
    name, _ = _ready_key(cluster, unique, destructionDelay="3s")
    label = key_label(cluster, name, 1)
    _kill(cluster, "operator")
    try:
        earlier = kubectl(cluster, "patch", "signingkey", name, "-n", NAMESPACE, "--type=merge",
                          "-p", json.dumps({"metadata": {"finalizers": ["keyroom.dev/finalizer"]}}))
        assert earlier.returncode == 0, earlier.stderr
        assert kubectl(cluster, "delete", "signingkey", name, "-n", NAMESPACE, "--wait=false").returncode == 0
    finally:
        controlplane.start_operator(cluster)

    def scheduled() -> dict | None:
        found = kubectl(cluster, "get", "signingkey", name, "-n", NAMESPACE, "-o", "json")
        assert found.returncode == 0, f"the key went before its material was settled; {label} stays in the token"
        status = json.loads(found.stdout).get("status", {})
        return status if status.get("versions", [{}])[0].get("state") == "PendingDestruction" else None
    pending = wait_for(scheduled, what="destruction to be scheduled")
    assert pending["versions"][0]["destroyAt"]
    wait_for(lambda: kubectl(cluster, "get", "signingkey", name, "-n", NAMESPACE).returncode != 0, timeout=30,
             what="the SigningKey to be gone")
    assert label not in token_labels(cluster)


def test_a_key_of_an_earlier_version_swaps_kopfs_finalizer_for_its_own(cluster, unique):
    name, _ = _ready_key(cluster, unique)
    held = kubectl(cluster, "patch", "signingkey", name, "-n", NAMESPACE, "--type=merge",
                   "-p", json.dumps({"metadata": {"finalizers": ["keyroom.dev/finalizer", "example.com/other"]}}))
    assert held.returncode == 0, held.stderr
    wait_for(lambda: get(cluster, "signingkey", name, namespace=NAMESPACE)["metadata"]["finalizers"]
             == ["example.com/other", "keyroom.dev/key-material"], what="keyroom.dev/key-material in place of Kopf's")
    kubectl(cluster, "patch", "signingkey", name, "-n", NAMESPACE, "--type=json",
            "-p", json.dumps([{"op": "remove", "path": "/metadata/finalizers/0"}]))


def test_another_teams_key_is_invisible(cluster, unique):
    name = unique("team-b-key")
    key = _key(name)
    key["metadata"]["namespace"] = "team-b"
    assert apply(cluster, key).returncode == 0
    assert kubectl(cluster, "get", "signingkey", name, "-n", "team-b", identity="alice").returncode != 0
    listed = kubectl(cluster, "get", "signingkeys", "-n", NAMESPACE, "-o", "name", identity="alice")
    assert listed.returncode == 0 and name not in listed.stdout
    assert kubectl(cluster, "get", "signingkeys", "-A", identity="alice").returncode != 0


def test_a_bad_time_zone_stalls_the_key_with_a_clear_message(cluster, unique):
    name = unique("key")
    assert apply(cluster, _key(name, offline={"windows": [
        {"schedule": "0 9 * * *", "duration": "1h", "timeZone": "Mars/Olympus"}]})).returncode == 0
    status = wait_for(lambda: _condition(s := _status(cluster, name), "Stalled") and s, what="Stalled")
    assert _condition(status, "Stalled")["reason"] == "InvalidSpec"
    assert "Mars/Olympus" in _condition(status, "Ready")["message"]


# ---------------------------------------------------------------- the signer's door

def _raw_call(cluster, token: str | None) -> int:
    import ssl
    import urllib.error
    import urllib.request

    context = ssl.create_default_context(cafile=str(cluster.state_dir / "pki" / "ca.crt"))
    request = urllib.request.Request(cluster.signer_url + "/v1/keys")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        return urllib.request.urlopen(request, context=context, timeout=10).status
    except urllib.error.HTTPError as error:
        return error.code


def _token(cluster, service_account: str, audience: str | None) -> str:
    args = ["create", "token", service_account, "-n", "keyroom-system"]
    if audience:
        args.append(f"--audience={audience}")
    return kubectl(cluster, *args).stdout.strip()


def test_the_signer_refuses_calls_without_a_valid_operator_token(cluster):
    assert _raw_call(cluster, None) == 401
    assert _raw_call(cluster, "not-a-token") == 401
    assert _raw_call(cluster, _token(cluster, "keyroom-operator", None)) == 401          # wrong audience
    assert _raw_call(cluster, _token(cluster, "keyroom-signer", "keyroom-signer")) == 403  # another account
    assert _raw_call(cluster, _token(cluster, "keyroom-operator", "keyroom-signer")) == 200


def test_a_wrong_pin_is_reported_without_the_pin(cluster, tmp_path):
    """A second signer on the same token with a wrong PIN reports PinIncorrect and never prints a PIN."""
    import os
    import socket
    import ssl
    import sys
    import urllib.error
    import urllib.request

    hsm_dir = cluster.state_dir / "hsm"
    real_pin = (hsm_dir / "pin").read_text().strip()
    wrong_pin = "wrong-" + real_pin[::-1]
    (tmp_path / "pin").write_text(wrong_pin)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, SOFTHSM2_CONF=str(hsm_dir / "softhsm2.conf"), KEYROOM_TOKEN_LABEL="keyroom-dev",
               KEYROOM_PIN_FILE=str(tmp_path / "pin"), KEYROOM_SIGNER_LISTEN=f"127.0.0.1:{port}",
               KEYROOM_SIGNER_TLS_CERT=str(cluster.state_dir / "pki" / "signer.crt"),
               KEYROOM_SIGNER_TLS_KEY=str(cluster.state_dir / "pki" / "signer.key"),
               KEYROOM_SIGNER_STATE_DIR=str(tmp_path / "state"), KUBECONFIG=str(cluster.kubeconfig("signer")))
    log = tmp_path / "signer.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "keyroom.signer"], env=env, stdout=output,
                                   stderr=subprocess.STDOUT)
    context = ssl.create_default_context(cafile=str(cluster.state_dir / "pki" / "ca.crt"))

    def health():
        try:
            urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=context, timeout=2)
        except urllib.error.HTTPError as error:
            return json.loads(error.read())
        except OSError:
            return None
    try:
        answer = wait_for(lambda: (h := health()) and h.get("reason") != "HSMUnavailable" and h,
                          what="the signer to report the token state")
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert answer["reason"] == "PinIncorrect"
    assert wrong_pin not in json.dumps(answer) and wrong_pin not in log.read_text()
    for path in (cluster.state_dir / "logs").glob("*.log"):
        assert real_pin not in path.read_text(errors="replace"), f"the PIN leaked into {path.name}"


def test_the_operator_reports_token_objects_no_key_declares(cluster):
    stray = KeyHandle(namespace="team-a", name="stray", uid="00000000-0000-4000-8000-00000000beef", version=1)
    plant_key(cluster, label=stray.label, object_id=stray.object_id)
    log = cluster.state_dir / "logs" / "operator.log"
    wait_for(lambda: "keyroom:team-a/stray:v1" in log.read_text() and "declared by no SigningKey" in log.read_text(),
             timeout=30, what="the operator to report the stray object")
    assert stray.label in token_labels(cluster)  # reported, not destroyed


def test_a_stray_keyroom_object_is_a_warning_event_on_its_keys_namespace(cluster, unique):
    stray = KeyHandle(namespace="team-a", name=unique("gone"), uid=str(uuid.uuid4()), version=2)
    plant_key(cluster, label=stray.label, object_id=stray.object_id)
    log = cluster.state_dir / "logs" / "operator.log"

    def events() -> list[dict]:
        listed = kubectl(cluster, "get", "events", "-n", NAMESPACE, "--field-selector",
                         "reason=UndeclaredKeyObject", "-o", "json")
        assert listed.returncode == 0, listed.stderr
        return [e for e in json.loads(listed.stdout)["items"] if stray.label in e["message"]]

    found = wait_for(events, timeout=60, what="an UndeclaredKeyObject event (operator log: "
                     f"{[line for line in log.read_text().splitlines() if 'token audit' in line][-3:]})")
    assert len(found) == 1
    event = found[0]
    assert (event["type"], event["involvedObject"]["kind"], event["involvedObject"]["name"]) == (
        "Warning", "Namespace", "team-a")
    assert f"SigningKey {stray.name} version 2" in event["message"] and stray.uid in event["message"]
    assert stray.label in token_labels(cluster)  # reported, never destroyed


def test_key_material_destroyed_outside_keyroom_stalls_the_key_until_a_rotation(cluster, unique):
    name, _ = _ready_key(cluster, unique)
    remove_key(cluster, label=key_label(cluster, name, 1))
    # any event makes the operator ask the signer, which checks the token
    assert kubectl(cluster, "label", "signingkey", name, "-n", NAMESPACE, "poke=1").returncode == 0
    status = wait_for(lambda: _condition(s := _status(cluster, name), "Stalled").get("status") == "True" and s,
                      what="the key to stall")
    assert _condition(status, "Stalled")["reason"] == "KeyMaterialMissing" and status["phase"] == "Failed"
    assert status["versions"][0]["missing"] is True
    assert kubectl(cluster, "annotate", "signingkey", name, "-n", NAMESPACE, "keyroom.dev/rotate=1").returncode == 0
    status = wait_for(lambda: (s := _status(cluster, name)).get("currentVersion") == 2 and s, what="version 2")
    assert status["phase"] == "Active" and _condition(status, "Stalled").get("status") != "True"


def _connections_to(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` to local ``port`` (its sockets matched in /proc/net/tcp)."""
    import os
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                    count += 1
    return count


def test_a_flood_of_keys_is_all_ready_none_goes_back_and_the_operator_keeps_its_connections_bounded(
        cluster, unique):
    from keyroom import operator as keyroom_operator
    from keyroom.devenv import controlplane

    namespace = unique("flood")
    assert kubectl(cluster, "create", "namespace", namespace).returncode == 0
    count = 300
    manifests = [{**_key(f"key-{n:03d}"), "metadata": {"name": f"key-{n:03d}", "namespace": namespace}}
                 for n in range(count)]
    went_back: set[str] = set()
    ready: set[str] = set()

    def start_watch() -> subprocess.Popen:  # each start lists the keys as they are, then follows their changes
        return subprocess.Popen([str(cluster.kubectl), f"--kubeconfig={cluster.kubeconfig()}", "get", "signingkeys",
                                 "-n", namespace, "--watch", "-o", "json", "--output-watch-events"],
                                stdout=subprocess.PIPE, text=True)
    watch, restarts = start_watch(), 0
    try:
        created = kubectl(cluster, "apply", "-f", "-", input="\n---\n".join(json.dumps(m) for m in manifests))
        assert created.returncode == 0, created.stderr
        decoder = json.JSONDecoder()
        buffer = ""
        operator = controlplane._read_state(cluster.state_dir)["processes"]["operator"]["pid"]
        api_port = int(cluster.server.rsplit(":", 1)[1])
        most = 0
        while len(ready) < count:
            line = watch.stdout.readline()
            if not line:  # the API server ends a watch whose reader falls behind (a loaded machine): start again
                watch.kill()
                watch, buffer, restarts = start_watch(), "", restarts + 1
                assert restarts <= 10, "the watch kept ending before every key was Ready"
                continue
            buffer += line
            try:
                event, end = decoder.raw_decode(buffer.lstrip())
            except ValueError:
                continue
            buffer = buffer.lstrip()[end:]
            body = event["object"]
            name = body["metadata"]["name"]
            conditions = body.get("status", {}).get("conditions", [])
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                ready.add(name)
            elif name in ready:
                went_back.add(name)
            most = max(most, _connections_to(operator, api_port))
    finally:
        watch.kill()  # the keys stay: deleting them would schedule 300 destructions for the tests that follow
    assert not went_back
    # Kopf's session (bounded) and the kubernetes client's pool the reconcilers' own calls use (10 at most here)
    assert most <= keyroom_operator.API_CONNECTIONS + 10, most

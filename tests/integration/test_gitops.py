"""GitOps tools judge keyroom objects truthfully: kstatus, Argo CD's Lua health and Flux's healthCheckExprs.

Objects of each kind are driven through their states on the real control
plane; each state is captured as the API server returns it and judged by the
real kstatus library (tests/kstatus), by the shipped Lua scripts in a Lua
interpreter and by the shipped CEL expressions. The three must agree, and
with what the state means: working is InProgress, finished is Current,
stuck until someone changes the spec is Failed. The captures are also stored
under tests/fixtures/gitops-states.json for the fast unit test; running this
file with KEYROOM_RECAPTURE=1 rewrites them.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests import gitops
from tests.conftest import REPO, apply, approve, get, identity, kubectl, wait_for

pytestmark = pytest.mark.integration

NAMESPACE = "team-a"
FIXTURES = REPO / "tests" / "fixtures" / "gitops-states.json"
SUBJECT = {"commonName": "gitops test", "organization": ["keyroom tests"]}


def _create(cluster, kind: str, name: str, spec: dict, *, user: str = "admin") -> None:
    applied = apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": kind,
                              "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}, identity=user)
    assert applied.returncode == 0, applied.stderr


def _capture(cluster, kind: str, name: str, until) -> dict:
    return wait_for(lambda: (body := get(cluster, kind.lower(), name, namespace=NAMESPACE))
                    and until(body.get("status") or {}) and body, timeout=60, what=f"{kind} {name} to settle")


def _ready(status: dict) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})


def _reason(reason: str):
    return lambda status: _ready(status).get("reason") == reason


def _clean(body: dict) -> dict:
    """The object as a tool reads it, without the noise that changes from run to run."""
    body = json.loads(json.dumps(body))
    body["metadata"].pop("managedFields", None)
    return body


@pytest.fixture(scope="module")
def states(cluster) -> dict[str, dict]:
    """One captured object per (kind, state); the expected kstatus verdict is part of the name."""
    found: dict[str, dict] = {}
    suffix = os.urandom(3).hex()
    key, offline, onetime, impossible = (f"gitops-{n}-{suffix}" for n in ("key", "offline", "onetime", "never"))
    _create(cluster, "SigningKey", key, {"algorithm": "ECDSA_P256"})
    _create(cluster, "SigningKey", offline, {"algorithm": "ECDSA_P256", "offline": {"windows": [
        {"start": "2099-01-01T00:00:00Z", "end": "2099-01-02T00:00:00Z"}]}})
    _create(cluster, "SigningKey", onetime, {"algorithm": "ECDSA_P256", "usage": "OneTime",
                                             "destructionDelay": "2s"})
    _create(cluster, "SigningKey", impossible, {"algorithm": "ECDSA_P256", "offline": {"windows": [
        {"schedule": "0 0 30 2 *", "duration": "1h"}]}})
    policy = f"gitops-policy-{suffix}"
    _create(cluster, "SigningPolicy", policy, {"keys": [key, onetime], "requesters": {"groups": ["team-a-devs"]},
                                               "approvers": {"groups": ["team-a-approvers"]},
                                               "requiredApprovals": 0})
    approval_policy = f"gitops-approval-{suffix}"
    _create(cluster, "SigningPolicy", approval_policy, {"keys": [offline], "requesters": {"groups": ["team-a-devs"]},
                                                        "approvers": {"groups": ["team-a-approvers"]},
                                                        "requiredApprovals": 1})
    found["SigningKey/Active/Current"] = _capture(cluster, "SigningKey", key, _reason("KeyAvailable"))
    found["SigningKey/Offline/Current"] = _capture(cluster, "SigningKey", offline,
                                                   lambda s: s.get("phase") == "Offline")
    found["SigningKey/ImpossibleSchedule/Failed"] = _capture(
        cluster, "SigningKey", impossible, lambda s: any(c["type"] == "Stalled" for c in s.get("conditions", [])))
    found["SigningPolicy/Ready/Current"] = _capture(cluster, "SigningPolicy", policy,
                                                    lambda s: len(s.get("matchedKeys", [])) == 2)

    digest = {"name": "app.bin", "value": "ab" * 32}
    request = lambda name, key_name: _create(cluster, "SignRequest", name, {  # noqa: E731
        "keyRef": {"name": key_name}, "requester": identity("alice"), "reason": "gitops", "digests": [digest]},
        user="alice")
    request(f"gitops-signed-{suffix}", key)
    found["SignRequest/Signed/Current"] = _capture(cluster, "SignRequest", f"gitops-signed-{suffix}",
                                                   lambda s: s.get("phase") == "Signed")
    request(f"gitops-waiting-{suffix}", offline)
    found["SignRequest/AwaitingApproval/InProgress"] = _capture(
        cluster, "SignRequest", f"gitops-waiting-{suffix}", _reason("AwaitingApproval"))
    request(f"gitops-denied-{suffix}", offline)
    _capture(cluster, "SignRequest", f"gitops-denied-{suffix}", _reason("AwaitingApproval"))
    assert approve(cluster, f"gitops-denied-{suffix}", "bob", "Deny", namespace=NAMESPACE).returncode == 0
    found["SignRequest/Denied/Failed"] = _capture(cluster, "SignRequest", f"gitops-denied-{suffix}",
                                                  lambda s: s.get("phase") == "Denied")

    request(f"gitops-onetime-{suffix}", onetime)
    _capture(cluster, "SignRequest", f"gitops-onetime-{suffix}", lambda s: s.get("phase") == "Signed")
    found["SigningKey/Consumed/Current"] = _capture(cluster, "SigningKey", onetime,
                                                    lambda s: s.get("phase") in ("Consumed", "Destroyed"))
    found["SigningKey/Destroyed/Current"] = _capture(cluster, "SigningKey", onetime,
                                                     lambda s: s.get("phase") == "Destroyed")

    cert, waiting, revoked = (f"gitops-{n}-{suffix}" for n in ("cert", "nokey", "revoked"))
    _create(cluster, "Certificate", cert, {"keyRef": {"name": key}, "issuerRef": {"selfSigned": {}},
                                           "subject": SUBJECT})
    _create(cluster, "Certificate", waiting, {"keyRef": {"name": f"absent-{suffix}"},
                                              "issuerRef": {"selfSigned": {}}, "subject": SUBJECT})
    _create(cluster, "Certificate", revoked, {"keyRef": {"name": key}, "issuerRef": {"selfSigned": {}},
                                              "subject": SUBJECT})
    found["Certificate/Issued/Current"] = _capture(cluster, "Certificate", cert, _reason("Issued"))
    found["Certificate/WaitingForKey/InProgress"] = _capture(
        cluster, "Certificate", waiting, lambda s: _ready(s).get("reason") not in (None, "Reconciling"))
    _capture(cluster, "Certificate", revoked, _reason("Issued"))
    patched = kubectl(cluster, "patch", "certificate", revoked, "-n", NAMESPACE, "--type=merge", "-p",
                      json.dumps({"spec": {"revocation": {"reason": "keyCompromise",
                                                          "since": "2026-01-01T00:00:00Z"}}}))
    assert patched.returncode == 0, patched.stderr
    found["Certificate/Revoked/Failed"] = _capture(cluster, "Certificate", revoked, _reason("Revoked"))
    states = {name: _clean(body) for name, body in found.items()}
    if os.environ.get("KEYROOM_RECAPTURE"):
        FIXTURES.write_text(json.dumps(states, indent=1, sort_keys=True) + "\n")
    return states


def test_kstatus_argo_and_flux_agree_with_each_state(states):
    names = sorted(states)
    judged = gitops.verdicts([states[name] for name in names])
    assert [(name, k) for name, (k, _, _) in zip(names, judged)] == [(name, name.rsplit("/", 1)[1]) for name in names]
    for name, (k, argo, flux) in zip(names, judged):
        assert (argo, flux) == (gitops.ARGO_FOR_KSTATUS[k], k), name


def test_a_spec_change_not_yet_seen_is_in_progress_for_every_tool(states):
    for name, body in states.items():
        unseen = json.loads(json.dumps(body))
        unseen["metadata"]["generation"] += 1
        assert gitops.verdicts([unseen]) == [("InProgress", "Progressing", "InProgress")], name


def test_the_first_status_the_operator_writes_marks_a_certificate_reconciling(cluster, unique):
    """Every version of a new Certificate the API server serves: none is judged Current before it is Ready."""
    name = unique("gitops-first")
    watch = subprocess.Popen([str(cluster.kubectl), f"--kubeconfig={cluster.kubeconfig('admin')}", "get",
                              "certificate", "-n", NAMESPACE, "--field-selector", f"metadata.name={name}",
                              "--watch", "-o", "json"], stdout=subprocess.PIPE, text=True)
    try:
        _create(cluster, "Certificate", name, {"keyRef": {"name": unique("absent")},
                                               "issuerRef": {"selfSigned": {}}, "subject": SUBJECT})
        _capture(cluster, "Certificate", name, lambda s: _ready(s).get("reason") not in (None, "Reconciling"))
    finally:
        watch.terminate()
    decoder, text, versions = json.JSONDecoder(), watch.communicate(timeout=10)[0], []
    position = 0
    while text[position:].strip():
        body, end = decoder.raw_decode(text, len(text) - len(text[position:].lstrip()))
        versions.append(body)
        position = end
    with_status = [v for v in versions if (v.get("status") or {}).get("conditions")]
    assert with_status, versions
    first = with_status[0]["status"]
    assert [(c["type"], c["status"]) for c in first["conditions"]] == [("Reconciling", "True"), ("Ready", "False")]
    assert [k["status"] for k in gitops.kstatus(with_status)] == ["InProgress"] * len(with_status)

"""A status computed from a body that is no longer current is never written.

A key daemon that acts on a stale body (one from before the signer's record
reached status, as after a burst of events or a slow watch) must not replace
the newer status: the write carries the body's resourceVersion and the API
server refuses it. Driven here with the operator's own identity and the
reconcile functions the operator runs, against the real API server.
"""
from __future__ import annotations

import asyncio
import datetime
import logging

import kubernetes
import pytest

from keyroom.controllers import certificate, daemon, kube, signingkey, signrequest
from tests.conftest import apply, get, kubectl, wait_for
from tests.integration.test_signrequest import _request

pytestmark = pytest.mark.integration

NAMESPACE = "team-a"
NOW = datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture
def as_operator(cluster, monkeypatch):
    """kube's client as the operator's ServiceAccount (what the operator's reconcilers write with)."""
    client = kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig("operator")))
    api = kubernetes.client.CustomObjectsApi(client)
    monkeypatch.setattr(kube, "_api", lambda: api)
    yield
    client.close()


def _is_ready(status: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))


def _ready(cluster, kind: str, name: str) -> dict:
    return wait_for(lambda: _is_ready((o := get(cluster, kind, name, namespace=NAMESPACE)).get("status", {})) and o,
                    timeout=60, what=f"{kind} {name} to be Ready")


def _touch(cluster, kind: str, name: str) -> str:
    """A newer version of the object (what any later event brings); its resourceVersion."""
    assert kubectl(cluster, "annotate", kind, name, "-n", NAMESPACE, "--overwrite",
                   f"example.com/touched={datetime.datetime.now().timestamp()}").returncode == 0
    return get(cluster, kind, name, namespace=NAMESPACE)["metadata"]["resourceVersion"]


def _unwritten(cluster, kind: str, name: str, version: str) -> dict:
    """The object's status, asserting that nothing was written since ``version``."""
    current = get(cluster, kind, name, namespace=NAMESPACE)
    assert current["metadata"]["resourceVersion"] == version, "a status from a stale body was written"
    return current["status"]


def _ready_key_then_touched(cluster, unique) -> tuple[str, dict, str]:
    """A Ready SigningKey (name, the body as it was then) and the resourceVersion of a newer version of it."""
    name = unique("key")
    assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningKey",
                           "metadata": {"name": name, "namespace": NAMESPACE},
                           "spec": {"algorithm": "ECDSA_P256"}}).returncode == 0
    shown = _ready(cluster, "signingkey", name)
    return name, shown, _touch(cluster, "signingkey", name)


def test_a_key_status_from_a_stale_body_without_versions_is_refused(cluster, unique, as_operator):
    name, shown, version = _ready_key_then_touched(cluster, unique)
    stale = {**shown, "status": {}}  # the view from before the signer's record was written
    # no signer reachable: the stale view would be written as a key without versions, not ready
    due = asyncio.run(signingkey.reconcile(body=stale, signer=None, at=NOW, logger=logging.getLogger("test")))
    assert due == NOW + signingkey._STALE_RETRY
    after = _unwritten(cluster, "signingkey", name, version)
    assert after["versions"] == shown["status"]["versions"] and after["phase"] == "Active"


def test_a_first_status_from_a_stale_body_is_refused(cluster, unique, as_operator):
    name, shown, version = _ready_key_then_touched(cluster, unique)
    asyncio.run(daemon.write_first_status(plural="signingkeys", body={**shown, "status": {}}, message="stale"))
    after = _unwritten(cluster, "signingkey", name, version)
    assert _is_ready(after) and after["versions"] == shown["status"]["versions"]


def test_a_certificate_status_from_a_stale_body_is_refused(cluster, unique, as_operator):
    key, name = unique("key"), unique("cert")
    assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningKey",
                           "metadata": {"name": key, "namespace": NAMESPACE},
                           "spec": {"algorithm": "ECDSA_P256"}}).returncode == 0
    assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "kind": "Certificate",
                           "metadata": {"name": name, "namespace": NAMESPACE},
                           "spec": {"keyRef": {"name": key}, "issuerRef": {"selfSigned": {}},
                                    "subject": {"commonName": name}, "duration": "30d",
                                    "renewBefore": "10d"}}).returncode == 0
    shown = _ready(cluster, "certificate", name)
    version = _touch(cluster, "certificate", name)
    due, _ = asyncio.run(certificate.reconcile(body={**shown, "status": {}}, signer=None, at=NOW,
                                               logger=logging.getLogger("test")))
    assert due == NOW + certificate._STALE_RETRY
    after = _unwritten(cluster, "certificate", name, version)
    assert after["certificate"] == shown["status"]["certificate"] and _is_ready(after)


def _pending_request(cluster, unique) -> tuple[dict, signrequest.Reconciler]:
    """A SignRequest shown Pending (its key does not exist), and a reconciler that holds it as it is now."""
    name, created = _request(cluster, unique, unique("no-such-key"), {"a.bin": "ab" * 32})
    assert created.returncode == 0, created.stderr
    body = wait_for(lambda: (o := get(cluster, "signrequest", name, namespace=NAMESPACE)).get("status", {})
                    .get("phase") == "Pending" and o, timeout=60, what="the request to be Pending")
    requests = signrequest.Requests()
    requests.remember(body)
    return body, signrequest.Reconciler(requests=requests, signer=None, keys={}, policies={}, key_labels={})


def test_a_request_status_from_a_stale_body_replaces_nothing_written_since(cluster, unique, as_operator):
    """A SignRequest's status is written whole on the version it was computed from; on a newer version the
    write is refused and only what it changes is merged: nothing the newer status holds is lost."""
    stale, reconciler = _pending_request(cluster, unique)
    name = stale["metadata"]["name"]
    # a newer status, written after the stale body was read (as by a reconcile that ran meanwhile)
    newer = asyncio.run(kube.patch_status(plural="signrequests", namespace=NAMESPACE, name=name,
                                          status={"keyVersion": 7}))
    held = reconciler.requests.bodies[(NAMESPACE, name)]
    written = asyncio.run(reconciler._write(held, {"message": "from a stale body"}))
    assert written["status"]["message"] == "from a stale body"
    assert written["status"]["keyVersion"] == 7, "a status from a stale body replaced a newer one"
    assert int(written["metadata"]["resourceVersion"]) > int(newer["metadata"]["resourceVersion"])


def test_a_request_status_is_replaced_whole_on_the_version_it_was_computed_from(cluster, unique, as_operator,
                                                                             monkeypatch):
    current, reconciler = _pending_request(cluster, unique)

    async def no_merge_patch(**_):
        raise AssertionError("a status computed from the current version was merged, not replaced")
    monkeypatch.setattr(kube, "patch_status", no_merge_patch)
    held = reconciler.requests.bodies[(NAMESPACE, current["metadata"]["name"])]
    written = asyncio.run(reconciler._write(held, {"message": "current"}))
    assert written["status"] == {**current["status"], "message": "current"}

"""Attacks on the signer's HTTPS API.

The attacker modelled first is a compromised operator: it holds the operator's
own ServiceAccount token for the signer's audience, the only credential the
signer accepts, and calls the signer directly with any method, path and body.
It tries the raw key routes that were removed, names objects that do not
match (wrong UID, another team's object in its own team's path, malformed
names), asks for requests nobody approved or for digests the request does not
hold, and sends bodies that are not what the signer expects. The signer must
refuse each call and nothing may be obtained: no signature, no new key
version, no destroyed key, no Signed audit entry.

The second attacker is anyone else who can reach the signer's port: without a
token, with junk, with real tokens of the wrong audience or of another
ServiceAccount, or with a person's credentials. They must not get past
authentication at all.
"""
from __future__ import annotations

import base64
import datetime
import json
import time
import uuid

import pytest
import yaml

from keyroom.schedule import parse_time
from keyroom.signer.client import digests_fingerprint
from tests.conftest import get, key_label, kubectl, token_labels, wait_for
from tests.security.conftest import (
    NAMESPACE, audit_entries, digest, entries_for, key_status, make_key, make_policy, make_request, request_status,
    service_account_token, sign_call, signer_call, uid_of, wait_request,
)

pytestmark = pytest.mark.integration


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def room(cluster) -> dict:
    """team-a's key guarded by a one-approval policy, and team-b's key likewise."""
    key = make_key(cluster, _unique)
    make_policy(cluster, _unique, key, requiredApprovals=1)
    other = make_key(cluster, _unique, namespace="team-b")
    make_policy(cluster, _unique, other, namespace="team-b", requesters={"groups": ["team-b-devs"]},
                approvers={"users": ["nobody"]}, requiredApprovals=1)
    return {"key": key, "uid": uid_of(cluster, "signingkey", key),
            "other": other, "other_uid": uid_of(cluster, "signingkey", other, "team-b")}


def _pending(cluster, unique, key: str, *, user: str = "alice", namespace: str = NAMESPACE) -> tuple[str, dict]:
    """A request that waits for an approval; returns its name and the object."""
    name = make_request(cluster, unique, key, user=user, namespace=namespace)
    wait_request(cluster, name, lambda s: s.get("phase") == "Pending", namespace=namespace, what=f"{name} Pending")
    return name, get(cluster, "signrequest", name, namespace=namespace)


def _nothing_signed(cluster, name: str, uid: str, *, namespace: str = NAMESPACE) -> None:
    assert not entries_for(cluster, uid, "Intent") and not entries_for(cluster, uid, "Signed")
    status = request_status(cluster, name, namespace)
    assert status.get("phase") == "Pending" and not status.get("signatures"), status


def _key_entries(cluster, key_uid: str) -> list[dict]:
    return [e for e in audit_entries(cluster) if (e.get("key") or {}).get("uid") == key_uid]


# ---------------------------------------------------------------- the removed raw routes

@pytest.mark.parametrize("method, template, body", [
    ("PUT", "/v1/keys/{ns}/{name}/{uid}/2", {"algorithm": "ECDSA_P256"}),          # generate a version
    ("GET", "/v1/keys/{ns}/{name}/{uid}/1", None),                                 # read a version
    ("DELETE", "/v1/keys/{ns}/{name}/{uid}/1", None),                              # destroy a version
    ("POST", "/v1/keys/{ns}/{name}/{uid}/1/sign",                                  # sign chosen bytes
     {"digestAlgorithm": "SHA256", "digests": [digest("chosen by the attacker")]}),
    ("PUT", "/v1/keys/{ns}/{name}/{uid}/reconcile", {"algorithm": "ECDSA_P256"}),
    ("DELETE", "/v1/keys/{ns}/{name}/{uid}/reconcile", None),
    ("DELETE", "/v1/requests/{ns}/{name}/{uid}", None),
    ("PUT", "/v1/keys", {"algorithm": "ECDSA_P256"}),
])
def test_the_removed_raw_key_routes_are_gone(cluster, room, method, template, body):
    before = token_labels(cluster)
    entries_before = len(_key_entries(cluster, room["uid"]))
    path = template.format(ns=NAMESPACE, name=room["key"], uid=room["uid"])
    status, answer = signer_call(cluster, method, path, body=body)
    assert status in (404, 405), (status, answer)
    assert not any(word in str(answer) for word in ("signature", "publicKey", "destroyed")), answer
    after = token_labels(cluster)
    assert after == before
    assert key_label(cluster, room["key"], 1) in after and key_label(cluster, room["key"], 2) not in after
    assert len(_key_entries(cluster, room["uid"])) == entries_before  # the signer recorded no change of the key


# ---------------------------------------------------------------- reconcile: names that do not match

def test_reconcile_of_a_uid_that_is_not_the_named_keys_is_refused(cluster, room):
    before = token_labels(cluster)
    forged = str(uuid.uuid4())
    status, answer = signer_call(cluster, "POST", f"/v1/keys/{NAMESPACE}/{room['key']}/{forged}/reconcile")
    assert status == 404 and answer["reason"] == "KeyNotFound", answer
    assert token_labels(cluster) == before
    assert not _key_entries(cluster, forged)


#: how the signer refuses a call that names an object it cannot find as named
REFUSED = {400: "InvalidRequest", 404: "KeyNotFound", 409: "KeyMismatch"}


@pytest.mark.parametrize("case", ["another team's key in team-a's path", "another key's UID under this key's name"])
def test_reconcile_naming_a_key_in_the_wrong_place_is_refused(cluster, room, case):
    """A real UID the signer knows, under a namespace/name that is not that key's."""
    name = room["other"] if case.startswith("another team") else room["key"]
    path = f"/v1/keys/{NAMESPACE}/{name}/{room['other_uid']}/reconcile"
    before, entries_before = token_labels(cluster), _key_entries(cluster, room["other_uid"])
    status, answer = signer_call(cluster, "POST", path)
    assert status in REFUSED and answer["reason"] == REFUSED[status], (status, answer)
    assert "versions" not in answer  # not team-b's key record
    assert token_labels(cluster) == before
    assert _key_entries(cluster, room["other_uid"]) == entries_before
    # the key is still the signer's team-b key: its own reconcile answers under its own name
    status, answer = signer_call(cluster, "POST", f"/v1/keys/team-b/{room['other']}/{room['other_uid']}/reconcile")
    assert status == 200 and answer["currentVersion"] == 1, answer
    assert all(e["key"]["namespace"] == "team-b" for e in _key_entries(cluster, room["other_uid"]))


def test_a_reconcile_under_a_wrong_name_cannot_destroy_a_version_before_the_spec_allows(cluster, unique):
    """A retired version scheduled with an 8 s delay that an admin then extends to 1 h stays in the token."""
    key = make_key(cluster, unique, rotation={"every": "90d", "keepVersions": 1}, destructionDelay="8s")
    uid = uid_of(cluster, "signingkey", key)
    for request in ("first", "second"):  # v3 current, v2 kept, v1 trimmed: scheduled with the 8 s delay
        assert kubectl(cluster, "annotate", "--overwrite", "signingkey", key, "-n", NAMESPACE,
                       f"keyroom.dev/rotate={request}").returncode == 0
        wait_for(lambda: key_status(cluster, key).get("lastRotationRequest") == request,
                 what=f"rotation {request}")
    extended = kubectl(cluster, "patch", "signingkey", key, "-n", NAMESPACE, "--type=merge",
                       "-p", json.dumps({"spec": {"destructionDelay": "1h"}}))  # the admin postpones it
    assert extended.returncode == 0, extended.stderr
    version = wait_for(lambda: (v := _version(cluster, key, 1)).get("destroyAt")
                       and parse_time(v["destroyAt"]) - _now() > datetime.timedelta(minutes=50) and v,
                       what="v1 to be pending destruction in about an hour")
    scheduled_at = parse_time(version["destroyAt"]) - datetime.timedelta(hours=1)
    time.sleep(max(0.0, (scheduled_at + datetime.timedelta(seconds=10) - _now()).total_seconds()))
    label = key_label(cluster, key, 1)
    assert label in token_labels(cluster)  # past the 8 s recorded at scheduling, kept: the spec now says 1 h

    status, answer = signer_call(cluster, "POST", f"/v1/keys/{NAMESPACE}/{unique('no-such-key')}/{uid}/reconcile")
    assert status in REFUSED and answer["reason"] == REFUSED[status], (status, answer)
    assert label in token_labels(cluster), "v1 was destroyed in the HSM before the spec's destructionDelay"
    assert not [e for e in _key_entries(cluster, uid) if e["event"] == "KeyVersionDestroyed"]


def _version(cluster, key: str, number: int) -> dict:
    return next((v for v in key_status(cluster, key).get("versions", []) if v["version"] == number), {})


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@pytest.mark.parametrize("namespace, name, uid", [
    ("team-b%2F..%2Fteam-a", "{key}", "{uid}"),  # an encoded slash
    ("team-a", "team-b%2F{other}", "{other_uid}"),
    ("team-a", "{key}", "not-a-uuid"),           # not a UID
    ("team-a", "{key}", "..%2F..%2F{uid}"),
    ("team-a", "{key}", "{uid}%2F..%2F{other_uid}"),
    ("team-a", "{key}", "%00"),
    ("team-a", "{key}", "{uid}x"),
])
def test_reconcile_with_malformed_uids_or_encoded_slashes_is_refused(cluster, room, namespace, name, uid):
    values = {"key": room["key"], "uid": room["uid"], "other": room["other"], "other_uid": room["other_uid"]}
    path = f"/v1/keys/{namespace.format(**values)}/{name.format(**values)}/{uid.format(**values)}/reconcile"
    before = token_labels(cluster)
    entries_before = _key_entries(cluster, room["uid"]), _key_entries(cluster, room["other_uid"])
    status, answer = signer_call(cluster, "POST", path)
    assert status in REFUSED and answer["reason"] == REFUSED[status], (path, status, answer)
    assert "versions" not in str(answer)
    assert token_labels(cluster) == before
    assert (_key_entries(cluster, room["uid"]), _key_entries(cluster, room["other_uid"])) == entries_before


@pytest.mark.parametrize("namespace, name", [
    ("..", "{key}"),          # path traversal as a whole segment
    ("team-a", ".."),
    ("%2E%2E", "{key}"),      # the same, percent-encoded
    ("TEAM-A", "{key}"),      # not a Kubernetes name
    ("team-a", "x" * 300),
])
def test_reconcile_with_names_that_are_not_kubernetes_names_is_refused_before_reading(cluster, room, namespace,
                                                                                      name):
    forged_uid = str(uuid.uuid4())  # a fresh UID: only the name's shape is on trial here
    path = f"/v1/keys/{namespace}/{name.format(key=room['key'])}/{forged_uid}/reconcile"
    before = token_labels(cluster)
    status, answer = signer_call(cluster, "POST", path)
    assert token_labels(cluster) == before and not _key_entries(cluster, forged_uid)
    assert status == 400 and answer["reason"] == "InvalidRequest", (path, status, answer)


# ---------------------------------------------------------------- sign: what the request does not allow

def test_signing_an_unapproved_request_is_refused_and_audited_once(cluster, room, unique):
    name, body = _pending(cluster, unique, room["key"])
    uid = body["metadata"]["uid"]
    for _ in range(5):
        status, answer = sign_call(cluster, NAMESPACE, name, uid, digests_fingerprint(body["spec"]))
        assert status == 403 and answer["reason"] == "AwaitingApproval", answer
        assert "signatures" not in answer
    refused = entries_for(cluster, uid, "Refused")
    assert len(refused) == 1 and refused[0]["reason"] == "AwaitingApproval", refused
    _nothing_signed(cluster, name, uid)


def test_signing_with_a_fingerprint_of_other_digests_is_refused(cluster, room, unique):
    name, body = _pending(cluster, unique, room["key"])
    uid = body["metadata"]["uid"]
    other_digests = {**body["spec"], "digests": [{"name": "a.bin", "value": digest("the attacker's artifact")}]}
    other_algorithm = {**body["spec"], "digestAlgorithm": "SHA512"}
    for forged in (digests_fingerprint(other_digests), digests_fingerprint(other_algorithm), "sha256:" + "0" * 64):
        status, answer = sign_call(cluster, NAMESPACE, name, uid, forged)
        assert status == 409 and answer["reason"] == "DigestsMismatch", answer
    assert [e["reason"] for e in entries_for(cluster, uid, "Refused")] == ["DigestsMismatch"] * 3
    _nothing_signed(cluster, name, uid)


def test_signing_a_uid_that_is_not_the_named_requests_is_refused(cluster, room, unique):
    name, body = _pending(cluster, unique, room["key"])
    other, other_body = _pending(cluster, unique, room["key"])
    for forged in (str(uuid.uuid4()), other_body["metadata"]["uid"]):
        status, answer = sign_call(cluster, NAMESPACE, name, forged, digests_fingerprint(body["spec"]))
        assert status == 404 and answer["reason"] == "RequestNotFound", answer
    _nothing_signed(cluster, name, body["metadata"]["uid"])
    _nothing_signed(cluster, other, other_body["metadata"]["uid"])


def test_team_bs_request_named_in_team_as_path_is_refused(cluster, room, unique):
    name, body = _pending(cluster, unique, room["other"], user="dave", namespace="team-b")
    uid = body["metadata"]["uid"]
    status, answer = sign_call(cluster, NAMESPACE, name, uid, digests_fingerprint(body["spec"]))
    assert status == 404 and answer["reason"] == "RequestNotFound", answer
    _nothing_signed(cluster, name, uid, namespace="team-b")


@pytest.mark.parametrize("data", [
    b"not json",
    b"",
    b"\xff\xfe\x00garbage",
    b"[]",
    b'"sha256:0000"',
    b"null",
    b"{}",
    b'{"digests": 5}',
    b'{"digests": null}',
    b'{"digests": ["sha256:0000"]}',
    b'{"digests": {"sha256": "0000"}}',
    b'{"digest": "sha256:0000"}',
], ids=lambda data: data.decode(errors="replace")[:24] or "empty")
def test_sign_bodies_that_are_not_the_expected_json_are_400(cluster, room, unique, data):
    name, body = _pending(cluster, unique, room["key"])
    uid = body["metadata"]["uid"]
    status, answer = signer_call(cluster, "POST", f"/v1/requests/{NAMESPACE}/{name}/{uid}/sign", data=data)
    assert status == 400 and answer["reason"] == "InvalidRequest", (status, answer)
    _nothing_signed(cluster, name, uid)


def test_a_deeply_nested_json_body_is_400_not_500(cluster, room, unique):
    name, body = _pending(cluster, unique, room["key"])
    uid = body["metadata"]["uid"]
    nested = b'{"digests": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, answer = signer_call(cluster, "POST", f"/v1/requests/{NAMESPACE}/{name}/{uid}/sign", data=nested)
    _nothing_signed(cluster, name, uid)
    assert status == 400, (status, answer)


def test_a_body_over_the_size_limit_is_refused_without_reading_it(cluster, room, unique):
    name, body = _pending(cluster, unique, room["key"])
    uid = body["metadata"]["uid"]
    huge = b'{"digests": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    status, answer = signer_call(cluster, "POST", f"/v1/requests/{NAMESPACE}/{name}/{uid}/sign", data=huge)
    assert status == 413, (status, answer)
    _nothing_signed(cluster, name, uid)


# ---------------------------------------------------------------- every other identity

def _client_credentials(cluster, user: str, directory) -> tuple[str, str, str]:
    """(certificate file, key file, the certificate's base64) of a person's kubeconfig."""
    config = yaml.safe_load(cluster.kubeconfig(user).read_text())
    credentials = config["users"][0]["user"]
    cert, key = directory / f"{user}.crt", directory / f"{user}.key"
    cert.write_bytes(base64.b64decode(credentials["client-certificate-data"]))
    key.write_bytes(base64.b64decode(credentials["client-key-data"]))
    return str(cert), str(key), credentials["client-certificate-data"]


@pytest.fixture(scope="module")
def ci_account(cluster) -> str:
    """A ServiceAccount of team-a, as a CI pipeline of the team would have."""
    name = _unique("ci")
    assert kubectl(cluster, "create", "serviceaccount", name, "-n", NAMESPACE).returncode == 0
    return name


@pytest.mark.parametrize("who", [
    "no token", "empty bearer", "junk token", "basic auth", "operator token for the API server's audience",
    "signer's own token", "team-a CI ServiceAccount token for the signer audience",
    "alice's client certificate", "bob's client certificate as bearer",
])
def test_every_identity_but_the_operators_is_refused(cluster, room, unique, ci_account, tmp_path, who):
    name, body = _pending(cluster, unique, room["key"])
    uid = body["metadata"]["uid"]
    expected, token, client_cert, headers = 401, None, None, {}
    if who == "empty bearer":
        token = ""
    elif who == "junk token":
        token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.junk"
    elif who == "basic auth":
        token = None
        headers = {"Authorization": "Basic " + base64.b64encode(b"keyroom-operator:" +
                                                                  (cluster.state_dir / "operator-signer-token")
                                                                  .read_bytes().strip()).decode()}
    elif who.startswith("operator token for the API"):
        token = service_account_token(cluster, "keyroom-operator")
    elif who == "signer's own token":
        token, expected = service_account_token(cluster, "keyroom-signer", audience="keyroom-signer"), 403
    elif who.startswith("team-a CI"):
        token = service_account_token(cluster, ci_account, namespace=NAMESPACE, audience="keyroom-signer")
        expected = 403
    elif who == "alice's client certificate":
        cert, key, _ = _client_credentials(cluster, "alice", tmp_path)
        client_cert = (cert, key)
    elif who == "bob's client certificate as bearer":
        cert, key, data = _client_credentials(cluster, "bob", tmp_path)
        token, client_cert = data, (cert, key)
    before = token_labels(cluster)
    calls = [("POST", f"/v1/requests/{NAMESPACE}/{name}/{uid}/sign", {"digests": digests_fingerprint(body["spec"])}),
             ("GET", f"/v1/requests/{NAMESPACE}/{name}/{uid}", None),
             ("POST", f"/v1/keys/{NAMESPACE}/{room['key']}/{room['uid']}/reconcile", None),
             ("GET", "/v1/keys", None)]
    for method, path, payload in calls:
        status, answer = signer_call(cluster, method, path, token=token, body=payload, client_cert=client_cert,
                                     headers=headers)
        assert status == expected, (who, method, path, status, answer)
        assert answer["reason"] == ("Forbidden" if expected == 403 else "Unauthenticated"), answer
        assert not any(word in str(answer) for word in ("signature", "publicKey", "objects", "label"))
    assert token_labels(cluster) == before
    assert not entries_for(cluster, uid)  # not even a refusal: the caller never got past authentication
    _nothing_signed(cluster, name, uid)


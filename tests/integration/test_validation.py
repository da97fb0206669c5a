"""The API server refuses bad keyroom YAML at `kubectl apply`, with a message a user can act on.

Each case starts from a valid object, breaks one thing, and expects kubectl to
fail with a message naming the problem. The valid examples in ``examples/``
are accepted as they are.
"""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import yaml

from tests.conftest import REPO, apply

pytestmark = pytest.mark.integration

NAMESPACE = "team-a"
SHA256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
ADMIN = {"username": "keyroom-admin", "groups": ["system:masters", "system:authenticated"]}


def _object(kind: str, spec: dict) -> dict:
    return {"apiVersion": "keyroom.dev/v1alpha1", "kind": kind,
            "metadata": {"name": "invalid", "namespace": NAMESPACE}, "spec": spec}


def signing_key() -> dict:
    return _object("SigningKey", {"algorithm": "ECDSA_P256"})


def certificate() -> dict:
    return _object("Certificate", {"keyRef": {"name": "k"}, "issuerRef": {"selfSigned": {}},
                                   "subject": {"commonName": "Team A"}})


def signing_policy() -> dict:
    return _object("SigningPolicy", {"keys": ["k"], "requesters": {"groups": ["team-a-devs"]},
                                     "approvers": {"groups": ["team-a-approvers"]}, "requiredApprovals": 1})


def sign_request() -> dict:
    return _object("SignRequest", {"keyRef": {"name": "k"}, "requester": dict(ADMIN),
                                   "digests": [{"name": "app.exe", "value": SHA256}]})


def _set(path: str, value) -> Callable[[dict], None]:
    def change(document: dict) -> None:
        *parents, leaf = path.split(".")
        target = document
        for part in parents:
            target = target.setdefault(part, {}) if not part.isdigit() else target[int(part)]
        if value is _DELETE:
            del target[leaf]
        elif leaf.isdigit():
            target[int(leaf)] = value
        else:
            target[leaf] = value
    return change


_DELETE = object()

# (id, base object, change, part of the expected message)
CASES = [
    # SigningKey
    ("key-unknown-algorithm", signing_key, _set("spec.algorithm", "DSA_1024"), "Unsupported value: \"DSA_1024\""),
    ("key-missing-algorithm", signing_key, _set("spec.algorithm", _DELETE), "spec.algorithm: Required value"),
    ("key-unknown-usage", signing_key, _set("spec.usage", "Sometimes"), "spec.usage: Unsupported value"),
    ("key-bad-rotation-duration", signing_key, _set("spec.rotation", {"every": "3 months"}), "spec.rotation.every"),
    ("key-rotation-without-every", signing_key, _set("spec.rotation", {"keepVersions": 2}),
     "spec.rotation.every: Required value"),
    ("key-negative-keep-versions", signing_key, _set("spec.rotation", {"every": "90d", "keepVersions": -1}),
     "should be greater than or equal to 0"),
    ("key-onetime-with-rotation", signing_key,
     lambda d: d["spec"].update(usage="OneTime", rotation={"every": "1d"}), "cannot have spec.rotation"),
    ("key-window-end-before-start", signing_key, _set("spec.offline", {"windows": [
        {"start": "2026-12-01T12:00:00Z", "end": "2026-12-01T10:00:00Z"}]}), "end must be after its start"),
    ("key-window-both-forms", signing_key, _set("spec.offline", {"windows": [
        {"start": "2026-12-01T10:00:00Z", "end": "2026-12-01T12:00:00Z", "schedule": "0 9 * * *", "duration": "1h"}]}),
     "either absolute (start and end) or recurring"),
    ("key-window-start-only", signing_key, _set("spec.offline", {"windows": [{"start": "2026-12-01T10:00:00Z"}]}),
     "needs both start and end"),
    ("key-window-schedule-without-duration", signing_key, _set("spec.offline", {"windows": [{"schedule": "0 9 * * *"}]}),
     "needs both schedule and duration"),
    ("key-window-bad-cron", signing_key, _set("spec.offline", {"windows": [{"schedule": "every monday", "duration": "1h"}]}),
     "spec.offline.windows[0].schedule"),
    ("key-window-bad-timestamp", signing_key, _set("spec.offline", {"windows": [
        {"start": "tomorrow", "end": "2026-12-01T12:00:00Z"}]}), "spec.offline.windows[0].start"),
    ("key-timezone-on-absolute-window", signing_key, _set("spec.offline", {"windows": [
        {"start": "2026-12-01T10:00:00Z", "end": "2026-12-01T12:00:00Z", "timeZone": "Europe/Berlin"}]}),
     "timeZone applies to recurring windows"),
    ("key-bad-destruction-delay", signing_key, _set("spec.destructionDelay", "a week"), "spec.destructionDelay"),
    ("key-unknown-deletion-policy", signing_key, _set("spec.deletionPolicy", "Shred"), "spec.deletionPolicy"),
    # Certificate
    ("cert-no-issuer", certificate, _set("spec.issuerRef", {}), "exactly one of selfSigned, ca or external"),
    ("cert-two-issuers", certificate, _set("spec.issuerRef", {"selfSigned": {}, "external": {}}),
     "exactly one of selfSigned, ca or external"),
    ("cert-missing-key-ref", certificate, _set("spec.keyRef", _DELETE), "spec.keyRef: Required value"),
    ("cert-missing-common-name", certificate, _set("spec.subject", {"organization": ["Example"]}),
     "spec.subject.commonName: Required value"),
    ("cert-bad-country", certificate, _set("spec.subject.country", ["Germany"]), "spec.subject.country"),
    ("cert-bad-duration", certificate, _set("spec.duration", "1 year"), "spec.duration"),
    ("cert-unknown-usage", certificate, _set("spec.usages", ["serverAuth"]), "spec.usages[0]: Unsupported value"),
    ("cert-keycertsign-without-ca", certificate, _set("spec.usages", ["codeSigning", "keyCertSign"]),
     "keyCertSign and cRLSign are for CA certificates"),
    ("cert-bad-revocation-reason", certificate, _set("spec.revocation", {"reason": "oops"}),
     "spec.revocation.reason: Unsupported value"),
    ("cert-bad-secret-name", certificate, _set("spec.secretName", "Not_A_Name"), "spec.secretName"),
    # SigningPolicy
    ("policy-no-keys", signing_policy, _set("spec.keys", _DELETE), "exactly one of keySelector or keys"),
    ("policy-keys-and-selector", signing_policy, _set("spec.keySelector", {"matchLabels": {"a": "b"}}),
     "exactly one of keySelector or keys"),
    ("policy-empty-requesters", signing_policy, _set("spec.requesters", {}),
     "requesters must name at least one user, group or serviceAccount"),
    ("policy-approvals-without-approvers", signing_policy, _set("spec.approvers", _DELETE),
     "requiredApprovals > 0 needs approvers"),
    ("policy-too-many-approvals", signing_policy, _set("spec.requiredApprovals", 11),
     "should be less than or equal to 10"),
    ("policy-unknown-digest", signing_policy, _set("spec.allowedDigestAlgorithms", ["MD5"]),
     "spec.allowedDigestAlgorithms[0]: Unsupported value"),
    ("policy-unknown-format", signing_policy, _set("spec.allowedFormats", ["pgp"]),
     "spec.allowedFormats[0]: Unsupported value"),
    ("policy-over-digest-ceiling", signing_policy, _set("spec.maxDigestsPerRequest", 501),
     "should be less than or equal to 500"),
    ("policy-bad-ttl", signing_policy, _set("spec.requestTTL", "tomorrow"), "spec.requestTTL"),
    ("policy-in-without-values", signing_policy, lambda d: d["spec"].update(
        keys=None, keySelector={"matchExpressions": [{"key": "team", "operator": "In"}]}),
     "In and NotIn need values"),
    ("policy-one-matching-build", signing_policy, _set("spec.matchingBuilds", {
        "required": 1, "builders": {"serviceAccounts": ["ci"]}}), "should be greater than or equal to 2"),
    ("policy-seven-matching-builds", signing_policy, _set("spec.matchingBuilds", {
        "required": 7, "builders": {"serviceAccounts": ["ci"]}}), "should be less than or equal to 6"),
    ("policy-matching-builds-without-builders", signing_policy, _set("spec.matchingBuilds", {
        "required": 2, "builders": {}}), "matchingBuilds.builders must name at least one user, group or serviceAccount"),
    ("policy-matching-builds-bad-account", signing_policy, _set("spec.matchingBuilds", {
        "builders": {"serviceAccounts": ["system:serviceaccount:team-a:ci"]}}),
     "spec.matchingBuilds.builders.serviceAccounts[0]"),
    # SignRequest
    ("request-short-digest", sign_request, _set("spec.digests.0.value", SHA256[:40]),
     "spec.digests[0].value"),
    ("request-non-hex-digest", sign_request, _set("spec.digests.0.value", "z" * 64), "spec.digests[0].value"),
    ("request-length-mismatch", sign_request, _set("spec.digestAlgorithm", "SHA512"),
     "must be the hex of a digest of digestAlgorithm"),
    ("request-no-digests", sign_request, _set("spec.digests", []), "spec.digests"),
    ("request-duplicate-names", sign_request, _set("spec.digests", [{"name": "a", "value": SHA256}] * 2),
     "Duplicate value: two digests share a name; each of spec.digests needs a name of its own"),
    ("request-attestation-duplicate-names", sign_request, _set("spec.attestations", [
        {"user": "ci", "digests": [{"name": "a", "value": SHA256}] * 2}]),
     "Duplicate value: two digests share a name; each of an attestation's digests needs a name of its own"),
    ("request-too-many-digests", sign_request,
     _set("spec.digests", [{"name": f"f{i}", "value": SHA256} for i in range(501)]), "must have at most 500 items"),
    ("request-unknown-format", sign_request, _set("spec.format", "pgp"), "spec.format: Unsupported value"),
    ("request-unknown-digest-algorithm", sign_request, _set("spec.digestAlgorithm", "MD5"),
     "spec.digestAlgorithm: Unsupported value"),
    ("request-missing-requester", sign_request, _set("spec.requester", _DELETE), "spec.requester: Required value"),
    ("request-missing-key", sign_request, _set("spec.keyRef", _DELETE), "spec.keyRef: Required value"),
    ("request-bad-decision", sign_request, _set("spec.approvals", [{"user": "bob", "decision": "Maybe"}]),
     "spec.approvals[0].decision: Unsupported value"),
]


def _drop_nones(value):
    if isinstance(value, dict):
        return {k: _drop_nones(v) for k, v in value.items() if v is not None}
    return value


@pytest.mark.parametrize("base,change,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_manifest_is_refused_with_a_clear_message(cluster, base, change, expected):
    document = copy.deepcopy(base())
    change(document)
    result = apply(cluster, _drop_nones(document))
    assert result.returncode != 0, f"accepted an invalid {document['kind']}"
    assert expected in result.stderr, result.stderr


def test_there_are_at_least_thirty_cases_across_all_four_kinds():
    kinds = {case[1]()["kind"] for case in CASES}
    assert len(CASES) >= 30 and kinds == {"SigningKey", "Certificate", "SigningPolicy", "SignRequest"}


@pytest.mark.parametrize("base", [signing_key, certificate, signing_policy, sign_request])
def test_the_unbroken_base_objects_are_accepted(cluster, base, unique):
    document = base()
    document["metadata"]["name"] = unique("valid")
    result = apply(cluster, document)
    assert result.returncode == 0, result.stderr


def test_the_examples_are_accepted(cluster):
    for path in sorted((REPO / "examples" / "team-a").glob("*.yaml")):
        result = apply(cluster, path.read_text())
        assert result.returncode == 0, f"{path.name}: {result.stderr}"
    for path in sorted((REPO / "examples" / "requests").glob("*.yaml")):
        result = apply(cluster, path.read_text(), identity="alice")
        assert result.returncode == 0, f"{path.name}: {result.stderr}"


def test_immutable_fields_cannot_change(cluster, unique):
    key = signing_key()
    key["metadata"]["name"] = unique("immutable")
    assert apply(cluster, key).returncode == 0
    key["spec"]["algorithm"] = "RSA_3072"
    result = apply(cluster, key)
    assert result.returncode != 0 and "spec.algorithm is immutable" in result.stderr, result.stderr


@pytest.mark.parametrize("field, change", [
    ("digests", lambda spec: spec["digests"].append(dict(spec["digests"][0]))),  # a duplicate name
    ("digestAlgorithm", lambda spec: spec.update(digestAlgorithm="SHA512")),  # digests of the wrong length
    ("format", lambda spec: spec.update(format="cosign")),  # "app.exe" is no image reference
])
def test_what_the_digest_rules_checked_at_creation_cannot_change_afterwards(cluster, unique, field, change):
    # The rules over spec.digests run when a request is created, not on its updates (they would cost every
    # status write): an update must not be able to bring in what they refuse.
    request = sign_request()
    request["metadata"]["name"] = unique("digests")
    assert apply(cluster, request).returncode == 0
    changed = copy.deepcopy(request)
    change(changed["spec"])
    result = kubectl_replace(cluster, changed)
    assert result.returncode != 0 and f"spec.{field} cannot change after creation" in result.stderr, result.stderr
    refused_at_creation = copy.deepcopy(changed)
    refused_at_creation["metadata"]["name"] = unique("digests")
    result = apply(cluster, refused_at_creation)
    assert result.returncode != 0 and "spec.digests" in result.stderr, result.stderr


def test_a_revocation_cannot_be_withdrawn(cluster, unique):
    cert = certificate()
    cert["metadata"]["name"] = unique("revoked")
    cert["spec"]["revocation"] = {"reason": "keyCompromise", "since": "2026-11-01T00:00:00Z"}
    assert apply(cluster, cert).returncode == 0
    del cert["spec"]["revocation"]
    result = kubectl_replace(cluster, cert)
    assert result.returncode != 0 and "cannot be withdrawn" in result.stderr, result.stderr


def kubectl_replace(cluster, document):
    return cluster.run_kubectl("replace", "-f", "-", input=yaml.safe_dump(document), check=False)


def test_defaults_are_filled_in(cluster, unique):
    from tests.conftest import get

    policy = signing_policy()
    policy["metadata"]["name"] = unique("defaults")
    assert apply(cluster, policy).returncode == 0
    spec = get(cluster, "signingpolicy", policy["metadata"]["name"], namespace=NAMESPACE)["spec"]
    assert spec["separationOfDuties"] is True
    assert spec["allowedDigestAlgorithms"] == ["SHA256", "SHA384", "SHA512"]
    assert spec["requestTTL"] == "24h" and spec["maxDigestsPerRequest"] == 500

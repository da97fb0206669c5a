"""Generated near-valid specs against the real API server: what it accepts, the operator's pure code handles.

For each kind, Hypothesis starts from a valid object and changes one to three
fields to values of random types and shapes (durations, cron expressions, time
zones, timestamps, hex, names, control characters, numbers, lists, maps) and
asks the API server to create it as a server-side dry run, with the shipped
CRDs and admission policies. Then:

- accepted: the object the server returns (with its defaults) goes through the
  pure functions the operator and the signer run on it (the controllers'
  ``desired_status``, the key's windows and rotation, the certificate's
  validity and profile, ``policy.request_problems`` and ``policy.decide``);
  none may raise, because an accepted object that crashes a reconcile loop
  stalls every object of its kind;
- refused: the message is not empty and names a field.

Runs are bounded (``FUZZ_EXAMPLES`` per kind) and derandomized, so CI sees the
same examples every time.
"""
from __future__ import annotations

import collections
import copy
import datetime
import json
import os
import re
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyroom import policy, schedule
from keyroom.controllers import certificate as certificate_controller
from keyroom.controllers import policy as policy_controller
from keyroom.controllers import signingkey as signingkey_controller
from keyroom.controllers import signrequest as signrequest_controller
from keyroom.signer import certificates, keys
from tests.conftest import identity, kubectl

pytestmark = pytest.mark.integration

NAMESPACE = "team-a"
FUZZ_EXAMPLES = int(os.environ.get("KEYROOM_FUZZ_EXAMPLES", "150"))
AT = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=datetime.timezone.utc)
SHA256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
ALICE = identity("alice")
TALLY: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

BASES: dict[str, dict] = {
    "SigningKey": {
        "algorithm": "ECDSA_P256",
        "rotation": {"every": "90d", "keepVersions": 3},
        "offline": {"enabled": True, "windows": [
            {"schedule": "0 9 * * 1-5", "duration": "8h", "timeZone": "Europe/Berlin"},
            {"start": "2026-12-01T10:00:00Z", "end": "2026-12-01T12:00:00Z"}]},
        "destructionDelay": "7d",
    },
    "Certificate": {
        "keyRef": {"name": "release-key"}, "issuerRef": {"selfSigned": {}},
        "subject": {"commonName": "Team A", "organization": ["Example"], "country": ["DE"]},
        "duration": "90d", "renewBefore": "30d", "usages": ["codeSigning"],
    },
    "SigningPolicy": {
        "keys": ["release-key"], "requesters": {"groups": ["team-a-devs"], "users": ["alice"]},
        "approvers": {"groups": ["team-a-approvers"]}, "requiredApprovals": 1,
        "matchingBuilds": {"required": 2, "builders": {"serviceAccounts": ["ci-builder-a", "ci-builder-b"]}},
        "allowedFormats": ["raw", "cms"], "maxDigestsPerRequest": 10, "maxSignaturesPerHour": 100,
        "requestTTL": "24h",
    },
    "SignRequest": {
        "keyRef": {"name": "release-key"}, "requester": ALICE, "reason": "release 1.4.2", "format": "raw",
        "digestAlgorithm": "SHA256", "digests": [{"name": "app.exe", "value": SHA256}],
    },
}

_DELETE = object()

texts = st.text(max_size=40)
durations = st.one_of(
    st.from_regex(r"\A[0-9]{1,12}(\.[0-9]{1,3})?(ns|us|ms|s|m|h|d)([0-9]{1,6}(s|m|h|d))?\Z"),
    st.sampled_from(["0s", "1s", "0.5s", "1ms", "99999d", "99999d99999d99999d99999d99999d", "36500d", "36501d",
                     "1d12h", "90m", "3s", "-1h", "1h-", "P1D", "1e3h", "24 h", "0d0h0m1s"]))
crons = st.one_of(
    st.sampled_from(["0 9 * * 1-5", "* * * * *", "0 0 30 2 *", "0 0 29 2 *", "*/0 * * * *", "60 * * * *",
                     "@hourly", "@reboot", "0 0 31 4 *", "0 0 1 1 7", "0 9 * * MON-FRI", "0 0 L * *",
                     "0 0 * * 5#3", "0 0 ? * *", "H 9 * * *", "0 9 * *\n*", "59 23 31 12 *"]),
    st.lists(st.from_regex(r"\A[0-9*/,\-LW#?A-Z]{1,6}\Z"), min_size=5, max_size=5).map(" ".join))
time_zones = st.one_of(
    st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Pacific/Kiritimati", "Australia/Lord_Howe",
                     "Mars/Olympus", "Etc/GMT+12", "Etc/GMT-14", "Factory", "posixrules", "localtime", "EST5EDT",
                     "right/UTC", "US/Pacific-New", "Europe/Kyiv"]),
    st.from_regex(r"\A[A-Za-z][A-Za-z0-9_+\-]{0,20}(/[A-Za-z0-9_+\-]{1,12}){0,2}\Z"))
timestamps = st.one_of(
    st.datetimes(min_value=datetime.datetime(1, 1, 1), max_value=datetime.datetime(9999, 12, 31, 23, 59, 59))
    .map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%SZ").rjust(20, "0")),
    st.sampled_from(["0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "2026-12-01T10:00:00+14:00",
                     "2026-12-01T10:00:00-12:00", "2026-02-30T00:00:00Z", "2026-12-01T10:00:00.999999999Z",
                     "2026-12-01 10:00:00Z", "2026-12-01T10:00:00"]))
certificate_durations = st.one_of(
    st.from_regex(r"\A([0-9]{1,11}d)?([0-9]{1,6}h)?([0-9]{1,4}m)?([0-9]{1,4}s)?\Z"),
    st.sampled_from(["36500d", "36501d", "90d", "1d", "0d", "1s", "999999999d"]))
urls = st.one_of(st.from_regex(r"\Ahttps?://[!-~]{1,30}\Z"), texts,
                 st.sampled_from(["https://ca.example/crls", "http://ca.example/crl\nX: y", "javascript:alert(1)"]))
hex_digests = st.one_of(st.text("0123456789abcdefABCDEF", min_size=0, max_size=130),
                        st.sampled_from([SHA256, SHA256 * 2, SHA256 + SHA256[:32], SHA256[:63]]))
names = st.one_of(st.from_regex(r"\A[a-z0-9]([-a-z0-9.]{0,20}[a-z0-9])?\Z"),
                  st.sampled_from(["team-b/release-key", "..", "release-key.", "a" * 254, "Release-Key"]))
enums = st.sampled_from(["ECDSA_P256", "RSA_4096", "OneTime", "Reusable", "Retain", "Destroy", "raw", "cms", "jar",
                         "apk", "sigstore", "authenticode", "cosign", "SHA256", "SHA384", "SHA512", "codeSigning",
                         "keyCertSign", "cRLSign", "keyCompromise", "In", "NotIn", "Exists", "DoesNotExist",
                         "CABForumCodeSigning", "Approve", "Deny"])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**62, 2**62), st.integers(-3, 12),
                    st.floats(allow_nan=False, allow_infinity=False, width=32), texts, enums, names)
domain = st.one_of(durations, crons, time_zones, timestamps, hex_digests, names, enums)
values = st.one_of(
    st.just(_DELETE), domain, domain, scalars,
    st.lists(st.one_of(domain, scalars), max_size=4),
    st.lists(st.fixed_dictionaries({"name": names, "value": hex_digests}), min_size=0, max_size=3),
    st.dictionaries(st.sampled_from(["name", "schedule", "duration", "start", "end", "timeZone", "key", "operator",
                                     "values", "users", "groups", "serviceAccounts", "required", "builders",
                                     "matchLabels", "value", "scheme", "user", "decision", "since", "reason"]),
                    st.one_of(domain, scalars, st.lists(domain, max_size=2)), max_size=3),
)


#: the fields mutated, per kind (list indices as numbers), each with the values that field takes; a mutation
#: draws mostly from those (to get past the schema and into the operator's code) and sometimes from anything
PATHS: dict[str, dict[str, st.SearchStrategy]] = {
    "SigningKey": {
        "algorithm": enums, "usage": enums, "rotation": values, "rotation.every": durations,
        "rotation.keepVersions": st.integers(-3, 200), "offline": values, "offline.enabled": st.booleans(),
        "offline.windows": values, "offline.windows.0": values, "offline.windows.0.schedule": crons,
        "offline.windows.0.duration": durations, "offline.windows.0.timeZone": time_zones,
        "offline.windows.1.start": timestamps, "offline.windows.1.end": timestamps,
        "offline.windows.1.schedule": crons, "destructionDelay": durations, "deletionPolicy": enums,
    },
    "Certificate": {
        "keyRef": values, "keyRef.name": names, "issuerRef": values, "issuerRef.ca": values,
        "issuerRef.ca.name": names, "issuerRef.external": values, "subject.commonName": texts,
        "subject.organization": st.lists(texts, max_size=3), "subject.country": st.lists(texts, max_size=2),
        "subject.locality": st.lists(texts, max_size=2), "duration": certificate_durations,
        "renewBefore": certificate_durations, "isCA": st.booleans(), "usages": st.lists(enums, max_size=3),
        "followRotation": st.booleans(), "crlDistributionPoint": urls, "secretName": names, "revocation": values,
        "revocation.reason": enums, "revocation.since": timestamps,
    },
    "SigningPolicy": {
        "keys": st.lists(names, max_size=3), "keySelector": values, "keySelector.matchLabels": values,
        "keySelector.matchExpressions": values, "requesters": values, "requesters.users": st.lists(texts, max_size=3),
        "requesters.groups": st.lists(texts, max_size=3), "requesters.serviceAccounts": st.lists(names, max_size=3),
        "approvers": values, "approvers.users": st.lists(texts, max_size=3), "matchingBuilds": values,
        "matchingBuilds.required": st.integers(-1, 8), "matchingBuilds.builders": values,
        "requiredApprovals": st.integers(-1, 12), "separationOfDuties": st.booleans(),
        "allowedDigestAlgorithms": st.lists(enums, max_size=3), "allowedFormats": st.lists(enums, max_size=4),
        "maxDigestsPerRequest": st.integers(-1, 600), "maxSignaturesPerHour": st.integers(-1, 2**40),
        "certificateProfile": enums, "requestTTL": durations,
    },
    "SignRequest": {
        "keyRef.name": names, "reason": texts, "format": enums, "digestAlgorithm": enums, "digests": values,
        "digests.0": values, "digests.0.name": texts, "digests.0.value": hex_digests,
        "digests.1": st.fixed_dictionaries({"name": texts, "value": hex_digests}), "certificateRef": values,
        "manifest": texts, "apk": values, "approvals": values, "attestations": values,
        "requester.groups": st.lists(texts, max_size=3),
    },
}


def _set(spec: dict, path: str, value: Any) -> None:
    *parents, leaf = [int(p) if p.isdigit() else p for p in path.split(".")]
    target: Any = spec
    for part in parents:
        if isinstance(part, int):
            if not isinstance(target, list) or part >= len(target):
                return
            target = target[part]
        else:
            if not isinstance(target, dict):
                return
            target = target.setdefault(part, {})
    if isinstance(leaf, int):
        if not isinstance(target, list):
            return
        if value is _DELETE:
            if leaf < len(target):
                del target[leaf]
        elif leaf < len(target):
            target[leaf] = value
        else:
            target.append(value)
    elif isinstance(target, dict):
        if value is _DELETE:
            target.pop(leaf, None)
        else:
            target[leaf] = value


def mutated(kind: str) -> st.SearchStrategy[tuple[dict, list[str]]]:
    def build(changes: list[tuple[str, Any]]) -> tuple[dict, list[str]]:
        spec = copy.deepcopy(BASES[kind])
        for path, value in changes:
            _set(spec, path, value)
        return spec, [path for path, _ in changes]
    def value(path: str) -> st.SearchStrategy:  # four times in five what the field takes, else anything
        return st.integers(0, 4).flatmap(lambda draw: values if draw == 0 else PATHS[kind][path])

    change = st.sampled_from(sorted(PATHS[kind])).flatmap(lambda path: st.tuples(st.just(path), value(path)))
    return st.lists(change, min_size=1, max_size=3).map(build)


# ---------------------------------------------------------------- the pure code an accepted object meets

def _key_record(spec: dict, name: str) -> keys.KeyRecord:
    record = keys.KeyRecord(namespace=NAMESPACE, name=name, uid="uid-key", algorithm=spec.get("algorithm", ""),
                            usage=spec.get("usage", "Reusable"))
    for number, state in ((1, "Disabled"), (2, "PendingDestruction"), (3, "Enabled")):
        record.versions[number] = keys.VersionRecord(
            version=number, state=state, public_key="", fingerprint="sha256:00",
            created_at=AT - datetime.timedelta(days=400 - number),
            scheduled_at=AT - datetime.timedelta(days=1) if state == "PendingDestruction" else None,
            destruction_reason="Trimmed" if state == "PendingDestruction" else None)
    return record


def handle_signing_key(body: dict) -> None:
    spec, name = body["spec"], body["metadata"]["name"]
    record = _key_record(spec, name)
    mirrored = keys.mirror(record, spec=spec)
    for deleted in (False, True):
        keys.next_action(spec=spec, annotations={"keyroom.dev/rotate": "now"}, deleted=deleted, record=record, at=AT)
    keys.next_change_at(spec=spec, record=record)
    schedule.validate_windows(spec.get("offline"))
    for at in (AT, AT + datetime.timedelta(days=200)):
        policy.key_availability(spec, at)
        signingkey_controller.desired_status(spec=spec, status={}, record=mirrored, generation=1, at=at)
        signingkey_controller.next_wakeup(spec, mirrored, at)
    policy.decide(_request(body), key=body, key_state=policy.KeyState(current_version=3),
                  policies=[_policy(BASES["SigningPolicy"])], at=AT)


def handle_certificate(body: dict) -> None:
    spec, name = body["spec"], body["metadata"]["name"]
    certificates.spec_hash(spec)
    certificates.issuer_kind(spec)
    end = certificates.not_after(spec, None, AT)
    issued = certificates.Issued(serial=1, der=b"", key_version=3, not_before=AT, not_after=end,
                                 fingerprint="sha256:00", spec_hash=certificates.spec_hash(spec))
    certificates.renewal_time(spec, issued)
    certificates.profile_problems([{"certificateProfile": "CABForumCodeSigning"}], key_algorithm="ECDSA_P256",
                                  spec=spec)
    record = certificates.CertificateRecord(namespace=NAMESPACE, name=name, uid="uid-cert", issued=[issued])
    certificates.next_change_at(spec, record)
    certificates.next_action(spec=spec, record=record, key=_key_record({"algorithm": "ECDSA_P256"}, "release-key"),
                             issuer=None, external=None, at=AT)
    certificate_controller.issuer_of(spec)
    certificate_controller.desired_status(spec=spec, status={}, record=None, generation=1, at=AT, name=name)


def _policy(spec: dict) -> dict:
    return {"metadata": {"name": "fuzzed", "namespace": NAMESPACE}, "spec": spec}


def _request(key: dict | None = None) -> dict:
    """A valid request for ``key`` (default release-key), made an hour before AT."""
    key_name = (key or {}).get("metadata", {}).get("name", "release-key")
    return {"metadata": {"name": "fuzzed-request", "namespace": NAMESPACE, "uid": "uid-request",
                         "creationTimestamp": schedule.format_time(AT - datetime.timedelta(hours=1))},
            "spec": {**BASES["SignRequest"], "keyRef": {"name": key_name}}}


_KEY = {"metadata": {"name": "release-key", "namespace": NAMESPACE, "labels": {"tier": "release"}},
        "spec": BASES["SigningKey"]}


def handle_signing_policy(body: dict) -> None:
    spec = body["spec"]
    keys_now = [("release-key", {"tier": "release"}), ("other-key", {})]
    policy_controller.desired_status(spec=spec, generation=1, status={}, keys=keys_now)
    policy.matched_keys(spec, keys_now)
    policy.request_problems(spec, BASES["SignRequest"], namespace=NAMESPACE)
    policy.request_ttl([_policy(spec)])
    for key_state in (policy.KeyState(current_version=3), policy.KeyState(current_version=None)):
        decision = policy.decide(_request(_KEY), key=_KEY, key_state=key_state, policies=[_policy(spec)], at=AT)
        signrequest_controller.desired_status(decision=decision, phase=decision.phase, status={}, generation=1,
                                              at=AT)


def handle_sign_request(body: dict) -> None:
    request = {**_request(), "spec": body["spec"]}
    governing = _policy({**BASES["SigningPolicy"], "allowedFormats": ["raw", "cms", "jar", "apk", "sigstore",
                                                                       "authenticode", "cosign"]})
    policy.request_problems(governing["spec"], body["spec"], namespace=NAMESPACE)
    for key_state in (policy.KeyState(current_version=3), policy.KeyState(current_version=3, destroyed=True)):
        decision = policy.decide(request, key=_KEY, key_state=key_state, policies=[governing], at=AT)
        signrequest_controller.desired_status(decision=decision, phase=decision.phase, status={}, generation=1,
                                              at=AT)


HANDLERS = {"SigningKey": handle_signing_key, "Certificate": handle_certificate,
            "SigningPolicy": handle_signing_policy, "SignRequest": handle_sign_request}
IDENTITIES = {"SigningKey": "admin", "Certificate": "admin", "SigningPolicy": "admin", "SignRequest": "alice"}


def _names_a_field(message: str, paths: list[str]) -> bool:
    fields = {"spec", *(part for path in paths for part in path.split(".") if not part.isdigit())}
    return any(re.search(rf"\b{re.escape(field)}\b", message) for field in fields)


def _try(cluster, kind: str, spec: dict, paths: list[str]) -> None:
    document = {"apiVersion": "keyroom.dev/v1alpha1", "kind": kind,
                "metadata": {"name": f"fuzz-{uuid.uuid4().hex[:8]}", "namespace": NAMESPACE}, "spec": spec}
    result = kubectl(cluster, "create", "--dry-run=server", "-o", "json", "-f", "-", identity=IDENTITIES[kind],
                     input=json.dumps(document))
    if result.returncode != 0:
        TALLY[kind]["refused"] += 1
        message = result.stderr.strip()
        assert message, f"refused without a message: {spec}"
        assert _names_a_field(message, paths), f"the refusal names no field of {paths}: {message}"
        return
    TALLY[kind]["accepted"] += 1
    body = json.loads(result.stdout)
    try:
        HANDLERS[kind](body)
    except Exception as crash:  # noqa: BLE001: any exception here is the finding
        raise AssertionError(f"the API server accepted a {kind} that the operator's code cannot handle "
                             f"({type(crash).__name__}: {crash}): {json.dumps(body['spec'])}") from crash


def _fuzz(kind: str):
    @pytest.mark.timeout(240)
    def test(cluster, capsys):
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much])
        @given(case=mutated(kind))
        def run(case):
            _try(cluster, kind, *case)

        run()
        with capsys.disabled():
            print(f"\n{kind}: {TALLY[kind]['accepted']} accepted, {TALLY[kind]['refused']} refused by the API server")
    return test


test_fuzzed_signing_keys = _fuzz("SigningKey")
test_fuzzed_certificates = _fuzz("Certificate")
test_fuzzed_signing_policies = _fuzz("SigningPolicy")
test_fuzzed_sign_requests = _fuzz("SignRequest")

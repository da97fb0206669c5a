"""Hostile manifests and API calls, each refused with a message that names what is wrong.

The cases are data (``tests/hostile/corpus.yaml``): malformed and oversized
objects, wrong types, control characters and injection-looking strings,
forged identities, references into other namespaces, tampering with
approvals, status and spec writes by the wrong people. Each runs as the
identity it names against the real API server with the shipped CRDs and
admission policies. Creates and patches are server-side dry runs, so no case
changes what another sees; updates and patches act on real objects made once
for the module. The few cases only the operator can judge (what a policy
allows, whether a cron schedule ever fires) create real objects and wait for
the outcome, and check that nothing was signed.
"""
from __future__ import annotations

import collections
import json
import uuid

import pytest

from tests.conftest import apply, approve, get, kubectl, wait_for
from tests.hostile import corpus

pytestmark = pytest.mark.integration

NAMESPACE = "team-a"
CORPUS = corpus.load()
CASES = CORPUS["cases"]
PLURALS = {"SigningKey": "signingkeys", "Certificate": "certificates", "SigningPolicy": "signingpolicies",
           "SignRequest": "signrequests"}


def _name(prefix: str = "hostile") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def targets(cluster) -> dict[str, str]:
    """The real objects that update and patch cases act on, by target name: made once, never changed."""
    names = {}
    for target, spec in CORPUS["targets"].items():
        document = corpus.document(CORPUS, {"kind": spec["kind"], "base": spec.get("base", spec["kind"])})
        document["metadata"]["name"] = names[target] = _name(target.lower())
        made = apply(cluster, document, identity=spec.get("owner", "admin"))
        assert made.returncode == 0, f"target {target}: {made.stderr}"
        for approver in spec.get("approvals", []):
            approved = approve(cluster, names[target], approver, namespace=NAMESPACE)
            assert approved.returncode == 0, f"target {target}: {approved.stderr}"
    return names


@pytest.fixture(scope="module")
def setup_objects(cluster) -> None:
    """What the downstream cases need: a key and a policy that governs it."""
    for document in CORPUS["setup"]:
        made = apply(cluster, document)
        assert made.returncode == 0, made.stderr


def _target(case: dict) -> str:
    return case.get("target", case["kind"])


def _run(cluster, case: dict, targets: dict[str, str]):
    verb, identity, kind = case["verb"], case["identity"], case["kind"]
    if verb == "create":
        document = corpus.document(CORPUS, case)
        document["metadata"].setdefault("name", _name())
        return kubectl(cluster, "create", "--dry-run=server", "-f", "-", identity=identity,
                       input=json.dumps(document))
    name = targets[_target(case)]
    if verb == "update":
        live = get(cluster, PLURALS[kind], name, namespace=NAMESPACE)
        live.pop("status", None)
        document = corpus.change(live, set=case.get("set"), unset=case.get("unset"))
        return kubectl(cluster, "replace", "--dry-run=server", "-f", "-", identity=identity,
                       input=json.dumps(document))
    patch_type = {"patch-json": "json", "patch-merge": "merge", "status": "merge"}[verb]
    extra = ["--subresource=status"] if verb == "status" else []
    return kubectl(cluster, "patch", PLURALS[kind], name, "-n", NAMESPACE, f"--type={patch_type}", *extra,
                   "--dry-run=server", "-p", json.dumps(corpus.expand(case["patch"])), identity=identity)


def _dry_cases() -> list:
    return [pytest.param(case, id=case["name"]) for case in CASES if case["verb"] != "create-real"]


def _downstream_cases() -> list:
    return [pytest.param(case, id=case["name"]) for case in CASES if case["verb"] == "create-real"]


@pytest.mark.parametrize("case", _dry_cases())
def test_refused_with_a_message_naming_the_field(cluster, targets, case):
    result = _run(cluster, case, targets)
    expect = case["expect"]
    assert result.returncode != 0, f"{case['name']}: accepted ({case['category']}): {result.stdout}"
    message = result.stderr
    assert expect["field"] in message, f"the refusal does not name {expect['field']}: {message}"
    fragments = expect["message_contains"]
    for fragment in [fragments] if isinstance(fragments, str) else fragments:
        assert fragment in message, f"expected {fragment!r} in: {message}"


def _conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status.get("conditions") or []}


@pytest.mark.parametrize("case", _downstream_cases())
def test_what_admission_cannot_see_fails_downstream_and_nothing_is_signed(cluster, setup_objects, case):
    document = corpus.document(CORPUS, case)
    name = document["metadata"]["name"] = _name()
    made = kubectl(cluster, "create", "-f", "-", identity=case["identity"], input=json.dumps(document))
    assert made.returncode == 0 and not case["expect"]["refused"], made.stderr
    outcome = case["expect"]["outcome"]
    plural = PLURALS[case["kind"]]

    def reached() -> dict | None:
        status = get(cluster, plural, name, namespace=NAMESPACE).get("status") or {}
        condition = _conditions(status).get(outcome.get("condition", "Ready"))
        return status if condition and condition["reason"] == outcome["reason"] else None

    status = wait_for(reached, timeout=60, what=f"{case['name']}: reason {outcome['reason']}")
    condition = _conditions(status)[outcome.get("condition", "Ready")]
    assert condition["status"] == outcome.get("status", "False")
    if "phase" in outcome:
        assert status.get("phase") == outcome["phase"], status
    assert outcome["message_contains"] in condition["message"], condition["message"]
    assert not status.get("signatures"), "signed although the request is refused"
    assert _conditions(status).get("Signed", {}).get("status") != "True"


def test_the_corpus_covers_every_kind_and_category():
    counts = collections.Counter(case["kind"] for case in CASES)
    categories = collections.Counter(case["category"] for case in CASES)
    names = [case["name"] for case in CASES]
    assert len(CASES) >= 100 and set(counts) == corpus.KINDS, counts
    assert len(set(names)) == len(names), "case names must be unique"
    for case in CASES:
        assert case["verb"] in corpus.VERBS and case["kind"] in corpus.KINDS, case["name"]
        assert case["expect"]["refused"] == (case["verb"] != "create-real"), case["name"]
        assert case["verb"] == "create-real" or {"field", "message_contains"} <= set(case["expect"]), case["name"]
    assert {"forged-identity", "cross-namespace", "approval-tampering", "status-write", "spec-edit",
            "unicode-injection", "oversized", "wrong-type", "malformed", "digests", "schedule",
            "conflicting", "downstream"} <= set(categories), categories

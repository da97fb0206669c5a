"""The ValidatingAdmissionPolicies that make SignRequest identities authentic and the components harmless.

The API server, not the operator, checks who asked and who approved, from
``request.userInfo`` of the very request that writes the object:

- at creation, ``spec.requester`` equals the creating user and no approval
  or build attestation is present;
- on update, at most one approval is appended, by the updating user themself,
  with the updating user's groups, and no existing entry is removed or edited;
- likewise at most one build attestation is appended, by the updating user
  themself with their groups, once per user and request, and only by someone
  RBAC grants the ``attest`` verb on the request (the ``keyroom-builder``
  role): an approver's or the operator's ``patch`` alone attests nothing;
- labels and annotations change only by the request's own requester (client-side
  ``kubectl apply`` rewrites its last-applied annotation), by the operator's
  ServiceAccount, or by someone RBAC lets ``delete`` the request (admins, asked
  through the policy's ``authorizer``): the ``patch`` that requesters and
  approvers hold for their own requests and approvals gives no say over another
  person's request, such as a shorter ``keyroom.dev/ttl-after-finished``.

So a requester can never forge, remove or self-count an approval, a builder
can never attest in another builder's name, change or remove another's
attestation, or count twice, and no webhook must be up for anyone to work. The
operator (and the signer) then decide whether the authentic approvals and
attestations satisfy the policy.

A second policy keeps the operator's own identity (a ServiceAccount named
``keyroom-operator``) away from every spec: it needs to write status,
finalizers and annotations, never what a key, certificate, policy or request
says, nor labels (policies select keys by them, so a relabelled key could
fall under a laxer policy), nor the ``keyroom.dev/rotate`` annotation, which
the signer acts on. A
compromised operator therefore cannot relax a policy to get a pending request
signed (the signer re-reads the policies, and only admins write them), nor
rotate keys until their old versions fall out of ``keepVersions``.

A third lets the operator's identity write only what it publishes: Secrets of
type ``keyroom.dev/certificate`` holding ``tls.crt`` and ``ca.crt`` and CRL
ConfigMaps, created by it or already its own. RBAC gives it create and patch
on Secrets but no get; this policy makes a patch of any other Secret fail
before the API server would answer with the Secret's data.

A fourth lets the signer's identity create no ConfigMap but its own
checkpoint: RBAC cannot limit ``create`` by name, and the administrator's
new-chain instruction, which the signer only reads, must never be the
signer's own.
"""
from __future__ import annotations

from keyroom.api.common import (
    CERTIFICATE_LABEL, CERTIFICATE_SECRET_KEYS, CERTIFICATE_SECRET_TYPE, CRL_CONFIGMAP_KEYS, GROUP,
    ISSUED_CERTIFICATE_ANNOTATION, ROTATE_ANNOTATION,
)
from keyroom.signer.audit import CHECKPOINT_NAME

POLICY_NAME = "keyroom-signrequest-identity"
#: CEL: the caller is the operator's ServiceAccount (named keyroom-operator in whichever namespace it runs)
_OPERATOR_IDENTITY = ("request.userInfo.username.startsWith('system:serviceaccount:') && "
                      "request.userInfo.username.endsWith(':keyroom-operator')")
OPERATOR_POLICY_NAME = "keyroom-operator-writes-no-spec"
SIGNER_POLICY_NAME = "keyroom-signer-creates-only-its-checkpoint"
PUBLISHING_POLICY_NAME = "keyroom-operator-publishes-only-public-certificates"
KINDS = ["signingkeys", "certificates", "signingpolicies", "signrequests"]
#: the RBAC verb on signrequests that appending a build attestation needs (granted by keyroom-builder only)
ATTEST_VERB = "attest"


def _same_set(a: str, b: str) -> str:
    return f"{a}.all(g, g in {b}) && {b}.all(g, g in {a})"


def _annotation(obj: str, name: str) -> str:
    """CEL for an annotation's value, '' when absent."""
    return (f"(has({obj}.metadata.annotations) && '{name}' in {obj}.metadata.annotations ? "
            f"{obj}.metadata.annotations['{name}'] : '')")


def _labels(obj: str) -> str:
    return f"(has({obj}.metadata.labels) ? {obj}.metadata.labels : {{}})"


def _annotations(obj: str) -> str:
    return f"(has({obj}.metadata.annotations) ? {obj}.metadata.annotations : {{}})"


def _check(expression: str, message_expression: str, *, message: str | None = None) -> dict:
    """One validation; ``message`` is what the API server says when the message expression cannot be shown.

    A message expression that quotes a value the caller wrote, such as a forged user with a newline in it,
    yields a message with a line break, which the API server refuses to show: without ``message`` the caller
    would read only the failed CEL expression.
    """
    check = {"expression": expression, "messageExpression": message_expression, "reason": "Forbidden"}
    if message:
        check["message"] = message
    return check


def validating_admission_policy() -> dict:
    created = "request.operation == 'CREATE'"
    updated = "request.operation == 'UPDATE'"
    appended = "variables.newApprovals[size(variables.newApprovals) - 1]"
    attested = "variables.newAttestations[size(variables.newAttestations) - 1]"
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": POLICY_NAME, "labels": {"app.kubernetes.io/part-of": "keyroom"}},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [GROUP], "apiVersions": ["*"],
                "operations": ["CREATE", "UPDATE"], "resources": ["signrequests"],
            }]},
            "variables": [
                {"name": "callerGroups",
                 "expression": "has(request.userInfo.groups) ? request.userInfo.groups : []"},
                {"name": "newApprovals",
                 "expression": "has(object.spec.approvals) ? object.spec.approvals : []"},
                {"name": "oldApprovals",
                 "expression": f"{updated} && has(oldObject.spec.approvals) ? oldObject.spec.approvals : []"},
                {"name": "requesterGroups",
                 "expression": "has(object.spec.requester.groups) ? object.spec.requester.groups : []"},
                {"name": "appendedOne",
                 "expression": f"{updated} && size(variables.newApprovals) == size(variables.oldApprovals) + 1"},
                {"name": "newAttestations",
                 "expression": "has(object.spec.attestations) ? object.spec.attestations : []"},
                {"name": "oldAttestations",
                 "expression": f"{updated} && has(oldObject.spec.attestations) ? oldObject.spec.attestations : []"},
                {"name": "attestedOne",
                 "expression": f"{updated} && size(variables.newAttestations) == size(variables.oldAttestations) + 1"},
                {"name": "metadataChanged",
                 "expression": f"{updated} && ({_labels('object')} != {_labels('oldObject')} || "
                               f"{_annotations('object')} != {_annotations('oldObject')})"},
            ],
            "validations": [
                _check(f"!({created}) || object.spec.requester.username == request.userInfo.username",
                       "'spec.requester.username must be your own username \"' + request.userInfo.username + "
                       "'\", not \"' + object.spec.requester.username + '\"'",
                       message="spec.requester.username must be your own username (kubectl auth whoami shows it)"),
                _check(f"!({created}) || ({_same_set('variables.requesterGroups', 'variables.callerGroups')})",
                       "'spec.requester.groups must be exactly your groups [' + "
                       "variables.callerGroups.join(', ') + '] (kubectl auth whoami shows them)'"),
                _check(f"!({created}) || size(variables.newApprovals) == 0",
                       "'a SignRequest cannot carry approvals when it is created; approvers add them afterwards "
                       "with kubectl keyroom approve'"),
                _check(f"!({updated}) || size(variables.newApprovals) <= size(variables.oldApprovals) + 1",
                       "'append exactly one approval per update'"),
                _check(f"!({updated}) || (size(variables.newApprovals) >= size(variables.oldApprovals) && "
                       "variables.newApprovals.slice(0, size(variables.oldApprovals)) == variables.oldApprovals)",
                       "'approvals are append-only: existing entries cannot be removed or edited'"),
                _check(f"!variables.appendedOne || {appended}.user == request.userInfo.username",
                       f"'an approval must be your own: user must be \"' + request.userInfo.username + "
                       f"'\", not \"' + {appended}.user + '\"'",
                       message="an approval must be your own: its user must be your username"),
                _check(f"!variables.appendedOne || ({_same_set(f'(has({appended}.groups) ? {appended}.groups : [])', 'variables.callerGroups')})",
                       "'an approval must carry exactly your groups [' + variables.callerGroups.join(', ') + ']'"),
                _check(f"!({created}) || size(variables.newAttestations) == 0",
                       "'a SignRequest cannot carry build attestations when it is created; builders add them "
                       "afterwards with kubectl keyroom attest'"),
                _check(f"!({updated}) || size(variables.newAttestations) <= size(variables.oldAttestations) + 1",
                       "'append exactly one build attestation per update'"),
                _check(f"!({updated}) || (size(variables.newAttestations) >= size(variables.oldAttestations) && "
                       "variables.newAttestations.slice(0, size(variables.oldAttestations)) == "
                       "variables.oldAttestations)",
                       "'attestations are append-only: existing entries cannot be removed or edited'"),
                _check(f"!variables.attestedOne || authorizer.group('{GROUP}').resource('signrequests')"
                       f".namespace(request.namespace).name(request.name).check('{ATTEST_VERB}').allowed()",
                       f"'only a builder may attest: ' + request.userInfo.username + ' may not \"{ATTEST_VERB}\" "
                       f"signrequests in ' + request.namespace + ' (the keyroom-builder role grants it)'"),
                _check(f"!variables.attestedOne || {attested}.user == request.userInfo.username",
                       f"'an attestation must be your own: user must be \"' + request.userInfo.username + "
                       f"'\", not \"' + {attested}.user + '\"'",
                       message="an attestation must be your own: its user must be your username"),
                _check(f"!variables.attestedOne || ({_same_set(f'(has({attested}.groups) ? {attested}.groups : [])', 'variables.callerGroups')})",
                       "'an attestation must carry exactly your groups [' + variables.callerGroups.join(', ') + ']'"),
                _check(f"!variables.attestedOne || !variables.oldAttestations.exists(a, a.user == "
                       "request.userInfo.username)",
                       "'you already attested this request: a builder attests once (' + request.userInfo.username "
                       "+ ')'"),
                _check("!variables.metadataChanged || oldObject.spec.requester.username == request.userInfo.username"
                       f" || ({_OPERATOR_IDENTITY}) || authorizer.group('{GROUP}').resource('signrequests')"
                       ".namespace(request.namespace).name(request.name).check('delete').allowed()",
                       "'only the requester (' + oldObject.spec.requester.username + '), the keyroom operator or "
                       "someone who may delete it changes the labels and annotations of SignRequest ' + "
                       "request.namespace + '/' + request.name + '; ' + request.userInfo.username + "
                       "' may only append their own approval'"),
            ],
        },
    }


def operator_admission_policy() -> dict:
    """The operator's ServiceAccount may change metadata (finalizers, annotations) and status, never spec."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": OPERATOR_POLICY_NAME, "labels": {"app.kubernetes.io/part-of": "keyroom"}},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [GROUP], "apiVersions": ["*"],
                "operations": ["CREATE", "UPDATE"], "resources": KINDS,  # not */status: status is its job
            }]},
            "matchConditions": [{"name": "the-keyroom-operator", "expression": _OPERATOR_IDENTITY}],
            "validations": [
                _check("request.operation == 'UPDATE' && "
                       "(has(object.spec) == has(oldObject.spec)) && (!has(object.spec) || object.spec == oldObject.spec)",
                       "'the keyroom operator may change status and metadata, never spec (' + "
                       "request.userInfo.username + ')'"),
                _check("(has(object.metadata.labels) ? object.metadata.labels : {}) == "
                       "(has(oldObject.metadata.labels) ? oldObject.metadata.labels : {})",
                       "'the keyroom operator may not change labels: policies select keys by them'"),
                _check(f"{_annotation('object', ROTATE_ANNOTATION)} == {_annotation('oldObject', ROTATE_ANNOTATION)}",
                       f"'the keyroom operator may not request a rotation ({ROTATE_ANNOTATION}): only platform "
                       "admins rotate keys'"),
                _check(f"{_annotation('object', ISSUED_CERTIFICATE_ANNOTATION)} == "
                       f"{_annotation('oldObject', ISSUED_CERTIFICATE_ANNOTATION)}",
                       f"'the keyroom operator may not supply an external certificate "
                       f"({ISSUED_CERTIFICATE_ANNOTATION}): platform admins do'"),
            ],
        },
    }


def _labelled(obj: str) -> str:
    return f"has({obj}.metadata.labels) && '{CERTIFICATE_LABEL}' in {obj}.metadata.labels"


def _only_keys(obj: str, field: str, allowed: tuple[str, ...]) -> str:
    return f"!has({obj}.{field}) || {obj}.{field}.all(k, k in {list(allowed)!r})"


def publishing_admission_policy() -> dict:
    """The operator's ServiceAccount may write only its certificate Secrets and CRL ConfigMaps."""
    secret = "request.resource.resource == 'secrets'"
    config_map = "request.resource.resource == 'configmaps'"
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": PUBLISHING_POLICY_NAME, "labels": {"app.kubernetes.io/part-of": "keyroom"}},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE", "DELETE"],
                "resources": ["secrets", "configmaps"],
            }]},
            "matchConditions": [{"name": "the-keyroom-operator", "expression": _OPERATOR_IDENTITY}],
            "validations": [
                _check("request.operation != 'DELETE'", "'the keyroom operator deletes no Secret or ConfigMap'"),
                _check(f"request.operation != 'UPDATE' || ({_labelled('oldObject')} && "
                       f"(!({secret}) || oldObject.type == '{CERTIFICATE_SECRET_TYPE}'))",
                       "'the keyroom operator may change only the certificate Secrets and CRL ConfigMaps it "
                       "wrote, not ' + request.namespace + '/' + request.name"),
                _check(f"request.operation == 'DELETE' || {_labelled('object')}",
                       f"'what the keyroom operator writes carries the label {CERTIFICATE_LABEL}'"),
                _check(f"!({secret}) || request.operation == 'DELETE' || (object.type == '{CERTIFICATE_SECRET_TYPE}' "
                       f"&& ({_only_keys('object', 'data', CERTIFICATE_SECRET_KEYS)}) && "
                       f"!has(object.stringData))",
                       f"'a Secret the keyroom operator writes is of type {CERTIFICATE_SECRET_TYPE} and holds only "
                       f"{' and '.join(CERTIFICATE_SECRET_KEYS)}: public certificates, never a private key'"),
                _check(f"!({config_map}) || request.operation == 'DELETE' || (object.metadata.name.endsWith('-crl') "
                       f"&& ({_only_keys('object', 'data', CRL_CONFIGMAP_KEYS)}) && !has(object.binaryData))",
                       f"'a ConfigMap the keyroom operator writes is a CRL: <name>-crl holding only "
                       f"{' and '.join(CRL_CONFIGMAP_KEYS)}'"),
            ],
        },
    }


def signer_admission_policy() -> dict:
    """The signer's ServiceAccount may create only its checkpoint ConfigMap (RBAC cannot limit create by name)."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": SIGNER_POLICY_NAME, "labels": {"app.kubernetes.io/part-of": "keyroom"}},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"],
            }]},
            "matchConditions": [{
                "name": "the-keyroom-signer",
                "expression": "request.userInfo.username.startsWith('system:serviceaccount:') && "
                              "request.userInfo.username.endsWith(':keyroom-signer')",
            }],
            "validations": [
                _check(f"object.metadata.name == '{CHECKPOINT_NAME}'",
                       f"'the keyroom signer may create only its checkpoint ConfigMap {CHECKPOINT_NAME}, not ' + "
                       "object.metadata.name"),
            ],
        },
    }


def _binding(policy: str) -> dict:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": policy, "labels": {"app.kubernetes.io/part-of": "keyroom"}},
        "spec": {"policyName": policy, "validationActions": ["Deny"]},
    }


def policies() -> list[dict]:
    """Both policies with their bindings, in apply order."""
    return [validating_admission_policy(), _binding(POLICY_NAME),
            operator_admission_policy(), _binding(OPERATOR_POLICY_NAME),
            publishing_admission_policy(), _binding(PUBLISHING_POLICY_NAME),
            signer_admission_policy(), _binding(SIGNER_POLICY_NAME)]

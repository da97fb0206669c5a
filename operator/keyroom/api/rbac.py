"""The shipped ClusterRoles, least privilege first.

People get them through RoleBindings in their team's namespace:

- ``keyroom-viewer``: read the four kinds.
- ``keyroom-requester``: read, and create SignRequests.
- ``keyroom-approver``: read, and patch SignRequests (the admission policy lets
  an update do nothing but append the caller's own approval).
- ``keyroom-admin``: manage keys, certificates, policies and requests. Never
  status, which only the operator writes.

The components get cluster-wide roles: ``keyroom-operator`` (reconcile the
four kinds and write their status) and ``keyroom-signer`` (read-only, plus
TokenReview to authenticate its callers). Nothing is aggregated into the
built-in ``edit`` or ``admin`` roles: writing keys and policies is a
platform-admin right.
"""
from __future__ import annotations

from keyroom.api.common import GROUP
from keyroom.signer.audit import CHECKPOINT_NAME

KINDS = ["signingkeys", "certificates", "signingpolicies", "signrequests"]
READ = ["get", "list", "watch"]


def _role(name: str, rules: list[dict], description: str) -> dict:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "keyroom"},
                     "annotations": {"keyroom.dev/description": description}},
        "rules": rules,
    }


def _keyroom(resources: list[str], verbs: list[str]) -> dict:
    return {"apiGroups": [GROUP], "resources": resources, "verbs": verbs}


def cluster_roles() -> list[dict]:
    read_all = _keyroom(KINDS, READ)
    return [
        _role("keyroom-viewer", [read_all], "Read keyroom objects."),
        _role("keyroom-requester", [read_all, _keyroom(["signrequests"], ["create"])],
              "Read keyroom objects and request signatures."),
        _role("keyroom-approver", [read_all, _keyroom(["signrequests"], ["patch", "update"])],
              "Read keyroom objects and append one's own approval or denial to SignRequests."),
        _role("keyroom-admin", [_keyroom(KINDS, [*READ, "create", "update", "patch", "delete", "deletecollection"])],
              "Manage SigningKeys, Certificates, SigningPolicies and SignRequests."),
        _role("keyroom-operator", [
            _keyroom(KINDS, [*READ, "patch", "update"]),
            _keyroom([f"{kind}/status" for kind in KINDS], ["get", "patch", "update"]),
            _keyroom(["signrequests"], ["delete"]),
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
            {"apiGroups": [""], "resources": ["secrets", "configmaps"],
             "verbs": [*READ, "create", "update", "patch"]},
            {"apiGroups": [""], "resources": ["namespaces"], "verbs": READ},
            {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": READ},
        ], "The keyroom operator: reconciles the four kinds and writes their status."),
        _role("keyroom-signer", [
            _keyroom(KINDS, READ),
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            # the audit checkpoint: it may create a ConfigMap, but change only its own
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "update", "patch"],
             "resourceNames": [CHECKPOINT_NAME]},
        ], "The keyroom signer: re-reads requests, keys and policies, authenticates its callers, and "
           "checkpoints its audit log."),
    ]

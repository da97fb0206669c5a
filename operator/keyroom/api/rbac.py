"""Who may do what: the shipped roles, least privilege first.

People get ClusterRoles through RoleBindings in their team's namespace, so a
role never reaches beyond the namespaces it is bound in:

- ``keyroom-viewer``: read the four kinds.
- ``keyroom-requester``: read, and create and patch SignRequests. Patch is what
  ``kubectl apply`` (client-side and ``--server-side``) and GitOps tools send;
  the CRD makes spec immutable and the admission policy lets an update append
  only the caller's own approval (which separation of duties never counts for
  the requester) and no attestation, and lets only a request's own requester
  (or an admin) change its labels and annotations, so patch adds no power over
  a request, least of all over another person's.
- ``keyroom-approver``: read, and patch SignRequests (the admission policy lets
  an update do nothing but append the caller's own approval).
- ``keyroom-builder``: get, patch and ``attest`` SignRequests, nothing else:
  for a CI pipeline that attests the digests its own build produced. ``attest``
  is no verb the API server acts on; the admission policy asks RBAC for it
  (an ``authorizer`` check) before it accepts an appended build attestation,
  so only those bound to this role attest, and only in their own name.
- ``keyroom-admin``: manage keys, certificates, policies and requests. Never
  status, which only the operator writes.

Nothing is aggregated into the built-in ``edit`` or ``admin`` roles: writing
keys and policies is a platform-admin right.

The two components run under their own ServiceAccounts and get exactly what
their code calls, nothing for later:

- ``keyroom-operator`` (ClusterRole, bound cluster-wide: it reconciles every
  team's namespace): get/list/watch/patch on the four kinds (Kopf watches them
  and patches metadata: its finalizer and bookkeeping annotations); patch on
  their ``/status`` (it is the only writer of status), and update on
  ``signrequests/status`` (a request's status is replaced whole, on the
  version it was computed from: cheaper than a merge patch for a large
  request); delete on SignRequests
  (removing finished requests after their TTL); create core ``events`` (Kopf
  posts core v1 Events only); get/list/watch on namespaces and
  CustomResourceDefinitions (Kopf's cluster observation); create and patch
  (server-side apply) on Secrets and ConfigMaps, to publish a Certificate's
  ``tls.crt``/``ca.crt`` and a CA's CRL. It can neither get, list nor watch
  them, and an admission policy lets it write only Secrets of type
  ``keyroom.dev/certificate`` and ConfigMaps labelled as a CRL, holding public
  material only: a patch of any other Secret is refused before the API server
  answers with its data, so a stolen operator token reads no secret in any
  namespace. It runs Kopf standalone, so it needs no peering objects, and has
  no create/update of the kinds: spec is written by people. (Patch on the
  kinds could also touch spec; the admission policy refuses that.)
- ``keyroom-operator`` (Role, only in the operator's own namespace, see
  :func:`operator_role`): ``get`` on the one Secret ``keyroom-notify-webhook``
  (the approvers' webhook URL and token, read only when a notification is
  sent); no list or watch, no other Secret.
- ``keyroom-signer`` (ClusterRole, bound cluster-wide): get/list/watch on the
  four kinds (it re-reads every request, key and policy itself, in whatever
  namespace it lives) and create TokenReviews (to authenticate its callers).
  Read-only everywhere: it writes no keyroom object and no status.
- ``keyroom-signer`` (Role, only in the signer's own namespace, see
  :func:`signer_role`): the audit checkpoint ConfigMap. It may create
  ConfigMaps (the checkpoint does not exist before the first signature),
  get/update/patch only ``keyroom-audit-checkpoint``, and only get
  ``keyroom-audit-new-chain``: an administrator's instruction to start a new
  audit chain, which the signer must not be able to give itself. It cannot
  read, change or delete any other ConfigMap and reads no Secret: its PIN and
  TLS key are mounted files. RBAC cannot limit ``create`` by name, so while no
  new-chain instruction exists the signer's identity could create one; only an
  admission policy on the signer's creates can close that.

:func:`cluster_roles` is generated into ``crds/rbac.yaml``;
:func:`component_bindings` (ServiceAccount bindings plus the namespaced Roles)
into the Helm chart's ``templates/rbac.yaml`` and the local control plane.
"""
from __future__ import annotations

from keyroom.api.admission import ATTEST_VERB
from keyroom.api.common import GROUP
from keyroom.signer.audit import CHECKPOINT_NAME, NEW_CHAIN_NAME

KINDS = ["signingkeys", "certificates", "signingpolicies", "signrequests"]
READ = ["get", "list", "watch"]
RBAC_API = "rbac.authorization.k8s.io"
OPERATOR = "keyroom-operator"
SIGNER = "keyroom-signer"
#: the one Secret the operator may read, in its own namespace: the approvers' webhook (keyroom.controllers.notify)
NOTIFY_SECRET = "keyroom-notify-webhook"
LABELS = {"app.kubernetes.io/part-of": "keyroom"}


def _metadata(name: str, description: str | None = None, namespace: str | None = None) -> dict:
    metadata: dict = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    metadata["labels"] = dict(LABELS)
    if description is not None:
        metadata["annotations"] = {"keyroom.dev/description": description}
    return metadata


def _role(name: str, rules: list[dict], description: str) -> dict:
    return {"apiVersion": f"{RBAC_API}/v1", "kind": "ClusterRole", "metadata": _metadata(name, description),
            "rules": rules}


def _keyroom(resources: list[str], verbs: list[str]) -> dict:
    return {"apiGroups": [GROUP], "resources": resources, "verbs": verbs}


def cluster_roles() -> list[dict]:
    read_all = _keyroom(KINDS, READ)
    return [
        _role("keyroom-viewer", [read_all], "Read keyroom objects."),
        _role("keyroom-requester", [read_all, _keyroom(["signrequests"], ["create", "patch"])],
              "Read keyroom objects and request signatures (also with kubectl apply, server-side or not)."),
        _role("keyroom-approver", [read_all, _keyroom(["signrequests"], ["patch", "update"])],
              "Read keyroom objects and append one's own approval or denial to SignRequests."),
        _role("keyroom-builder", [_keyroom(["signrequests"], ["get", "patch", ATTEST_VERB])],
              "Attest one's own build of a SignRequest's digests (kubectl keyroom attest), nothing else."),
        _role("keyroom-admin", [_keyroom(KINDS, [*READ, "create", "update", "patch", "delete", "deletecollection"])],
              "Manage SigningKeys, Certificates, SigningPolicies and SignRequests."),
        _role(OPERATOR, [
            _keyroom(KINDS, [*READ, "patch"]),
            _keyroom([f"{kind}/status" for kind in KINDS], ["patch"]),
            _keyroom(["signrequests/status"], ["update"]),  # a signed request's status is replaced, not merged
            _keyroom(["signrequests"], ["delete"]),
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
            # public certificates and CRLs only (admission policy); no get/list/watch: it reads no Secret
            {"apiGroups": [""], "resources": ["secrets", "configmaps"], "verbs": ["create", "patch"]},
            {"apiGroups": [""], "resources": ["namespaces"], "verbs": READ},
            {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": READ},
        ], "The keyroom operator: watches the four kinds, patches their metadata and status, deletes finished "
           "SignRequests, posts events, publishes certificates and CRLs (never reads a Secret)."),
        _role(SIGNER, [
            _keyroom(KINDS, READ),
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        ], "The keyroom signer: re-reads requests, keys and policies and authenticates its callers. Its audit "
           "checkpoint rights are a Role in its own namespace."),
    ]


def signer_role(namespace: str) -> dict:
    """The signer's rights in its own namespace: its audit checkpoint, and reading the new-chain instruction."""
    return {
        "apiVersion": f"{RBAC_API}/v1",
        "kind": "Role",
        "metadata": _metadata(SIGNER, "The keyroom signer's audit checkpoint: create it, then change only it; "
                                      "read (never write) an administrator's new-chain instruction.", namespace),
        "rules": [
            # create cannot be limited by name; the checkpoint is created on the first signature
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "update", "patch"],
             "resourceNames": [CHECKPOINT_NAME]},
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": [NEW_CHAIN_NAME]},
        ],
    }


def operator_role(namespace: str) -> dict:
    """The operator's rights in its own namespace: read the one Secret that configures approvers' webhook."""
    return {
        "apiVersion": f"{RBAC_API}/v1",
        "kind": "Role",
        "metadata": _metadata(OPERATOR, "The keyroom operator's webhook for approvers: get (never list or watch) "
                                        f"the Secret {NOTIFY_SECRET}, nothing else.", namespace),
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": [NOTIFY_SECRET]}],
    }


def _binding(kind: str, role_kind: str, name: str, namespace: str) -> dict:
    """A binding of the role ``name`` to the ServiceAccount ``name`` in ``namespace``."""
    return {
        "apiVersion": f"{RBAC_API}/v1",
        "kind": kind,
        "metadata": _metadata(name, namespace=namespace if kind == "RoleBinding" else None),
        "roleRef": {"apiGroup": RBAC_API, "kind": role_kind, "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
    }


def component_bindings(namespace: str) -> list[dict]:
    """Bindings of the components' ServiceAccounts in ``namespace`` to their roles, and their Roles there."""
    return [
        _binding("ClusterRoleBinding", "ClusterRole", OPERATOR, namespace),
        _binding("ClusterRoleBinding", "ClusterRole", SIGNER, namespace),
        signer_role(namespace),
        _binding("RoleBinding", "Role", SIGNER, namespace),
        operator_role(namespace),
        _binding("RoleBinding", "Role", OPERATOR, namespace),
    ]

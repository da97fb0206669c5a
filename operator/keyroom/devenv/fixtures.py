"""The people, teams and service identities of the local control plane.

Each identity gets a kubeconfig (``kubeconfig-<identity>``; ``kubeconfig`` for
admin). Teams are namespaces; RoleBindings grant the shipped keyroom roles to a
team's groups in that team's namespace only, as a platform team would. The
operator and the signer run as ServiceAccounts in ``keyroom-system`` with the
same bindings the Helm chart makes (:func:`keyroom.api.rbac.component_bindings`).
Two CI systems of team-a build every release independently, as ServiceAccounts
``ci-builder-a`` (which also requests the signatures) and ``ci-builder-b``.
"""
from __future__ import annotations

from keyroom.api import rbac

#: username -> groups carried in the client certificate
IDENTITIES: dict[str, list[str]] = {
    "admin": ["system:masters"],
    "alice": ["team-a-devs"],
    "bob": ["team-a-approvers"],
    "carol": ["team-a-approvers"],
    "dave": ["team-b-devs"],
}

SYSTEM_NAMESPACE = "keyroom-system"

#: kubeconfig name -> (namespace, ServiceAccount); these authenticate with TokenRequest tokens
SERVICE_ACCOUNTS: dict[str, tuple[str, str]] = {
    "operator": (SYSTEM_NAMESPACE, rbac.OPERATOR),
    "signer": (SYSTEM_NAMESPACE, rbac.SIGNER),
    "ci-builder-a": ("team-a", "ci-builder-a"),
    "ci-builder-b": ("team-a", "ci-builder-b"),
}

#: kubeconfig name of a team's ServiceAccount -> the ClusterRoles it is bound to in its namespace
SERVICE_ACCOUNT_ROLES: dict[str, list[str]] = {
    "ci-builder-a": ["keyroom-requester", "keyroom-builder"],
    "ci-builder-b": ["keyroom-builder"],
}

#: namespace -> [(group, ClusterRole)]
TEAMS: dict[str, list[tuple[str, str]]] = {
    "team-a": [("team-a-devs", "keyroom-requester"), ("team-a-approvers", "keyroom-approver")],
    "team-b": [("team-b-devs", "keyroom-requester")],
}


def manifests() -> list[dict]:
    documents: list[dict] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        for name in [SYSTEM_NAMESPACE, *TEAMS]
    ]
    for namespace, bindings in TEAMS.items():
        for group, role in bindings:
            documents.append({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": f"{group}-{role}", "namespace": namespace},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}],
            })
    for namespace, service_account in SERVICE_ACCOUNTS.values():
        documents.append({"apiVersion": "v1", "kind": "ServiceAccount",
                          "metadata": {"name": service_account, "namespace": namespace}})
    for identity, roles in SERVICE_ACCOUNT_ROLES.items():
        namespace, service_account = SERVICE_ACCOUNTS[identity]
        for role in roles:
            documents.append({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": f"{service_account}-{role}", "namespace": namespace},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
            })
    # the same bindings as the Helm chart's: ClusterRoleBindings, and the signer's Role in its own namespace only
    documents.extend(rbac.component_bindings(SYSTEM_NAMESPACE))
    return documents

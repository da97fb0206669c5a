"""Everything keyroom installs into a cluster, as plain dicts, in apply order."""
from __future__ import annotations

from keyroom.api import admission, certificate, common, rbac, signingkey, signingpolicy, signrequest

KINDS = [signingkey.KIND, certificate.KIND, signingpolicy.KIND, signrequest.KIND]


def crds() -> list[dict]:
    return [common.crd(kind) for kind in KINDS]


def all_manifests() -> list[dict]:
    return [
        *crds(),
        *admission.policies(),
        *rbac.cluster_roles(),
    ]

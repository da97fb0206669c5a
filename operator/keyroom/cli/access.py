"""Who may do what with a key, resolved from its policies *and* the RBAC bindings that let people act.

A SigningPolicy says whose requests and approvals count; RBAC says who can
create a SignRequest or append an approval at all. Both must agree for a
person to take part, and a mismatch is a common misconfiguration: a policy
naming an approver group that is bound to no ``keyroom-approver`` role (its
members cannot approve, so the request waits forever), or a group bound to
``keyroom-requester`` that no policy names (its requests are refused). This
module joins the two views for one key, without I/O, so that compliance
tooling gets the same answer as ``kubectl keyroom access``.

Which ClusterRoles let a part act is read from the roles' rules where the
caller may read them (:func:`granting_roles`: create, patch or attest on
SignRequests), so a custom role counts for what it grants; otherwise the
shipped roles are assumed to be as shipped (:data:`ROLES`). Roles bound
through a namespaced Role are not resolved.

It also answers an approver's question for ``kubectl keyroom pending``: could
my approval still count for this request?
"""
from __future__ import annotations

import dataclasses
import datetime
from typing import Iterable, Mapping

from keyroom import policy, schedule

#: the shipped ClusterRoles that grant each part's verb on SignRequests, when the roles cannot be read
ROLES = {
    "requester": ("keyroom-requester", "keyroom-admin", "cluster-admin"),
    "approver": ("keyroom-approver", "keyroom-requester", "keyroom-admin", "cluster-admin"),
    "builder": ("keyroom-builder", "cluster-admin"),
}
#: the verb on SignRequests each part needs
VERBS = {"requester": "create", "approver": "patch", "builder": "attest"}
#: the shipped role each part is meant to hold (named in advice)
MEANT = {"requester": "keyroom-requester", "approver": "keyroom-approver", "builder": "keyroom-builder"}
_ALL_POWERFUL_GROUPS = ("system:masters",)


@dataclasses.dataclass(frozen=True)
class Subject:
    kind: str  # User, Group or ServiceAccount
    name: str
    namespace: str = ""

    def __str__(self) -> str:
        if self.kind == "ServiceAccount":
            return f"ServiceAccount {self.namespace}/{self.name}"
        return f"{self.kind} {self.name}"

    def as_dict(self) -> dict:
        found = {"kind": self.kind, "name": self.name}
        if self.namespace:
            found["namespace"] = self.namespace
        return found

    def implied_groups(self) -> set[str]:
        """Groups every member of this subject is in: a binding to one of them reaches the subject too."""
        if self.kind == "Group":
            return {self.name}
        if self.kind == "ServiceAccount":
            return {"system:authenticated", "system:serviceaccounts", f"system:serviceaccounts:{self.namespace}"}
        return {"system:authenticated"}


def _binds(binding_subject: Mapping, subject: Subject) -> bool:
    kind, name = binding_subject.get("kind"), binding_subject.get("name")
    if kind == "Group":
        return name in subject.implied_groups()
    if kind == subject.kind == "User":
        return name == subject.name
    if kind == subject.kind == "ServiceAccount":
        return name == subject.name and binding_subject.get("namespace", subject.namespace) == subject.namespace
    return False


def bound_roles(subject: Subject, *, namespace: str, role_bindings: Iterable[Mapping],
                cluster_role_bindings: Iterable[Mapping]) -> dict[str, str]:
    """ClusterRole name -> where it is bound for ``subject`` ("RoleBinding team-a/x", "ClusterRoleBinding y")."""
    found: dict[str, str] = {}
    for where, bindings in (("RoleBinding", role_bindings), ("ClusterRoleBinding", cluster_role_bindings)):
        for binding in bindings:
            meta, ref = binding.get("metadata") or {}, binding.get("roleRef") or {}
            if ref.get("kind") != "ClusterRole":
                continue
            if where == "RoleBinding" and meta.get("namespace") != namespace:
                continue
            if any(_binds(s, subject) for s in binding.get("subjects") or []):
                label = f"{where} {meta.get('namespace') + '/' if where == 'RoleBinding' else ''}{meta.get('name')}"
                found.setdefault(ref["name"], label)
    return found


def granting_roles(cluster_roles: Iterable[Mapping]) -> dict[str, tuple[str, ...]]:
    """For each part, the ClusterRoles whose rules grant its verb on keyroom.dev SignRequests."""
    found: dict[str, list[str]] = {part: [] for part in VERBS}
    for role in cluster_roles:
        for rule in role.get("rules") or []:
            if not ({"keyroom.dev", "*"} & set(rule.get("apiGroups") or [])
                    and {"signrequests", "*"} & set(rule.get("resources") or [])) or rule.get("resourceNames"):
                continue
            for part, verb in VERBS.items():
                if {verb, "*"} & set(rule.get("verbs") or []) and role["metadata"]["name"] not in found[part]:
                    found[part].append(role["metadata"]["name"])
    return {part: tuple(names) for part, names in found.items()}


def _subjects(named: Mapping | None, *, namespace: str) -> list[Subject]:
    named = named or {}
    return ([Subject("User", u) for u in named.get("users") or []]
            + [Subject("Group", g) for g in named.get("groups") or []]
            + [Subject("ServiceAccount", s, namespace) for s in named.get("serviceAccounts") or []])


def resolve(*, key: Mapping, policies: list[Mapping], role_bindings: list[Mapping] | None,
            cluster_role_bindings: list[Mapping] | None, at: datetime.datetime,
            roles: Mapping[str, tuple[str, ...]] | None = None) -> dict:
    """Who may request, approve and attest for ``key``, from ``policies`` (those of its namespace) and bindings.

    ``role_bindings``/``cluster_role_bindings`` are None when the caller may not
    read them: the RBAC side is then reported as unknown, not as missing.
    ``roles`` says which ClusterRoles grant each part (:func:`granting_roles`;
    default :data:`ROLES`).
    """
    roles = roles or ROLES
    meta, spec, status = key["metadata"], key.get("spec") or {}, key.get("status") or {}
    namespace, name = meta["namespace"], meta["name"]
    selecting = [p for p in policies if policy.policy_selects(p.get("spec") or {}, key_name=name,
                                                              key_labels=meta.get("labels"))]
    problems: list[str] = []
    notes: list[str] = []
    if not selecting:
        problems.append(f"no SigningPolicy in {namespace} selects {name}: it cannot sign (fail closed)")
    rbac_known = role_bindings is not None and cluster_role_bindings is not None
    if not rbac_known:
        notes.append("RBAC bindings were not readable with your rights: who holds the roles is not checked "
                     "(a platform admin sees it)")
    parts: dict[str, list[dict]] = {}
    for part, field in (("requester", "requesters"), ("approver", "approvers"), ("builder", "builders")):
        named: dict[Subject, list[str]] = {}
        for item in selecting:
            source = ((item["spec"].get("matchingBuilds") or {}).get("builders") if part == "builder"
                      else item["spec"].get(field))
            for subject in _subjects(source, namespace=namespace):
                named.setdefault(subject, []).append(item["metadata"]["name"])
        rows = []
        for subject, names in named.items():
            row = {**subject.as_dict(), "policies": names}
            if rbac_known:
                bound = bound_roles(subject, namespace=namespace, role_bindings=role_bindings,
                                    cluster_role_bindings=cluster_role_bindings)
                granting = {r: w for r, w in bound.items() if r in roles[part]}
                masters = subject.kind == "Group" and subject.name in _ALL_POWERFUL_GROUPS
                row["boundBy"] = sorted(granting.values()) + (["the system:masters group"] if masters else [])
                row["rbac"] = bool(row["boundBy"])
                if not row["rbac"]:
                    problems.append(f"{subject} is a{'n' if part == 'approver' else ''} {part} in "
                                    f"{', '.join(names)} but has no binding to {MEANT[part]} in {namespace} or "
                                    f"cluster-wide: {'its members' if subject.kind == 'Group' else 'it'} cannot "
                                    f"{_action(part)} (bind {MEANT[part]} to it in {namespace})")
            if part == "requester" and len(names) < len(selecting):
                missing = sorted({p["metadata"]["name"] for p in selecting} - set(names))
                problems.append(f"{subject} is a requester in {', '.join(names)} but not in {', '.join(missing)}: a "
                                "request must satisfy every policy that selects the key, so its requests are refused")
            rows.append(row)
        parts[part] = rows
    for item in selecting:
        problems.extend(_quorum_problems(item))
    if rbac_known:
        notes.extend(_unnamed_bindings(parts, namespace=namespace, role_bindings=role_bindings, key=name))
    availability = policy.key_availability(spec, at)
    offline = spec.get("offline") or {}
    online = {"online": availability.online, "offline": bool(offline.get("enabled")),
              "windows": offline.get("windows") or [],
              "until": schedule.format_time(availability.until) if availability.until else None,
              "nextWindowAt": schedule.format_time(availability.next_open) if availability.next_open else None}
    if offline.get("enabled") and not availability.online and availability.next_open is None:
        problems.append(f"{name} is offline and no window lies ahead: it cannot sign until a window is added")
    return {
        "key": {"namespace": namespace, "name": name, "phase": status.get("phase"),
                "currentVersion": status.get("currentVersion")},
        "policies": [{"name": p["metadata"]["name"],
                      "requiredApprovals": int(p["spec"].get("requiredApprovals", 1)),
                      "separationOfDuties": p["spec"].get("separationOfDuties", True),
                      "matchingBuilds": int((p["spec"].get("matchingBuilds") or {}).get("required", 0)),
                      "allowedFormats": p["spec"].get("allowedFormats"),
                      "maxDigestsPerRequest": p["spec"].get("maxDigestsPerRequest")} for p in selecting],
        "requiredApprovals": max((int(p["spec"].get("requiredApprovals", 1)) for p in selecting), default=None),
        "requesters": parts["requester"], "approvers": parts["approver"], "builders": parts["builder"],
        "availability": online, "rbacChecked": rbac_known, "problems": problems, "notes": notes,
    }


def _action(part: str) -> str:
    return {"requester": "create SignRequests", "approver": "append approvals",
            "builder": "attest builds"}[part]


def _quorum_problems(item: Mapping) -> list[str]:
    spec, name = item["spec"], item["metadata"]["name"]
    required = int(spec.get("requiredApprovals", 1))
    approvers = spec.get("approvers") or {}
    if required and not approvers.get("users") and not approvers.get("groups"):
        return [f"policy {name} requires {required} approval(s) but names no approver: nothing it selects can sign"]
    if required and not approvers.get("groups") and len(set(approvers.get("users") or [])) < required:
        return [f"policy {name} requires {required} approvals but names only "
                f"{len(set(approvers['users']))} approver user(s)"]
    return []


def _unnamed_bindings(parts: dict[str, list[dict]], *, namespace: str, role_bindings: list[Mapping],
                      key: str) -> list[str]:
    """Subjects bound to the requester/approver roles in the namespace that no policy of the key names."""
    notes = []
    for part, role in (("requester", "keyroom-requester"), ("approver", "keyroom-approver")):
        named = {(row["kind"], row["name"]) for row in parts[part]}
        for binding in role_bindings:
            if (binding.get("roleRef") or {}).get("name") != role or \
                    (binding.get("metadata") or {}).get("namespace") != namespace:
                continue
            for subject in binding.get("subjects") or []:
                if (subject.get("kind"), subject.get("name")) not in named:
                    what = "approvals do not count" if part == "approver" else "requests are refused"
                    notes.append(f"{subject.get('kind')} {subject.get('name')} is bound to {role} in {namespace} but "
                                 f"no policy of {key} names it: its {what} for {key}")
    return notes


# ---------------------------------------------------------------- pending: could my approval still count?

def approval_prospect(request: Mapping, *, policies: list[Mapping], key_labels: Mapping | None,
                      identity: policy.Identity) -> tuple[bool, str]:
    """(whether ``identity``'s approval would count for ``request`` now, why or why not)."""
    spec, status = request["spec"], request.get("status") or {}
    phase = status.get("phase") or "Pending"
    if phase != "Pending":
        return False, f"it is {phase}"
    if any(a.get("user") == identity.username for a in spec.get("approvals") or []):
        return False, "you already decided"
    requester = policy.Identity.of_requester(spec["requester"])
    selecting = [p for p in policies if policy.policy_selects(p.get("spec") or {}, key_name=spec["keyRef"]["name"],
                                                              key_labels=key_labels)]
    if not selecting:
        return False, "no policy selects its key"
    counts, reasons = [], []
    for item in selecting:
        policy_spec, name = item["spec"], item["metadata"]["name"]
        tally = policy.count_approvals(policy_spec, requester=requester, approvals=spec.get("approvals") or [])
        if not policy.approver_eligible(policy_spec, identity):
            reasons.append(f"you are no approver in {name}")
        elif policy_spec.get("separationOfDuties", True) and identity.username == requester.username:
            reasons.append("you requested it (separation of duties)")
        elif tally.denied:
            reasons.append(f"denied by {', '.join(tally.denied_by)}")
        elif tally.missing == 0:
            reasons.append(f"{name} has its {tally.required} approval(s)")
        else:
            counts.append(f"{name}: {len(tally.approved_by)}/{tally.required}")
    if counts:
        return True, "counts for " + ", ".join(counts)
    return False, "; ".join(reasons)

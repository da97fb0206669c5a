"""Pure decisions about signing: which policies govern a key, who may request, what approvals count.

No I/O here: the operator and the signer both call these functions with the
objects they read, so both decide the same way, and the tests need no cluster.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping


def _requirement_holds(labels: Mapping[str, str], requirement: Mapping) -> bool:
    key, operator = requirement["key"], requirement["operator"]
    values = requirement.get("values") or []
    if operator == "In":
        return key in labels and labels[key] in values
    if operator == "NotIn":
        return key not in labels or labels[key] not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    raise ValueError(f"unknown label selector operator {operator!r}")


def selector_matches(selector: Mapping, labels: Mapping[str, str] | None) -> bool:
    """Kubernetes label-selector semantics; an empty selector matches every key."""
    labels = labels or {}
    match_labels = selector.get("matchLabels") or {}
    if any(labels.get(key) != value for key, value in match_labels.items()):
        return False
    return all(_requirement_holds(labels, r) for r in selector.get("matchExpressions") or [])


def policy_selects(policy_spec: Mapping, *, key_name: str, key_labels: Mapping[str, str] | None) -> bool:
    """Whether a SigningPolicy (of the key's namespace) governs the key."""
    if "keys" in policy_spec and policy_spec["keys"] is not None:
        return key_name in policy_spec["keys"]
    if "keySelector" in policy_spec and policy_spec["keySelector"] is not None:
        return selector_matches(policy_spec["keySelector"], key_labels)
    return False


def matched_keys(policy_spec: Mapping, keys: Iterable[tuple[str, Mapping[str, str] | None]]) -> list[str]:
    """The sorted names of the keys (name, labels) that the policy selects."""
    return sorted(name for name, labels in keys if policy_selects(policy_spec, key_name=name, key_labels=labels))


# ---------------------------------------------------------------- who may request and approve

@dataclasses.dataclass(frozen=True)
class Identity:
    """A user as the API server authenticated them (a SignRequest's requester or an approval)."""

    username: str
    groups: tuple[str, ...] = ()

    @classmethod
    def of_requester(cls, requester: Mapping) -> "Identity":
        return cls(requester["username"], tuple(requester.get("groups") or ()))


def _service_account(username: str) -> tuple[str, str] | None:
    parts = username.split(":")
    if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
        return parts[2], parts[3]
    return None


def requester_allowed(policy_spec: Mapping, requester: Identity, *, namespace: str) -> bool:
    """Whether the policy lets this identity request signatures (ServiceAccounts of the policy's namespace)."""
    requesters = policy_spec.get("requesters") or {}
    if requester.username in (requesters.get("users") or []):
        return True
    if set(requester.groups) & set(requesters.get("groups") or []):
        return True
    account = _service_account(requester.username)
    return account is not None and account[0] == namespace and account[1] in (requesters.get("serviceAccounts") or [])


def approver_eligible(policy_spec: Mapping, approver: Identity) -> bool:
    approvers = policy_spec.get("approvers") or {}
    return approver.username in (approvers.get("users") or []) or bool(
        set(approver.groups) & set(approvers.get("groups") or []))


@dataclasses.dataclass(frozen=True)
class Tally:
    """The approvals of one request as one policy counts them."""

    approved_by: tuple[str, ...]
    denied_by: tuple[str, ...]
    #: (user, why the entry did not count)
    ignored: tuple[tuple[str, str], ...]
    required: int

    @property
    def denied(self) -> bool:
        return bool(self.denied_by)

    @property
    def approved(self) -> bool:
        return not self.denied and len(self.approved_by) >= self.required

    @property
    def missing(self) -> int:
        return max(0, self.required - len(self.approved_by))


def count_approvals(policy_spec: Mapping, *, requester: Identity, approvals: Iterable[Mapping]) -> Tally:
    """Distinct eligible approvers against ``requiredApprovals``; one eligible Deny denies.

    With ``separationOfDuties`` (the default) the requester never counts, even
    when they are also an approver; an ineligible person's entry is ignored and
    reported. A user's repeated Approve counts once.
    """
    separation = policy_spec.get("separationOfDuties", True)
    approved: list[str] = []
    denied: list[str] = []
    ignored: list[tuple[str, str]] = []
    for entry in approvals:
        approver = Identity(entry["user"], tuple(entry.get("groups") or ()))
        if separation and approver.username == requester.username:
            ignored.append((approver.username, "a requester cannot approve or deny their own request"))
        elif not approver_eligible(policy_spec, approver):
            ignored.append((approver.username, "not an approver in the policy"))
        elif entry["decision"] == "Deny":
            if approver.username not in denied:
                denied.append(approver.username)
        elif approver.username not in approved:
            approved.append(approver.username)
    return Tally(approved_by=tuple(approved), denied_by=tuple(denied), ignored=tuple(ignored),
                 required=int(policy_spec.get("requiredApprovals", 1)))


def request_problems(policy_spec: Mapping, request_spec: Mapping, *, namespace: str) -> list[str]:
    """Why a request can never satisfy this policy (empty when it can)."""
    problems = []
    requester = Identity.of_requester(request_spec["requester"])
    if not requester_allowed(policy_spec, requester, namespace=namespace):
        problems.append(f"{requester.username} is not a requester in the policy")
    algorithm = request_spec.get("digestAlgorithm", "SHA256")
    if algorithm not in (policy_spec.get("allowedDigestAlgorithms") or ["SHA256", "SHA384", "SHA512"]):
        problems.append(f"digest algorithm {algorithm} is not allowed")
    fmt = request_spec.get("format", "raw")
    if fmt not in (policy_spec.get("allowedFormats") or ["raw", "cms"]):
        problems.append(f"format {fmt} is not allowed")
    limit = policy_spec.get("maxDigestsPerRequest", 500)
    if len(request_spec.get("digests") or []) > limit:
        problems.append(f"{len(request_spec['digests'])} digests exceed the policy's maxDigestsPerRequest of {limit}")
    return problems

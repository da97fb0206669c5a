"""Pure decisions about signing: which policies govern a key, and (later) who may sign.

No I/O here: the operator and the signer both call these functions with the
objects they read, so both decide the same way, and the tests need no cluster.
"""
from __future__ import annotations

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

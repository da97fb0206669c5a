"""Status conditions in the metav1.Condition shape, kept the kstatus way.

``Ready`` summarises an object; ``Reconciling`` and ``Stalled`` are abnormal-true
conditions: present and True only while the operator works on the object or
cannot make progress, and removed otherwise, so that ``kubectl wait``, Flux and
Argo CD read health the same way. A condition's ``lastTransitionTime`` moves
only when its status changes.
"""
from __future__ import annotations

import datetime
from typing import Iterable

ABNORMAL_TRUE = ("Reconciling", "Stalled")


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type: str, status: bool | str, reason: str, message: str, *, generation: int) -> dict:
    if isinstance(status, bool):
        status = "True" if status else "False"
    return {"type": type, "status": status, "reason": reason, "message": message,
            "observedGeneration": generation}


def merge(existing: Iterable[dict] | None, updates: Iterable[dict], *, now: str | None = None) -> list[dict]:
    """The conditions after applying ``updates`` to ``existing``.

    A condition whose status did not change keeps its lastTransitionTime. An
    update of Reconciling or Stalled to False removes it (abnormal-true).
    Conditions not named in ``updates`` are kept as they are.
    """
    now = now or now_rfc3339()
    by_type = {c["type"]: dict(c) for c in existing or ()}
    for update in updates:
        old = by_type.get(update["type"])
        if update["type"] in ABNORMAL_TRUE and update["status"] == "False":
            by_type.pop(update["type"], None)
            continue
        merged = dict(update)
        if old is not None and old.get("status") == update["status"] and old.get("lastTransitionTime"):
            merged["lastTransitionTime"] = old["lastTransitionTime"]
        else:
            merged["lastTransitionTime"] = now
        by_type[update["type"]] = merged
    return list(by_type.values())


def first_status(*, generation: int, message: str, now: str | None = None) -> dict:
    """The status an object gets as soon as the operator sees it, before any work on it is done.

    Without it, an object that never got a status (the first moments of every
    object, or one whose reconcile keeps failing before it writes anything)
    would read as Current, i.e. healthy, to kstatus, Flux and Argo CD: they
    judge an object without conditions or observedGeneration as finished.
    """
    return {"observedGeneration": generation, "conditions": merge([], [
        condition("Reconciling", True, "Reconciling", message, generation=generation),
        condition("Ready", False, "Reconciling", message, generation=generation),
    ], now=now)}


def needs_first_status(status: dict | None) -> bool:
    """Whether an object has no status written by the operator yet."""
    return not (status or {}).get("conditions")


def find(conditions: Iterable[dict] | None, type: str) -> dict | None:
    return next((c for c in conditions or () if c.get("type") == type), None)

"""The SigningPolicy reconciler: which keys a policy governs, and whether it is in force.

The reconcile is level-based and cheap: the status is computed from the policy
and the namespace's keys (kept in a Kopf index) and written only when it
differs. It runs on every policy event, and after key events of the
namespace (a new or relabelled key changes what a policy selects): the key
events of ``SETTLE_SECONDS`` are taken together, so a thousand keys applied at
once cost a few status writes and Events, not thousands. Each re-list after a
watch ends brings every policy round again as a safety net.
No finalizer and no bookkeeping annotation is needed (a Kopf timer would add
a finalizer, so there is none).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Mapping

import kopf

from keyroom import conditions, policy
from keyroom.api.common import GROUP, VERSION
from keyroom.controllers import kube, signingkey


# The indexes are async although they await nothing: Kopf runs plain functions in its thread pool (see
# keyroom.controllers.signrequest.signing_keys).
@kopf.index(GROUP, VERSION, "signingkeys")
async def keys_by_namespace(namespace: str, name: str, labels: Mapping[str, str], **_: Any) -> dict:
    return {namespace: (name, dict(labels))}


@kopf.index(GROUP, VERSION, "signingpolicies")
async def policies_by_namespace(namespace: str, body: kopf.Body, **_: Any) -> dict:
    """The namespace's policies as last seen, so a key event needs no API read to re-check them."""
    return {namespace: {"apiVersion": body["apiVersion"], "kind": body["kind"], "metadata": dict(body["metadata"]), "spec": dict(body.get("spec") or {}),
                        "status": dict(body.get("status") or {})}}


logger = logging.getLogger(__name__)

#: key events within this many seconds of the first are reconciled together, once per namespace
SETTLE_SECONDS = 1.0

#: at most this many key names in status.matchedKeys (a policy may select thousands; status.matchedKeyCount counts all)
MATCHED_KEYS_LISTED = 100
#: at most this many key names in the status message and the KeysSelected event
NAMES_IN_MESSAGE = 10


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_IN_MESSAGE])
    return shown + (f" and {len(names) - NAMES_IN_MESSAGE} more" if len(names) > NAMES_IN_MESSAGE else "")


def desired_status(*, spec: Mapping, generation: int, status: Mapping,
                   keys: list[tuple[str, Mapping[str, str]]]) -> dict:
    """The policy's status for the keys that exist now (pure).

    Its size does not grow with the number of keys: the count is exact, the
    list of names and the message are capped (sorted, so the same keys always
    give the same status and no write).
    """
    matched = policy.matched_keys(spec, keys)
    missing = sorted(set(spec.get("keys") or []) - {name for name, _ in keys})
    if matched:
        reason, message = "KeysSelected", f"governs {len(matched)} key(s): {_names(matched)}"
    else:
        reason, message = "NoKeysSelected", "selects no SigningKey of the namespace yet"
    if missing:
        message += f"; not found: {_names(missing)}"
    ready = conditions.condition("Ready", True, reason, message, generation=generation)
    return {
        "observedGeneration": generation,
        "matchedKeyCount": len(matched),
        "matchedKeys": matched[:MATCHED_KEYS_LISTED],
        "message": message,
        "conditions": conditions.merge(status.get("conditions"), [
            ready,
            conditions.condition("Reconciling", False, reason, "", generation=generation),
            conditions.condition("Stalled", False, reason, "", generation=generation),
        ]),
    }


def _changed(current: Mapping, desired: Mapping) -> bool:
    return any(current.get(field) != value for field, value in desired.items())


@kopf.on.event(GROUP, VERSION, "signingpolicies")
async def policy_changed(event: Mapping, body: kopf.Body, spec: Mapping, status: Mapping, meta: Mapping,
                         namespace: str, keys_by_namespace: kopf.Index, **_: Any) -> None:
    if event["type"] == "DELETED" or meta.get("deletionTimestamp"):
        return
    await _reconcile(body=body, spec=spec, status=status, generation=meta["generation"],
                     namespace=namespace, keys=list(keys_by_namespace.get(namespace, [])))


@kopf.on.startup()
def setup_policies(memo: kopf.Memo, **_: Any) -> None:
    memo.policy_passes = {}  # namespace -> the pending pass over its policies
    memo.policy_tasks = set()  # the passes running (the event loop keeps only weak references to tasks)


@signingkey.on_key_event
async def key_changed(namespace: str, memo: kopf.Memo, policies_by_namespace: kopf.Index,
                      keys_by_namespace: kopf.Index, **_: Any) -> None:
    """Reconcile the namespace's policies once the key events of the next moment are in (one pass for all)."""
    passes: dict[str, asyncio.Task] = memo.policy_passes
    if namespace in passes:
        return  # the pending pass reads the indexes when it runs: it sees this event too

    async def reconcile_policies() -> None:
        try:
            await asyncio.sleep(SETTLE_SECONDS)
        finally:
            passes.pop(namespace, None)  # events from now on schedule another pass
        keys = list(keys_by_namespace.get(namespace, []))
        for body in list(policies_by_namespace.get(namespace, [])):
            if body["metadata"].get("deletionTimestamp"):
                continue
            try:
                await _reconcile(body=body, spec=body["spec"], status=body["status"],
                                 generation=body["metadata"]["generation"], namespace=namespace, keys=keys)
            except Exception:  # the next key or policy event, or the re-list, tries again
                logger.exception("cannot update the status of policy %s/%s", namespace, body["metadata"]["name"])

    task = asyncio.create_task(reconcile_policies())
    passes[namespace] = task
    memo.policy_tasks.add(task)
    task.add_done_callback(memo.policy_tasks.discard)


async def _reconcile(*, body: Mapping, spec: Mapping, status: Mapping, generation: int, namespace: str,
                     keys: list) -> None:
    desired = desired_status(spec=spec, generation=generation, status=status, keys=keys)
    if not _changed(status, desired):
        return
    before = (status.get("matchedKeyCount"), status.get("matchedKeys") or [])
    await kube.patch_status(plural="signingpolicies", namespace=namespace, name=body["metadata"]["name"],
                            status=desired)
    if (desired["matchedKeyCount"], desired["matchedKeys"]) != before:
        kopf.info(body, reason="KeysSelected" if desired["matchedKeys"] else "NoKeysSelected",
                  message=desired["message"])

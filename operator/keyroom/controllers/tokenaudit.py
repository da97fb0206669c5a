"""Token audit: key material in the HSM that no SigningKey declares.

Key objects outlive their SigningKeys on purpose (``deletionPolicy: Retain``,
a key deleted while the operator was down), and other tools may write to the
same token. Periodically the operator lists the token's objects through the
signer and reports each keyroom object whose SigningKey (namespace, name,
UID) or version is no longer declared, and each object keyroom did not
create: as a warning in its log, as the gauge
``keyroom_token_undeclared_objects`` (``--metrics``), and, for a keyroom
object, once per operator process as a Warning Event ``UndeclaredKeyObject``
on the Namespace its key lived in, where the team's people see it. It never
destroys anything it finds.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Iterable, Mapping

import kopf
import kubernetes

from keyroom import conditions, kubeclient, metrics
from keyroom.controllers import kube

logger = logging.getLogger("keyroom.tokenaudit")


def undeclared_objects(objects: Iterable[Mapping], keys: Iterable[Mapping]) -> list[str]:
    """Labels of token objects that no SigningKey version declares (pure)."""
    declared = {
        (key["metadata"]["namespace"], key["metadata"]["name"], key["metadata"]["uid"], version["version"])
        for key in keys
        for version in (key.get("status") or {}).get("versions") or []
        if version.get("state") != "Destroyed"
    }
    found = []
    for item in objects:
        handle = item.get("key")
        if handle is None or (handle["namespace"], handle["name"], handle["uid"], handle["version"]) not in declared:
            found.append(item["label"])
    return sorted(set(found))


def finding_event(item: Mapping) -> dict | None:
    """The Event for an undeclared keyroom object, on its key's Namespace (None for a foreign object)."""
    handle = item.get("key")
    if handle is None:
        return None
    return {
        "metadata": {"generateName": "keyroom-token-audit-", "namespace": handle["namespace"]},
        # the API server refuses an Event whose namespace differs from its involved object's, and a Namespace's
        # own namespace is itself: without it the Event is invalid (422)
        "involvedObject": {"apiVersion": "v1", "kind": "Namespace", "name": handle["namespace"],
                           "namespace": handle["namespace"]},
        "type": "Warning", "reason": "UndeclaredKeyObject", "source": {"component": "keyroom-operator"},
        "message": (f"the HSM holds {item['label']} (SigningKey {handle['name']} version {handle['version']}, "
                    f"uid {handle['uid']}), which no SigningKey declares; it is kept: remove it deliberately"),
        "firstTimestamp": conditions.now_rfc3339(), "lastTimestamp": conditions.now_rfc3339(), "count": 1,
    }


def _post_event(event: dict) -> None:
    kubernetes.client.CoreV1Api(kubeclient.api_client()).create_namespaced_event(
        event["metadata"]["namespace"], event)


async def audit_once(signer: Any, reported: set[str] | None = None) -> list[str]:
    objects = await signer.list_objects()
    keys = await kube.list_all(plural="signingkeys")
    undeclared = undeclared_objects(objects, keys)
    metrics.TOKEN_UNDECLARED_OBJECTS.set(len(undeclared))
    reported = set() if reported is None else reported
    for label in undeclared:
        logger.warning("token object %r is declared by no SigningKey; it is kept, remove it deliberately", label)
    for item in objects:
        event = finding_event(item) if item["label"] in undeclared and item["label"] not in reported else None
        if event is None:
            continue
        try:
            await asyncio.to_thread(_post_event, event)
        except kubernetes.client.ApiException as error:  # e.g. the Namespace is gone: the next round tries again
            logger.info("token audit: no Event for %r in namespace %s: %s %s", item["label"],
                        event["metadata"]["namespace"], error.status, error.reason)
            continue
        reported.add(item["label"])
    return undeclared


async def _audit_forever(memo: kopf.Memo, interval: float) -> None:
    reported: set[str] = set()
    while True:
        await asyncio.sleep(interval)
        if memo.get("signer") is None:
            continue
        try:
            await audit_once(memo.signer, reported)
            metrics.TOKEN_AUDITS.labels("ok").inc()
        except asyncio.CancelledError:
            raise
        except Exception as error:  # an API or signer error skips one round, never ends the audit
            metrics.TOKEN_AUDITS.labels("skipped").inc()
            logger.info("token audit skipped: %s: %s", type(error).__name__, error)


@kopf.on.startup()
async def start_token_audit(memo: kopf.Memo, **_: Any) -> None:
    interval = float(os.environ.get("KEYROOM_TOKEN_AUDIT_SECONDS", "600"))
    if interval > 0:
        memo.token_audit = asyncio.create_task(_audit_forever(memo, interval))


@kopf.on.cleanup()
async def stop_token_audit(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("token_audit") is not None:
        memo.token_audit.cancel()

"""Token audit: key material in the HSM that no SigningKey declares.

Key objects outlive their SigningKeys on purpose (``deletionPolicy: Retain``,
a key deleted while the operator was down), and other tools may write to the
same token. Periodically the operator lists the token's objects through the
signer and reports, as a warning in its log, each keyroom object whose
SigningKey (namespace, name, UID) or version is no longer declared, and each
object keyroom did not create. It never destroys anything it finds.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Iterable, Mapping

import kopf

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


async def audit_once(signer: Any) -> list[str]:
    objects = await signer.list_objects()
    keys = await kube.list_all(plural="signingkeys")
    undeclared = undeclared_objects(objects, keys)
    for label in undeclared:
        logger.warning("token object %r is declared by no SigningKey; it is kept, remove it deliberately", label)
    return undeclared


async def _audit_forever(memo: kopf.Memo, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        if memo.get("signer") is None:
            continue
        try:
            await audit_once(memo.signer)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # an API or signer error skips one round, never ends the audit
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

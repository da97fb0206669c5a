"""What the per-object daemons (SigningKeys, Certificates) share: sleeping until the clock or a change wakes them."""
from __future__ import annotations

import asyncio
from typing import Mapping

import kopf

from keyroom import conditions
from keyroom.controllers import kube


async def sleep(stopped: kopf.DaemonStopped, wakeup: asyncio.Event, seconds: float | None) -> None:
    """Sleep ``seconds`` (None: until woken), or less when the daemon is stopped or ``wakeup`` is set."""
    waiters = [asyncio.ensure_future(stopped.wait()), asyncio.ensure_future(wakeup.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def write_first_status(*, plural: str, body: kopf.Body, message: str) -> None:
    """Mark an object as being reconciled before anything else happens to it (see conditions.first_status).

    The write is conditional on the resourceVersion it was decided on: a body
    without status may be stale, and a newer version's status must not be
    overwritten. When the object changed meanwhile (Kopf's own finalizer or
    annotations, say), it is read again and the first status written only if
    it still has none.
    """
    current: Mapping = body
    for _ in range(5):
        if not conditions.needs_first_status(current.get("status")):
            return
        meta = current["metadata"]
        try:
            await kube.patch_status(plural=plural, namespace=meta["namespace"], name=meta["name"],
                                    status=conditions.first_status(generation=meta["generation"], message=message),
                                    resource_version=meta.get("resourceVersion"))
            return
        except kube.Conflict:
            fresh = await kube.get(plural=plural, namespace=meta["namespace"], name=meta["name"])
            if fresh is None:
                return
            current = fresh

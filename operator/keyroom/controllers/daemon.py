"""What the per-object daemons (SigningKeys, Certificates) share: sleeping until the clock or a change wakes them."""
from __future__ import annotations

import asyncio

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
    """Mark an object as being reconciled before anything else happens to it (see conditions.first_status)."""
    if conditions.needs_first_status(body.get("status")):
        meta = body["metadata"]
        try:
            # conditional: a body without status may be stale, and a newer version's status must not be overwritten
            await kube.patch_status(plural=plural, namespace=meta["namespace"], name=meta["name"],
                                    status=conditions.first_status(generation=meta["generation"], message=message),
                                    resource_version=meta.get("resourceVersion"))
        except kube.Conflict:
            pass

"""What the per-object daemons (SigningKeys, Certificates) share: sleeping until the clock or a change wakes them."""
from __future__ import annotations

import asyncio

import kopf


async def sleep(stopped: kopf.DaemonStopped, wakeup: asyncio.Event, seconds: float | None) -> None:
    """Sleep ``seconds`` (None: until woken), or less when the daemon is stopped or ``wakeup`` is set."""
    waiters = [asyncio.ensure_future(stopped.wait()), asyncio.ensure_future(wakeup.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()

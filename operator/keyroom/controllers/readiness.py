"""Kopf's index readiness gate, with its waiters woken once instead of on every change.

When the operator starts, Kopf holds back every object's handlers until all
indexed objects (SigningKeys, SigningPolicies) are indexed: a toggle per
indexed object in one set, and every object's worker waiting on the set's
condition. Each toggle made or dropped notifies every waiter, and each waiter
re-checks the whole set: with 10,000 keys and 10,000 finished requests, a
restarted operator spent minutes of CPU waking its workers (about 20,000
toggle changes times 20,000 waiters) before it handled anything.

:class:`ToggleSet` keeps Kopf's interface and state, but its waiters wait for
an event that is set when the whole set turns, so each waiter wakes once.
:func:`install` puts it where Kopf creates its toggle sets; it is called before
the operator starts.
"""
from __future__ import annotations

import asyncio
from typing import Callable, Iterable

from kopf._cogs.aiokits import aiotoggles


class _Condition(asyncio.Condition):
    """The set's condition (shared with its toggles): every notification also re-checks the set's state."""

    def __init__(self, changed: Callable[[], None]) -> None:
        super().__init__()
        self._changed = changed

    def notify_all(self) -> None:
        self._changed()
        super().notify_all()


class ToggleSet(aiotoggles.ToggleSet):
    """Kopf's ToggleSet whose waiters wake when the whole set turns, not on every toggle's change."""

    def __init__(self, fn: Callable[[Iterable[bool]], bool]) -> None:
        super().__init__(fn)
        self._condition = _Condition(self._changed)
        self._turned = {True: asyncio.Event(), False: asyncio.Event()}
        self._changed()

    def _changed(self) -> None:
        on = self.is_on()
        self._turned[on].set()
        self._turned[not on].clear()

    async def wait_for(self, __state: bool) -> None:
        state = bool(__state)
        while self.is_on() != state:
            await self._turned[state].wait()


def install() -> None:
    """Have Kopf create this ToggleSet (the operator's readiness and pause gates) from now on."""
    aiotoggles.ToggleSet = ToggleSet  # type: ignore[misc]

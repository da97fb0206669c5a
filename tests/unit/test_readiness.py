"""Kopf's index readiness gate: each waiter wakes once when the whole set turns, not on every change."""
from __future__ import annotations

import asyncio

import pytest
from kopf._cogs.aiokits import aiotoggles
from kopf._core.reactor import orchestration

from keyroom.controllers import readiness

KOPF_TOGGLE_SET = aiotoggles.ToggleSet


@pytest.fixture
def installed():
    readiness.install()
    yield
    aiotoggles.ToggleSet = KOPF_TOGGLE_SET


def test_kopf_creates_its_toggle_sets_where_the_patch_puts_ours(installed):
    # the operator's readiness gate is made as aiotoggles.ToggleSet(all) when the operator starts
    assert orchestration.aiotoggles.ToggleSet is readiness.ToggleSet
    assert issubclass(readiness.ToggleSet, KOPF_TOGGLE_SET)


def _scenario(toggle_set_class, objects: int):
    """``objects`` workers waiting for ``objects`` toggles made and then dropped, as at an operator's start."""
    checks = 0

    def counted_all(states):
        nonlocal checks
        checks += 1
        return all(states)

    async def scenario():
        gate = toggle_set_class(counted_all)
        blocker = await gate.make_toggle(name="listing")
        woken = []

        async def worker(n):
            await gate.wait_for(True)
            woken.append(n)
        workers = [asyncio.create_task(worker(n)) for n in range(objects)]
        toggles = [await gate.make_toggle(name=f"object {n}") for n in range(objects)]
        await asyncio.sleep(0)
        for toggle in toggles:  # each object's worker drops its toggle in its own turn of the loop
            await gate.drop_toggle(toggle)
            await asyncio.sleep(0)
        assert woken == []  # the blocker is still off
        await blocker.turn_to(True)
        await asyncio.wait_for(asyncio.gather(*workers), 10)
        assert sorted(woken) == list(range(objects))
        await blocker.turn_to(False)
        assert not gate.is_on()
        waiting_off = asyncio.create_task(gate.wait_for(False))
        await asyncio.wait_for(waiting_off, 1)
    asyncio.run(scenario())
    return checks


def test_every_waiter_wakes_once_when_the_set_turns_on():
    objects = 300
    ours = _scenario(readiness.ToggleSet, objects)
    # a check per change (each object's toggle made and dropped) and two per waiter (before and after waiting)
    assert ours < 5 * objects
    kopfs = _scenario(KOPF_TOGGLE_SET, objects)
    assert kopfs > 50 * objects  # Kopf's own: every waiter re-checks on every change (about objects squared)

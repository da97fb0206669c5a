"""The scheduler behind the SigningKey and Certificate reconcilers: when passes run, and what they read."""
from __future__ import annotations

import asyncio
import datetime

import pytest

from keyroom.controllers.daemon import Retry, Scheduler, Stalled


def body(name: str, *, version: str = "1", namespace: str = "team-a", **spec) -> dict:
    return {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningKey",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": version, "uid": f"uid-{name}",
                         "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]},
            "spec": spec}


def later(seconds: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)


class Recorder:
    """A reconcile that records the bodies it saw and does what each test asks of it."""

    def __init__(self, behave=None) -> None:
        self.seen: list[dict] = []
        self.passed = asyncio.Event()
        self.behave = behave

    async def __call__(self, body: dict):
        self.seen.append(body)
        self.passed.set()
        return await self.behave(body) if self.behave else None

    async def wait(self, count: int, timeout: float = 5.0) -> None:
        async def enough():
            while len(self.seen) < count:
                self.passed.clear()
                await self.passed.wait()
        await asyncio.wait_for(enough(), timeout)

    def names(self) -> list[str]:
        return [b["metadata"]["name"] for b in self.seen]


async def settle(seconds: float = 0.2) -> None:
    await asyncio.sleep(seconds)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 20))


def test_a_seen_object_gets_one_pass_with_its_newest_body_without_managed_fields():
    async def scenario():
        recorder = Recorder()
        scheduler = Scheduler("test", recorder)
        scheduler.start()
        scheduler.seen(body("k", version="1"))
        scheduler.seen(body("k", version="2"))  # before the pass started: coalesced
        await recorder.wait(1)
        await settle()
        await scheduler.stop()
        return recorder.seen
    seen = run(scenario())
    assert [b["metadata"]["resourceVersion"] for b in seen] == ["2"]
    assert "managedFields" not in seen[0]["metadata"]
    assert seen[0]["metadata"]["uid"] == "uid-k" and seen[0]["kind"] == "SigningKey"


def test_the_due_time_a_pass_returns_brings_the_next_pass_then_and_not_before():
    async def scenario():
        async def behave(b):
            return later(0.5) if len(recorder.seen) == 1 else None
        recorder = Recorder(behave)
        scheduler = Scheduler("test", recorder)
        scheduler.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        scheduler.seen(body("k"))
        await recorder.wait(1)
        await settle(0.2)
        early = len(recorder.seen)
        await recorder.wait(2)
        took = loop.time() - started
        await settle(0.3)
        await scheduler.stop()
        return early, took, len(recorder.seen)
    early, took, total = run(scenario())
    assert early == 1
    assert took >= 0.45
    assert total == 2  # None: no further pass until woken


class InFlight:
    """A pass that counts the passes in flight (the most at once) and waits at a gate while ``held(body)``."""

    def __init__(self, held) -> None:
        self.gate, self.inside, self.most, self.held = asyncio.Event(), 0, 0, held

    async def __call__(self, body: dict) -> None:
        self.inside += 1
        self.most = max(self.most, self.inside)
        if self.held(body):
            await self.gate.wait()
        self.inside -= 1


def test_a_wake_during_a_pass_runs_exactly_one_more_pass_after_it_never_two_at_once():
    async def scenario():
        flight = InFlight(lambda b: len(recorder.seen) == 1)
        recorder = Recorder(flight)
        scheduler = Scheduler("test", recorder)
        scheduler.start()
        scheduler.seen(body("k", version="1"))
        await recorder.wait(1)
        for version in ("2", "3", "4"):
            scheduler.seen(body("k", version=version))
        await settle()
        during = len(recorder.seen)
        flight.gate.set()
        await recorder.wait(2)
        await settle()
        await scheduler.stop()
        return during, flight.most, [b["metadata"]["resourceVersion"] for b in recorder.seen]
    during, most, versions = run(scenario())
    assert during == 1 and most == 1
    assert versions == ["1", "4"]


def test_passes_in_flight_are_bounded_and_the_rest_wait_their_turn():
    async def scenario():
        flight = InFlight(lambda b: True)
        recorder = Recorder(flight)
        scheduler = Scheduler("test", recorder, concurrency=3)
        scheduler.start()
        for n in range(10):
            scheduler.seen(body(f"k{n}"))
        await recorder.wait(3)
        await settle()
        waiting = len(recorder.seen)
        flight.gate.set()
        await recorder.wait(10)
        await scheduler.stop()
        return waiting, flight.most, sorted(recorder.names())
    waiting, most, names = run(scenario())
    assert waiting == 3 and most == 3
    assert names == sorted(f"k{n}" for n in range(10))


def test_a_forgotten_object_gets_no_more_passes_even_one_due_or_woken():
    async def scenario():
        async def behave(b):
            return later(0.3)
        recorder = Recorder(behave)
        scheduler = Scheduler("test", recorder)
        scheduler.start()
        scheduler.seen(body("k"))
        await recorder.wait(1)
        scheduler.forget(("team-a", "k"))
        scheduler.wake(("team-a", "k"))
        await settle(0.6)
        await scheduler.stop()
        return len(recorder.seen), len(scheduler)
    passes, kept = run(scenario())
    assert passes == 1 and kept == 0


def test_a_failing_pass_is_retried_with_a_growing_delay_and_a_stalled_one_waits_for_a_wake():
    async def scenario():
        async def behave(b):
            if b["metadata"]["name"] == "retry":
                raise Retry("the signer is busy")
            if b["metadata"]["name"] == "broken":
                raise ValueError("a bug")
            raise Stalled("wrong PIN")
        recorder = Recorder(behave)
        scheduler = Scheduler("test", recorder)
        scheduler.start()
        loop = asyncio.get_running_loop()
        times: dict[str, list[float]] = {}
        original = recorder.__call__

        async def timed(b):
            times.setdefault(b["metadata"]["name"], []).append(loop.time())
            return await original(b)
        scheduler._reconcile = timed
        for name in ("retry", "broken", "stalled"):
            scheduler.seen(body(name))
        await asyncio.sleep(3.3)
        stalled_before = len(times["stalled"])
        scheduler.wake(("team-a", "stalled"))
        await settle()
        await scheduler.stop()
        return times, stalled_before
    times, stalled_before = run(scenario())
    retry = times["retry"]
    assert len(retry) == 3  # at 0, 1 and 3 s: the delay doubles
    assert 0.9 <= retry[1] - retry[0] and 1.9 <= retry[2] - retry[1]
    assert len(times["broken"]) == 3  # an unexpected error does not stop the scheduler nor the object
    assert stalled_before == 1 and len(times["stalled"]) == 2  # only the wake-up brought another pass


def test_seen_without_wake_keeps_the_body_for_the_next_pass_but_runs_none():
    async def scenario():
        async def behave(b):
            return later(0.4) if len(recorder.seen) == 1 else None
        recorder = Recorder(behave)
        scheduler = Scheduler("test", recorder)
        scheduler.start()
        scheduler.seen(body("k", version="1"))
        await recorder.wait(1)
        scheduler.seen(body("k", version="2"), wake=False)
        await settle(0.2)
        before_due = len(recorder.seen)
        await recorder.wait(2)
        await scheduler.stop()
        return before_due, recorder.seen[1]["metadata"]["resourceVersion"]
    before_due, version = run(scenario())
    assert before_due == 1
    assert version == "2"


def test_the_version_a_pass_wrote_itself_wakes_nothing_any_other_write_does():
    async def scenario():
        async def behave(b):
            if b["metadata"]["resourceVersion"] == "1":
                scheduler.written({**b, "metadata": {**b["metadata"], "resourceVersion": "2"}})  # its status write
        recorder = Recorder(behave)
        scheduler = Scheduler("test", recorder)
        scheduler.seen(body("k", version="1"))
        await recorder.wait(1)
        await settle()
        scheduler.seen(body("k", version="2"))  # the event of the pass's own write
        await settle()
        after_own = len(recorder.seen)
        scheduler.seen(body("k", version="3"))  # someone else's write (a forged status, say)
        await recorder.wait(2)
        await scheduler.stop()
        return after_own, [b["metadata"]["resourceVersion"] for b in recorder.seen]
    after_own, versions = run(scenario())
    assert after_own == 1
    assert versions == ["1", "3"]


@pytest.mark.parametrize("count", [2000])
def test_many_objects_cost_no_task_each(count):
    async def scenario():
        recorder = Recorder(lambda b: asyncio.sleep(0, later(3600)))
        scheduler = Scheduler("test", recorder)
        before = len(asyncio.all_tasks())
        scheduler.start()
        for n in range(count):
            scheduler.seen(body(f"k{n}"))
        await recorder.wait(count, timeout=30)
        await settle()
        tasks = len(asyncio.all_tasks())
        await scheduler.stop()
        return tasks - before
    # the scheduler's task and its timed wait, however many objects: each waits in the heap, not in a task
    assert run(scenario()) <= 2


@pytest.mark.parametrize("module", ["signingkey", "certificate"])
@pytest.mark.parametrize("reason, waits", [("PinIncorrect", False), ("TokenFull", False), ("TokenNotFound", False),
                                           ("SignerUnreachable", False), ("SignerForbidden", False),
                                           ("InvalidRequest", True)])
def test_a_failure_fixed_outside_the_object_is_asked_about_again_one_fixed_by_a_change_waits(
        monkeypatch, module, reason, waits):
    import importlib

    from keyroom.signer.client import SignerError
    controller = importlib.import_module(f"keyroom.controllers.{module}")

    async def failing(**_):
        raise SignerError(reason, "the signer said no")
    monkeypatch.setattr(controller, "reconcile", failing)
    shown = {**body("k"), "status": {"observedGeneration": 1, "conditions": [
        {"type": "Ready", "status": "False", "reason": "Reconciling", "message": "", "lastTransitionTime": "x"}]}}
    shown["metadata"]["generation"] = 1
    if module == "signingkey":
        shown["metadata"]["finalizers"] = [controller.FINALIZER]  # held already: the pass asks the signer
    import kopf
    memo = kopf.Memo(signer=None, signing_keys=Scheduler("test", Recorder()))
    with pytest.raises(Stalled if waits else Retry):
        run(controller._pass(shown, memo=memo, settings=kopf.OperatorSettings()))


def test_a_key_woken_often_with_its_next_pass_far_ahead_does_not_grow_the_heap():
    async def scenario():
        recorder = Recorder(lambda b: asyncio.sleep(0, later(3600)))
        scheduler = Scheduler("test", recorder)
        scheduler.seen(body("k"))
        for _ in range(200):
            await asyncio.sleep(0.005)
            scheduler.wake(("team-a", "k"))  # each pass leaves an entry an hour ahead, each wake one for now
        await settle()
        await scheduler.stop()
        return len(recorder.seen), len(scheduler._heap)
    passes, entries = run(scenario())
    assert passes > 100
    assert entries <= 2 * 1 + 64 + 1


def test_delayed_wake_ups_coalesce_into_one_pass_at_the_soonest_and_one_during_a_pass_waits_its_delay():
    async def scenario():
        gate = asyncio.Event()

        async def behave(b):
            if len(recorder.seen) == 2:
                await gate.wait()  # the second pass is in flight while woken again
        recorder = Recorder(behave)
        scheduler = Scheduler("test", recorder)
        scheduler.start()
        loop = asyncio.get_running_loop()
        scheduler.seen(body("k"))
        await recorder.wait(1)
        began = loop.time()
        for _ in range(20):  # a busy key: a signature after another
            scheduler.wake(("team-a", "k"), after=0.6)
        scheduler.wake(("team-a", "k"), after=0.4)
        await recorder.wait(2)
        second = loop.time() - began
        scheduler.wake(("team-a", "k"), after=0.5)  # during the second pass
        gate.set()
        ended = loop.time()
        await recorder.wait(3)
        third = loop.time() - ended
        await settle(0.8)
        await scheduler.stop()
        return second, third, len(recorder.seen)
    second, third, passes = run(scenario())
    assert 0.35 <= second < 0.6  # the soonest wanted, not the first asked nor one per wake-up
    assert third >= 0.45  # after the delay asked for, not at once when the pass ended
    assert passes == 3


def test_signatures_made_with_a_key_within_the_count_delay_bring_one_pass_after_it():
    import kopf

    from keyroom.controllers import signingkey

    async def scenario():
        recorder = Recorder()
        scheduler = Scheduler("SigningKey", recorder)
        memo = kopf.Memo(signing_keys=scheduler)
        scheduler.start()
        scheduler.seen(body("k"))
        await recorder.wait(1)
        loop = asyncio.get_running_loop()
        began = loop.time()
        for _ in range(5):
            signingkey.wake(memo, "team-a", "k")
            await asyncio.sleep(0.1)
        await recorder.wait(2)
        waited = loop.time() - began
        await settle(0.5)
        await scheduler.stop()
        return waited, len(recorder.seen)
    waited, passes = run(scenario())
    assert waited >= signingkey.SIGNATURE_COUNT_DELAY - 0.05 and passes == 2

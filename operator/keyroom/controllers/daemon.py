"""What the per-object reconcilers of SigningKeys and Certificates share.

Each object needs a pass now and then: when it changes, when something it
depends on changes, and at moments its own record names (a window edge, a
renewal, a destruction falling due). One Kopf daemon per object did that with
an asyncio task, a stopper and a live body per object, about 100 KiB each:
10,000 keys would have needed a gigabyte. :class:`Scheduler` does it for a
whole kind with one task: the last body seen of each object (compact JSON),
a heap of due times, and a bounded number of passes in flight, which is also
the backpressure on the signer (a flood of new keys queues here instead of
timing out there). An object is never in two passes at once; a change seen
during a pass runs one more pass after it.
"""
from __future__ import annotations

import asyncio
import datetime
import heapq
import itertools
import json
import logging
import time
from typing import Awaitable, Callable, Mapping

import kubernetes
import urllib3

from keyroom import conditions
from keyroom.controllers import kube

logger = logging.getLogger("keyroom.scheduler")

Key = tuple[str, str]  # (namespace, name)
#: one pass over an object: returns the wall-clock moment of its next pass (None: only when woken)
Reconcile = Callable[[dict], Awaitable["datetime.datetime | None"]]


class Retry(Exception):
    """A pass failed in a way that passes by itself: the scheduler tries again after a growing delay."""


class Stalled(Exception):
    """A pass failed in a way only a change fixes: the next pass waits for a wake-up."""


class Scheduler:
    """Passes over the objects of one kind, each when woken or when its due time comes.

    ``reconcile(body)`` does one pass; it returns when the next is due by the
    clock, raises :class:`Retry` for a backoff (1 s doubling to ``max_backoff``)
    or :class:`Stalled` to wait for a change. Any other exception is logged and
    retried like :class:`Retry`, so one bad object never stops the others.
    """

    def __init__(self, kind: str, reconcile: Reconcile, *, concurrency: int = 16,
                 max_backoff: float = 60.0) -> None:
        self.kind = kind
        self._reconcile = reconcile
        self._concurrency = concurrency
        self._max_backoff = max_backoff
        self._bodies: dict[Key, bytes] = {}
        self._due: dict[Key, float] = {}  # monotonic moment of the next pass, for objects not in a pass
        self._heap: list[tuple[float, int, Key]] = []
        self._order = itertools.count()
        self._running: set[Key] = set()
        self._again: dict[Key, float] = {}  # woken during their pass: the monotonic moment wanted for the next
        self._backoff: dict[Key, float] = {}
        self._own: dict[Key, str] = {}  # the resourceVersion of each object's last write by a pass
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._passes: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ what the event handlers call

    def seen(self, body: Mapping, *, wake: bool = True) -> None:
        """Keep ``body`` (the newest version of an object) as the one its next pass reads; wake it unless told not to.

        The version a pass wrote itself (see :meth:`written`) wakes nothing: the
        pass already decided on it. Any other write, a forged status included,
        brings a pass that shows the signer's record again.
        """
        meta = body["metadata"]
        place = (meta["namespace"], meta["name"])
        if self._own.get(place) == meta.get("resourceVersion"):
            wake = False
        slim = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                "metadata": {k: v for k, v in meta.items() if k != "managedFields"},
                "spec": body.get("spec") or {}, "status": body.get("status") or {}}
        self._bodies[place] = json.dumps(slim, separators=(",", ":"), default=dict).encode()
        if self._task is None:
            self.start()
        if wake:
            self.wake(place)

    def written(self, obj: Mapping) -> None:
        """A pass wrote ``obj`` (the object as the API server returned it): its event needs no other pass."""
        meta = obj["metadata"]
        if (meta["namespace"], meta["name"]) in self._bodies:
            self._own[(meta["namespace"], meta["name"])] = meta["resourceVersion"]

    def forget(self, key: Key) -> None:
        """The object is gone (or being deleted): no more passes; one in flight finishes and is not repeated."""
        self._own.pop(key, None)
        self._bodies.pop(key, None)
        self._due.pop(key, None)
        self._again.pop(key, None)
        self._backoff.pop(key, None)

    def wake(self, key: Key, *, after: float = 0.0) -> None:
        """A pass over ``key`` within ``after`` seconds (and after the one in flight, if any).

        Wake-ups coalesce: however many come before the pass, it runs once, at
        the soonest moment any of them asked for.
        """
        if key not in self._bodies:
            return
        at = time.monotonic() + after
        if key in self._running:
            self._again[key] = min(at, self._again.get(key, at))
        else:
            self._schedule(key, at)

    def __len__(self) -> int:
        return len(self._bodies)

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Start the passes; :meth:`seen` does it for the first object.

        Started from Kopf's event handler, the task runs in Kopf's context for
        objects, where ``kopf.info`` and ``kopf.warn`` post Events (a task started by
        a startup handler could not post them).
        """
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"keyroom-{self.kind}-scheduler")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._passes) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    def _schedule(self, key: Key, at: float) -> None:
        """Set ``key``'s next pass to ``at`` unless one is already due sooner."""
        if self._due.get(key, float("inf")) <= at:
            return
        self._due[key] = at
        heapq.heappush(self._heap, (at, next(self._order), key))
        if len(self._heap) > 2 * len(self._due) + 64:
            # entries superseded by sooner passes (a busy key woken often, its next due far ahead) are dropped
            # here rather than kept until their time comes
            self._heap = [entry for entry in self._heap if self._due.get(entry[2]) == entry[0]]
            heapq.heapify(self._heap)
        self._changed.set()

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self._concurrency)
        while True:
            self._changed.clear()
            while self._heap and self._heap[0][0] <= time.monotonic():
                at, _, key = heapq.heappop(self._heap)
                if self._due.get(key) != at:
                    continue  # superseded by a sooner pass, or forgotten
                await slots.acquire()  # backpressure: at most `concurrency` passes in flight
                if self._due.get(key) != at:  # forgotten or rescheduled while waiting for a slot
                    slots.release()
                    continue
                del self._due[key]
                self._running.add(key)
                task = asyncio.get_running_loop().create_task(self._pass(key, slots))
                self._passes.add(task)
                task.add_done_callback(self._passes.discard)
            timeout = max(0.0, self._heap[0][0] - time.monotonic()) if self._heap else None
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def _pass(self, key: Key, slots: asyncio.Semaphore) -> None:
        delay: float | None = None
        try:
            raw = self._bodies.get(key)
            if raw is None:
                return
            try:
                due = await self._reconcile(json.loads(raw))
                self._backoff.pop(key, None)
                if due is not None:
                    delay = max(0.0, (due - datetime.datetime.now(datetime.timezone.utc)).total_seconds())
            except Stalled:
                self._backoff.pop(key, None)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                delay = self._backoff.get(key, 1.0)
                self._backoff[key] = min(delay * 2, self._max_backoff)
                if isinstance(error, (kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError)):
                    logger.warning("%s %s/%s: the API server failed (%s); trying again in %.0fs", self.kind, *key,
                                   type(error).__name__, delay)
                elif not isinstance(error, Retry):
                    logger.exception("%s %s/%s: the pass failed; trying again in %.0fs", self.kind, *key, delay)
        finally:
            self._running.discard(key)
            slots.release()
            if key in self._bodies:
                # the sooner of a wake-up during the pass and the pass's own next moment: that pass reads
                # everything afresh and sets the one after it
                wanted = [at for at in (self._again.pop(key, None),
                                        None if delay is None else time.monotonic() + delay) if at is not None]
                if wanted:
                    self._schedule(key, min(wanted))


async def write_first_status(*, plural: str, body: Mapping, message: str,
                             written: Callable[[Mapping], None] | None = None) -> Mapping:
    """Mark an object as being reconciled before anything else happens to it (see conditions.first_status).

    Returns the object as it now is (``body`` itself when it had a status), for
    the rest of the pass to decide on: its status is then computed from the
    version just written, not refused as stale. ``written`` is told of the write.

    The write is conditional on the resourceVersion it was decided on: a body
    without status may be stale, and a newer version's status must not be
    overwritten. When the object changed meanwhile (Kopf's own finalizer or
    annotations, say), it is read again and the first status written only if
    it still has none.
    """
    current: Mapping = body
    for _ in range(5):
        if not conditions.needs_first_status(current.get("status")):
            return current
        meta = current["metadata"]
        try:
            fresh = await kube.patch_status(plural=plural, namespace=meta["namespace"], name=meta["name"],
                                            status=conditions.first_status(generation=meta["generation"],
                                                                           message=message),
                                            resource_version=meta.get("resourceVersion"))
            if written is not None:
                written(fresh)
            return fresh
        except kube.Conflict:
            fresh = await kube.get(plural=plural, namespace=meta["namespace"], name=meta["name"])
            if fresh is None:
                return current
            current = fresh
    return current

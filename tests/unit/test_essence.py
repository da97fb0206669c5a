"""The operator's diff base and progress storage: Kopf's essence of an object, built and cleared of progress
annotations without copying what they drop or keep unchanged."""
from __future__ import annotations

import copy

import kopf
import pytest
from kopf._cogs.structs import bodies

from keyroom.controllers import essence

PREFIX = "keyroom.dev"


class _NoCopy(dict):
    """A stanza that must not be copied: deep-copying it fails the test."""

    def __deepcopy__(self, memo):
        raise AssertionError("this stanza was deep-copied")


def _body(**status) -> dict:
    return {
        "apiVersion": "keyroom.dev/v1alpha1", "kind": "SignRequest",
        "metadata": {"name": "r", "namespace": "team-a", "uid": "u", "resourceVersion": "7",
                     "labels": {"release": "1.4"},
                     "annotations": {"keep": "me", f"{PREFIX}/last-handled-configuration": "{}",
                                     "kubectl.kubernetes.io/last-applied-configuration": "{}",
                                     f"{PREFIX}/request_changed": "{}"},
                     "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]},
        "spec": {"keyRef": {"name": "k"}, "digests": [{"name": f"f{n}", "value": "ab" * 32} for n in range(3)]},
        "status": {"phase": "Signed", "signatures": [{"name": "f0", "value": "c2ln"}], **status},
    }


def _storages():
    return (essence.DiffBaseStorage(prefix=PREFIX, key="last-handled-configuration"),
            kopf.AnnotationsDiffBaseStorage(prefix=PREFIX, key="last-handled-configuration"))


@pytest.mark.parametrize("extra_fields", [None, [], ["status.phase"], ["status"], ["metadata.managedFields"],
                                          ["metadata"], ["spec.keyRef"]])
def test_the_essence_is_kopfs_own(extra_fields):
    ours, kopfs = _storages()
    body = bodies.Body(_body())
    assert ours.build(body=body, extra_fields=extra_fields) == kopfs.build(body=body, extra_fields=extra_fields)


def test_the_essence_of_a_body_without_status_or_metadata_is_kopfs_own():
    ours, kopfs = _storages()
    for raw in ({"spec": {"a": 1}}, {"metadata": {"name": "x"}, "spec": {}}, {}):
        assert ours.build(body=bodies.Body(raw)) == kopfs.build(body=bodies.Body(raw))


def test_status_and_managed_fields_are_not_copied_unless_a_handler_asks_for_them():
    ours, kopfs = _storages()
    raw = _body()
    raw["status"] = _NoCopy(raw["status"])
    raw["metadata"]["managedFields"] = [_NoCopy(raw["metadata"]["managedFields"][0])]
    built = ours.build(body=bodies.Body(raw))
    assert "status" not in built and built["spec"] == raw["spec"]
    with pytest.raises(AssertionError, match="deep-copied"):  # Kopf's own copies them all
        kopfs.build(body=bodies.Body(raw))
    with pytest.raises(AssertionError, match="deep-copied"):  # a handler watching a status field gets it
        ours.build(body=bodies.Body(raw), extra_fields=["status.phase"])


def test_the_essence_does_not_change_with_the_body_it_was_built_from():
    ours, _ = _storages()
    raw = _body()
    built = ours.build(body=bodies.Body(raw))
    before = copy.deepcopy(built)
    raw["spec"]["digests"][0]["value"] = "cd" * 32
    raw["metadata"]["labels"]["release"] = "2.0"
    assert built == before


@pytest.mark.parametrize("raw", [
    {"spec": {"a": [1, 2]}, "metadata": {"labels": {"x": "y"}, "annotations": {f"{PREFIX}/request_changed": "{}",
                                                                                "keep": "me"}}},
    {"spec": {}, "metadata": {"annotations": {f"{PREFIX}/request_changed": "{}"}}},
    {"spec": {}, "metadata": {"labels": {}}, "status": {}},
    {"spec": {"a": 1}},
    {},
])
def test_clearing_progress_annotations_is_kopfs_own_and_leaves_the_essence_as_it_was(raw):
    ours, kopfs = essence.ProgressStorage(prefix=PREFIX), kopf.AnnotationsProgressStorage(prefix=PREFIX)
    before = copy.deepcopy(raw)
    assert ours.clear(essence=raw) == kopfs.clear(essence=copy.deepcopy(raw))
    assert raw == before


def test_clearing_progress_annotations_copies_no_spec():
    raw = {"spec": _NoCopy(a=1), "metadata": {"annotations": {f"{PREFIX}/request_changed": "{}", "keep": "me"}}}
    cleared = essence.ProgressStorage(prefix=PREFIX).clear(essence=raw)
    assert cleared == {"spec": {"a": 1}, "metadata": {"annotations": {"keep": "me"}}}
    with pytest.raises(AssertionError, match="deep-copied"):
        kopf.AnnotationsProgressStorage(prefix=PREFIX).clear(essence=raw)


def test_a_detached_context_posts_events_but_holds_nothing_of_the_event_being_handled():
    import asyncio
    import contextvars

    from kopf._core.actions import execution
    from kopf._core.engines import posting

    handled = contextvars.ContextVar("handled")  # stands for Kopf's cause, handler and the like

    async def scenario():
        queue: asyncio.Queue = asyncio.Queue()
        posting.event_queue_loop_var.set(asyncio.get_running_loop())
        posting.event_queue_var.set(queue)
        posting.settings_var.set(kopf.OperatorSettings())
        execution.cause_var.set("the cause with the whole body")
        handled.set("the event's body")
        detached = essence.detached_context()
        assert execution.cause_var not in detached and handled not in detached
        body = {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SignRequest",
                "metadata": {"name": "r", "namespace": "team-a", "uid": "u"}}
        detached.run(kopf.info, body, reason="Expired", message="no approval in time")
        event = await asyncio.wait_for(queue.get(), 1)
        assert (event.ref["name"], event.reason, event.message) == ("r", "Expired", "no approval in time")

    asyncio.run(scenario())

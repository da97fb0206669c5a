"""The operator's log as deployed: Kopf's per-event handler successes are left out, nothing else."""
from __future__ import annotations

import logging

import kopf
from kopf._core.actions import loggers

from keyroom.operator import quiet_watch_successes

BODY = {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningKey",
        "metadata": {"namespace": "team-a", "name": "release", "uid": "u-1"}}


def test_only_the_watch_handlers_successes_are_left_out(caplog):
    settings = kopf.OperatorSettings()
    local = loggers.LocalObjectLogger(body=kopf.Body(BODY), settings=settings)  # what Kopf uses for event handlers
    posted = loggers.ObjectLogger(body=kopf.Body(BODY), settings=settings)
    kopf_objects = logging.getLogger("kopf.objects")
    kopf_objects.addFilter(quiet_watch_successes)
    try:
        with caplog.at_level(logging.DEBUG, logger="kopf.objects"):
            local.info("Handler 'signing_key_seen' succeeded.")
            local.error("Handler 'signing_key_seen' failed with an exception. Will ignore.")
            local.warning("Handler 'signing_key_seen' succeeded.")  # not an INFO: kept
            local.info("Something else happened.")
            posted.info("Handler 'delete_signing_key' succeeded.")  # a changing handler's, posted as an Event: kept
    finally:
        kopf_objects.removeFilter(quiet_watch_successes)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", "Handler 'signing_key_seen' failed with an exception. Will ignore."),
        ("WARNING", "Handler 'signing_key_seen' succeeded."),
        ("INFO", "Something else happened."),
        ("INFO", "Handler 'delete_signing_key' succeeded."),
    ]

"""Webhook notifications: when a request is announced, what the payload holds, the bounded queue."""
from __future__ import annotations

import pytest

from keyroom.controllers import notify


def _status(phase: str, reason: str, summary: str = "0/1") -> dict:
    return {"phase": phase, "approvalSummary": summary, "message": "waits",
            "conditions": [{"type": "Ready", "status": "False", "reason": reason}]}


def _body(name: str = "sr-1", uid: str = "u-1", **status) -> dict:
    return {"metadata": {"namespace": "team-a", "name": name, "uid": uid},
            "spec": {"keyRef": {"name": "release"}, "requester": {"username": "alice", "groups": ["devs"]},
                     "reason": "1.0", "format": "cms", "digests": [{"name": "a", "value": "ab" * 32}]},
            "status": status or _status("Pending", "AwaitingApproval")}


@pytest.mark.parametrize("before, after, expected", [
    ({}, _status("Pending", "AwaitingApproval"), "AwaitingApproval"),
    (_status("Pending", "KeyOffline"), _status("Pending", "AwaitingApproval"), "AwaitingApproval"),
    (_status("Pending", "AwaitingApproval"), _status("Pending", "AwaitingApproval", "1/2"), None),
    (_status("Pending", "AwaitingApproval"), _status("Pending", "KeyOffline"), None),
    (_status("Pending", "AwaitingApproval"), _status("Signed", "Signed", "1/1"), "Finished"),
    (_status("Pending", "AwaitingApproval"), _status("Denied", "Denied"), "Finished"),
    ({}, _status("Expired", "Expired", "0/2"), "Finished"),
    ({}, _status("Signed", "Signed", "0/0"), None),            # no approval needed: approvers are not told
    ({}, _status("Failed", "NoPolicy", ""), None),
    (_status("Signed", "Signed", "1/1"), _status("Signed", "Signed", "1/1"), None),
])
def test_a_request_is_announced_when_it_starts_waiting_for_approval_and_when_it_finishes(before, after, expected):
    assert notify.transition(before, after) == expected


def test_the_payload_names_the_request_and_holds_no_digest_values():
    sent = notify.payload(_body(), event="AwaitingApproval")
    assert sent["approveCommand"] == "kubectl keyroom approve sr-1 -n team-a"
    assert (sent["digests"], sent["format"], sent["waitingFor"], sent["requester"]) == (1, "cms", "waits", "alice")
    assert "ab" * 32 not in repr(sent)


def test_each_request_and_event_is_queued_once_and_a_full_queue_drops_the_oldest(caplog):
    notifier = notify.Notifier(secret=("keyroom-system", "keyroom-notify-webhook"), queue_size=2)
    for uid in ("u-1", "u-1", "u-2", "u-3"):
        notifier.notify(_body(name=uid, uid=uid), event="AwaitingApproval")
    assert [notifier.queue.get_nowait()["request"]["uid"] for _ in range(notifier.queue.qsize())] == ["u-2", "u-3"]
    assert "dropped AwaitingApproval of team-a/u-1" in caplog.text


@pytest.mark.parametrize("setting", ["keyroom-system", "/name", "a/b/c", "ns/"])
def test_a_malformed_secret_setting_says_what_it_wants(setting):
    with pytest.raises(ValueError, match="NAMESPACE/NAME"):
        notify.parse_secret_setting(setting)


def test_retries_back_off_exponentially_up_to_a_minute():
    delays = [notify.retry_delay(attempt) for attempt in (1, 2, 3, 10)]
    assert 0.8 <= delays[0] <= 1.2 and 1.6 <= delays[1] <= 2.4 and 3.2 <= delays[2] <= 4.8
    assert delays[3] <= notify.MAX_RETRY * 1.2


def test_the_worker_outlives_a_notification_it_cannot_send(caplog):
    import asyncio

    def broken(namespace: str, name: str) -> notify.Webhook:
        raise RuntimeError("https://user:secret@hooks.example/x")

    async def scenario() -> None:
        notifier = notify.Notifier(secret=("keyroom-system", "keyroom-notify-webhook"), read_secret=broken)
        worker = asyncio.create_task(notifier.run())
        notifier.notify(_body(uid="u-1"), event="AwaitingApproval")
        notifier.notify(_body(uid="u-2"), event="AwaitingApproval")
        while not notifier.queue.empty():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not worker.done()
        worker.cancel()

    asyncio.run(scenario())
    assert caplog.text.count("dropped: RuntimeError") == 2 and "secret@" not in caplog.text

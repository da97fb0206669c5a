"""The operator's --metrics endpoint and the token audit's finding Events (pure parts)."""
from __future__ import annotations

import socket
import urllib.request

import pytest

from keyroom import metrics
from keyroom.controllers.tokenaudit import finding_event


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_metrics_are_served_at_the_url_given():
    port = _free_port()
    metrics.serve(f"http://127.0.0.1:{port}/metrics")
    metrics.TOKEN_UNDECLARED_OBJECTS.set(2)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "keyroom_token_undeclared_objects 2.0" in text


@pytest.mark.parametrize("url", ["127.0.0.1:9090", "https://0.0.0.0:9090/metrics", "http://0.0.0.0/metrics"])
def test_a_metrics_url_without_http_and_a_port_is_refused(url):
    with pytest.raises(ValueError):
        metrics.serve(url)


def test_a_keyroom_object_finding_is_an_event_on_its_namespace_and_a_foreign_one_is_none():
    item = {"label": "keyroom:team-a/gone:v2:uid-1",
            "key": {"namespace": "team-a", "name": "gone", "uid": "uid-1", "version": 2}}
    event = finding_event(item)
    assert event["metadata"]["namespace"] == "team-a" and event["involvedObject"] == {
        "apiVersion": "v1", "kind": "Namespace", "name": "team-a", "namespace": "team-a"}  # else refused (422)
    assert event["type"] == "Warning" and event["reason"] == "UndeclaredKeyObject" and "gone" in event["message"]
    assert finding_event({"label": "someone-else", "key": None}) is None


def test_an_event_the_api_server_refuses_neither_skips_the_audit_nor_counts_as_reported(monkeypatch):
    import asyncio

    import kubernetes

    from keyroom.controllers import kube, tokenaudit

    gone = {"label": "keyroom:gone-team/gone:v1:uid-1",
            "key": {"namespace": "gone-team", "name": "gone", "uid": "uid-1", "version": 1}}
    here = {"label": "keyroom:team-a/old:v1:uid-2",
            "key": {"namespace": "team-a", "name": "old", "uid": "uid-2", "version": 1}}
    posted = []

    def post(event):
        if event["metadata"]["namespace"] == "gone-team":
            raise kubernetes.client.ApiException(status=404, reason="Not Found")
        posted.append(event)

    class Signer:
        async def list_objects(self):
            return [gone, here]

    async def no_keys(**_):
        return []

    monkeypatch.setattr(tokenaudit, "_post_event", post)
    monkeypatch.setattr(kube, "list_all", no_keys)
    reported: set[str] = set()
    assert asyncio.run(tokenaudit.audit_once(Signer(), reported)) == sorted([gone["label"], here["label"]])
    assert [e["metadata"]["namespace"] for e in posted] == ["team-a"] and reported == {here["label"]}

"""The SigningPolicy status a reconcile writes, computed without a cluster."""
from __future__ import annotations

from keyroom import conditions
from keyroom.controllers.policy import desired_status

SPEC = {"keySelector": {"matchLabels": {"team": "a"}}}


def test_status_lists_matched_keys_and_is_ready():
    status = desired_status(spec=SPEC, generation=3, status={}, keys=[("k1", {"team": "a"}), ("k2", {})])
    assert status["matchedKeys"] == ["k1"] and status["observedGeneration"] == 3
    ready = conditions.find(status["conditions"], "Ready")
    assert ready["status"] == "True" and ready["reason"] == "KeysSelected" and ready["observedGeneration"] == 3
    assert conditions.find(status["conditions"], "Stalled") is None


def test_missing_named_keys_are_reported():
    status = desired_status(spec={"keys": ["k1", "gone"]}, generation=1, status={}, keys=[("k1", {})])
    assert status["matchedKeys"] == ["k1"]
    assert "not found: gone" in conditions.find(status["conditions"], "Ready")["message"]


def test_recomputing_an_unchanged_status_changes_nothing():
    first = desired_status(spec=SPEC, generation=1, status={}, keys=[("k1", {"team": "a"})])
    second = desired_status(spec=SPEC, generation=1, status=first, keys=[("k1", {"team": "a"})])
    assert second == first


def test_the_status_stays_bounded_whatever_the_number_of_keys():
    keys = [(f"key-{index:05d}", {"team": "a"}) for index in range(5000)]
    status = desired_status(spec={"keySelector": {"matchLabels": {"team": "a"}}}, generation=1, status={}, keys=keys)
    assert status["matchedKeyCount"] == 5000
    assert status["matchedKeys"] == [name for name, _ in keys[:100]]
    assert status["message"].startswith("governs 5000 key(s): key-00000, key-00001")
    assert status["message"].endswith("and 4990 more") and len(status["message"]) < 4096
    # the same keys in another order give the same status, so a re-list writes nothing
    again = desired_status(spec={"keySelector": {"matchLabels": {"team": "a"}}}, generation=1, status=status,
                           keys=list(reversed(keys)))
    assert again == status

"""Conditions keep their transition time while unchanged; Reconciling/Stalled are abnormal-true."""
from __future__ import annotations

from keyroom import conditions


def _ready(status: bool, reason: str = "R", generation: int = 1) -> dict:
    return conditions.condition("Ready", status, reason, "m", generation=generation)


def test_a_new_condition_gets_the_current_time():
    merged = conditions.merge([], [_ready(True)], now="2026-01-01T00:00:00Z")
    assert merged == [{"type": "Ready", "status": "True", "reason": "R", "message": "m",
                       "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"}]


def test_an_unchanged_status_keeps_its_transition_time():
    first = conditions.merge([], [_ready(True)], now="2026-01-01T00:00:00Z")
    second = conditions.merge(first, [_ready(True, "Other", generation=2)], now="2026-02-01T00:00:00Z")
    assert second[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert second[0]["reason"] == "Other" and second[0]["observedGeneration"] == 2


def test_a_changed_status_moves_the_transition_time():
    first = conditions.merge([], [_ready(True)], now="2026-01-01T00:00:00Z")
    second = conditions.merge(first, [_ready(False)], now="2026-02-01T00:00:00Z")
    assert second[0]["status"] == "False" and second[0]["lastTransitionTime"] == "2026-02-01T00:00:00Z"


def test_abnormal_true_conditions_are_removed_when_false():
    stalled = conditions.condition("Stalled", True, "HSMUnreachable", "m", generation=1)
    merged = conditions.merge([], [stalled, _ready(False)])
    assert {c["type"] for c in merged} == {"Stalled", "Ready"}
    cleared = conditions.merge(merged, [conditions.condition("Stalled", False, "Ok", "", generation=1)])
    assert [c["type"] for c in cleared] == ["Ready"]


def test_untouched_conditions_are_kept():
    online = conditions.condition("Online", True, "InWindow", "m", generation=1)
    merged = conditions.merge([dict(online, lastTransitionTime="t")], [_ready(True)])
    assert conditions.find(merged, "Online")["lastTransitionTime"] == "t"

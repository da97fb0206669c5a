"""Which policies govern which keys: Kubernetes label-selector semantics, fail closed."""
from __future__ import annotations

import pytest

from keyroom import policy


@pytest.mark.parametrize("selector,labels,expected", [
    ({}, {}, True),
    ({}, {"a": "1"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
    ({"matchLabels": {"a": "1"}}, {}, False),
    ({"matchLabels": {"a": "1", "b": "2"}}, {"a": "1"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {}, False),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {"a": "1"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"b": "1"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"b": "1"}, True),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": "1"}, False),
    ({"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]}, {"a": "1"}, False),
])
def test_selector_matches(selector, labels, expected):
    assert policy.selector_matches(selector, labels) is expected


def test_unknown_operator_is_an_error():
    with pytest.raises(ValueError, match="Sometimes"):
        policy.selector_matches({"matchExpressions": [{"key": "a", "operator": "Sometimes"}]}, {"a": "1"})


def test_keys_by_name():
    spec = {"keys": ["release", "nightly"]}
    assert policy.matched_keys(spec, [("release", {}), ("other", {}), ("nightly", None)]) == ["nightly", "release"]


def test_a_policy_naming_no_keys_selects_none():
    assert policy.matched_keys({}, [("release", {"a": "1"})]) == []


def test_selector_policy():
    spec = {"keySelector": {"matchLabels": {"purpose": "release"}}}
    keys = [("r1", {"purpose": "release"}), ("n1", {"purpose": "nightly"}), ("bare", None)]
    assert policy.matched_keys(spec, keys) == ["r1"]

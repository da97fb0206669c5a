"""Small builders for OpenAPI v3 schemas with CEL rules.

The keyroom API is written once, in Python, with these builders; the CRDs in
``crds/`` are generated from it. Every builder takes the field's description
first, because the description is what ``kubectl explain`` teaches the user.
"""
from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

#: Go-style durations plus ``d`` for days: ``36h``, ``90m``, ``90d``, ``1d12h``, ``1.5h``.
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h|d))+$"
#: A Kubernetes object name (DNS-1123 subdomain).
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
#: The most digits of a duration's whole numbers: 99999d is 273 years, and the 32 characters of a duration hold at
#: most five such parts, so that now plus any duration stays inside the calendar (year 9999) of every reader.
DURATION_DIGITS = 5
#: CEL: characters that make text lie on a terminal or a screen: C0 and C1 controls (newline, NUL, ANSI escapes
#: ...), DEL, and the bidirectional overrides and isolates that reorder what is shown (U+202A-E, U+2066-9).
_DECEPTIVE = r"[\\x00-\\x1f\\x7f-\\x9f\\x{202a}-\\x{202e}\\x{2066}-\\x{2069}]"


def rule(expression: str, message: str, *, field_path: str | None = None,
         reason: str | None = None, optional_old_self: bool = False) -> Schema:
    """One CEL validation rule with the message a user sees when it fails."""
    result: Schema = {"rule": expression, "message": message}
    if field_path:
        result["fieldPath"] = field_path
    if reason:
        result["reason"] = reason
    if optional_old_self:
        result["optionalOldSelf"] = True
    return result


def immutable(what: str) -> Schema:
    return rule("self == oldSelf", f"{what} is immutable; create a new object instead")


def _finish(schema: Schema, description: str, rules: list[Schema] | None, default: Any) -> Schema:
    schema["description"] = description
    if rules:
        schema["x-kubernetes-validations"] = rules
    if default is not None:
        schema["default"] = default
    return schema


def string(description: str, *, enum: list[str] | None = None, pattern: str | None = None,
           min_length: int | None = None, max_length: int | None = None, format: str | None = None,
           default: str | None = None, rules: list[Schema] | None = None) -> Schema:
    schema: Schema = {"type": "string"}
    if enum:
        schema["enum"] = enum
    if pattern:
        schema["pattern"] = pattern
    if min_length is not None:
        schema["minLength"] = min_length
    if max_length is not None:
        schema["maxLength"] = max_length
    if format:
        schema["format"] = format
    return _finish(schema, description, rules, default)


def printable(what: str) -> Schema:
    """A rule that keeps control characters and bidirectional overrides out of text people read."""
    return rule(f"!self.matches('{_DECEPTIVE}')",
                f"{what} must not contain control characters (newlines, NUL, ANSI escapes) or bidirectional "
                "overrides: they change what approvers and auditors see")


def duration(description: str, *, default: str | None = None, rules: list[Schema] | None = None,
             at_least_a_second: bool = False) -> Schema:
    """A duration; ``at_least_a_second`` where zero would mean "all the time" (rotate, expire at once)."""
    bounds = [rule(f"!self.matches('(^|[a-z])[0-9]{{{DURATION_DIGITS + 1}}}')",
                   f"a duration's numbers have at most {DURATION_DIGITS} digits (99999d is 273 years): "
                   "use a larger unit")]
    if at_least_a_second:
        bounds.append(rule("self.matches('(^|[a-z])0*[1-9][0-9]*([.][0-9]+)?(s|m|h|d)($|[0-9])')",
                           "must be at least one second"))
    return string(description + " A duration such as 90m, 36h, 90d or 1d12h.",
                  pattern=DURATION_PATTERN, max_length=32, default=default, rules=bounds + (rules or []))


def timestamp(description: str, *, rules: list[Schema] | None = None) -> Schema:
    return string(description + " RFC 3339, e.g. 2026-12-01T10:00:00Z.", format="date-time",
                  max_length=64, rules=rules)


def name(description: str, *, rules: list[Schema] | None = None) -> Schema:
    return string(description, pattern=NAME_PATTERN, min_length=1, max_length=253, rules=rules)


def integer(description: str, *, minimum: int | None = None, maximum: int | None = None,
            default: int | None = None, rules: list[Schema] | None = None) -> Schema:
    schema: Schema = {"type": "integer", "format": "int64"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return _finish(schema, description, rules, default)


def boolean(description: str, *, default: bool | None = None) -> Schema:
    return _finish({"type": "boolean"}, description, None, default)


def array(description: str, items: Schema, *, min_items: int | None = None, max_items: int,
          list_type: str | None = None, map_keys: list[str] | None = None,
          default: list | None = None, rules: list[Schema] | None = None) -> Schema:
    """A list; ``max_items`` is mandatory because CEL cost and etcd both need a bound."""
    schema: Schema = {"type": "array", "items": items, "maxItems": max_items}
    if min_items is not None:
        schema["minItems"] = min_items
    if list_type:
        schema["x-kubernetes-list-type"] = list_type
    if map_keys:
        schema["x-kubernetes-list-map-keys"] = map_keys
    return _finish(schema, description, rules, default)


def string_list(description: str, *, max_items: int = 100, item_max_length: int = 253,
                enum: list[str] | None = None, pattern: str | None = None,
                min_items: int | None = None, default: list | None = None,
                item_rules: list[Schema] | None = None) -> Schema:
    return array(description, string("", enum=enum, pattern=pattern, min_length=1, max_length=item_max_length,
                                     rules=item_rules),
                 min_items=min_items, max_items=max_items, list_type="set", default=default)


def obj(description: str, properties: dict[str, Schema] | None = None, *, required: list[str] | None = None,
        rules: list[Schema] | None = None, default: dict | None = None,
        additional: Schema | None = None, max_properties: int | None = None) -> Schema:
    schema: Schema = {"type": "object"}
    if properties is not None:
        schema["properties"] = properties
    if additional is not None:
        schema["additionalProperties"] = additional
    if max_properties is not None:
        schema["maxProperties"] = max_properties
    if required:
        schema["required"] = required
    return _finish(schema, description, rules, default)


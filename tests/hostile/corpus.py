"""Reading the hostile corpus (``corpus.yaml``): cases, their documents and their patches.

A case names who does what to which kind, and the refusal it must get::

    name, category, kind, identity,
    verb: create | update | patch-json | patch-merge | status | create-real
    base (a name from ``bases``; default the kind) with ``set`` (dotted path -> value, list indices as numbers)
    and ``unset`` (paths), or a whole ``object``; ``patch`` for the patch verbs and status
    target: which real object an update or patch acts on (default: the kind's)
    expect: {refused: true, field: ..., message_contains: ...}
            or, for what admission cannot see, {refused: false, outcome: {...}}

Long or repeated values are written with two small generators, so that the
file stays readable: ``{$repeat: [text, count]}`` is ``text * count`` and
``{$list: [count, template]}`` a list of ``count`` copies of ``template`` in
which ``{i}`` inside strings is the item's index.
"""
from __future__ import annotations

import copy
import pathlib
from typing import Any

import yaml

CORPUS = pathlib.Path(__file__).resolve().parent / "corpus.yaml"
VERBS = {"create", "update", "patch-json", "patch-merge", "status", "create-real"}
KINDS = {"SigningKey", "Certificate", "SigningPolicy", "SignRequest"}


def load(path: pathlib.Path = CORPUS) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def expand(value: Any, index: int | None = None) -> Any:
    """The value with its ``$repeat`` and ``$list`` generators written out."""
    if isinstance(value, dict):
        if set(value) == {"$repeat"}:
            text, count = value["$repeat"]
            return expand(text, index) * count
        if set(value) == {"$list"}:
            count, template = value["$list"]
            return [expand(copy.deepcopy(template), i) for i in range(count)]
        return {k: expand(v, index) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, index) for v in value]
    if isinstance(value, str) and index is not None:
        return value.replace("{i}", str(index))
    return value


def _walk(document: Any, path: str) -> tuple[Any, str | int]:
    *parents, leaf = [int(p) if p.isdigit() else p for p in path.split(".")]
    target = document
    for part in parents:
        target = target[part] if isinstance(part, int) else target.setdefault(part, {})
    return target, leaf


def change(document: dict, *, set: dict | None = None, unset: list | None = None) -> dict:
    """The document with ``set`` paths given values and ``unset`` paths removed (in place, returned)."""
    for path, value in (set or {}).items():
        target, leaf = _walk(document, path)
        if isinstance(leaf, int) and leaf == len(target):
            target.append(expand(value))  # the next item of a list
        else:
            target[leaf] = expand(value)
    for path in unset or []:
        target, leaf = _walk(document, path)
        del target[leaf]
    return document


def document(corpus: dict, case: dict) -> dict:
    """The whole object a create or update case sends."""
    if "object" in case:
        return expand(copy.deepcopy(case["object"]))
    base = copy.deepcopy(corpus["bases"][case.get("base", case["kind"])])
    return change(base, set=case.get("set"), unset=case.get("unset"))

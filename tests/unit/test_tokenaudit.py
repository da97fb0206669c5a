"""Which token objects no SigningKey declares."""
from __future__ import annotations

from keyroom.controllers.tokenaudit import undeclared_objects

UID = "6f1c8e2a-3b4d-4e5f-8a9b-0c1d2e3f4a5b"


def _object(label, namespace="team-a", name="release", uid=UID, version=1, keyroom=True):
    key = {"namespace": namespace, "name": name, "uid": uid, "version": version} if keyroom else None
    return {"label": label, "key": key}


def _key(versions, namespace="team-a", name="release", uid=UID):
    return {"metadata": {"namespace": namespace, "name": name, "uid": uid},
            "status": {"versions": [{"version": v, "state": s} for v, s in versions]}}


def test_declared_versions_are_not_reported():
    assert undeclared_objects([_object("a", version=1), _object("b", version=2)],
                              [_key([(2, "Enabled"), (1, "PendingDestruction")])]) == []


def test_objects_of_deleted_recreated_or_foreign_keys_are_reported():
    objects = [
        _object("old-uid", uid="00000000-0000-4000-8000-000000000000"),  # a deleted and re-created key
        _object("other-team", namespace="team-b"),
        _object("destroyed", version=3),
        _object("foreign", keyroom=False),
    ]
    assert undeclared_objects(objects, [_key([(3, "Destroyed"), (1, "Enabled")])]) == [
        "destroyed", "foreign", "old-uid", "other-team"]

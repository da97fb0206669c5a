"""How key versions are named on the token: labels and IDs (no token needed)."""
from __future__ import annotations

import uuid

import pytest

from keyroom.signer.hsm import HSMError, KeyHandle

UID = "6f1c2b9e-3d4a-4e5f-9a8b-7c6d5e4f3a2b"


def test_label_and_object_id():
    handle = KeyHandle(namespace="team-a", name="release", uid=UID, version=3)
    assert handle.label == f"keyroom:team-a/release:v3:{UID}"
    assert handle.object_id == uuid.UUID(UID).bytes + b"\x00\x00\x00\x03"
    assert len(handle.object_id) == 20


def test_from_label_round_trip():
    handle = KeyHandle(namespace="team-a", name="release.signing-key", uid=UID, version=4294967295)
    assert KeyHandle.from_label(handle.label) == handle
    parsed = KeyHandle.from_label(handle.label)
    assert parsed.object_id == handle.object_id


def test_uid_is_canonicalised():
    upper = KeyHandle(namespace="a", name="b", uid=UID.upper(), version=1)
    assert upper.uid == UID
    assert upper == KeyHandle(namespace="a", name="b", uid=UID, version=1)
    assert KeyHandle.from_label(f"keyroom:a/b:v1:{UID.upper()}") == upper


def test_different_uids_or_versions_give_different_ids():
    base = KeyHandle(namespace="team-a", name="release", uid=UID, version=1)
    recreated = KeyHandle(namespace="team-a", name="release", uid=str(uuid.uuid4()), version=1)
    next_version = KeyHandle(namespace="team-a", name="release", uid=UID, version=2)
    other_team = KeyHandle(namespace="team-b", name="release", uid=str(uuid.uuid4()), version=1)
    ids = {h.object_id for h in (base, recreated, next_version, other_team)}
    labels = {h.label for h in (base, recreated, next_version, other_team)}
    assert len(ids) == 4
    assert len(labels) == 4


@pytest.mark.parametrize("label", [
    "",
    "my-key",
    "keyroom",
    f"keyroom:team-a/release:{UID}",             # no version
    f"keyroom:team-a/release:v1:{UID}:extra",    # trailing data
    f"keyroom:team-a:release:v1:{UID}",          # wrong separator
    "keyroom:team-a/release:v1:not-a-uuid-at-all-but-36-chars-long",
    f"keyroom:team-a/release:v99999999999:{UID}",  # version beyond 32 bits
    f"keyroom:/release:v1:{UID}",                  # empty namespace
    f"KEYROOM:team-a/release:v1:{UID}",            # another prefix
    f"prefix keyroom:team-a/release:v1:{UID}",
])
def test_foreign_labels_are_not_ours(label):
    assert KeyHandle.from_label(label) is None


def test_from_label_of_non_strings():
    assert KeyHandle.from_label(None) is None  # type: ignore[arg-type]
    assert KeyHandle.from_label(b"keyroom:a/b:v1:" + UID.encode()) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [
    dict(namespace="team-a", name="release", uid="not-a-uuid", version=1),
    dict(namespace="team-a", name="release", uid=UID, version=-1),
    dict(namespace="team-a", name="release", uid=UID, version=2 ** 32),
    dict(namespace="team-a", name="release", uid=UID, version=True),
    dict(namespace="team-a", name="release", uid=UID, version="1"),
    dict(namespace="", name="release", uid=UID, version=1),
    dict(namespace="team/a", name="release", uid=UID, version=1),
    dict(namespace="team-a", name="rel:ease", uid=UID, version=1),
    dict(namespace="team-a", name="rel ease", uid=UID, version=1),
])
def test_invalid_handles_are_refused(kwargs):
    with pytest.raises(ValueError):
        KeyHandle(**kwargs)


def test_handles_are_hashable_values():
    a = KeyHandle(namespace="team-a", name="release", uid=UID, version=1)
    b = KeyHandle(namespace="team-a", name="release", uid=UID, version=1)
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.version = 2  # type: ignore[misc]


def test_hsm_error_carries_reason():
    error = HSMError("KeyNotFound", "no private key here")
    assert error.reason == "KeyNotFound"
    assert str(error) == "no private key here"
    assert "KeyNotFound" in repr(error)

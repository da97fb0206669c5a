"""The shipped Argo CD Lua health scripts and Flux healthCheckExprs, on objects captured from the control plane.

tests/fixtures/gitops-states.json holds one object per kind and state as the
API server served it (tests/integration/test_gitops.py captures them again
with KEYROOM_RECAPTURE=1). Each key ends with the verdict kstatus gives it.
"""
from __future__ import annotations

import copy
import json

import pytest

from tests import gitops
from tests.conftest import REPO

STATES = json.loads((REPO / "tests" / "fixtures" / "gitops-states.json").read_text())


@pytest.mark.parametrize("name", sorted(STATES))
def test_argo_and_flux_agree_with_the_state(name):
    expected = name.rsplit("/", 1)[1]
    assert gitops.argo_health(STATES[name])["status"] == gitops.ARGO_FOR_KSTATUS[expected]
    assert gitops.flux_health(STATES[name]) == expected


def test_every_kind_has_a_captured_state_of_each_verdict_it_can_reach():
    reached = {tuple(name.split("/")[::2]) for name in STATES}
    for kind in gitops.KINDS:
        assert (kind, "Current") in reached
    assert {("SignRequest", "InProgress"), ("SignRequest", "Failed"), ("Certificate", "InProgress"),
            ("Certificate", "Failed"), ("SigningKey", "Failed")} <= reached


@pytest.mark.parametrize("kind", gitops.KINDS)
def test_an_object_without_status_is_progressing_not_healthy(kind):
    bare = {"apiVersion": "keyroom.dev/v1alpha1", "kind": kind,
            "metadata": {"name": "new", "namespace": "team-a", "generation": 1}, "spec": {}}
    assert gitops.argo_health(bare)["status"] == "Progressing"
    assert gitops.flux_health(bare) == "InProgress"


@pytest.mark.parametrize("name", sorted(STATES))
def test_a_generation_not_yet_observed_is_progressing(name):
    unseen = copy.deepcopy(STATES[name])
    unseen["metadata"]["generation"] += 1
    assert gitops.argo_health(unseen)["status"] == "Progressing"
    assert gitops.flux_health(unseen) == "InProgress"


def test_argo_messages_say_why():
    waiting = STATES["SignRequest/AwaitingApproval/InProgress"]
    message = gitops.argo_health(waiting)["message"]
    assert message.startswith("AwaitingApproval") and f"kubectl keyroom approve {waiting['metadata']['name']}" in message
    assert gitops.argo_health(STATES["SigningKey/Offline/Current"])["message"].endswith("(offline until 2099-01-01T00:00:00Z)")
    assert "Revoked" in gitops.argo_health(STATES["Certificate/Revoked/Failed"])["message"]


def test_a_consumed_key_is_healthy_with_its_reason():
    verdict = gitops.argo_health(STATES["SigningKey/Consumed/Current"])
    assert verdict["status"] == "Healthy" and verdict["message"].startswith("Consumed")


def test_the_argocd_cm_snippet_carries_exactly_the_shipped_scripts():
    import yaml

    data = yaml.safe_load((gitops.HEALTH_DIR / "argocd-cm.yaml").read_text())["data"]
    assert data == {f"resource.customizations.health.keyroom.dev_{kind}": gitops.lua_script(kind)
                    for kind in gitops.KINDS}

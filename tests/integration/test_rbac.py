"""The shipped roles, bound per team namespace, keep teams in their own rooms; the components get only what they use."""
from __future__ import annotations

import base64

import json
import subprocess

import pytest
import yaml

from keyroom.api import generate, rbac
from keyroom.devenv.fixtures import SYSTEM_NAMESPACE as SYSTEM
from keyroom.signer.audit import CHECKPOINT_NAME, NEW_CHAIN_NAME
from tests.conftest import REPO, apply, get, kubectl, wait_for

pytestmark = pytest.mark.integration

SHA256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def can_i(cluster, identity: str, verb: str, resource: str, namespace: str, *extra: str) -> bool:
    result = kubectl(cluster, "auth", "can-i", verb, resource, "-n", namespace, *extra, identity=identity)
    assert result.stdout.strip() in ("yes", "no"), result.stderr
    return result.stdout.strip() == "yes"


def _key(name: str, namespace: str) -> dict:
    return {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningKey",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"algorithm": "ECDSA_P256"}}


def _policy(name: str, namespace: str) -> dict:
    return {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SigningPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"keys": ["release-key"], "requesters": {"users": ["alice"]}, "requiredApprovals": 0}}


@pytest.mark.parametrize("kind", ["signingkeys", "signingpolicies", "certificates"])
@pytest.mark.parametrize("verb", ["create", "update", "patch", "delete"])
def test_requesters_and_approvers_cannot_write_keys_policies_or_certificates(cluster, kind, verb):
    for identity in ("alice", "bob"):
        assert not can_i(cluster, identity, verb, f"{kind}.keyroom.dev", "team-a")


def test_alice_cannot_create_a_key_or_a_policy(cluster, unique):
    for document in (_key(unique("key"), "team-a"), _policy(unique("policy"), "team-a")):
        result = apply(cluster, document, identity="alice")
        assert result.returncode != 0 and "forbidden" in result.stderr.lower(), result.stderr


def test_alice_cannot_change_an_existing_key(cluster, unique):
    name = unique("key")
    assert apply(cluster, _key(name, "team-a")).returncode == 0
    result = kubectl(cluster, "label", "signingkey", name, "-n", "team-a", "owner=alice", identity="alice")
    assert result.returncode != 0 and "forbidden" in result.stderr.lower(), result.stderr


def test_nobody_but_the_operator_writes_status(cluster):
    for kind in ("signingkeys", "signingpolicies", "signrequests"):
        for identity in ("alice", "bob"):
            assert not can_i(cluster, identity, "patch", f"{kind}.keyroom.dev", "team-a", "--subresource=status")
    assert can_i(cluster, "operator", "patch", "signrequests.keyroom.dev", "team-a", "--subresource=status")


def test_alice_reads_and_requests_in_her_team(cluster):
    assert can_i(cluster, "alice", "list", "signingkeys.keyroom.dev", "team-a")
    assert can_i(cluster, "alice", "create", "signrequests.keyroom.dev", "team-a")
    assert can_i(cluster, "alice", "patch", "signrequests.keyroom.dev", "team-a")  # kubectl apply, GitOps
    assert not can_i(cluster, "alice", "update", "signrequests.keyroom.dev", "team-a")
    assert not can_i(cluster, "alice", "delete", "signrequests.keyroom.dev", "team-a")
    result = kubectl(cluster, "get", "keyroom", "-n", "team-a", identity="alice")
    assert result.returncode == 0, result.stderr


def test_approvers_may_patch_requests_but_not_create_them(cluster):
    assert can_i(cluster, "bob", "patch", "signrequests.keyroom.dev", "team-a")
    assert not can_i(cluster, "bob", "create", "signrequests.keyroom.dev", "team-a")


def test_a_builder_may_attest_and_nothing_else(cluster):
    """keyroom-builder: get, patch and attest SignRequests; no create, list, status, keys or policies."""
    assert can_i(cluster, "ci-builder-b", "attest", "signrequests.keyroom.dev", "team-a")
    assert can_i(cluster, "ci-builder-b", "patch", "signrequests.keyroom.dev", "team-a")
    for verb, resource, extra in [("create", "signrequests", ()), ("list", "signrequests", ()),
                                  ("delete", "signrequests", ()), ("patch", "signrequests", ("--subresource=status",)),
                                  ("get", "signingpolicies", ()), ("get", "signingkeys", ()),
                                  ("patch", "signingpolicies", ())]:
        assert not can_i(cluster, "ci-builder-b", verb, f"{resource}.keyroom.dev", "team-a", *extra), (verb, resource)
    assert not can_i(cluster, "ci-builder-b", "attest", "signrequests.keyroom.dev", "team-b")


def test_only_builders_may_attest(cluster):
    for identity in ("alice", "bob", "dave", "operator", "signer"):
        assert not can_i(cluster, identity, "attest", "signrequests.keyroom.dev", "team-a"), identity


@pytest.mark.parametrize("kind", ["signingkeys", "certificates", "signingpolicies", "signrequests"])
def test_dave_can_neither_read_nor_create_anything_in_team_a(cluster, kind):
    for verb in ("get", "list", "watch", "create"):
        assert not can_i(cluster, "dave", verb, f"{kind}.keyroom.dev", "team-a")
    result = kubectl(cluster, "get", kind, "-n", "team-a", identity="dave")
    assert result.returncode != 0 and "forbidden" in result.stderr.lower()


def test_dave_cannot_request_a_signature_in_team_a(cluster, unique):
    request = {"apiVersion": "keyroom.dev/v1alpha1", "kind": "SignRequest",
               "metadata": {"name": unique("sr"), "namespace": "team-a"},
               "spec": {"keyRef": {"name": "release-key"},
                        "requester": {"username": "dave", "groups": ["team-b-devs", "system:authenticated"]},
                        "digests": [{"name": "a", "value": SHA256}]}}
    result = apply(cluster, request, identity="dave")
    assert result.returncode != 0 and "forbidden" in result.stderr.lower(), result.stderr


def test_dave_works_in_team_b(cluster):
    assert can_i(cluster, "dave", "create", "signrequests.keyroom.dev", "team-b")
    assert not can_i(cluster, "dave", "create", "signingkeys.keyroom.dev", "team-b")


def test_the_shipped_roles_are_not_aggregated_into_edit_or_admin(cluster, unique):
    """Someone bound to the built-in edit and admin roles in team-a can write pods, but no keyroom object."""
    group = unique("team-a-editors")
    for role in ("edit", "admin"):
        assert apply(cluster, {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": f"{group}-{role}", "namespace": "team-a"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}],
        }).returncode == 0
    try:
        def as_editor(verb: str, resource: str) -> bool:
            result = kubectl(cluster, "auth", "can-i", verb, resource, "-n", "team-a",
                             "--as=someone", f"--as-group={group}")
            return result.stdout.strip() == "yes"

        # the bindings are live (the authorizer's cache follows within moments), so a "no" below means something
        wait_for(lambda: as_editor("create", "pods") and as_editor("create", "rolebindings"),
                 what="the edit and admin bindings to take effect")
        for kind in ("signingkeys", "signingpolicies", "certificates", "signrequests"):
            for verb in ("get", "create", "patch", "delete"):
                assert not as_editor(verb, f"{kind}.keyroom.dev"), f"edit/admin grants {verb} {kind}"
    finally:
        for role in ("edit", "admin"):
            kubectl(cluster, "delete", "rolebinding", f"{group}-{role}", "-n", "team-a", "--ignore-not-found")
    roles = kubectl(cluster, "get", "clusterroles", "-l", "app.kubernetes.io/part-of=keyroom", "-o",
                    "jsonpath={.items[*].metadata.labels}")
    assert "aggregate-to" not in roles.stdout


# ---------------------------------------------------------------- the components' own identities

def forbidden(result) -> bool:
    return result.returncode != 0 and "forbidden" in result.stderr.lower()


def _config_map(name: str, namespace: str, data: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": namespace},
            "data": data or {"owner": "someone else"}}


@pytest.fixture
def secrets_and_config_maps(cluster, unique):
    """A Secret and a ConfigMap that are not keyroom's, in the signer's namespace and in a team's."""
    made = []
    for namespace in (SYSTEM, "team-a"):
        name = unique("not-keyroom")
        for document in (_config_map(name, namespace),
                         {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
                          "stringData": {"password": "hunter2"}}):
            assert apply(cluster, document).returncode == 0
        made.append((namespace, name))
    yield made
    for namespace, name in made:
        kubectl(cluster, "delete", "secret,configmap", name, "-n", namespace, "--ignore-not-found")


@pytest.mark.parametrize("identity", ["operator", "signer"])
def test_the_components_cannot_read_secrets(cluster, secrets_and_config_maps, identity):
    for namespace, name in secrets_and_config_maps:
        assert forbidden(kubectl(cluster, "get", "secret", name, "-n", namespace, identity=identity))
        assert forbidden(kubectl(cluster, "get", "secrets", "-n", namespace, identity=identity))
        assert kubectl(cluster, "get", "secret", name, "-n", namespace).returncode == 0  # it is there
    assert forbidden(kubectl(cluster, "get", "secrets", "-A", identity=identity))


def test_the_operator_cannot_read_or_change_config_maps_it_did_not_write(cluster, secrets_and_config_maps):
    """RBAC lets it create and patch (to publish CRLs); admission refuses every ConfigMap that is not its CRL."""
    for namespace, name in [*secrets_and_config_maps, (SYSTEM, CHECKPOINT_NAME), (SYSTEM, NEW_CHAIN_NAME)]:
        assert forbidden(kubectl(cluster, "get", "configmap", name, "-n", namespace, identity="operator"))
        assert forbidden(kubectl(cluster, "get", "configmaps", "-n", namespace, identity="operator"))
        for verb in ("update", "delete"):
            assert not can_i(cluster, "operator", verb, f"configmaps/{name}", namespace)
    for namespace, name in secrets_and_config_maps:  # server-side apply: one PATCH, no GET before it
        patched = _server_side_apply(cluster, {"apiVersion": "v1", "kind": "ConfigMap",
                                               "metadata": {"name": name, "namespace": namespace},
                                               "data": {"index": "0"}})
        assert patched.returncode != 0 and "ValidatingAdmissionPolicy" in patched.stderr, patched.stderr


def _server_side_apply(cluster, document: dict) -> subprocess.CompletedProcess:
    """What the operator's code does: a PATCH (apply) with no GET before it, answered with the object."""
    return kubectl(cluster, "apply", "--server-side", "--force-conflicts", "--field-manager=keyroom-operator",
                   "-o", "json", "-f", "-", identity="operator", input=yaml.safe_dump(document))


def test_the_operator_cannot_read_a_secret_by_patching_it(cluster, secrets_and_config_maps):
    """Patch answers with the object: admission must refuse it before the API server would answer with data."""
    for namespace, name in secrets_and_config_maps:
        for labels in ({"keyroom.dev/certificate": "x"}, {}):
            patched = _server_side_apply(cluster, {"apiVersion": "v1", "kind": "Secret", "metadata": {
                "name": name, "namespace": namespace, "labels": labels}})
            assert patched.returncode != 0, patched.stdout
            assert "hunter2" not in patched.stdout and base64.b64encode(b"hunter2").decode() not in patched.stdout


def test_the_operator_writes_no_private_key_into_a_secret(cluster, unique):
    name = unique("cert-secret")
    document = {"apiVersion": "v1", "kind": "Secret", "type": "keyroom.dev/certificate",
                "metadata": {"name": name, "namespace": "team-a", "labels": {"keyroom.dev/certificate": name}},
                "data": {"tls.crt": "QQ==", "ca.crt": "QQ==", "tls.key": "QQ=="}}
    refused = _server_side_apply(cluster, document)
    assert refused.returncode != 0 and "never a private key" in refused.stderr, refused.stderr
    del document["data"]["tls.key"]
    accepted = _server_side_apply(cluster, document)
    assert accepted.returncode == 0, accepted.stderr  # public material only is accepted
    kubectl(cluster, "delete", "secret", name, "-n", "team-a")


@pytest.mark.parametrize("kind", ["signingkeys", "signingpolicies", "certificates", "signrequests"])
def test_the_operator_cannot_create_or_replace_keyroom_objects(cluster, kind):
    for verb in ("create", "update", "deletecollection"):
        assert not can_i(cluster, "operator", verb, f"{kind}.keyroom.dev", "team-a")
    assert can_i(cluster, "operator", "delete", f"{kind}.keyroom.dev", "team-a") == (kind == "signrequests")


def test_the_operator_cannot_create_a_key_or_a_policy(cluster, unique):
    for document in (_key(unique("key"), "team-a"), _policy(unique("policy"), "team-a")):
        assert forbidden(apply(cluster, document, identity="operator"))


def test_the_operator_can_do_what_its_code_does(cluster):
    """The rights the reconcilers and Kopf use; without them the negative tests above would prove little."""
    for kind in ("signingkeys", "signingpolicies", "certificates", "signrequests"):
        for verb in ("get", "list", "watch", "patch"):
            assert can_i(cluster, "operator", verb, f"{kind}.keyroom.dev", "team-a")
        assert can_i(cluster, "operator", "patch", f"{kind}.keyroom.dev", "team-a", "--subresource=status")
    assert can_i(cluster, "operator", "create", "events", "team-a")
    assert can_i(cluster, "operator", "list", "customresourcedefinitions.apiextensions.k8s.io", "default")
    assert can_i(cluster, "operator", "watch", "namespaces", "default")


def test_the_signer_changes_no_config_map_but_its_checkpoint(cluster, secrets_and_config_maps):
    patch = ["--type=merge", "-p", '{"data": {"owner": "the signer"}}', "--dry-run=server"]
    for namespace, name in secrets_and_config_maps:
        assert kubectl(cluster, "get", "configmap", name, "-n", namespace).returncode == 0  # it is there
        assert forbidden(kubectl(cluster, "patch", "configmap", name, "-n", namespace, *patch, identity="signer"))
        assert forbidden(kubectl(cluster, "replace", "--dry-run=server", "-f", "-", identity="signer",
                                 input=yaml.safe_dump(_config_map(name, namespace, {"owner": "the signer"}))))
        assert forbidden(kubectl(cluster, "delete", "configmap", name, "-n", namespace, "--dry-run=server",
                                 identity="signer"))
        assert forbidden(kubectl(cluster, "get", "configmap", name, "-n", namespace, identity="signer"))
        assert forbidden(kubectl(cluster, "get", "configmaps", "-n", namespace, identity="signer"))
    # its own checkpoint: authorised (a dry run leaves the running signer's checkpoint as it is; before the first
    # signature kubectl's own read of it finds nothing, which is not a refusal either)
    checkpoint = kubectl(cluster, "patch", "configmap", CHECKPOINT_NAME, "-n", SYSTEM, *patch, identity="signer")
    assert not forbidden(checkpoint), checkpoint.stderr
    for verb in ("get", "update", "patch"):
        assert can_i(cluster, "signer", verb, f"configmaps/{CHECKPOINT_NAME}", SYSTEM)
    assert not can_i(cluster, "signer", "delete", f"configmaps/{CHECKPOINT_NAME}", SYSTEM)
    # ConfigMap rights only in its own namespace: no checkpoint of its own anywhere else
    for verb in ("create", "get", "patch"):
        assert not can_i(cluster, "signer", verb, f"configmaps/{CHECKPOINT_NAME}", "team-a")


@pytest.fixture
def new_chain_instruction(cluster):
    """An administrator's new-chain instruction that supersedes no checkpoint, so the signer never acts on it."""
    instruction = _config_map(NEW_CHAIN_NAME, SYSTEM, {"supersedes": "0:sha256:not-a-checkpoint",
                                                       "reason": "RBAC test, never acted on"})
    created = kubectl(cluster, "create", "-f", "-", input=yaml.safe_dump(instruction))
    assert created.returncode == 0, created.stderr
    yield instruction
    kubectl(cluster, "delete", "configmap", NEW_CHAIN_NAME, "-n", SYSTEM, "--ignore-not-found")


def test_the_signer_reads_but_never_writes_the_new_chain_instruction(cluster, new_chain_instruction):
    read = kubectl(cluster, "get", "configmap", NEW_CHAIN_NAME, "-n", SYSTEM, "-o", "json", identity="signer")
    assert read.returncode == 0, read.stderr
    assert json.loads(read.stdout)["data"] == new_chain_instruction["data"]
    for verb in ("update", "patch", "delete", "list", "watch"):
        assert not can_i(cluster, "signer", verb, f"configmaps/{NEW_CHAIN_NAME}", SYSTEM)
    forged = dict(new_chain_instruction, data={"supersedes": "none", "reason": "forged by the signer"})
    for args in (["patch", "configmap", NEW_CHAIN_NAME, "-n", SYSTEM, "--type=merge", "-p",
                  '{"data": {"reason": "forged by the signer"}}'],
                 ["delete", "configmap", NEW_CHAIN_NAME, "-n", SYSTEM]):
        assert forbidden(kubectl(cluster, *args, identity="signer"))
    assert forbidden(kubectl(cluster, "replace", "-f", "-", identity="signer", input=yaml.safe_dump(forged)))
    unchanged = kubectl(cluster, "get", "configmap", NEW_CHAIN_NAME, "-n", SYSTEM, "-o", "json")
    assert json.loads(unchanged.stdout)["data"] == new_chain_instruction["data"]


@pytest.mark.parametrize("kind", ["signingkeys", "signingpolicies", "certificates", "signrequests"])
def test_the_signer_writes_no_keyroom_object_nor_status(cluster, kind):
    for verb in ("get", "list", "watch"):
        assert can_i(cluster, "signer", verb, f"{kind}.keyroom.dev", "team-a")
    for verb in ("create", "update", "patch", "delete", "deletecollection"):
        assert not can_i(cluster, "signer", verb, f"{kind}.keyroom.dev", "team-a")
    for verb in ("update", "patch"):
        assert not can_i(cluster, "signer", verb, f"{kind}.keyroom.dev", "team-a", "--subresource=status")


def test_the_signer_cannot_change_a_key_or_its_status(cluster, unique):
    name = unique("key")
    assert apply(cluster, _key(name, "team-a")).returncode == 0
    assert forbidden(kubectl(cluster, "label", "signingkey", name, "-n", "team-a", "x=y", identity="signer"))
    assert forbidden(kubectl(cluster, "patch", "signingkey", name, "-n", "team-a", "--subresource=status",
                             "--type=merge", "-p", '{"status": {"phase": "Destroyed"}}', identity="signer"))
    assert forbidden(apply(cluster, _key(unique("key"), "team-a"), identity="signer"))


def test_the_operator_reads_exactly_one_secret_the_webhook_for_approvers(cluster):
    """It is there in the session (tests/conftest.py); the operator may get it and nothing beside it."""
    read = kubectl(cluster, "get", "secret", rbac.NOTIFY_SECRET, "-n", SYSTEM, "-o", "json", identity="operator")
    assert read.returncode == 0, read.stderr
    assert can_i(cluster, "operator", "get", f"secrets/{rbac.NOTIFY_SECRET}", SYSTEM)
    for verb in ("list", "watch", "update", "delete"):
        assert not can_i(cluster, "operator", verb, f"secrets/{rbac.NOTIFY_SECRET}", SYSTEM)
    for verb in ("get", "list", "watch"):
        assert not can_i(cluster, "operator", verb, "secrets", SYSTEM)
    assert not can_i(cluster, "operator", "get", "secrets/keyroom-signer-tls", SYSTEM)
    assert not can_i(cluster, "operator", "get", f"secrets/{rbac.NOTIFY_SECRET}", "team-a")
    assert forbidden(kubectl(cluster, "get", "secrets", "-n", SYSTEM, identity="operator"))


def test_the_devenv_and_the_chart_bind_exactly_the_generated_rbac(cluster):
    installed = get(cluster, "role", rbac.SIGNER, namespace=SYSTEM)
    assert installed["rules"] == rbac.signer_role(SYSTEM)["rules"]
    assert get(cluster, "role", rbac.OPERATOR, namespace=SYSTEM)["rules"] == rbac.operator_role(SYSTEM)["rules"]
    bound = get(cluster, "rolebinding", rbac.OPERATOR, namespace=SYSTEM)
    assert bound["subjects"] == [{"kind": "ServiceAccount", "name": rbac.OPERATOR, "namespace": SYSTEM}]
    for name in (rbac.OPERATOR, rbac.SIGNER):
        binding = json.loads(kubectl(cluster, "get", "clusterrolebinding", name, "-o", "json").stdout)
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": SYSTEM}]
    for path, text in generate.rendered_chart().items():
        on_disk = (REPO / "charts" / "keyroom" / path).read_text()
        assert on_disk == text, f"charts/keyroom/{path} is stale; run `make crds`"


def test_the_signer_cannot_create_the_new_chain_instruction(cluster):
    """RBAC cannot limit create by name; the admission policy keyroom-signer-creates-only-its-checkpoint does."""
    instruction = _config_map(NEW_CHAIN_NAME, SYSTEM, {"supersedes": "none", "reason": "forged by the signer"})
    created = kubectl(cluster, "create", "--dry-run=server", "-f", "-", identity="signer",
                      input=yaml.safe_dump(instruction))
    assert forbidden(created), created.stderr

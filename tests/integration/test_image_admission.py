"""The admission policies of docs/guides/image-signatures.md, as written there, with the tools themselves.

The guide's ClusterImagePolicy (Sigstore policy-controller) and ClusterPolicy
(Kyverno) are taken from the guide itself, given a real exported key and the
test registry, and sent to the real API server (dry run) after the CRDs those
projects ship (from their pinned Go modules) are installed: the API server
checks them against the schemas, with unknown fields refused. Then each tool
evaluates its policy against an image signed through an approved
SignRequest, an unsigned image, and the signed image with another key:
policy-controller's ``policy-tester`` and ``kyverno apply --registry`` (the
CLI runs Kyverno's own image verification engine against the registry).

Not run here: the admission webhooks themselves (their controllers need a
cluster with nodes).
"""
from __future__ import annotations

import pathlib
import re
import subprocess

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests import tools
from tests.conftest import kubectl, wait_for
from tests.integration.test_cli import keyroom
from tests.integration.test_images import push, registry, sign_with_approval, signing_key  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

GUIDE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "guides" / "image-signatures.md"
CRDS = {
    "kyverno": (tools.KYVERNO, "config/crds/kyverno/kyverno.io_clusterpolicies.yaml", "clusterpolicies.kyverno.io"),
    "policy-controller": (tools.POLICY_CONTROLLER, "config/300-clusterimagepolicy.yaml",
                          "clusterimagepolicies.policy.sigstore.dev"),
}
_PLACEHOLDER = re.compile(r"^( *)-----BEGIN PUBLIC KEY-----\n\1\(the contents of [^)]*\)\n\1-----END PUBLIC KEY-----$",
                          re.MULTILINE)


def guide_policy(tool: str, *, public_key: str, repository: str) -> str:
    """The guide's YAML block marked ``# keyroom: TOOL``, with the real key and ``repository`` put in."""
    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", GUIDE.read_text(), re.DOTALL)
               if b.startswith(f"# keyroom: {tool}\n")]
    assert _PLACEHOLDER.search(block), f"the {tool} policy in the guide lost its key placeholder"
    block = _PLACEHOLDER.sub(lambda m: "\n".join(m.group(1) + line for line in public_key.strip().splitlines()),
                             block)
    return block.replace("registry.example/team-a", repository)


@pytest.fixture(scope="module")
def admission_crds(cluster):
    for tool, ((module, version), path, name) in CRDS.items():
        crd = yaml.safe_load((tools.module_dir(module, version) / path).read_text())
        # policy-controller converts between its versions in its own webhook, which does not run here: the schema
        # of each version is what is checked, so no conversion is needed
        crd["spec"]["conversion"] = {"strategy": "None"}
        installed = kubectl(cluster, "apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump(crd))
        assert installed.returncode == 0, installed.stderr
        wait_for(lambda: kubectl(cluster, "wait", "--for=condition=Established", "--timeout=5s",
                                 f"crd/{name}").returncode == 0, what=f"the {tool} CRD")
    return CRDS


@pytest.fixture(scope="module")
def signed(cluster, registry, tmp_path_factory):  # noqa: F811 (the registry fixture)
    """(registry, a signed image, an unsigned image, the key's PEM, the repository prefix) for the policies."""
    work = tmp_path_factory.mktemp("admission")
    key = signing_key(cluster, "img-admission", "ECDSA_P256")
    image = push(registry, work, "team-a/app", "admitted\n")
    unsigned = push(registry, work, "team-a/unsigned", "never signed\n")
    assert sign_with_approval(cluster, "img-admission", key, image).returncode == 0
    trust = work / "trust"
    assert keyroom(cluster, "alice", "export", key, "--out", str(trust)).returncode == 0
    return {"image": image, "unsigned": unsigned, "public_key": (trust / f"{key}-v1.pub.pem").read_text(),
            "repository": f"{registry.host}/team-a", "work": work}


@pytest.mark.parametrize("tool", ["policy-controller", "kyverno"])
def test_the_guides_policy_is_valid_for_the_tools_schema(cluster, admission_crds, signed, tool):
    policy = guide_policy(tool, public_key=signed["public_key"], repository=signed["repository"])
    accepted = kubectl(cluster, "apply", "--dry-run=server", "--validate=strict", "-f", "-", input=policy)
    assert accepted.returncode == 0, accepted.stderr
    assert "(server dry run)" in accepted.stdout
    # the schema is really applied: a misspelt field of the same policy is refused
    misspelt = policy.replace("hashAlgorithm:", "hashAlgorythm:").replace("ignoreTlog:", "ignoreTLog:")
    refused = kubectl(cluster, "apply", "--dry-run=server", "--validate=strict", "-f", "-", input=misspelt)
    assert refused.returncode != 0 and "unknown field" in refused.stderr


def test_policy_controller_admits_the_signed_image_only_with_its_key(signed):
    def tester(image: str, public_key: str) -> subprocess.CompletedProcess:
        policy = signed["work"] / "cip.yaml"
        policy.write_text(guide_policy("policy-controller", public_key=public_key, repository=signed["repository"]))
        return tools.run("policy-tester", "--policy", policy, "--image", image, timeout=180)
    admitted = tester(signed["image"], signed["public_key"])
    assert admitted.returncode == 0, admitted.stdout + admitted.stderr
    assert "Verification was successful!" in admitted.stderr
    unsigned = tester(signed["unsigned"], signed["public_key"])
    assert unsigned.returncode != 0 and "no signatures found" in unsigned.stdout, unsigned.stdout + unsigned.stderr
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    wrong_key = tester(signed["image"], stranger)
    assert wrong_key.returncode != 0 and "signature key validation failed" in wrong_key.stdout, \
        wrong_key.stdout + wrong_key.stderr


def test_kyverno_admits_a_pod_of_the_signed_image_only_with_its_key(signed):
    def apply_policy(image: str, public_key: str) -> subprocess.CompletedProcess:
        policy, pod = signed["work"] / "kyverno-policy.yaml", signed["work"] / "pod.yaml"
        policy.write_text(guide_policy("kyverno", public_key=public_key, repository=signed["repository"]))
        pod.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Pod",
                                       "metadata": {"name": "app", "namespace": "default"},
                                       "spec": {"containers": [{"name": "app", "image": image}]}}))
        return tools.run("kyverno", "apply", policy, "--resource", pod, "--registry", timeout=300)
    admitted = apply_policy(signed["image"], signed["public_key"])
    assert admitted.returncode == 0, admitted.stdout + admitted.stderr
    assert re.search(r"pass: [1-9]\d*, fail: 0, warn: 0, error: 0", admitted.stdout), admitted.stdout
    unsigned = apply_policy(signed["unsigned"], signed["public_key"])
    assert unsigned.returncode == 1 and "pass: 0" in unsigned.stdout, unsigned.stdout + unsigned.stderr
    assert "no signatures found" in unsigned.stdout
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    wrong_key = apply_policy(signed["image"], stranger)
    assert wrong_key.returncode == 1 and "pass: 0" in wrong_key.stdout, wrong_key.stdout + wrong_key.stderr
    assert f"failed to verify image {signed['image']}" in wrong_key.stdout

"""Container images signed through SignRequests with approvals, verified by cosign itself and by verify-image.

A distribution registry (v3.1.2) runs on 127.0.0.1; crane pushes the test
images; ``kubectl keyroom sign-image`` resolves each tag to its digest, asks
for the signature (alice), waits for bob's approval and attaches the signature
as cosign does; ``cosign verify --key`` (v2.6.5) checks it with the public key
``kubectl keyroom export`` wrote. The three tools are built from their pinned
Go modules by tests/tools.py.
"""
from __future__ import annotations

import base64
import json
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keyroom.cli import registry as registry_client
from keyroom.signer.formats import cosign
from tests import tools
from tests.conftest import apply, get, identity, kubectl, wait_for
from tests.integration.test_cli import NAMESPACE, keyroom
from tests.integration.test_cli_roles import offline

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    for name in tools.COMMANDS:  # built (or found in the cache) before the clock of any request starts
        tools.binary(name)
    running = tools.Registry(tmp_path_factory.mktemp("registry"))
    yield running
    running.stop()


def push(registry, tmp_path, repository: str, content: str) -> str:
    """An image with one layer holding ``content``, pushed with crane; its reference by tag."""
    layer = tmp_path / f"{repository.replace('/', '-')}.tar"
    source = tmp_path / "layer"
    source.mkdir(exist_ok=True)
    (source / "content.txt").write_text(content)
    subprocess.run(["tar", "-C", str(source), "-cf", str(layer), "content.txt"], check=True)
    reference = f"{registry.host}/{repository}:v1"
    pushed = tools.run("crane", "append", "-f", layer, "-t", reference)
    assert pushed.returncode == 0, pushed.stderr
    return reference


def digest_of(reference: str) -> str:
    found = tools.run("crane", "digest", reference)
    assert found.returncode == 0, found.stderr
    return found.stdout.strip()


def cosign_verify(reference: str, key) -> subprocess.CompletedProcess:
    return tools.run("cosign", "verify", "--key", key, "--insecure-ignore-tlog=true", "--allow-insecure-registry",
                     reference, timeout=60)


def signing_key(cluster, name: str, algorithm: str) -> str:
    """A SigningKey and a policy: alice may request, one approval by team-a-approvers."""
    for document in ({"kind": "SigningKey", "spec": {"algorithm": algorithm}},
                     {"kind": "SigningPolicy", "spec": {"keys": [name], "requesters": {"groups": ["team-a-devs"]},
                                                        "approvers": {"groups": ["team-a-approvers"]},
                                                        "requiredApprovals": 1,
                                                        "allowedFormats": ["cosign"]}}):
        assert apply(cluster, {"apiVersion": "keyroom.dev/v1alpha1", "metadata": {"name": name, "namespace": NAMESPACE},
                               **document}).returncode == 0
    wait_for(lambda: get(cluster, "signingkey", name, namespace=NAMESPACE).get("status", {}).get("phase") == "Active",
             what=f"{name} to be Active")
    return name


def sign_with_approval(cluster, request: str, key: str, *references: str) -> subprocess.CompletedProcess:
    """alice runs sign-image; bob sees the images in pending and approve, and approves; alice's command ends."""
    running = keyroom(cluster, "alice", "sign-image", *references, "--key", key, "--name", request,
                      "--reason", "release 1.4.2", "--timeout", "90", "-o", "json", wait=False)

    def waiting() -> bool:
        if running.poll() is not None:
            pytest.fail(f"sign-image ended before the approval: {running.stdout.read()}{running.stderr.read()}")
        found = kubectl(cluster, "get", "sr", request, "-n", NAMESPACE, "-o", "json")
        return found.returncode == 0 and "needs 1 more approval" in \
            json.loads(found.stdout).get("status", {}).get("message", "")
    wait_for(waiting, what=f"{request} to wait for approval")
    shown = [p for p in json.loads(keyroom(cluster, "bob", "pending", "-o", "json").stdout) if p["name"] == request]
    assert shown and shown[0]["format"] == "cosign"
    assert shown[0]["images"] == [f"{r.split(':v1')[0]}:v1@{digest_of(r)}" for r in references]
    approved = keyroom(cluster, "bob", "approve", request, "--reason", "checked the digests")
    assert approved.returncode == 0, approved.stderr
    assert "images (reference, manifest digest; a tag is shown, never signed):" in approved.stderr
    for reference in references:
        assert f"    {reference}  {digest_of(reference)}" in approved.stderr
    stdout, stderr = running.communicate(timeout=120)
    return subprocess.CompletedProcess(running.args, running.returncode, stdout, stderr)


@pytest.mark.parametrize("algorithm", ["ECDSA_P256", "RSA_3072", "ECDSA_P384", "RSA_4096"])
def test_cosign_verifies_images_signed_through_an_approved_request(cluster, registry, unique, tmp_path, algorithm):
    key = signing_key(cluster, unique(f"img-{algorithm.lower().replace('_', '-')}"), algorithm)
    first = push(registry, tmp_path, f"team/app-{algorithm.lower()}", f"app built with {algorithm}\n")
    second = push(registry, tmp_path, f"team/tool-{algorithm.lower()}", f"tool built with {algorithm}\n")
    request = unique("img")
    signed = sign_with_approval(cluster, request, key, first, second)
    assert signed.returncode == 0, signed.stderr
    report = json.loads(signed.stdout)
    assert report["phase"] == "Signed" and [i["image"] for i in report["images"]] == [
        f"{first.removesuffix(':v1')}@{digest_of(first)}", f"{second.removesuffix(':v1')}@{digest_of(second)}"]

    trust = tmp_path / "trust"
    assert keyroom(cluster, "alice", "export", key, "--out", str(trust)).returncode == 0
    public_key = trust / f"{key}-v1.pub.pem"
    for reference in (first, second):
        verified = cosign_verify(reference, public_key)
        assert verified.returncode == 0, verified.stderr
        [claims] = json.loads(verified.stdout)
        assert claims["critical"]["image"]["docker-manifest-digest"] == digest_of(reference)
        assert claims["critical"]["identity"]["docker-reference"] == reference.removesuffix(":v1")
        assert "The signatures were verified against the specified public key" in verified.stderr
        ours = offline("verify-image", reference, "--trust", str(trust))
        assert ours.returncode == 0, ours.stdout + ours.stderr
        assert ours.stdout.startswith(f"verified: {reference.removesuffix(':v1')}@{digest_of(reference)}")

    stranger = tmp_path / "stranger.pub.pem"
    stranger.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    wrong = cosign_verify(first, stranger)
    assert wrong.returncode != 0 and "no matching signatures" in wrong.stderr
    assert offline("verify-image", first, "--key", str(stranger)).returncode == 3

    intent = next(e for e in json.loads(keyroom(cluster, "admin", "audit", "show", "--file",
                                                str(cluster.state_dir / "signer" / "audit.jsonl"), "--request",
                                                request, "-o", "json").stdout) if e["event"] == "Intent")
    assert intent["format"] == "cosign" and intent["approvers"] == ["bob"]
    assert intent["images"] == [{"reference": r.removesuffix(":v1"), "tag": "v1", "digest": digest_of(r)}
                                for r in (first, second)]


def test_a_copied_or_tampered_signature_and_a_moved_tag_fail(cluster, registry, unique, tmp_path):
    key = signing_key(cluster, unique("img-copies"), "ECDSA_P256")
    signed_image = push(registry, tmp_path, "team/signed", "the signed image\n")
    other = push(registry, tmp_path, "team/other", "another image\n")
    moved = push(registry, tmp_path, "team/moved", "the content that was signed\n")
    request = unique("img")
    assert sign_with_approval(cluster, request, key, signed_image, moved).returncode == 0
    again = keyroom(cluster, "alice", "sign-image", signed_image, moved, "--key", key, "--name", request)
    assert again.returncode == 0 and f"{request} exists and asks for exactly these images" in again.stderr
    other_images = keyroom(cluster, "alice", "sign-image", other, "--key", key, "--name", request)
    assert other_images.returncode == 1 and "asks for other images" in other_images.stderr
    client = registry_client.Registry(registry.host)
    assert len(registry_client.signature_layers(client, "team/signed", digest_of(signed_image))) == 1  # not twice
    trust = tmp_path / "trust"
    assert keyroom(cluster, "alice", "export", key, "--out", str(trust)).returncode == 0
    public_key = trust / f"{key}-v1.pub.pem"
    assert cosign_verify(signed_image, public_key).returncode == 0

    # the signature of one image copied beside another: it claims the first image's digest
    signature_tag = registry_client.signature_tag(digest_of(signed_image))
    copied = tools.run("crane", "copy", f"{signed_image.removesuffix(':v1')}:{signature_tag}",
                       f"{other.removesuffix(':v1')}:{registry_client.signature_tag(digest_of(other))}")
    assert copied.returncode == 0, copied.stderr
    retagged = cosign_verify(other, public_key)
    assert retagged.returncode != 0 and "no matching signatures" in retagged.stderr
    ours = offline("verify-image", other, "--trust", str(trust))
    assert ours.returncode == 3 and "the payload is for " + digest_of(signed_image) in ours.stdout

    # one byte of the signature changed in the registry
    repository = "team/signed"
    manifest = json.loads(client.manifest(repository, signature_tag)[0])
    layer = manifest["layers"][0]
    signature = bytearray(base64.b64decode(layer["annotations"][cosign.SIGNATURE_ANNOTATION]))
    signature[-3] ^= 0x01
    layer["annotations"][cosign.SIGNATURE_ANNOTATION] = base64.b64encode(bytes(signature)).decode()
    client.put_manifest(repository, signature_tag, json.dumps(manifest).encode(), registry_client.OCI_MANIFEST)
    tampered = cosign_verify(signed_image, public_key)
    assert tampered.returncode != 0 and "no matching signatures" in tampered.stderr
    ours = offline("verify-image", signed_image, "--trust", str(trust))
    assert ours.returncode == 3 and "verifies with none of the trusted keys" in ours.stdout

    # the tag moved to other content after signing: the new digest has no signature
    assert cosign_verify(moved, public_key).returncode == 0
    push(registry, tmp_path, "team/moved", "content pushed after signing\n")
    assert cosign_verify(moved, public_key).returncode != 0
    ours = offline("verify-image", moved, "--trust", str(trust))
    assert ours.returncode == 3 and "no signature attached" in ours.stdout


@pytest.mark.parametrize("name, algorithm, value, message", [
    ("app:v1", "SHA256", "a" * 64, "each digest's value the hex of the image manifest's sha256"),
    ("registry.example/team/app@sha256:" + "a" * 64, "SHA256", "a" * 64, "no @digest"),
    ("registry.example/team/app", "SHA384", "a" * 96, "format cosign signs container images by digest"),
])
def test_the_api_server_refuses_image_requests_without_a_registry_or_a_sha256_digest(cluster, unique, name, algorithm,
                                                                                    value, message):
    refused = apply(cluster, {
        "apiVersion": "keyroom.dev/v1alpha1", "kind": "SignRequest",
        "metadata": {"name": unique("img-bad"), "namespace": NAMESPACE},
        "spec": {"keyRef": {"name": "any"}, "requester": identity("alice"), "format": "cosign",
                 "digestAlgorithm": algorithm, "digests": [{"name": name, "value": value}]}}, identity="alice")
    assert refused.returncode != 0 and message in refused.stderr

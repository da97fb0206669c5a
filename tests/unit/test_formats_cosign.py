"""cosign image signatures (keyroom.signer.formats.cosign) signed in a real SoftHSM2 token, checked by cosign itself.

The payload is what cosign writes for an image; proof that the signature is
right comes from ``cosign verify-blob --key`` (cosign v2.6.5, built from its Go
module by tests/tools.py) over the payload bytes. The registry round trip is in
tests/integration/test_images.py.
"""
from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography.hazmat.primitives import serialization

from keyroom.cli import registry
from keyroom.signer import formats
from keyroom.signer.formats import FormatError, cosign
from tests import tools

DIGEST = hashlib.sha256(b"an image manifest").digest()


@pytest.fixture(scope="session")
def key(format_token):
    """``key(algorithm)`` -> (public key DER, sign callback)."""
    def make(algorithm: str):
        name = f"cosign-{algorithm.lower()}"
        return format_token.key(name, algorithm), format_token.signer(name)
    return make


def _pem(der: bytes) -> bytes:
    return serialization.load_der_public_key(der).public_bytes(serialization.Encoding.PEM,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo)


def test_the_payload_is_cosigns_simple_signing_document_for_the_repository_and_digest():
    payload = cosign.payload(reference="registry.example:5000/team/app:1.4", digest=DIGEST)
    assert payload == (b'{"critical":{"identity":{"docker-reference":"registry.example:5000/team/app"},'
                       b'"image":{"docker-manifest-digest":"sha256:' + DIGEST.hex().encode() +
                       b'"},"type":"cosign container image signature"},"optional":null}')
    assert cosign.claims(payload) == ("registry.example:5000/team/app", "sha256:" + DIGEST.hex())


@pytest.mark.parametrize("name", ["app:1.4", "library/app", "registry.example/team/app@sha256:" + "0" * 64,
                                  "registry.example/Team/app", "registry.example/", "registry.example/app:"])
def test_references_without_a_registry_or_with_a_digest_are_refused(name):
    with pytest.raises(FormatError, match="is not an image reference"):
        cosign.payload(reference=name, digest=DIGEST)


@pytest.mark.parametrize("algorithm", ["ECDSA_P256", "RSA_3072"])
def test_cosign_verify_blob_accepts_the_signature_and_refuses_another_payload(key, tmp_path, algorithm):
    public_key_der, sign = key(algorithm)
    built = formats.build("cosign", digest=DIGEST, digest_algorithm="SHA256", embedded=None, manifest=None,
                          public_key_der=public_key_der, signing_time=None, sign=sign,
                          name="127.0.0.1:5000/team/app:v1")
    payload, signature = cosign.parse(built)
    assert json.loads(built)["mediaType"] == cosign.PAYLOAD_MEDIA_TYPE
    (tmp_path / "key.pub").write_bytes(_pem(public_key_der))
    (tmp_path / "payload.json").write_bytes(payload)
    (tmp_path / "payload.sig").write_text(base64.b64encode(signature).decode())
    args = ["verify-blob", "--key", tmp_path / "key.pub", "--signature", tmp_path / "payload.sig",
            "--insecure-ignore-tlog=true"]
    verified = tools.run("cosign", *args, tmp_path / "payload.json")
    assert verified.returncode == 0, verified.stderr
    assert "Verified OK" in verified.stderr
    (tmp_path / "other.json").write_bytes(cosign.payload(reference="127.0.0.1:5000/team/app",
                                                         digest=hashlib.sha256(b"another").digest()))
    assert tools.run("cosign", *args, tmp_path / "other.json").returncode != 0


def test_a_signature_of_another_key_never_leaves_the_format(key):
    public_key_der, _ = key("ECDSA_P256")
    _, other_sign = key("RSA_3072")
    with pytest.raises(FormatError, match="does not verify"):
        cosign.document(reference="r.example/a", digest=DIGEST, digest_algorithm="SHA256",
                        public_key_der=public_key_der, sign=other_sign)
    with pytest.raises(FormatError, match="are SHA256, not SHA384"):
        cosign.document(reference="r.example/a", digest=hashlib.sha384().digest(), digest_algorithm="SHA384",
                        public_key_der=public_key_der, sign=other_sign)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:5000/team/app:v1", ("127.0.0.1:5000", "team/app", "v1", None)),
    ("127.0.0.1:5000/app", ("127.0.0.1:5000", "app", "latest", None)),
    ("busybox", ("index.docker.io", "library/busybox", "latest", None)),
    ("ghcr.io/o/app@sha256:" + "a" * 64, ("ghcr.io", "o/app", None, "sha256:" + "a" * 64)),
    ("localhost:5000/app:1@sha256:" + "b" * 64, ("localhost:5000", "app", "1", "sha256:" + "b" * 64)),
])
def test_the_plugin_splits_image_references(text, expected):
    found = registry.parse_reference(text)
    assert (found.registry, found.repository, found.tag, found.digest) == expected


def test_the_plugin_refuses_short_or_foreign_digests():
    for text in ("r.example/app@sha256:abc", "r.example/app@sha512:" + "a" * 128, "r.example/App:1"):
        with pytest.raises(registry.RegistryError):
            registry.parse_reference(text)


def test_the_crd_pattern_and_the_signers_agree():
    from keyroom.api import signrequest

    rules = [r["rule"] for r in signrequest.SPEC["x-kubernetes-validations"] if "cosign" in r["rule"]]
    assert len(rules) == 1 and signrequest.IMAGE_REFERENCE_PATTERN in rules[0]

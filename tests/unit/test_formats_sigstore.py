"""Sigstore bundles v0.3 (keyroom.signer.formats.sigstore) signed in a real SoftHSM2 token, checked by @sigstore/verify.

Proof that a bundle is right comes only from ``@sigstore/verify`` (the library
sigstore-js verifies with), run offline by ``tests/verifiers/verify-sigstore.js``
with one trusted public key and the transparency-log, CT-log and timestamp
thresholds at 0: the PyPI ``sigstore`` package refuses a bundle without a
certificate and a tlog entry, and cosign is a heavy Go build. The verifier is
pinned in ``tests/verifiers/package-lock.json``; ``npm ci --prefix
tests/verifiers`` installs it (CI does, in ``.ci/run``).

The keys are real SoftHSM2 keys in a child process, generated once per
session; the signing callback is exactly ``Token.sign`` over the digest.
"""
from __future__ import annotations

import base64
import hashlib
import json
import pathlib
import re
import subprocess

import pytest

from keyroom.signer.formats import FormatError
from keyroom.signer.formats import sigstore

VERIFIERS = pathlib.Path(__file__).resolve().parent.parent / "verifiers"
INSTALL = "npm ci --prefix tests/verifiers --no-audit --no-fund"
#: each key algorithm with a digest algorithm it signs with here
ALGORITHMS = {"ECDSA_P256": "SHA256", "ECDSA_P384": "SHA384", "RSA_3072": "SHA512"}
ARTIFACT = b"keyroom release 1.2.3\n" + bytes(range(256)) * 16


@pytest.fixture(scope="session")
def keys(format_token):
    """``key(algorithm)`` -> public key DER, generating each key once per session, when first needed."""
    return lambda algorithm: format_token.key(f"sigstore-{algorithm.lower()}", algorithm)


@pytest.fixture(scope="session")
def verifier():
    """``verify(bundle, artifact, key DER, hint=None)`` -> the finished verifier process."""
    if not (VERIFIERS / "node_modules" / "@sigstore" / "verify" / "package.json").is_file():
        pytest.fail(f"the Sigstore verifier is not installed: run `{INSTALL}` in the repository", pytrace=False)

    def verify(directory: pathlib.Path, bundle: dict, artifact: bytes, public_key_der: bytes,
               hint: str | None = None) -> subprocess.CompletedProcess:
        (directory / "bundle.json").write_text(json.dumps(bundle))
        (directory / "artifact").write_bytes(artifact)
        (directory / "key.der").write_bytes(public_key_der)
        return subprocess.run(["node", str(VERIFIERS / "verify-sigstore.js"), "bundle.json", "artifact", "key.der",
                               *([hint] if hint else [])], cwd=directory, capture_output=True, text=True,
                              timeout=60)
    return verify


def sign(format_token, keys, algorithm: str, digest: bytes, digest_algorithm: str) -> bytes:
    """``Token.sign`` of the key of ``algorithm`` (generated first if need be) over ``digest``."""
    keys(algorithm)
    return format_token.signer(f"sigstore-{algorithm.lower()}")(digest, digest_algorithm)


def signed_bundle(format_token, keys, algorithm: str, artifact: bytes = ARTIFACT) -> dict:
    digest_algorithm = ALGORITHMS[algorithm]
    digest = hashlib.new(digest_algorithm.lower(), artifact).digest()
    signature = sign(format_token, keys, algorithm, digest, digest_algorithm)
    return sigstore.bundle(digest=digest, digest_algorithm=digest_algorithm, public_key_der=keys(algorithm),
                           signature=signature)


# --------------------------------------------------------------------------- @sigstore/verify accepts keyroom's bundles


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_bundle_verifies_with_sigstore_verify(format_token, keys, verifier, tmp_path, algorithm):
    bundle = signed_bundle(format_token, keys, algorithm)
    checked = verifier(tmp_path, bundle, ARTIFACT, keys(algorithm))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == "verified"


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_a_tampered_artifact_fails(format_token, keys, verifier, tmp_path, algorithm):
    bundle = signed_bundle(format_token, keys, algorithm)
    tampered = ARTIFACT[:-1] + bytes([ARTIFACT[-1] ^ 1])
    checked = verifier(tmp_path, bundle, tampered, keys(algorithm))
    assert checked.returncode == 1
    assert "SIGNATURE_ERROR: signature verification failed" in checked.stderr


def test_another_key_fails(format_token, keys, verifier, tmp_path):
    bundle = signed_bundle(format_token, keys, "ECDSA_P256")
    other = keys("ECDSA_P384")
    # a verifier that trusts only another key does not know the bundle's key
    checked = verifier(tmp_path, bundle, ARTIFACT, other)
    assert checked.returncode == 1
    assert f"PUBLIC_KEY_ERROR: key not found: {bundle['verificationMaterial']['publicKey']['hint']}" in checked.stderr
    # nor does another key pass when a verifier is told it is the one the bundle names
    checked = verifier(tmp_path, bundle, ARTIFACT, other, hint=bundle["verificationMaterial"]["publicKey"]["hint"])
    assert checked.returncode == 1
    assert "SIGNATURE_ERROR: signature verification failed" in checked.stderr


def test_a_bundle_whose_digest_is_not_the_artifacts_fails(format_token, keys, verifier, tmp_path):
    # the verifier checks the recorded messageDigest too, so this test shows it would catch a wrong one
    bundle = signed_bundle(format_token, keys, "ECDSA_P256")
    bundle["messageSignature"]["messageDigest"]["digest"] = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    checked = verifier(tmp_path, bundle, ARTIFACT, keys("ECDSA_P256"))
    assert checked.returncode == 1
    assert "messageDigest is not the sha256 of the artifact" in checked.stderr


# --------------------------------------------------------------------------- the bundle's fields (pure)


def test_bundle_fields(format_token, keys):
    public_key = keys("ECDSA_P384")
    digest = hashlib.sha384(ARTIFACT).digest()
    signature = sign(format_token, keys, "ECDSA_P384", digest, "SHA384")
    bundle = sigstore.bundle(digest=digest, digest_algorithm="SHA384", public_key_der=public_key, signature=signature)
    assert bundle == {
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": {"publicKey": {"hint": base64.b64encode(hashlib.sha256(public_key).digest()).decode()},
                                 "tlogEntries": []},
        "messageSignature": {"messageDigest": {"algorithm": "SHA2_384", "digest": base64.b64encode(digest).decode()},
                             "signature": base64.b64encode(signature).decode()},
    }
    assert json.loads(json.dumps(bundle)) == bundle
    assert sigstore.key_hint(public_key) == bundle["verificationMaterial"]["publicKey"]["hint"]


@pytest.mark.parametrize("digest_algorithm,name", [("SHA256", "SHA2_256"), ("SHA384", "SHA2_384"),
                                                   ("SHA512", "SHA2_512")])
def test_hash_algorithm_names(format_token, keys, digest_algorithm, name):
    digest = hashlib.new(digest_algorithm.lower(), ARTIFACT).digest()
    signature = sign(format_token, keys, "ECDSA_P256", digest, digest_algorithm)
    bundle = sigstore.bundle(digest=digest, digest_algorithm=digest_algorithm, public_key_der=keys("ECDSA_P256"),
                             signature=signature)
    assert bundle["messageSignature"]["messageDigest"]["algorithm"] == name


def test_refusals(format_token, keys):
    public_key = keys("ECDSA_P256")
    digest = hashlib.sha256(ARTIFACT).digest()
    signature = sign(format_token, keys, "ECDSA_P256", digest, "SHA256")
    good = {"digest": digest, "digest_algorithm": "SHA256", "public_key_der": public_key, "signature": signature}
    cases = [
        ({"digest_algorithm": "SHA1"}, "unknown digest algorithm 'SHA1'"),
        ({"digest": digest[:31]}, "a SHA256 digest is 32 bytes, not 31 bytes"),
        ({"digest": digest.hex()}, "a SHA256 digest is 32 bytes, not str"),
        ({"digest_algorithm": "SHA384"}, "a SHA384 digest is 48 bytes, not 32 bytes"),
        ({"signature": b""}, "the signature is non-empty bytes"),
        ({"public_key_der": b"\x30\x00"}, "the public key: not a DER SubjectPublicKeyInfo"),
        ({"public_key_der": keys("ECDSA_P384")}, "does not verify with the public key"),
        ({"digest": hashlib.sha256(b"other").digest()}, "does not verify with the public key"),
        ({"signature": signature[:-1] + bytes([signature[-1] ^ 1])}, "does not verify with the public key"),
    ]
    for overrides, message in cases:
        with pytest.raises(FormatError, match=re.escape(message)):
            sigstore.bundle(**{**good, **overrides})

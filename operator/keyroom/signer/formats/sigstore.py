"""Sigstore bundles (v0.3) for a signature by a long-lived key, without a transparency log.

A Sigstore bundle carries a signature together with what a verifier needs to
check it. keyroom signs with keys kept in an HSM, not with short-lived Fulcio
certificates, so its bundles are the *public key* kind:

- ``verificationMaterial.publicKey.hint`` names the key; the verifier is given
  the key itself out of band (``cosign verify-blob --key``, a trusted root).
  keyroom's hint is base64(SHA-256(SubjectPublicKeyInfo DER)), which a
  verifier holding the key can recompute;
- ``tlogEntries`` is empty: nothing is uploaded to Rekor, so verifiers run
  with their transparency-log and timestamp thresholds at 0;
- ``messageSignature`` holds the artifact's digest and the signature over it
  (the key signs the digest, the "hashedrekord" way), so the signer never
  sees the artifact.

The bundle is a plain dict in the protobuf JSON form (camelCase names, bytes
as standard base64), ready for ``json.dumps``. Before it is returned, the
signature is checked against the public key, so a signature of another key
version never becomes a bundle.
"""
from __future__ import annotations

import base64
import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

from keyroom.signer import x509
from keyroom.signer.formats import FormatError

MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
#: digest algorithm, as hsm.Token.sign names it -> (Sigstore's HashAlgorithm, length, cryptography's hash)
HASH_ALGORITHMS = {
    "SHA256": ("SHA2_256", 32, hashes.SHA256),
    "SHA384": ("SHA2_384", 48, hashes.SHA384),
    "SHA512": ("SHA2_512", 64, hashes.SHA512),
}


def key_hint(public_key_der: bytes) -> str:
    """The hint that names a key in keyroom's bundles: base64 of the SHA-256 of its SubjectPublicKeyInfo DER."""
    return base64.b64encode(hashlib.sha256(bytes(public_key_der)).digest()).decode("ascii")


def bundle(*, digest: bytes, digest_algorithm: str, public_key_der: bytes, signature: bytes) -> dict:
    """The bundle v0.3 for ``signature`` by the key ``public_key_der`` over an artifact whose digest is ``digest``.

    ``signature`` is what :meth:`keyroom.signer.hsm.Token.sign` returns: a DER
    ECDSA-Sig-Value or an RSA PKCS#1 v1.5 signature of the digest.
    """
    if digest_algorithm not in HASH_ALGORITHMS:
        raise FormatError(f"unknown digest algorithm {digest_algorithm!r}; use one of {', '.join(HASH_ALGORITHMS)}")
    algorithm, length, hash_class = HASH_ALGORITHMS[digest_algorithm]
    if not isinstance(digest, bytes | bytearray) or len(digest) != length:
        shown = f"{len(digest)} bytes" if isinstance(digest, bytes | bytearray) else type(digest).__name__
        raise FormatError(f"a {digest_algorithm} digest is {length} bytes, not {shown}")
    if not isinstance(signature, bytes | bytearray) or not signature:
        raise FormatError("the signature is non-empty bytes")
    if not isinstance(public_key_der, bytes | bytearray):
        raise FormatError(f"the public key is DER bytes, not {type(public_key_der).__name__}")
    try:
        x509.key_algorithm_of(bytes(public_key_der))
    except x509.X509Error as error:
        raise FormatError(f"the public key: {error}") from None
    key = serialization.load_der_public_key(bytes(public_key_der))
    prehashed = utils.Prehashed(hash_class())
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(bytes(signature), bytes(digest), ec.ECDSA(prehashed))
        else:
            key.verify(bytes(signature), bytes(digest), padding.PKCS1v15(), prehashed)
    except InvalidSignature:
        raise FormatError("the signature does not verify with the public key over this digest "
                          "(another key version, another digest, or a faulty token)") from None
    return {
        "mediaType": MEDIA_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": key_hint(public_key_der)},
            "tlogEntries": [],
        },
        "messageSignature": {
            "messageDigest": {"algorithm": algorithm, "digest": base64.b64encode(bytes(digest)).decode("ascii")},
            "signature": base64.b64encode(bytes(signature)).decode("ascii"),
        },
    }

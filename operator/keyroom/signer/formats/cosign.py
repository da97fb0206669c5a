"""Container image signatures as cosign makes them: a simple-signing payload and a signature over it.

cosign signs an image by signing a small JSON document, the *simple-signing
payload*, that names the image's repository and the digest of its manifest::

    {"critical":{"identity":{"docker-reference":"registry.example/team/app"},
                 "image":{"docker-manifest-digest":"sha256:<hex>"},
                 "type":"cosign container image signature"},"optional":null}

The signature covers the payload's bytes (ECDSA or RSA PKCS#1 v1.5 over their
SHA-256). It is attached to the registry beside the image, under the tag
``sha256-<hex>.sig``, as an OCI manifest whose one layer is the payload and
whose annotation ``dev.cosignproject.cosign/signature`` carries the signature;
``cosign verify --key`` and admission controllers (Sigstore's
policy-controller, Kyverno) read it from there.

In a SignRequest of format cosign each digest names one image: ``name`` is the
image reference (repository, optionally with the tag it was resolved from) and
``value`` the hex of its manifest's SHA-256. The signer builds the payload
itself from those two, so it knows exactly which image it signs; a tag is
shown to approvers but never signed (cosign signs the repository and the
digest, not the tag, so a moved tag cannot carry a signature to other
content). The signer returns :func:`document`'s JSON: the payload and the
signature, which the client attaches unchanged.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

from keyroom.api.signrequest import IMAGE_REFERENCE_PATTERN
from keyroom.signer.formats import FormatError

PAYLOAD_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_TYPE = "cosign container image signature"
_REFERENCE = re.compile(IMAGE_REFERENCE_PATTERN)


def split_reference(name: str) -> tuple[str, str | None]:
    """(repository, tag or None) of a digest's name; FormatError unless it is ``host[:port]/path[:tag]``."""
    if not isinstance(name, str) or not _REFERENCE.match(name) or len(name) > 253:
        raise FormatError(f"{name!r} is not an image reference of the form registry.example/path/name[:tag] "
                          "(the registry named, no @digest: the digest is the request's value)")
    last = name.rsplit("/", 1)[1]
    if ":" in last:
        repository, tag = name.rsplit(":", 1)
        return repository, tag
    return name, None


def payload(*, reference: str, digest: bytes) -> bytes:
    """The simple-signing payload for the image with manifest SHA-256 ``digest`` in ``reference``'s repository.

    The bytes are what cosign itself writes (Go's encoding/json field order, no
    spaces); a verifier checks the signature over these exact bytes.
    """
    if not isinstance(digest, bytes | bytearray) or len(digest) != 32:
        raise FormatError("an image's manifest digest is a SHA-256: 32 bytes")
    repository, _ = split_reference(reference)
    document = {"critical": {"identity": {"docker-reference": repository},
                             "image": {"docker-manifest-digest": "sha256:" + bytes(digest).hex()},
                             "type": SIGNATURE_TYPE},
                "optional": None}
    return json.dumps(document, separators=(",", ":")).encode()


def check_signature(*, public_key_der: bytes, data: bytes, signature: bytes) -> None:
    """FormatError unless ``signature`` is the key's signature over SHA-256(``data``)."""
    key = serialization.load_der_public_key(bytes(public_key_der))
    prehashed = utils.Prehashed(hashes.SHA256())
    digest = hashlib.sha256(data).digest()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(bytes(signature), digest, ec.ECDSA(prehashed))
        else:
            key.verify(bytes(signature), digest, padding.PKCS1v15(), prehashed)
    except (InvalidSignature, TypeError, ValueError):
        raise FormatError("the signature does not verify with the public key over the payload "
                          "(another key version, another payload, or a faulty token)") from None


def document(*, reference: str, digest: bytes, digest_algorithm: str, public_key_der: bytes | None, sign) -> dict:
    """The payload for one image and the key's signature over it, checked before it is returned."""
    if digest_algorithm != "SHA256":
        raise FormatError(f"image manifest digests are SHA256, not {digest_algorithm}")
    if public_key_der is None:
        raise FormatError("the key version's public key is not known")
    data = payload(reference=reference, digest=digest)
    signature = sign(hashlib.sha256(data).digest(), "SHA256")
    check_signature(public_key_der=public_key_der, data=data, signature=signature)
    return {"mediaType": PAYLOAD_MEDIA_TYPE, "payload": base64.b64encode(data).decode("ascii"),
            "signature": base64.b64encode(bytes(signature)).decode("ascii")}


def parse(data: bytes) -> tuple[bytes, bytes]:
    """(payload, signature) from the bytes the signer returned for one image."""
    try:
        found = json.loads(data)
        return base64.b64decode(found["payload"], validate=True), base64.b64decode(found["signature"], validate=True)
    except (ValueError, KeyError, TypeError):
        raise FormatError("not a cosign signature document from keyroom's signer") from None


def claims(data: bytes) -> tuple[str, str]:
    """(docker-reference, docker-manifest-digest) a simple-signing payload claims; FormatError when it is not one."""
    try:
        critical = json.loads(data)["critical"]
        if critical["type"] != SIGNATURE_TYPE:
            raise FormatError(f"the payload's type is {critical['type']!r}, not {SIGNATURE_TYPE!r}")
        return str(critical["identity"]["docker-reference"]), str(critical["image"]["docker-manifest-digest"])
    except (ValueError, KeyError, TypeError):
        raise FormatError("not a simple-signing payload") from None

"""Signed structures of the code-signing formats, built around a digest the signer was given.

Each module builds one signed structure (a detached CMS SignedData, an
Authenticode PKCS#7, ...) from three things: the digest of the artifact, the
certificate chain of the signing key, and the signing callback
(:data:`keyroom.signer.x509.SignDigest`), which is the only private-key
operation and only ever gets the digest of bytes built here. The artifact
itself never reaches the signer: what it signs is assembled field by field from
checked inputs, so no caller can have it sign bytes of their choosing. The
modules are pure: no I/O, no clock (times are arguments), no token.
"""
from __future__ import annotations

import json


class FormatError(ValueError):
    """Arguments that cannot make the signed structure, or a signature that does not verify."""


def build(fmt: str, *, digest: bytes, digest_algorithm: str, embedded, manifest: bytes | None,
          public_key_der: bytes | None, signing_time, sign, apk_signed_data=None, name: str = "") -> bytes:
    """The bytes a SignRequest's status carries for one digest in format ``fmt`` (base64-encoded there).

    raw: the signature over the digest; cms, authenticode: DER ContentInfo; jar: the signature block (.EC or
    .RSA) over the signature file derived from ``manifest``; sigstore: the bundle's JSON; apk: the APK Signing
    Block over ``apk_signed_data``, ``[(scheme, signed data)]``; cosign: the JSON of the simple-signing payload
    the signer builds for the image ``name`` (the digest's name) and the signature over it. ``embedded`` is the
    certificate and chain the signer chose (:class:`keyroom.signer.certificates.Usable`) for the formats that
    embed one.
    """
    # imported here: each of them imports FormatError from this package
    from keyroom.signer.formats import authenticode, cms, jar, sigstore

    if fmt == "raw":
        return sign(digest, digest_algorithm)
    if fmt == "sigstore":
        if public_key_der is None:
            raise FormatError("the key version's public key is not known")
        document = sigstore.bundle(digest=digest, digest_algorithm=digest_algorithm, public_key_der=public_key_der,
                                   signature=sign(digest, digest_algorithm))
        return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
    if fmt == "cosign":
        from keyroom.signer.formats import cosign

        return json.dumps(cosign.document(reference=name, digest=digest, digest_algorithm=digest_algorithm,
                                          public_key_der=public_key_der, sign=sign)).encode()
    if embedded is None:
        raise FormatError(f"format {fmt} needs a certificate")
    chain = [c.der for c in embedded.chain] or list(embedded.certificate.external_chain)
    common = {"digest_algorithm": digest_algorithm, "certificate_der": embedded.certificate.der, "chain_der": chain,
              "signing_time": signing_time, "sign": sign}
    if fmt == "cms":
        return cms.detached(digest=digest, **common)
    if fmt == "authenticode":
        return authenticode.signature(digest=digest, **common)
    if fmt == "jar":
        if manifest is None:
            raise FormatError("format jar needs the manifest")
        return jar.block(manifest=manifest, **common)
    if fmt == "apk":
        from keyroom.signer.formats import apk

        return apk.signing_block(blocks=apk_signed_data or [], digest=digest, digest_algorithm=digest_algorithm,
                                 certificate_der=embedded.certificate.der, sign=sign)
    raise FormatError(f"unknown format {fmt!r}")

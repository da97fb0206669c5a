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


class FormatError(ValueError):
    """Arguments that cannot make the signed structure, or a signature that does not verify."""

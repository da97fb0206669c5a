"""APK signatures: the v2 and v3 signed data a client built, checked, signed, and wrapped into an APK Signing Block.

APK Signature Scheme v2 and v3 (Android's ``apksig``, ``ApkSigningBlockUtils``)
sign a *signed data* structure per signer: the APK's content digest, the
signer's certificates and a few attributes (v3 adds the SDK range it applies
to). The content digest covers the whole file except the signing block
itself, chunked: every 1 MiB chunk of the zip entries, the central directory
and the end of central directory is hashed with a ``0xa5`` prefix and its
length, and the chunk digests are hashed with a ``0x5a`` prefix and their
count (:func:`content_digest`). The signing block sits between the entries and
the central directory, so adding it changes no digested byte except the
central directory's offset in the end record, which is digested as if the block
were not there.

The client has the APK, so it computes the content digest and writes the
signed data (:func:`signed_data`). The signer never signs signed data it has
not parsed: :func:`parse_signed_data` reads it strictly (every length must
account for every byte), and :func:`check` requires exactly one digest, made
with the one signature algorithm that fits the certificate's key and equal to
the request's digest, exactly the certificate the signer chose for the key
version, and no attribute but the v2 block's "also signed with v3" marker.
Only then does :func:`signing_block` sign each block and build the APK Signing
Block around them, with the public key taken from that certificate. The
signatures are what ``java.security.Signature`` makes: DER ECDSA-Sig-Value, or
RSASSA-PKCS1-v1_5.

Layout (all integers little-endian; "prefixed" means a uint32 length first):

- v2 signed data: prefixed digests (each prefixed: uint32 algorithm, prefixed
  digest), prefixed certificates (each prefixed DER), prefixed attributes
  (each prefixed: uint32 id, value); apksig adds an empty prefixed element
  (four zero bytes), accepted as the only thing after the attributes;
- v3 signed data: the same, with uint32 minSdk and maxSdk before the attributes;
- a signer: prefixed signed data, (v3: uint32 minSdk, maxSdk,) prefixed
  signatures (each prefixed: uint32 algorithm, prefixed signature), prefixed
  SubjectPublicKeyInfo; a scheme's value is a prefixed sequence of prefixed signers;
- the APK Signing Block: uint64 size, pairs (uint64 length, uint32 id, value),
  uint64 size again, ``APK Sig Block 42``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import struct
from typing import Iterable, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from keyroom.signer.formats import FormatError
from keyroom.signer.x509 import SignDigest

#: the scheme block's ID in the APK Signing Block
SCHEME_IDS = {"v2": 0x7109871A, "v3": 0xF05368C0}
MAGIC = b"APK Sig Block 42"
#: the v2 attribute saying which newer scheme also signed the APK, so that stripping that scheme is detected
STRIPPING_PROTECTION_ID = 0xBEEFF00D
#: SDK range of a v3 signer: Android 9 (the first to read v3) onward
V3_MIN_SDK, V3_MAX_SDK = 28, 0x7FFFFFFF
CHUNK_SIZE = 1 << 20
#: apksig (apksigner) ends v2 signed data with one more, empty, length-prefixed element; verifiers ignore it
APKSIG_V2_PADDING = bytes(4)
#: the longest signed data accepted: one digest, one certificate, one attribute (a certificate is well under 8 KiB)
MAX_SIGNED_DATA = 16384


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """An APK signature algorithm: its ID, the hash of its content digest and signature, and its JCA name."""

    id: int
    digest_algorithm: str
    jca: str


ECDSA_SHA256 = Algorithm(0x0201, "SHA256", "SHA256withECDSA")
ECDSA_SHA512 = Algorithm(0x0202, "SHA512", "SHA512withECDSA")
RSA_PKCS1_SHA256 = Algorithm(0x0103, "SHA256", "SHA256withRSA")
RSA_PKCS1_SHA512 = Algorithm(0x0104, "SHA512", "SHA512withRSA")
ALGORITHMS = {a.id: a for a in (ECDSA_SHA256, ECDSA_SHA512, RSA_PKCS1_SHA256, RSA_PKCS1_SHA512)}
_HASHES = {"SHA256": (hashlib.sha256, hashes.SHA256), "SHA512": (hashlib.sha512, hashes.SHA512)}


def algorithm_for(public_key_der: bytes) -> Algorithm:
    """The algorithm apksigner picks for this key: SHA-256 up to P-256 and RSA 3072, SHA-512 above (apksig's rule)."""
    try:
        key = serialization.load_der_public_key(bytes(public_key_der))
    except ValueError as error:
        raise FormatError(f"the certificate's public key cannot be read: {error}") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        return ECDSA_SHA256 if key.curve.key_size <= 256 else ECDSA_SHA512
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_PKCS1_SHA256 if key.key_size <= 3072 else RSA_PKCS1_SHA512
    raise FormatError(f"an APK is signed with an EC or RSA key, not {type(key).__name__}")


def certificate_public_key(certificate_der: bytes) -> bytes:
    """The SubjectPublicKeyInfo of a DER certificate (what a signer block carries as its public key)."""
    from cryptography import x509 as crypto_x509

    try:
        certificate = crypto_x509.load_der_x509_certificate(bytes(certificate_der))
    except ValueError as error:
        raise FormatError(f"the signing certificate is not a DER X.509 certificate: {error}") from None
    return certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


# --------------------------------------------------------------------------- content digest


def content_digest(sections: Iterable[bytes | memoryview], digest_algorithm: str = "SHA256") -> bytes:
    """The chunked content digest of the APK's three sections (entries, central directory, end record)."""
    if digest_algorithm not in _HASHES:
        raise FormatError(f"APK content digests are SHA256 or SHA512, not {digest_algorithm!r}")
    hash_function = _HASHES[digest_algorithm][0]
    chunks = []
    for section in sections:
        view = memoryview(section)
        for start in range(0, len(view), CHUNK_SIZE):
            chunk = view[start:start + CHUNK_SIZE]
            digest = hash_function(b"\xa5" + struct.pack("<I", len(chunk)))
            digest.update(chunk)
            chunks.append(digest.digest())
    return hash_function(b"\x5a" + struct.pack("<I", len(chunks)) + b"".join(chunks)).digest()


# --------------------------------------------------------------------------- writing


def _prefixed(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def _sequence(items: Iterable[bytes]) -> bytes:
    return _prefixed(b"".join(_prefixed(item) for item in items))


def signed_data(scheme: str, *, digest: bytes, algorithm: Algorithm, certificate_der: bytes,
                min_sdk: int = V3_MIN_SDK, max_sdk: int = V3_MAX_SDK, also_v3: bool = False,
                padded: bool = False) -> bytes:
    """The ``scheme`` (v2 or v3) signed data over the content ``digest`` with one certificate.

    ``also_v3`` (v2 only) adds the attribute that tells a verifier a v3 block
    must be present too; ``padded`` (v2 only) the empty element apksig appends.
    """
    digests = _sequence([struct.pack("<I", algorithm.id) + _prefixed(digest)])
    certificates = _sequence([bytes(certificate_der)])
    if scheme == "v2":
        attributes = [struct.pack("<II", STRIPPING_PROTECTION_ID, 3)] if also_v3 else []
        return digests + certificates + _sequence(attributes) + (APKSIG_V2_PADDING if padded else b"")
    if scheme == "v3":
        return digests + certificates + struct.pack("<II", min_sdk, max_sdk) + _sequence([])
    raise FormatError(f"unknown APK signature scheme {scheme!r}; v2 or v3")


# --------------------------------------------------------------------------- reading


class _Reader:
    """Length-prefixed little-endian fields of one buffer; any overrun or leftover byte is a FormatError."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.position, self.what = bytes(data), 0, what

    def uint32(self) -> int:
        if self.position + 4 > len(self.data):
            raise FormatError(f"{self.what} ends inside a number")
        value, = struct.unpack_from("<I", self.data, self.position)
        self.position += 4
        return value

    def prefixed(self) -> bytes:
        length = self.uint32()
        if self.position + length > len(self.data):
            raise FormatError(f"{self.what} holds a field of {length} bytes that runs past its end")
        value = self.data[self.position:self.position + length]
        self.position += length
        return value

    def sequence(self, what: str) -> list[bytes]:
        inner = _Reader(self.prefixed(), f"{self.what}: {what}")
        items = []
        while inner.position < len(inner.data):
            items.append(inner.prefixed())
        return items

    def pairs(self, what: str, item: str) -> list[tuple[int, bytes]]:
        """A prefixed sequence of (uint32, prefixed value) entries, each read strictly (an entry is ``item``)."""
        found = []
        for raw in self.sequence(what):
            entry = _Reader(raw, item)
            found.append((entry.uint32(), entry.prefixed()))
            entry.end()
        return found

    def end(self) -> None:
        if self.position != len(self.data):
            raise FormatError(f"{self.what} has {len(self.data) - self.position} bytes after its last field")


@dataclasses.dataclass(frozen=True)
class SignedData:
    """One parsed signed data block, and its exact bytes (what gets signed)."""

    scheme: str
    raw: bytes
    digests: tuple[tuple[int, bytes], ...]
    certificates: tuple[bytes, ...]
    attributes: tuple[tuple[int, bytes], ...]
    min_sdk: int | None = None
    max_sdk: int | None = None
    #: v2 only: ends with the empty element apksig appends (:data:`APKSIG_V2_PADDING`)
    padded: bool = False


def parse_signed_data(scheme: str, data: bytes) -> SignedData:
    """``data`` read as ``scheme`` (v2 or v3) signed data, strictly: every byte belongs to a field."""
    if scheme not in SCHEME_IDS:
        raise FormatError(f"unknown APK signature scheme {scheme!r}; v2 or v3")
    if not isinstance(data, bytes | bytearray) or not data:
        raise FormatError(f"the {scheme} signed data is empty")
    if len(data) > MAX_SIGNED_DATA:
        raise FormatError(f"the {scheme} signed data is {len(data)} bytes; at most {MAX_SIGNED_DATA} are accepted")
    reader = _Reader(data, f"the {scheme} signed data")
    digests = reader.pairs("digests", f"a {scheme} digest")
    certificates = tuple(reader.sequence("certificates"))
    min_sdk = max_sdk = None
    if scheme == "v3":
        min_sdk, max_sdk = reader.uint32(), reader.uint32()
    attributes = []
    for item in reader.sequence("attributes"):
        entry = _Reader(item, f"a {scheme} attribute")
        attributes.append((entry.uint32(), entry.data[entry.position:]))
    padded = scheme == "v2" and reader.data[reader.position:] == APKSIG_V2_PADDING
    if padded:
        reader.position += len(APKSIG_V2_PADDING)
    reader.end()
    return SignedData(scheme=scheme, raw=bytes(data), digests=tuple(digests), certificates=certificates,
                      attributes=tuple(attributes), min_sdk=min_sdk, max_sdk=max_sdk, padded=padded)


def check(blocks: Sequence[tuple[str, bytes]], *, digest: bytes, digest_algorithm: str,
          certificate_der: bytes) -> list[SignedData]:
    """The signed data ``blocks`` (scheme, bytes), parsed, if each is what the signer may sign; else FormatError.

    Each must carry exactly one digest, equal to ``digest``, under the
    signature algorithm of the certificate's key (whose content digest is
    ``digest_algorithm``), and exactly the certificate ``certificate_der``.
    v2 may carry only the attribute that marks a v3 signature (and then the
    v3 block must be there); v3 carries none and a sane SDK range.
    """
    schemes = [scheme for scheme, _ in blocks]
    if not schemes or len(set(schemes)) != len(schemes):
        raise FormatError(f"an APK request carries one signed data block per scheme (v2, v3), not {schemes}")
    algorithm = algorithm_for(certificate_public_key(certificate_der))
    if digest_algorithm != algorithm.digest_algorithm:
        raise FormatError(f"the key's APK signature algorithm {algorithm.jca} (0x{algorithm.id:04x}) takes a "
                          f"{algorithm.digest_algorithm} content digest, not {digest_algorithm}")
    parsed = [parse_signed_data(scheme, data) for scheme, data in blocks]
    for block in parsed:
        if block.digests != ((algorithm.id, bytes(digest)),):
            found = ", ".join(f"0x{identifier:04x}:{value.hex()}" for identifier, value in block.digests) or "none"
            raise FormatError(f"the {block.scheme} signed data must carry one digest, the request's content digest "
                              f"under algorithm 0x{algorithm.id:04x} ({algorithm.jca}); it carries {found}")
        if block.certificates != (bytes(certificate_der),):
            raise FormatError(f"the {block.scheme} signed data must carry exactly the key version's certificate "
                              f"(sha256:{hashlib.sha256(certificate_der).hexdigest()}); it carries "
                              f"{len(block.certificates)} other(s): sign again with the current certificate")
        if block.scheme == "v2":
            allowed = ((STRIPPING_PROTECTION_ID, struct.pack("<I", 3)),)
            if block.attributes not in ((), allowed):
                raise FormatError("the v2 signed data may carry only the attribute that marks a v3 signature")
            if block.attributes and "v3" not in schemes:
                raise FormatError("the v2 signed data says the APK is signed with v3 too, but no v3 block came")
        elif block.attributes:
            raise FormatError("the v3 signed data carries attributes (key rotation is not supported)")
        elif not 0 < block.min_sdk <= block.max_sdk:
            raise FormatError(f"the v3 signed data's SDK range {block.min_sdk}..{block.max_sdk} is empty")
    return parsed


# --------------------------------------------------------------------------- signing


def verifies(public_key_der: bytes, signature: bytes, data: bytes, algorithm: Algorithm) -> bool:
    """Whether ``signature`` is ``algorithm``'s signature over ``data`` by the key ``public_key_der``."""
    try:
        key = serialization.load_der_public_key(bytes(public_key_der))
    except ValueError:
        return False
    crypto_hash = _HASHES[algorithm.digest_algorithm][1]()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey) and algorithm.jca.endswith("ECDSA"):
            key.verify(signature, data, ec.ECDSA(crypto_hash))
        elif isinstance(key, rsa.RSAPublicKey) and algorithm.jca.endswith("RSA"):
            key.verify(signature, data, padding.PKCS1v15(), crypto_hash)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def signing_block(*, blocks: Sequence[tuple[str, bytes]], digest: bytes, digest_algorithm: str,
                  certificate_der: bytes, sign: SignDigest) -> bytes:
    """The APK Signing Block: each checked signed data block signed once through ``sign``, with its signer."""
    parsed = check(blocks, digest=digest, digest_algorithm=digest_algorithm, certificate_der=certificate_der)
    public_key = certificate_public_key(certificate_der)
    algorithm = algorithm_for(public_key)
    hash_function = _HASHES[algorithm.digest_algorithm][0]
    pairs = []
    for block in sorted(parsed, key=lambda b: b.scheme):
        signature = sign(hash_function(block.raw).digest(), algorithm.digest_algorithm)
        if not verifies(public_key, signature, block.raw, algorithm):
            raise FormatError("the key's signature over the signed data does not verify with the certificate's "
                              "public key: the certificate is not this key version's")
        signatures = _sequence([struct.pack("<I", algorithm.id) + _prefixed(signature)])
        sdk = struct.pack("<II", block.min_sdk, block.max_sdk) if block.scheme == "v3" else b""
        signer = _prefixed(block.raw) + sdk + signatures + _prefixed(public_key)
        pairs.append((SCHEME_IDS[block.scheme], _sequence([signer])))
    return block_of(pairs)


def block_of(pairs: Sequence[tuple[int, bytes]]) -> bytes:
    """An APK Signing Block holding the ``(id, value)`` pairs."""
    body = b"".join(struct.pack("<QI", 4 + len(value), identifier) + value for identifier, value in pairs)
    size = len(body) + 8 + len(MAGIC)
    return struct.pack("<Q", size) + body + struct.pack("<Q", size) + MAGIC


def parse_block(block: bytes) -> dict[int, bytes]:
    """The ``id -> value`` pairs of an APK Signing Block (whole, nothing after it); FormatError if malformed."""
    block = bytes(block)
    if len(block) < 32 or not block.endswith(MAGIC):
        raise FormatError("not an APK Signing Block (no 'APK Sig Block 42' at its end)")
    size, = struct.unpack_from("<Q", block, 0)
    trailing, = struct.unpack_from("<Q", block, len(block) - 24)
    if size != trailing or size != len(block) - 8:
        raise FormatError("the APK Signing Block's sizes disagree with its length")
    pairs, position, end = {}, 8, len(block) - 24
    while position < end:
        if position + 12 > end:
            raise FormatError("the APK Signing Block ends inside a pair")
        length, identifier = struct.unpack_from("<QI", block, position)
        if length < 4 or position + 8 + length > end:
            raise FormatError("an APK Signing Block pair runs past the block")
        if identifier in pairs:
            raise FormatError(f"the APK Signing Block holds the pair 0x{identifier:08x} twice")
        pairs[identifier] = block[position + 12:position + 8 + length]
        position += 8 + length
    return pairs


@dataclasses.dataclass(frozen=True)
class Signer:
    """One signer of a scheme block, as a verifier reads it."""

    signed_data: SignedData
    signatures: tuple[tuple[int, bytes], ...]
    public_key: bytes
    min_sdk: int | None = None
    max_sdk: int | None = None


def signers(scheme: str, value: bytes) -> list[Signer]:
    """The signers of a v2 or v3 block's ``value``, each read strictly."""
    found = []
    for raw in _Reader(value, f"the {scheme} block").sequence("signers"):
        reader = _Reader(raw, f"a {scheme} signer")
        signed = parse_signed_data(scheme, reader.prefixed())
        min_sdk = max_sdk = None
        if scheme == "v3":
            min_sdk, max_sdk = reader.uint32(), reader.uint32()
        signatures = reader.pairs("signatures", f"a {scheme} signature")
        public_key = reader.prefixed()
        reader.end()
        found.append(Signer(signed_data=signed, signatures=tuple(signatures), public_key=public_key,
                            min_sdk=min_sdk, max_sdk=max_sdk))
    return found


def signed_data_of(block: bytes) -> dict[str, bytes]:
    """The signed data of each scheme's only signer in an APK Signing Block (to check what came back)."""
    pairs = parse_block(block)
    found = {}
    for scheme, identifier in SCHEME_IDS.items():
        if identifier in pairs:
            signers = _Reader(pairs[identifier], f"the {scheme} block").sequence("signers")
            if len(signers) != 1:
                raise FormatError(f"the {scheme} block holds {len(signers)} signers, not one")
            found[scheme] = _Reader(signers[0], f"the {scheme} signer").prefixed()
    return found


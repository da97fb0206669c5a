"""Offline verification (keyroom.cli.verify) of every format the signer builds, and of every way it must fail.

The signatures are made by the signer's own format builders with software keys
(the builders only ever get a signing callback), the certificates and CRLs by
the signer's own x509 module; PE and JAR files are made and signed by the
client's code. Each format is checked once as valid and then broken one
thing at a time: the artifact, the signature, the key, the chain, the CRL.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import zipfile

import pytest
from cryptography import x509 as crypto_x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from keyroom.cli import jar as cli_jar
from keyroom.cli import pe
from keyroom.cli.verify import NotVerified, Trust, TrustError, guess_format, verify
from keyroom.devenv import samples
from keyroom.signer import x509
from keyroom.signer.formats import authenticode, cms, sigstore
from keyroom.signer.formats import jar as jar_format

UTC = datetime.timezone.utc
NOW = datetime.datetime.now(UTC).replace(microsecond=0)
HASHES = {"SHA256": hashes.SHA256, "SHA384": hashes.SHA384, "SHA512": hashes.SHA512}


class SoftKey:
    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.public_der = self.private.public_key().public_bytes(serialization.Encoding.DER,
                                                                 serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, digest: bytes, algorithm: str) -> bytes:
        return self.private.sign(digest, ec.ECDSA(utils.Prehashed(HASHES[algorithm]())))

    @property
    def public(self):
        return self.private.public_key()


class Pki:
    """A root CA, a code-signing leaf under it, and CRLs of the root (empty, and revoking the leaf)."""

    def __init__(self, name: str = "Test", *, leaf_days: int = 7) -> None:
        self.ca_key, self.leaf_key = SoftKey(), SoftKey()
        self.ca = x509.build_certificate(
            subject={"commonName": f"{name} CA"}, subject_public_key_der=self.ca_key.public_der,
            issuer_certificate_der=None, issuer_public_key_der=self.ca_key.public_der,
            not_before=NOW - datetime.timedelta(hours=1), not_after=NOW + datetime.timedelta(days=30),
            serial=x509.new_serial(), is_ca=True, sign=self.ca_key.sign, key_algorithm="ECDSA_P256")
        self.serial = x509.new_serial()
        self.leaf = x509.build_certificate(
            subject={"commonName": f"{name} release"}, subject_public_key_der=self.leaf_key.public_der,
            issuer_certificate_der=self.ca, issuer_public_key_der=self.ca_key.public_der,
            not_before=NOW - datetime.timedelta(minutes=5), not_after=NOW + datetime.timedelta(days=leaf_days),
            serial=self.serial, sign=self.ca_key.sign, key_algorithm="ECDSA_P256")
        times = {"this_update": NOW - datetime.timedelta(minutes=1), "next_update": NOW + datetime.timedelta(days=1)}
        self.empty_crl = x509.build_crl(issuer_certificate_der=self.ca, revoked=[], crl_number=1,
                                        sign=self.ca_key.sign, key_algorithm="ECDSA_P256", **times)
        self.revoking_crl = x509.build_crl(issuer_certificate_der=self.ca, crl_number=2, sign=self.ca_key.sign,
                                           key_algorithm="ECDSA_P256", **times,
                                           revoked=[(self.serial, NOW - datetime.timedelta(minutes=2),
                                                     "keyCompromise")])

    def trust(self, *, crl: bytes | None = None, keys: bool = False, roots: bool = True) -> Trust:
        return Trust(public_keys=[self.leaf_key.public] if keys else [],
                     roots=[crypto_x509.load_der_x509_certificate(self.ca)] if roots else [],
                     crls=[crypto_x509.load_der_x509_crl(crl)] if crl else [])

    def embedded(self) -> dict:
        return {"certificate_der": self.leaf, "chain_der": [self.ca], "signing_time": NOW, "sign": self.leaf_key.sign}


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture(scope="module")
def other() -> Pki:
    return Pki("Other")


ARTIFACT = b"release 1.4.2\n" * 1000


def check(fmt: str, artifact: bytes, signature: bytes | None, trust: Trust, path: str = "app.bin", **extra):
    return verify(fmt, artifact_path=path, artifact=artifact, signature=signature, trust=trust, **extra)


def test_a_raw_signature_verifies_with_the_key_version_and_with_nothing_else(pki, other):
    signature = pki.leaf_key.sign(hashlib.sha384(ARTIFACT).digest(), "SHA384")
    report = check("raw", ARTIFACT, signature, Trust(public_keys=[other.leaf_key.public, pki.leaf_key.public]),
                   algorithm="SHA384")
    assert report.signer["keyFingerprint"] == "sha256:" + hashlib.sha256(pki.leaf_key.public_der).hexdigest()
    assert any("valid over the SHA384 digest" in line for line in report.checked)
    with pytest.raises(NotVerified, match="does not verify"):
        check("raw", ARTIFACT, signature, Trust(public_keys=[pki.leaf_key.public]))  # SHA256 by default
    with pytest.raises(NotVerified, match="does not verify"):
        check("raw", ARTIFACT + b"x", signature, Trust(public_keys=[pki.leaf_key.public]), algorithm="SHA384")
    with pytest.raises(NotVerified):
        check("raw", ARTIFACT, signature, Trust(public_keys=[other.leaf_key.public]), algorithm="SHA384")
    with pytest.raises(TrustError, match="nothing to trust"):
        check("raw", ARTIFACT, signature, Trust(), algorithm="SHA384")
    with pytest.raises(TrustError, match="names no certificate"):  # a root alone says nothing about a raw signature
        check("raw", ARTIFACT, signature, pki.trust(), algorithm="SHA384")
    leaf = crypto_x509.load_der_x509_certificate(pki.leaf)
    report = check("raw", ARTIFACT, signature, pki.trust(crl=pki.empty_crl), algorithm="SHA384", certificate=leaf)
    assert any(line.startswith("certificate chain:") for line in report.checked)
    with pytest.raises(NotVerified, match="revoked"):
        check("raw", ARTIFACT, signature, pki.trust(crl=pki.revoking_crl), algorithm="SHA384", certificate=leaf)


def test_a_detached_cms_signature_verifies_against_the_root_and_the_crl(pki):
    signature = cms.detached(digest=hashlib.sha256(ARTIFACT).digest(), digest_algorithm="SHA256", **pki.embedded())
    report = check("cms", ARTIFACT, signature, pki.trust(crl=pki.empty_crl))
    text = "\n".join(report.checked)
    for expected in ("content digest: the signed messageDigest", "signature: valid, ECDSA secp256r1 with SHA256",
                     "certificate chain: CN=Test CA <- CN=Test release", "revocation: CN=Test release is not on"):
        assert expected in text
    assert report.signer["serialNumber"] == format(pki.serial, "x")
    assert "signing time: as the signer claims it (no trusted timestamp)" in report.not_checked
    assert check("cms", ARTIFACT, signature, pki.trust(keys=True, roots=False)).not_checked[-1].startswith(
        "certificate chain: no root given")
    without_crl = check("cms", ARTIFACT, signature, pki.trust())
    assert "revocation: no CRL given (--crl)" in without_crl.not_checked


@pytest.mark.parametrize("change, message", [
    ("artifact", "messageDigest is not the digest of this artifact"),
    ("signature byte", "does not verify|not a readable"),
    ("other root", "not a root you trust"),
    ("other key", "none of the public keys you trust"),
    ("revoked", "is revoked since"),
    ("later", "not at"),
])
def test_a_cms_signature_fails_for_each_broken_part(pki, other, change, message):
    signature = cms.detached(digest=hashlib.sha256(ARTIFACT).digest(), digest_algorithm="SHA256", **pki.embedded())
    artifact, trust, at = ARTIFACT, pki.trust(crl=pki.empty_crl), None
    if change == "artifact":
        artifact = ARTIFACT.replace(b"1.4.2", b"1.4.3", 1)
    elif change == "signature byte":
        signature = signature[:-10] + bytes([signature[-10] ^ 1]) + signature[-9:]
    elif change == "other root":
        trust = other.trust()
    elif change == "other key":
        trust = Trust(public_keys=[other.leaf_key.public])
    elif change == "revoked":
        trust = pki.trust(crl=pki.revoking_crl)
    elif change == "later":
        at = NOW + datetime.timedelta(days=8)  # the leaf lives 7 days
    with pytest.raises(NotVerified, match=message):
        check("cms", artifact, signature, trust, at=at)


def test_a_crl_with_a_forged_signature_fails(pki):
    signature = cms.detached(digest=hashlib.sha256(ARTIFACT).digest(), digest_algorithm="SHA256", **pki.embedded())
    crl = bytearray(pki.empty_crl)
    crl[-5] ^= 1  # inside the CRL's signature value
    trust = pki.trust()
    trust.crls = [crypto_x509.load_der_x509_crl(bytes(crl))]
    with pytest.raises(NotVerified, match="is not signed by CN=Test CA"):
        check("cms", ARTIFACT, signature, trust)


def test_a_signature_from_a_leaf_without_code_signing_fails(pki):
    tls_key = SoftKey()
    ca = crypto_x509.load_der_x509_certificate(pki.ca)
    server = (crypto_x509.CertificateBuilder().subject_name(crypto_x509.Name.from_rfc4514_string("CN=not for code"))
              .issuer_name(ca.subject).public_key(tls_key.public).serial_number(crypto_x509.random_serial_number())
              .not_valid_before(NOW - datetime.timedelta(minutes=5)).not_valid_after(NOW + datetime.timedelta(days=7))
              .add_extension(crypto_x509.ExtendedKeyUsage([crypto_x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                             critical=False)
              .sign(pki.ca_key.private, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    signature = cms.detached(digest=hashlib.sha256(ARTIFACT).digest(), digest_algorithm="SHA256",
                             certificate_der=server, chain_der=[pki.ca], signing_time=NOW, sign=tls_key.sign)
    with pytest.raises(NotVerified, match="not for code signing"):
        check("cms", ARTIFACT, signature, pki.trust())


def test_an_authenticode_signed_pe_verifies_and_a_patched_one_does_not(pki, tmp_path):
    unsigned = samples.minimal_pe()
    digest = pe.authenticode_digest(unsigned, "SHA256")
    signed = pe.attach_signature(unsigned, authenticode.signature(digest=digest, digest_algorithm="SHA256",
                                                                  **pki.embedded()))
    report = check("authenticode", signed, None, pki.trust(crl=pki.empty_crl), path="app.exe")
    assert report.signer["authenticodeDigest"] == digest.hex()
    assert any(line.startswith("Authenticode digest: the signed SHA256 digest equals") for line in report.checked)
    patched = bytearray(signed)
    patched[len(unsigned) - 1] ^= 1  # a byte of the image the digest covers
    with pytest.raises(NotVerified, match="another executable"):
        check("authenticode", bytes(patched), None, pki.trust(), path="app.exe")
    with pytest.raises(NotVerified, match="carries no signature"):
        check("authenticode", unsigned, None, pki.trust(), path="app.exe")
    detached = authenticode.signature(digest=digest, digest_algorithm="SHA256", **pki.embedded())
    assert check("authenticode", unsigned, detached, pki.trust(), path="app.exe").checked
    cms_signature = cms.detached(digest=digest, digest_algorithm="SHA256", **pki.embedded())
    with pytest.raises(NotVerified, match="not an Authenticode signature"):
        check("authenticode", unsigned, cms_signature, pki.trust(), path="app.exe")


def _signed_jar(pki: Pki, directory, entries: dict[str, bytes]):
    source = directory / "app.jar"
    with zipfile.ZipFile(source, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    manifest = cli_jar.manifest(source, "SHA256")
    block = jar_format.block(manifest=manifest, digest_algorithm="SHA256", **pki.embedded())
    signed = directory / "signed.jar"
    cli_jar.write_signed(source, signed, manifest=manifest, block=block, block_name="EC",
                         signature_file=jar_format.signature_file(manifest, digest_algorithm="SHA256"))
    return signed, manifest


def _rewrite(source, target, change) -> None:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = change(info.filename, old.read(info))
            if data is not None:
                new.writestr(info, data)


def test_a_signed_jar_verifies_entry_by_entry(pki, tmp_path):
    signed, manifest = _signed_jar(pki, tmp_path, {"com/example/App.class": b"\xca\xfe\xba\xbe",
                                                   "config.properties": b"a=1\n"})
    report = check("jar", signed.read_bytes(), None, pki.trust(crl=pki.empty_crl), path=signed)
    assert report.signer["requestDigest"] == hashlib.sha256(manifest).hexdigest()  # what the SignRequest carried
    assert "entries: all 2 entries match their signed digests; none is unsigned" in report.checked
    for name, change, message in [
        ("tampered.jar", lambda n, d: b"a=2\n" if n == "config.properties" else d, "config.properties was changed"),
        ("added.jar", None, "not covered by the signature"),
        ("manifest.jar", lambda n, d: d + b"Name: x\r\nSHA-256-Digest: AAAA\r\n\r\n" if n.endswith("MANIFEST.MF")
         else d, "manifest was changed after signing"),
        ("removed.jar", lambda n, d: None if n == "config.properties" else d, "does not hold: config.properties"),
    ]:
        target = tmp_path / name
        if change is None:
            _rewrite(signed, target, lambda n, d: d)
            with zipfile.ZipFile(target, "a") as archive:
                archive.writestr("extra.class", b"injected")
        else:
            _rewrite(signed, target, change)
        with pytest.raises(NotVerified, match=message):
            check("jar", target.read_bytes(), None, pki.trust(), path=target)
    with pytest.raises(NotVerified, match="0 signature files"):
        check("jar", b"", None, pki.trust(), path=tmp_path / "app.jar")


def test_a_sigstore_bundle_verifies_with_its_key(pki, other):
    digest = hashlib.sha256(ARTIFACT).digest()
    bundle = sigstore.bundle(digest=digest, digest_algorithm="SHA256", public_key_der=pki.leaf_key.public_der,
                             signature=pki.leaf_key.sign(digest, "SHA256"))
    data = json.dumps(bundle).encode()
    report = check("sigstore", ARTIFACT, data, Trust(public_keys=[pki.leaf_key.public]))
    assert "transparency log: keyroom bundles carry none" in report.not_checked
    with pytest.raises(NotVerified, match="another content"):
        check("sigstore", ARTIFACT + b"!", data, Trust(public_keys=[pki.leaf_key.public]))
    with pytest.raises(NotVerified, match="does not verify"):
        check("sigstore", ARTIFACT, data, Trust(public_keys=[other.leaf_key.public]))
    with pytest.raises(NotVerified, match="not readable"):
        check("sigstore", ARTIFACT, b"{not json", Trust(public_keys=[pki.leaf_key.public]))


def test_the_format_follows_the_file_names():
    assert guess_format("a.bin", "a.bin.sig") == "raw"
    assert guess_format("a.bin", "a.bin.p7s") == "cms"
    assert guess_format("a.bin", "a.bin.sigstore.json") == "sigstore"
    assert guess_format("App.EXE", None) == "authenticode"
    assert guess_format("lib.jar", None) == "jar"
    with pytest.raises(TrustError, match="--format"):
        guess_format("a.bin", "a.sign")

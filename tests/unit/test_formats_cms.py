"""Detached CMS signatures of keyroom.signer.formats.cms, signed in a real SoftHSM2 token, checked by openssl.

The proof is ``openssl cms -verify``, run the way a consumer checks a detached
signature: the content, the ``.p7s``, and the CA as the only trust anchor
(``-purpose any``, because the leaf is for codeSigning, not S/MIME; a CRL goes
into the CA bundle with ``-crl_check``, as ``openssl cms`` 3.0 has no
``-CRLfile``). The token lives in a child process (tests/token_process.py);
each key is generated once per session, since RSA generation is slow.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import pathlib
import subprocess

import pytest

from keyroom.signer import x509
from keyroom.signer.formats import FormatError, cms
from tests.token_process import TokenProcess, code_signing_chain

ALGORITHMS = ("ECDSA_P256", "ECDSA_P384", "RSA_3072")
UTC = datetime.timezone.utc
NOW = datetime.datetime.now(UTC).replace(microsecond=0)
HASHES = {"SHA256": hashlib.sha256, "SHA384": hashlib.sha384, "SHA512": hashlib.sha512}


class Chain:
    """A CA, a code-signing leaf under it, and CRLs of the CA that revoke nothing and the leaf."""

    def __init__(self, algorithm: str, directory: pathlib.Path, token: TokenProcess) -> None:
        self.algorithm, self.directory = algorithm, directory
        made = code_signing_chain(token, algorithm, now=NOW, ca_name="Formats Test CA", leaf_name="formats-release",
                                  crl_distribution_point="http://crl.keyroom.test/formats.crl")
        self.ca, self.leaf, self.sign = made.ca, made.leaf, made.sign
        empty_crl, revoking_crl = made.empty_crl, made.revoking_crl
        ca_pem = x509.to_pem(self.ca)
        (directory / "ca.pem").write_text(ca_pem)
        (directory / "ca-empty-crl.pem").write_text(ca_pem + x509.to_pem(empty_crl, "X509 CRL"))
        (directory / "ca-revoking-crl.pem").write_text(ca_pem + x509.to_pem(revoking_crl, "X509 CRL"))

    def sign_file(self, name: str, content: bytes, digest_algorithm: str = "SHA256") -> bytes:
        (self.directory / name).write_bytes(content)
        signature = cms.detached(digest=HASHES[digest_algorithm](content).digest(), digest_algorithm=digest_algorithm,
                                 certificate_der=self.leaf, chain_der=[self.ca], signing_time=NOW, sign=self.sign)
        (self.directory / f"{name}.p7s").write_bytes(signature)
        return signature

    def openssl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["openssl", *args], cwd=self.directory, capture_output=True, text=True, timeout=60)

    def verify(self, name: str, *extra: str, ca_file: str = "ca.pem") -> subprocess.CompletedProcess:
        return self.openssl("cms", "-verify", "-binary", "-inform", "DER", "-in", f"{name}.p7s", "-content", name,
                            "-CAfile", ca_file, "-purpose", "any", "-out", "/dev/null", *extra)


@pytest.fixture(scope="session")
def chains(tmp_path_factory, format_token):
    made: dict[str, Chain] = {}

    def chain(algorithm: str) -> Chain:
        if algorithm not in made:
            made[algorithm] = Chain(algorithm, tmp_path_factory.mktemp(f"cms-{algorithm.lower()}"), format_token)
        return made[algorithm]
    return chain


@pytest.fixture(params=ALGORITHMS)
def chain(request, chains) -> Chain:
    return chains(request.param)


# --------------------------------------------------------------------------- openssl cms -verify


def test_detached_signature_verifies(chain):
    chain.sign_file("release.tar", os.urandom(4099) + b"\r\n\n\x00")
    verified = chain.verify("release.tar")
    assert verified.returncode == 0, verified.stderr
    assert "Verification successful" in verified.stderr


@pytest.mark.parametrize("digest_algorithm", ["SHA384", "SHA512"])
def test_longer_digests_verify(chain, digest_algorithm):
    chain.sign_file("long.bin", os.urandom(777), digest_algorithm)
    verified = chain.verify("long.bin")
    assert verified.returncode == 0, verified.stderr
    printed = chain.openssl("cms", "-cmsout", "-print", "-inform", "DER", "-in", "long.bin.p7s")
    assert f"algorithm: {digest_algorithm.lower()} " in printed.stdout


def test_tampered_content_fails(chain):
    content = os.urandom(2048)
    chain.sign_file("app.bin", content)
    (chain.directory / "app.bin").write_bytes(content[:1000] + bytes([content[1000] ^ 1]) + content[1001:])
    refused = chain.verify("app.bin")
    assert refused.returncode != 0
    assert "content verify error" in refused.stderr


def test_revoked_leaf_fails_with_the_crl(chain):
    chain.sign_file("crl.bin", b"checked against the CA's CRL\n")
    accepted = chain.verify("crl.bin", "-crl_check", ca_file="ca-empty-crl.pem")
    assert accepted.returncode == 0, accepted.stderr
    refused = chain.verify("crl.bin", "-crl_check", ca_file="ca-revoking-crl.pem")
    assert refused.returncode != 0
    assert "certificate revoked" in refused.stderr


def test_an_untrusted_root_fails(chain, chains):
    chain.sign_file("untrusted.bin", b"signed under one CA, checked against another\n")
    other = next(chains(a) for a in ALGORITHMS if a != chain.algorithm)
    (chain.directory / "other-ca.pem").write_text(x509.to_pem(other.ca))
    refused = chain.verify("untrusted.bin", ca_file="other-ca.pem")
    assert refused.returncode != 0
    # the SignedData carries the CA, so openssl finds the chain but not a trusted root for it
    assert "self-signed certificate in certificate chain" in refused.stderr


def test_signed_attributes_and_certificate_order(chain):
    chain.sign_file("attributes.bin", b"what is signed\n")
    printed = chain.openssl("cms", "-cmsout", "-print", "-inform", "DER", "-in", "attributes.bin.p7s")
    assert printed.returncode == 0, printed.stderr
    text = printed.stdout
    attributes = text.split("signedAttrs:", 1)[1].split("signatureAlgorithm:", 1)[0]
    objects = [line.split("object:", 1)[1].strip().split(" ")[0] for line in attributes.splitlines()
               if "object:" in line]
    assert sorted(objects) == ["contentType", "messageDigest", "signingTime"]
    assert "eContentType: pkcs7-data" in text and "eContent: <ABSENT>" in text
    parsed = chain.openssl("asn1parse", "-inform", "DER", "-in", "attributes.bin.p7s")
    expected_digest = hashlib.sha256(b"what is signed\n").hexdigest().upper()
    assert f"OCTET STRING      [HEX DUMP]:{expected_digest}" in parsed.stdout
    certificates = chain.openssl("pkcs7", "-inform", "DER", "-in", "attributes.bin.p7s", "-print_certs", "-noout")
    subjects = [line for line in certificates.stdout.splitlines() if line.startswith("subject=")]
    assert subjects == ["subject=CN = formats-release", "subject=CN = Formats Test CA"]


def test_a_signature_of_another_key_is_refused(chains):
    chain, other = chains("ECDSA_P256"), chains("ECDSA_P384")
    with pytest.raises(FormatError, match="does not verify with the signing certificate's public key"):
        cms.detached(digest=hashlib.sha256(b"x").digest(), digest_algorithm="SHA256", certificate_der=chain.leaf,
                     chain_der=[chain.ca], signing_time=NOW, sign=other.sign)


# --------------------------------------------------------------------------- inputs (no signing happens)


def _never_called(digest: bytes, digest_algorithm: str) -> bytes:
    raise AssertionError("nothing may be signed for invalid inputs")


@pytest.fixture(scope="module")
def some_certificate(chains) -> bytes:
    return chains("ECDSA_P256").leaf


@pytest.mark.parametrize("changes, message", [
    ({"digest_algorithm": "MD5"}, "unknown digest algorithm 'MD5'; use one of SHA256, SHA384, SHA512"),
    ({"digest": b"\0" * 48}, "the message digest is 48 bytes, but a SHA256 digest is 32"),
    ({"digest": "00" * 32}, "the message digest is bytes, not str"),
    ({"signing_time": datetime.datetime(2030, 1, 1)}, "signing_time must be a timezone-aware datetime"),
    ({"certificate_der": b"\x30\x03\x02\x01\x01"}, "the signing certificate is not a DER X.509 certificate"),
    ({"chain_der": b"\x30\x00"}, "chain_der is a sequence of DER certificates"),
    ({"chain_der": [b"junk"]}, "chain certificate 1 is not a DER X.509 certificate"),
])
def test_invalid_inputs_are_refused_before_signing(some_certificate, changes, message):
    arguments = {"digest": b"\0" * 32, "digest_algorithm": "SHA256", "certificate_der": some_certificate,
                 "chain_der": [], "signing_time": NOW, "sign": _never_called, **changes}
    with pytest.raises(FormatError) as raised:
        cms.detached(**arguments)
    assert str(raised.value).startswith(message)

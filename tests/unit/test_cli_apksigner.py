"""What one request signs for the signed data apksigner hands keyroom's provider (:func:`apksigner_blocks`).

The signed data below is built as apksig 31.0.2 builds it (v2 with the
stripping-protection attribute and its empty trailing element; v3 with SDK
24..max), which the integration test checks against apksigner itself.
"""
from __future__ import annotations

import base64
import datetime
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from keyroom.cli import apk as cli_apk
from keyroom.cli import apksigner
from keyroom.signer.formats import FormatError
from keyroom.signer.formats import apk

DIGEST = hashlib.sha256(b"content").digest()


def _certificate(key) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "app")])
    now = datetime.datetime.now(datetime.timezone.utc)
    built = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
             .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
             .sign(key, hashes.SHA256()))
    return built.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def ec_key():
    key = ec.generate_private_key(ec.SECP256R1())
    return key, _certificate(key)


def _v2(certificate: bytes, *, digest: bytes = DIGEST, algorithm=apk.ECDSA_SHA256, also_v3=True, padded=True):
    return apk.signed_data("v2", digest=digest, algorithm=algorithm, certificate_der=certificate, also_v3=also_v3,
                           padded=padded)


def _v3(certificate: bytes, min_sdk: int = 24, algorithm=apk.ECDSA_SHA256) -> bytes:
    return apk.signed_data("v3", digest=DIGEST, algorithm=algorithm, certificate_der=certificate, min_sdk=min_sdk)


def test_apksigs_v2_brings_the_v3_apksig_builds_next_into_the_same_request(ec_key):
    _, certificate = ec_key
    v2 = _v2(certificate)
    assert v2.endswith(bytes(4)) and apk.parse_signed_data("v2", v2).padded
    algorithm, digest, blocks = cli_apk.apksigner_blocks(v2, certificate_der=certificate)
    assert (algorithm, digest) == ("SHA256", DIGEST)
    assert blocks == [("v2", v2), ("v3", _v3(certificate))]
    assert cli_apk.apksigner_blocks(v2, certificate_der=certificate, min_sdk=28, max_sdk=33)[2][1] == (
        "v3", apk.signed_data("v3", digest=DIGEST, algorithm=apk.ECDSA_SHA256, certificate_der=certificate,
                              min_sdk=28, max_sdk=33))
    # the signer checks the pair as any APK request's
    apk.check(blocks, digest=DIGEST, digest_algorithm="SHA256", certificate_der=certificate)


def test_a_v3_or_a_v2_without_v3_is_signed_alone(ec_key):
    _, certificate = ec_key
    v3 = _v3(certificate, min_sdk=30)  # apksigner built another range than foreseen: the provider asks again
    assert cli_apk.apksigner_blocks(v3, certificate_der=certificate)[2] == [("v3", v3)]
    lone = _v2(certificate, also_v3=False)
    assert cli_apk.apksigner_blocks(lone, certificate_der=certificate)[2] == [("v2", lone)]


def test_rsa_above_3072_bits_takes_sha512_as_apksig_chooses():
    key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    certificate = _certificate(key)
    assert apk.algorithm_for(apk.certificate_public_key(certificate)) == apk.RSA_PKCS1_SHA512
    digest = hashlib.sha512(b"content").digest()
    v2 = _v2(certificate, digest=digest, algorithm=apk.RSA_PKCS1_SHA512)
    assert cli_apk.apksigner_blocks(v2, certificate_der=certificate)[:2] == ("SHA512", digest)


@pytest.mark.parametrize("data, message", [
    (b"Signature-Version: 1.0\r\nCreated-By: 1.0 (Android)\r\n", "add --v1-signing-enabled false"),
    (b"\x6c\x01\x00\x00" + bytes(364), "add --v4-signing-enabled false"),
    (b"", "no v2 or v3 signed data"),
])
def test_what_is_no_v2_or_v3_signed_data_names_the_option_that_avoids_it(ec_key, data, message):
    with pytest.raises(cli_apk.ApkError, match=message):
        cli_apk.apksigner_blocks(data, certificate_der=ec_key[1])


def test_signed_data_keyroom_does_not_sign_is_refused(ec_key):
    _, certificate = ec_key
    other = _certificate(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(cli_apk.ApkError, match="another certificate"):
        cli_apk.apksigner_blocks(_v2(other), certificate_der=certificate)
    with pytest.raises(cli_apk.ApkError, match="signature algorithm 0x0202"):
        cli_apk.apksigner_blocks(_v2(certificate, algorithm=apk.ECDSA_SHA512), certificate_der=certificate)
    attributes = apk._sequence([b"\x01\x00\x00\x00rotation"])  # v3 key rotation (a lineage) is not signed
    rotated = _v3(certificate)[:-4] + attributes
    with pytest.raises(cli_apk.ApkError, match="no v2 or v3 signed data keyroom signs"):
        cli_apk.apksigner_blocks(rotated, certificate_der=certificate)
    two = apk.signed_data("v2", digest=DIGEST, algorithm=apk.ECDSA_SHA256, certificate_der=certificate)
    two = two[:4 + 4 + 4 + 4 + 32]  # a v2 block cut short
    with pytest.raises(cli_apk.ApkError, match="no v2 or v3 signed data"):
        cli_apk.apksigner_blocks(two, certificate_der=certificate)


def test_only_four_zero_bytes_may_follow_the_v2_attributes(ec_key):
    v2 = _v2(ec_key[1])
    for tail in (b"\x00\x00\x00\x01", bytes(8), bytes(3)):
        with pytest.raises(FormatError, match="after its last field"):
            apk.parse_signed_data("v2", v2[:-4] + tail)
    with pytest.raises(FormatError, match="after its last field"):  # v3 takes no such element
        apk.parse_signed_data("v3", _v3(ec_key[1]) + bytes(4))


def test_the_answer_maps_each_blocks_sha256_to_its_signature(ec_key):
    key, certificate = ec_key
    _, digest, blocks = cli_apk.apksigner_blocks(_v2(certificate), certificate_der=certificate)

    def sign(value: bytes, algorithm: str) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
        return key.sign(value, ec.ECDSA(Prehashed(hashes.SHA256())))

    block = apk.signing_block(blocks=blocks, digest=digest, digest_algorithm="SHA256", certificate_der=certificate,
                              sign=sign)
    found = cli_apk.signatures_by_data(block)
    assert set(found) == {hashlib.sha256(data).hexdigest() for _, data in blocks}
    for _, data in blocks:
        key.public_key().verify(found[hashlib.sha256(data).hexdigest()], data, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(cli_apk.ApkError, match="no valid APK Signing Block"):
        cli_apk.signatures_by_data(block[:-20])


def test_the_request_body_is_an_apk_request_for_the_blocks(ec_key):
    _, certificate = ec_key
    _, digest, blocks = cli_apk.apksigner_blocks(_v2(certificate), certificate_der=certificate)
    body = apksigner.request_body(key="android", certificate="android-cert", namespace="team-a",
                                  identity={"username": "alice", "groups": []}, name="app.apk", reason="3.2",
                                  digest_algorithm="SHA256", digest=digest, blocks=blocks)
    spec = body["spec"]
    assert body["metadata"] == {"namespace": "team-a", "generateName": "android-"}
    assert spec["format"] == "apk" and spec["certificateRef"] == {"name": "android-cert"}
    assert spec["digests"] == [{"name": "app.apk", "value": DIGEST.hex()}]
    assert [base64.b64decode(b["value"]) for b in spec["apk"]["signedData"]] == [data for _, data in blocks]

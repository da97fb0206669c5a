"""Signed APKs: the content digest and signed data the client writes, the block the signer builds, checked by apksigner.

Proof that a signed APK is right comes only from ``apksigner verify -v``
(Debian's apksigner 31.0.2 on OpenJDK 17): it recomputes the content digest
from the APK's bytes and checks every signature of the v2 and v3 blocks. The
keys are real SoftHSM2 keys in a child process
(:class:`tests.token_process.TokenProcess`), the certificates come from
:func:`keyroom.signer.x509.build_certificate`. The test APK is a zip with a
plain-text ``AndroidManifest.xml`` (apksigner then needs ``--min-sdk-version``),
a ``classes.dex`` stub and a stored resource larger than one 1 MiB chunk.

The signer's checks of the signed data are tested on blocks changed one field at a time.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import pathlib
import shutil
import struct
import zipfile

import pytest

from keyroom.cli import apk as cli_apk
from keyroom.signer.formats import FormatError
from keyroom.signer.formats import apk
from tests.android import RESOURCE, apksigner, make_apk, verify
from tests.token_process import TokenProcess, code_signing_chain

UTC = datetime.timezone.utc
NOW = datetime.datetime.now(UTC).replace(microsecond=0)
#: key algorithm -> (APK signature algorithm, content digest algorithm)
ALGORITHMS = {"ECDSA_P256": (apk.ECDSA_SHA256, "SHA256"), "ECDSA_P384": (apk.ECDSA_SHA512, "SHA512"),
              "RSA_3072": (apk.RSA_PKCS1_SHA256, "SHA256"), "RSA_4096": (apk.RSA_PKCS1_SHA512, "SHA512")}


@pytest.fixture(scope="module")
def chains(format_token: TokenProcess):
    return {algorithm: code_signing_chain(format_token, algorithm, now=NOW, ca_name=f"APK Test CA {algorithm}",
                                          leaf_name=f"apk-release-{algorithm.lower()}")
            for algorithm in ALGORITHMS}


def sign_apk(source: pathlib.Path, out: pathlib.Path, chain, *, replace: bool = False) -> bytes:
    """What ``kubectl keyroom sign --format apk`` does, with the signer's part called directly: the block."""
    digest_algorithm, digest, blocks = cli_apk.signed_data(source, certificate_der=chain.leaf,
                                                           replace_signature=replace)
    block = apk.signing_block(blocks=blocks, digest=digest, digest_algorithm=digest_algorithm,
                              certificate_der=chain.leaf, sign=chain.sign)
    cli_apk.write_signed(source, out, block, overwrite=replace)
    return block


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_apksigner_verifies_v2_and_v3_with_the_leaf_certificate(chains, algorithm, tmp_path):
    chain = chains[algorithm]
    assert apk.algorithm_for(apk.certificate_public_key(chain.leaf)) == ALGORITHMS[algorithm][0]
    source = make_apk(tmp_path / "app.apk")
    assert cli_apk.signed_data(source, certificate_der=chain.leaf)[0] == ALGORITHMS[algorithm][1]
    sign_apk(source, tmp_path / "signed.apk", chain)

    result = verify(tmp_path / "signed.apk", "--print-certs")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Verifies"
    assert "Verified using v2 scheme (APK Signature Scheme v2): true" in lines
    assert "Verified using v3 scheme (APK Signature Scheme v3): true" in lines
    assert "Number of signers: 1" in lines
    assert f"Signer #1 certificate SHA-256 digest: {hashlib.sha256(chain.leaf).hexdigest()}" in lines
    assert f"Signer #1 certificate DN: CN=apk-release-{algorithm.lower()}" in lines
    assert not [line for line in lines if line.startswith(("ERROR", "WARNING"))]
    # without --min-sdk-version apksigner reads the minimum SDK from a binary manifest, which this APK lacks
    unread = apksigner("verify", tmp_path / "signed.apk")
    assert unread.returncode != 0 and "Use --min-sdk-version to override" in unread.stderr


def test_the_content_digest_covers_entries_central_directory_and_end_record(chains, tmp_path):
    source = make_apk(tmp_path / "app.apk")
    parts = cli_apk.read(source)
    assert len(parts.entries) > apk.CHUNK_SIZE  # the resource spans two chunks
    digest = cli_apk.content_digest(source)
    sign_apk(source, tmp_path / "signed.apk", chains["ECDSA_P256"])
    signed = cli_apk.read(tmp_path / "signed.apk", replace_signature=True)
    assert signed.entries == parts.entries and signed.central_directory == parts.central_directory
    assert len(signed.old_block) > 0 and signed.end_record != parts.end_record  # only its offset moved
    assert cli_apk.content_digest(tmp_path / "signed.apk", replace_signature=True) == digest
    with zipfile.ZipFile(tmp_path / "signed.apk") as archive:  # still a zip every reader opens
        assert archive.testzip() is None and archive.read("res/raw/data.bin") == RESOURCE


@pytest.mark.parametrize("damage", ["entry", "signature", "central directory", "v3 stripped"])
def test_a_tampered_apk_fails_verification(chains, damage, tmp_path):
    chain = chains["ECDSA_P256"]
    source = make_apk(tmp_path / "app.apk")
    block = sign_apk(source, tmp_path / "signed.apk", chain)
    data = bytearray((tmp_path / "signed.apk").read_bytes())
    parts = cli_apk.read(tmp_path / "signed.apk", replace_signature=True)
    if damage == "entry":
        position = data.index(RESOURCE[:1024]) + 1000  # inside the stored resource: CRC aside, only digests
        data[position] ^= 0x01
    elif damage == "signature":
        signer = apk.signed_data_of(block)["v2"]
        # the v2 signer's signature sits right after its signed data and the two length prefixes before it
        position = len(parts.entries) + block.index(signer) + len(signer) + 4 + 4 + 4 + 4 + 10
        data[position] ^= 0x01
    elif damage == "central directory":
        position = len(parts.entries) + len(parts.old_block) + 47  # the first central entry's file name
        data[position] ^= 0x20
    else:
        stripped = apk.block_of([(apk.SCHEME_IDS["v2"], apk.parse_block(block)[apk.SCHEME_IDS["v2"]])])
        data = bytearray(cli_apk.signed_apk(source.read_bytes(), stripped))
    (tmp_path / "tampered.apk").write_bytes(data)
    result = verify(tmp_path / "tampered.apk")
    assert result.returncode != 0, result.stdout
    assert "DOES NOT VERIFY" in result.stdout + result.stderr
    expected = {"entry": "APK integrity check failed", "signature": "did not verify",
                "central directory": "APK integrity check failed", "v3 stripped": "v3"}[damage]
    assert expected in result.stdout + result.stderr


def test_an_apk_signed_before_is_refused_unless_its_signature_is_replaced(chains, tmp_path):
    source = make_apk(tmp_path / "app.apk")
    sign_apk(source, tmp_path / "signed.apk", chains["ECDSA_P256"])
    with pytest.raises(cli_apk.ApkError, match="already signed"):
        cli_apk.signed_data(tmp_path / "signed.apk", certificate_der=chains["RSA_3072"].leaf)
    shutil.copy(tmp_path / "signed.apk", tmp_path / "resigned.apk")
    sign_apk(tmp_path / "resigned.apk", tmp_path / "resigned.apk", chains["RSA_3072"], replace=True)
    result = verify(tmp_path / "resigned.apk", "--print-certs")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Signer #1 certificate SHA-256 digest: {hashlib.sha256(chains['RSA_3072'].leaf).hexdigest()}" \
        in result.stdout.splitlines()


def test_a_block_is_not_written_into_an_apk_that_changed_since_its_request(chains, tmp_path):
    chain = chains["ECDSA_P256"]
    source = make_apk(tmp_path / "app.apk")
    digest_algorithm, digest, blocks = cli_apk.signed_data(source, certificate_der=chain.leaf)
    block = apk.signing_block(blocks=blocks, digest=digest, digest_algorithm=digest_algorithm,
                              certificate_der=chain.leaf, sign=chain.sign)
    make_apk(source, resource=b"another build")
    with pytest.raises(cli_apk.ApkError, match="changed since its request was made"):
        cli_apk.write_signed(source, tmp_path / "signed.apk", block)
    assert not (tmp_path / "signed.apk").exists()


def test_what_is_no_apk_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no zip\n")
    with pytest.raises(cli_apk.ApkError, match="not a zip file"):
        cli_apk.content_digest(tmp_path / "notes.txt")


# --------------------------------------------------------------------------- what the signer refuses to sign


@pytest.fixture(scope="module")
def good(chains, tmp_path_factory):
    """(chain, digest, [(scheme, signed data)]) of a P-256 request that passes every check."""
    chain = chains["ECDSA_P256"]
    source = make_apk(tmp_path_factory.mktemp("apk") / "app.apk")
    _, digest, blocks = cli_apk.signed_data(source, certificate_der=chain.leaf)
    return chain, digest, blocks


def _checked(blocks, chain, digest, digest_algorithm="SHA256"):
    return apk.check(blocks, digest=digest, digest_algorithm=digest_algorithm, certificate_der=chain.leaf)


def test_well_formed_blocks_pass_and_are_signed_once_each(good, format_token):
    chain, digest, blocks = good
    parsed = _checked(blocks, chain, digest)
    assert [(p.scheme, p.min_sdk, p.max_sdk) for p in parsed] == [("v2", None, None), ("v3", 28, 0x7FFFFFFF)]
    calls = []
    block = apk.signing_block(blocks=blocks, digest=digest, digest_algorithm="SHA256", certificate_der=chain.leaf,
                              sign=lambda d, a: calls.append((d, a)) or chain.sign(d, a))
    assert calls == [(hashlib.sha256(data).digest(), "SHA256") for _, data in blocks]
    assert apk.signed_data_of(block) == dict(blocks)


def _rebuilt(scheme, chain, digest, **changes):
    fields = {"digest": digest, "algorithm": apk.ECDSA_SHA256, "certificate_der": chain.leaf, "also_v3": True}
    return scheme, apk.signed_data(scheme, **{**fields, **changes})


@pytest.mark.parametrize("change, message", [
    ("another digest", "must carry one digest, the request's content digest"),
    ("another algorithm", "under algorithm 0x0201"),
    ("two digests", "must carry one digest"),
    ("another certificate", "exactly the key version's certificate"),
    ("certificate and chain", "exactly the key version's certificate"),
    ("trailing bytes", "bytes after its last field"),
    ("truncated", "runs past its end"),
    ("unknown attribute", "may carry only the attribute that marks a v3 signature"),
    ("v3 attribute", "key rotation is not supported"),
    ("empty SDK range", "is empty"),
    ("v3 marker without v3", "no v3 block came"),
    ("scheme twice", "one signed data block per scheme"),
    ("digest algorithm", "takes a SHA256 content digest, not SHA512"),
    ("too long", "at most 16384"),
])
def test_signed_data_that_is_not_exactly_what_may_be_signed_is_refused(good, chains, change, message):
    chain, digest, blocks = good
    v2, v3 = blocks
    digest_algorithm = "SHA256"
    certificates = apk._sequence([chain.leaf])
    if change == "another digest":
        v2 = _rebuilt("v2", chain, hashlib.sha256(b"other").digest())
    elif change == "another algorithm":
        v3 = _rebuilt("v3", chain, digest, algorithm=apk.RSA_PKCS1_SHA256)
    elif change == "two digests":
        entry = struct.pack("<I", 0x0201) + apk._prefixed(digest)
        v2 = ("v2", apk._sequence([entry, entry]) + v2[1][len(apk._sequence([entry])):])
    elif change == "another certificate":
        v2 = _rebuilt("v2", chain, digest, certificate_der=chains["ECDSA_P384"].leaf)
    elif change == "certificate and chain":
        v3 = ("v3", v3[1].replace(certificates, apk._sequence([chain.leaf, chain.ca])))
    elif change == "trailing bytes":
        v2 = ("v2", v2[1] + b"\0")
    elif change == "truncated":
        v3 = ("v3", v3[1][:len(v3[1]) // 2])
    elif change == "unknown attribute":
        v2 = ("v2", v2[1][:-len(apk._sequence([struct.pack("<II", apk.STRIPPING_PROTECTION_ID, 3)]))]
              + apk._sequence([struct.pack("<II", 0x3BA06F8C, 1)]))
    elif change == "v3 attribute":
        v3 = ("v3", v3[1][:-4] + apk._sequence([struct.pack("<II", apk.STRIPPING_PROTECTION_ID, 3)]))
    elif change == "empty SDK range":
        v3 = _rebuilt("v3", chain, digest, min_sdk=30, max_sdk=29)
    elif change == "v3 marker without v3":
        v3 = None
    elif change == "scheme twice":
        v3 = v2
    elif change == "digest algorithm":
        digest_algorithm = "SHA512"
    elif change == "too long":
        v2 = ("v2", v2[1] + bytes(apk.MAX_SIGNED_DATA))
    with pytest.raises(FormatError, match=message):
        _checked([b for b in (v2, v3) if b is not None], chain, digest, digest_algorithm)


def test_a_signature_by_a_key_that_is_not_the_certificates_is_not_returned(good, chains):
    chain, digest, blocks = good
    with pytest.raises(FormatError, match="does not verify with the certificate's public key"):
        apk.signing_block(blocks=blocks, digest=digest, digest_algorithm="SHA256", certificate_der=chain.leaf,
                          sign=chains["ECDSA_P384"].sign)


def test_request_fields_round_trip_through_base64(good):
    _, _, blocks = good
    values = [base64.b64encode(data).decode() for _, data in blocks]
    assert all(len(value) <= 21_848 for value in values)  # spec.apk.signedData[].value's maxLength


def test_the_plugins_request_carries_the_content_digest_and_both_blocks(chains, tmp_path):
    from keyroom.cli import plugin

    source = make_apk(tmp_path / "app.apk")
    common = {"key": "android", "namespace": "team-a", "identity": {"username": "alice", "groups": []},
              "fmt": "apk", "certificate": "android-cert"}
    body = plugin.sign_request_body([source], apk_certificate=chains["ECDSA_P384"].leaf, **common)
    spec = body["spec"]
    assert spec["digestAlgorithm"] == "SHA512"  # the key's algorithm decides: ECDSA P-384 signs with SHA-512
    assert spec["digests"] == [{"name": "app.apk", "value": cli_apk.content_digest(source, "SHA512").hex()}]
    assert spec["certificateRef"] == {"name": "android-cert"}
    blocks = [(b["scheme"], base64.b64decode(b["value"])) for b in spec["apk"]["signedData"]]
    assert [p.scheme for p in apk.check(blocks, digest=bytes.fromhex(spec["digests"][0]["value"]),
                                        digest_algorithm="SHA512", certificate_der=chains["ECDSA_P384"].leaf)] \
        == ["v2", "v3"]
    assert plugin.format_digest(source, "apk", "SHA512")[0] == spec["digests"][0]["value"]  # what a builder attests
    with pytest.raises(plugin.CliError, match="name it with --certificate"):
        plugin.sign_request_body([source], **{**common, "certificate": None})
    with pytest.raises(plugin.CliError, match="one APK per request"):
        plugin.sign_request_body([source, source.with_name("other.apk")],
                                 apk_certificate=chains["ECDSA_P384"].leaf, **common)


# --------------------------------------------------------------------------- kubectl keyroom verify, offline


def test_the_plugin_verifies_a_signed_apk_offline_and_refuses_a_tampered_one(chains, tmp_path):
    from cryptography import x509 as crypto_x509

    from keyroom.cli import verify as verification

    chain = chains["RSA_3072"]
    source = make_apk(tmp_path / "app.apk")
    block = sign_apk(source, tmp_path / "signed.apk", chain)
    signed = (tmp_path / "signed.apk").read_bytes()
    roots = verification.Trust(roots=[crypto_x509.load_der_x509_certificate(chain.ca)])

    def check(data: bytes, trust=roots):
        assert verification.guess_format("app.apk", None) == "apk"
        return verification.verify("apk", artifact_path="app.apk", artifact=data, signature=None, trust=trust)

    report = check(signed)
    assert [line.split(":")[0] for line in report.checked][:2] == ["v2", "v3"]
    assert any(line.startswith("certificate chain: ") for line in report.checked)
    assert report.signer["requestDigest"] == cli_apk.content_digest(source).hex()
    keys = verification.Trust(public_keys=[crypto_x509.load_der_x509_certificate(chain.leaf).public_key()])
    assert check(signed, keys).checked
    stranger = verification.Trust(roots=[crypto_x509.load_der_x509_certificate(chains["ECDSA_P256"].ca)])
    with pytest.raises(verification.NotVerified, match="verifies its signature|not a root you trust"):
        check(signed, stranger)

    tampered = bytearray(signed)
    tampered[tampered.index(RESOURCE[:1024]) + 5000] ^= 0x01
    with pytest.raises(verification.NotVerified, match="changed after signing"):
        check(bytes(tampered))
    stripped = apk.block_of([(apk.SCHEME_IDS["v2"], apk.parse_block(block)[apk.SCHEME_IDS["v2"]])])
    with pytest.raises(verification.NotVerified, match="the v3 block is gone"):
        check(cli_apk.signed_apk(source.read_bytes(), stripped))
    with pytest.raises(verification.NotVerified, match="no APK Signing Block"):
        check(source.read_bytes())

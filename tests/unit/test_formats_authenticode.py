"""Authenticode signatures (keyroom.signer.formats.authenticode, keyroom.cli.pe), signed in SoftHSM, checked by osslsigncode.

The proof is ``osslsigncode verify -CAfile ca.pem [-CRLfile crl.pem]`` on the
signed file, for a PE32+ and a PE32 image built here and for a real EFI
binary from a Debian package (systemd-boot-efi, which ``.ci/run`` installs):
osslsigncode computes the Authenticode digest itself, checks the PKCS#7 and
the chain, and prints both digests, so the client's digest is compared with
its own. The tests of PE parsing and of bad inputs need no verifier.
"""
from __future__ import annotations

import datetime
import glob
import hashlib
import pathlib
import re
import struct
import subprocess

import pytest

from keyroom.cli import pe
from keyroom.signer import x509
from keyroom.signer.formats import FormatError, authenticode
from tests.token_process import TokenProcess, code_signing_chain

ALGORITHMS = ("ECDSA_P256", "ECDSA_P384", "RSA_3072")
UTC = datetime.timezone.utc
NOW = datetime.datetime.now(UTC).replace(microsecond=0)
DEBIAN_PE_FILES = "/usr/lib/systemd/boot/efi/systemd-boot*.efi"


def minimal_pe(*, pe32_plus: bool = True, overlay: bytes = b"") -> bytes:
    """A small valid PE image: headers, one .text section of 0x200 bytes, then ``overlay``."""
    optional_size = 240 if pe32_plus else 224
    dos = bytearray(0x80)
    dos[:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 0x80)
    coff = struct.pack("<HHIIIHH", 0x8664 if pe32_plus else 0x14C, 1, 0, 0, 0, optional_size,
                       0x22 if pe32_plus else 0x102)
    if pe32_plus:
        optional = struct.pack("<HBBIIIII", 0x20B, 14, 0, 0x200, 0, 0, 0x1000, 0x1000)
        optional += struct.pack("<QIIHHHHHHIIIIHHQQQQII", 0x140000000, 0x1000, 0x200, 6, 0, 0, 0, 6, 0, 0,
                                0x2000, 0x200, 0, 3, 0x8160, 0x100000, 0x1000, 0x100000, 0x1000, 0, 16)
    else:
        optional = struct.pack("<HBBIIIIII", 0x10B, 14, 0, 0x200, 0, 0, 0x1000, 0x1000, 0x2000)
        optional += struct.pack("<IIIHHHHHHIIIIHHIIIIII", 0x400000, 0x1000, 0x200, 6, 0, 0, 0, 6, 0, 0,
                                0x2000, 0x200, 0, 3, 0x8140, 0x100000, 0x1000, 0x100000, 0x1000, 0, 16)
    optional += b"\0" * (16 * 8)
    assert len(optional) == optional_size
    section = struct.pack("<8sIIIIIIHHI", b".text", 0x10, 0x1000, 0x200, 0x200, 0, 0, 0, 0, 0x60000020)
    headers = bytes(dos) + b"PE\0\0" + coff + optional + section
    text = b"\xc3" + bytes(range(1, 256)) + b"\0" * 0x100  # ret, then some bytes
    return headers + b"\0" * (0x200 - len(headers)) + text + overlay


class Chain:
    """A CA, a code-signing leaf under it, a CRL that revokes nothing and one that revokes the leaf."""

    def __init__(self, algorithm: str, directory: pathlib.Path, token: TokenProcess) -> None:
        self.algorithm, self.directory = algorithm, directory
        made = code_signing_chain(token, algorithm, now=NOW, ca_name="Authenticode Test CA",
                                  leaf_name="authenticode-release")
        self.ca, self.leaf, self.sign = made.ca, made.leaf, made.sign
        empty_crl, revoking_crl = made.empty_crl, made.revoking_crl
        (directory / "ca.pem").write_text(x509.to_pem(self.ca))
        (directory / "empty-crl.pem").write_text(x509.to_pem(empty_crl, "X509 CRL"))
        (directory / "crl.pem").write_text(x509.to_pem(revoking_crl, "X509 CRL"))

    def signature(self, data: bytes, digest_algorithm: str = "SHA256", **options) -> bytes:
        return authenticode.signature(digest=pe.authenticode_digest(data, digest_algorithm),
                                      digest_algorithm=digest_algorithm, certificate_der=self.leaf,
                                      chain_der=[self.ca], signing_time=NOW, sign=self.sign, **options)

    def sign_file(self, name: str, data: bytes, digest_algorithm: str = "SHA256", **options) -> bytes:
        signed = pe.attach_signature(data, self.signature(data, digest_algorithm, **options))
        (self.directory / name).write_bytes(signed)
        return signed

    def verify(self, name: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["osslsigncode", "verify", "-CAfile", "ca.pem", *extra, "-in", name],
                              cwd=self.directory, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="session")
def chains(tmp_path_factory, format_token):
    made: dict[str, Chain] = {}

    def chain(algorithm: str) -> Chain:
        if algorithm not in made:
            made[algorithm] = Chain(algorithm, tmp_path_factory.mktemp(f"authenticode-{algorithm.lower()}"),
                                    format_token)
        return made[algorithm]
    return chain


@pytest.fixture(params=ALGORITHMS)
def chain(request, chains) -> Chain:
    return chains(request.param)


def _digests(output: str) -> tuple[str, str]:
    current = re.search(r"Current message digest\s*:\s*([0-9A-F]+)", output)
    calculated = re.search(r"Calculated message digest\s*:\s*([0-9A-F]+)", output)
    assert current and calculated, output
    return current.group(1), calculated.group(1)


def assert_verified(verified: subprocess.CompletedProcess, data: bytes, digest_algorithm: str = "SHA256") -> None:
    output = verified.stdout + verified.stderr
    assert verified.returncode == 0, output
    assert "Signature verification: ok" in output and "Succeeded" in output
    ours = pe.authenticode_digest(data, digest_algorithm).hex().upper()
    assert _digests(output) == (ours, ours)  # osslsigncode's own digest of the file is the client's
    assert "invalid PE checksum" not in output  # the checksum attach_signature wrote is the one it computes


# --------------------------------------------------------------------------- osslsigncode verify


def test_generated_pe32_plus_verifies(chain):
    data = minimal_pe()
    chain.sign_file("app.exe", data)
    assert_verified(chain.verify("app.exe"), data)


def test_generated_pe32_of_odd_length_verifies(chain):
    data = minimal_pe(pe32_plus=False, overlay=b"odd")
    assert len(data) % 8
    chain.sign_file("app32.exe", data)
    assert_verified(chain.verify("app32.exe"), data)


def test_real_efi_binary_from_a_debian_package_verifies(chain):
    paths = sorted(glob.glob(DEBIAN_PE_FILES))
    assert paths, f"no {DEBIAN_PE_FILES}: install systemd-boot-efi (.ci/run does)"
    data = pathlib.Path(paths[0]).read_bytes()
    chain.sign_file("boot.efi", data, program_name="systemd-boot", url="https://systemd.io/")
    verified = chain.verify("boot.efi")
    assert_verified(verified, data)
    assert "Text description: systemd-boot" in verified.stdout
    assert "URL description: https://systemd.io/" in verified.stdout
    assert "Microsoft Individual Code Signing purpose" in verified.stdout


@pytest.mark.parametrize("digest_algorithm", ["SHA384", "SHA512"])
def test_longer_digests_verify(chains, digest_algorithm):
    chain = chains("RSA_3072")
    data = minimal_pe(overlay=b"long digest")
    chain.sign_file(f"{digest_algorithm}.exe", data, digest_algorithm)
    verified = chain.verify(f"{digest_algorithm}.exe")
    assert_verified(verified, data, digest_algorithm)
    assert f"Message digest algorithm  : {digest_algorithm}" in verified.stdout


def test_one_changed_byte_fails(chain):
    signed = bytearray(chain.sign_file("changed.exe", minimal_pe()))
    signed[0x210] ^= 0x01  # in the .text section
    (chain.directory / "changed.exe").write_bytes(bytes(signed))
    refused = chain.verify("changed.exe")
    assert refused.returncode != 0
    current, calculated = _digests(refused.stdout + refused.stderr)
    assert current != calculated


def test_revoked_leaf_fails_with_the_crl(chain):
    chain.sign_file("revoked.exe", minimal_pe())
    accepted = chain.verify("revoked.exe", "-CRLfile", "empty-crl.pem")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    refused = chain.verify("revoked.exe", "-CRLfile", "crl.pem")
    assert refused.returncode != 0
    assert "certificate revoked" in refused.stdout + refused.stderr


def test_the_signed_content_is_what_osslsigncode_would_sign(chains, tmp_path):
    data = minimal_pe(overlay=b"extract")
    (tmp_path / "app.exe").write_bytes(data)
    extracted = subprocess.run(["osslsigncode", "extract-data", "-h", "sha256", "-in", "app.exe", "-out", "data.der"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert extracted.returncode == 0, extracted.stdout + extracted.stderr
    content = authenticode.indirect_data_content(digest=pe.authenticode_digest(data), digest_algorithm="SHA256")
    assert content in (tmp_path / "data.der").read_bytes()


def test_a_signature_is_replaced_only_when_asked(chains):
    first, second = chains("ECDSA_P256"), chains("ECDSA_P384")
    data = minimal_pe(overlay=b"resign")
    signed = first.sign_file("resigned.exe", data)
    assert pe.authenticode_digest(signed) == pe.authenticode_digest(data)
    with pytest.raises(pe.PEError, match="already signed"):
        pe.attach_signature(signed, second.signature(signed))
    resigned = pe.attach_signature(signed, second.signature(signed), replace=True)
    (second.directory / "resigned.exe").write_bytes(resigned)
    verified = second.verify("resigned.exe")
    assert_verified(verified, data)
    assert "Subject: /CN=authenticode-release" in verified.stdout
    assert verified.stdout.count("Signature Index:") == 1  # the old signature is gone, not nested


# --------------------------------------------------------------------------- PE parsing (no verifier)


@pytest.mark.parametrize("data, message", [
    (b"hello world", "not a PE file: no MZ header"),
    (b"MZ" + b"\0" * 0x3E, "not a PE file: an MZ header without a PE signature"),
    (minimal_pe()[:0x100], "a truncated PE file"),
    (minimal_pe().replace(b"\x0b\x02\x0e", b"\x07\x01\x0e", 1), "unknown optional header magic 0x107"),
])
def test_what_is_not_a_pe_file_is_refused(data, message):
    with pytest.raises(pe.PEError, match=re.escape(message)):
        pe.authenticode_digest(data)


def test_a_pe_without_a_security_directory_is_refused():
    data = bytearray(minimal_pe())
    struct.pack_into("<I", data, 0x80 + 24 + 108, 4)  # NumberOfRvaAndSizes: only export..exception
    with pytest.raises(pe.PEError, match="no security directory entry"):
        pe.attach_signature(bytes(data), b"\x30\x00")


def test_a_security_directory_outside_the_file_is_refused():
    data = bytearray(minimal_pe())
    struct.pack_into("<II", data, 0x80 + 24 + 112 + 32, len(data) - 8, 64)
    with pytest.raises(pe.PEError, match="points outside the file"):
        pe.authenticode_digest(bytes(data))


def test_an_odd_length_file_is_digested_as_if_zero_padded_to_8_bytes():
    data = minimal_pe(overlay=b"abc")
    assert pe.authenticode_digest(data) == pe.authenticode_digest(data + b"\0" * 5)
    assert pe.authenticode_digest(data) != pe.authenticode_digest(data + b"\0" * 13)


def test_the_digest_skips_the_checksum_and_the_security_directory_only():
    data = minimal_pe()
    checksum, security = 0x80 + 24 + 64, 0x80 + 24 + 112 + 32
    changed = bytearray(data)
    changed[checksum:checksum + 4] = b"\x12\x34\x56\x78"
    assert pe.authenticode_digest(bytes(changed)) == pe.authenticode_digest(data)
    changed[checksum + 4] ^= 1
    assert pe.authenticode_digest(bytes(changed)) != pe.authenticode_digest(data)
    assert security == pe._layout(data).security_directory_offset


def test_the_certificate_table_is_an_aligned_win_certificate():
    data = minimal_pe(overlay=b"12345")
    signed = pe.attach_signature(data, b"\x30\x03\x02\x01\x07")
    offset, size = struct.unpack_from("<II", signed, 0x80 + 24 + 112 + 32)
    assert offset == 0x400 + 8 and offset % 8 == 0 and signed[len(data):offset] == b"\0" * 3
    assert size == 16 and offset + size == len(signed)
    assert struct.unpack_from("<IHH", signed, offset) == (16, 0x0200, 0x0002)
    assert signed[offset + 8:] == b"\x30\x03\x02\x01\x07\0\0\0"
    assert pe.is_signed(signed) and not pe.is_signed(data)


def test_attach_refuses_what_is_not_a_pkcs7():
    with pytest.raises(pe.PEError, match="DER PKCS#7"):
        pe.attach_signature(minimal_pe(), b"MZ not a signature")


def test_an_unknown_digest_algorithm_is_refused():
    with pytest.raises(pe.PEError, match="unknown digest algorithm 'SHA1'"):
        pe.authenticode_digest(minimal_pe(), "SHA1")


# --------------------------------------------------------------------------- the builder's inputs


def _never_called(digest: bytes, digest_algorithm: str) -> bytes:
    raise AssertionError("nothing may be signed for invalid inputs")


@pytest.mark.parametrize("changes, message", [
    ({"digest": b"\0" * 20}, "the Authenticode digest is 20 bytes, but a SHA256 digest is 32"),
    ({"digest_algorithm": "SHA1"}, "unknown digest algorithm 'SHA1'"),
    ({"signing_time": datetime.datetime(2030, 1, 1)}, "signing_time must be a timezone-aware datetime"),
    ({"program_name": ""}, "program_name must be printable text"),
    ({"program_name": "tab\there"}, "program_name must be printable text"),
    ({"url": "javascript:alert(1)"}, "url must be an http(s) URL"),
    ({"certificate_der": b"\x30\x00"}, "the signing certificate is not a DER X.509 certificate"),
])
def test_invalid_inputs_are_refused_before_signing(chains, changes, message):
    arguments = {"digest": hashlib.sha256(b"x").digest(), "digest_algorithm": "SHA256",
                 "certificate_der": chains("ECDSA_P256").leaf, "chain_der": [], "signing_time": NOW,
                 "sign": _never_called, **changes}
    with pytest.raises(FormatError, match=re.escape(message)):
        authenticode.signature(**arguments)


def test_a_signature_of_another_key_is_refused(chains):
    with pytest.raises(FormatError, match="does not verify with the signing certificate's public key"):
        authenticode.signature(digest=hashlib.sha256(b"x").digest(), digest_algorithm="SHA256",
                               certificate_der=chains("ECDSA_P256").leaf, chain_der=[], signing_time=NOW,
                               sign=chains("ECDSA_P384").sign)

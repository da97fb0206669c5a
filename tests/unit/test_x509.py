"""Certificates, CRLs and CSRs of keyroom.signer.x509, signed in a real SoftHSM2 token, checked by openssl.

Nothing here verifies a signature with code of our own: every chain, CRL and
request is written to files and given to the ``openssl`` command line, the
way a consumer of keyroom's certificates checks them (OpenSSL 3.0 has no
``codesign`` purpose, so ``openssl verify`` checks the chain with its default
purpose). The same profile is built for each issuing key algorithm; RSA-3072
generation in SoftHSM is slow, so each key is generated once per session.

The token lives in a child process. SoftHSM reads ``SOFTHSM2_CONF`` once, when
a process initialises it, and other test modules of the same pytest process
(tests/unit/test_signer_authority.py) keep their own session-long token loaded
in this process; switching SoftHSM to another configuration under them would
break their token, and theirs cannot be shared (its PIN and directory are
private to that module). So :class:`TokenProcess` runs the real backend,
:class:`keyroom.signer.hsm.Token`, in a child with its own ``SOFTHSM2_CONF``
and answers "generate" and "sign this digest" over a pipe: the signing
callback given to x509 is exactly ``Token.sign`` with a key handle bound,
only one process away.
"""
from __future__ import annotations

import datetime
import hashlib
import pathlib
import re
import subprocess

import pytest
from cryptography import x509 as crypto_x509
from cryptography.hazmat.primitives import serialization

from keyroom.signer import softhsm
from keyroom.signer import x509
from tests.token_process import TokenProcess

TOKEN_LABEL = "keyroom-x509"
PIN = "x509-user-pin-2d9a"
SO_PIN = "x509-so-pin-6f13"
ALGORITHMS = ("ECDSA_P256", "ECDSA_P384", "RSA_3072")
UTC = datetime.timezone.utc
NOW = datetime.datetime.now(UTC).replace(microsecond=0)
CA_SUBJECT = {"commonName": "Team A Code Signing CA", "organization": ["Keyroom Test"],
              "organizationalUnit": ["Team A"], "country": ["DE"]}
LEAF_SUBJECT = {"commonName": "keyroom-release", "organization": ["Keyroom Test"], "country": ["DE"]}
CRL_URL = "http://crl.keyroom.test/team-a-ca.crl"
#: the AlgorithmIdentifier each issuing key must produce, byte for byte (FORMATS.md)
SIGNATURE_ALGORITHM_DER = {
    "ECDSA_P256": bytes.fromhex("300a06082a8648ce3d040302"),        # ecdsa-with-SHA256, no parameters
    "ECDSA_P384": bytes.fromhex("300a06082a8648ce3d040303"),        # ecdsa-with-SHA384, no parameters
    "RSA_3072": bytes.fromhex("300d06092a864886f70d01010b0500"),    # sha256WithRSAEncryption, NULL
}
SIGNATURE_ALGORITHM_NAME = {"ECDSA_P256": "ecdsa-with-SHA256", "ECDSA_P384": "ecdsa-with-SHA384",
                            "RSA_3072": "sha256WithRSAEncryption"}


@pytest.fixture(scope="session")
def hsm_token(tmp_path_factory):
    softhsm.find_module()  # SoftHSM2 is a requirement: fail with its install hint, never skip
    made = softhsm.init_token(tmp_path_factory.mktemp("x509-softhsm"), label=TOKEN_LABEL, pin=PIN, so_pin=SO_PIN)
    process = TokenProcess(made, pin=PIN)
    yield process
    process.close()


@pytest.fixture(scope="session")
def key_pairs(hsm_token):
    """``key(role, algorithm)`` -> public key DER, generating each key once per session, when first needed."""
    generated: dict[tuple[str, str], bytes] = {}

    def key(role: str, algorithm: str) -> bytes:
        if (role, algorithm) not in generated:
            generated[role, algorithm] = hsm_token.generate(f"{role}-{algorithm.lower()}", algorithm)
        return generated[role, algorithm]
    return key


def signer_of(hsm_token, role: str, algorithm: str):
    return hsm_token.signer(f"{role}-{algorithm.lower()}")


# --------------------------------------------------------------------------- openssl


def openssl(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)


def write(directory: pathlib.Path, name: str, der: bytes, label: str) -> pathlib.Path:
    path = directory / name
    path.write_text(x509.to_pem(der, label))
    return path


class Chain:
    """A CA and a leaf under it, their CRLs and the leaf's CSR, built for one issuing key algorithm."""

    def __init__(self, algorithm: str, directory: pathlib.Path, hsm_token, key_pairs) -> None:
        self.algorithm, self.directory = algorithm, directory
        self.ca_key, self.leaf_key = key_pairs("ca", algorithm), key_pairs("leaf", algorithm)
        self.ca_sign, self.leaf_sign = signer_of(hsm_token, "ca", algorithm), signer_of(hsm_token, "leaf", algorithm)
        self.ca = x509.build_certificate(
            subject=CA_SUBJECT, subject_public_key_der=self.ca_key, issuer_certificate_der=None,
            issuer_public_key_der=self.ca_key, not_before=NOW - datetime.timedelta(hours=1),
            not_after=NOW + datetime.timedelta(days=365), serial=x509.new_serial(), is_ca=True, path_length=0,
            sign=self.ca_sign, key_algorithm=algorithm)
        self.leaf_serial = x509.new_serial()
        self.leaf = x509.build_certificate(
            subject=LEAF_SUBJECT, subject_public_key_der=self.leaf_key, issuer_certificate_der=self.ca,
            issuer_public_key_der=self.ca_key, not_before=NOW - datetime.timedelta(minutes=5),
            not_after=NOW + datetime.timedelta(days=90), serial=self.leaf_serial, crl_distribution_point=CRL_URL,
            sign=self.ca_sign, key_algorithm=algorithm)
        crl_times = {"this_update": NOW - datetime.timedelta(minutes=1),
                     "next_update": NOW + datetime.timedelta(days=7)}
        self.empty_crl = x509.build_crl(issuer_certificate_der=self.ca, revoked=[], crl_number=1, sign=self.ca_sign,
                                        key_algorithm=algorithm, **crl_times)
        self.other_crl = x509.build_crl(issuer_certificate_der=self.ca, crl_number=2, sign=self.ca_sign,
                                        revoked=[(self.leaf_serial + 1, NOW - datetime.timedelta(minutes=2),
                                                  "superseded")], key_algorithm=algorithm, **crl_times)
        self.revoking_crl = x509.build_crl(
            issuer_certificate_der=self.ca, crl_number=3, sign=self.ca_sign, key_algorithm=algorithm,
            revoked=[(self.leaf_serial + 1, NOW - datetime.timedelta(minutes=2), "superseded"),
                     (self.leaf_serial, NOW - datetime.timedelta(minutes=1), "keyCompromise")], **crl_times)
        self.csr = x509.build_csr(subject=LEAF_SUBJECT, public_key_der=self.leaf_key, sign=self.leaf_sign,
                                  key_algorithm=algorithm)
        for name, der, label in (("ca.pem", self.ca, "CERTIFICATE"), ("leaf.pem", self.leaf, "CERTIFICATE"),
                                 ("empty-crl.pem", self.empty_crl, "X509 CRL"),
                                 ("other-crl.pem", self.other_crl, "X509 CRL"),
                                 ("crl.pem", self.revoking_crl, "X509 CRL"),
                                 ("req.pem", self.csr, "CERTIFICATE REQUEST")):
            write(directory, name, der, label)

    def openssl(self, *args: str) -> subprocess.CompletedProcess:
        return openssl(*args, cwd=self.directory)


@pytest.fixture(scope="module", params=ALGORITHMS)
def chain(request, tmp_path_factory, hsm_token, key_pairs) -> Chain:
    return Chain(request.param, tmp_path_factory.mktemp(f"chain-{request.param.lower()}"), hsm_token, key_pairs)


# --------------------------------------------------------------------------- certificates


def test_leaf_verifies_under_its_ca(chain):
    verified = chain.openssl("verify", "-CAfile", "ca.pem", "leaf.pem")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.strip() == "leaf.pem: OK"


def test_ca_verifies_as_its_own_root(chain):
    verified = chain.openssl("verify", "-CAfile", "ca.pem", "ca.pem")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_leaf_does_not_verify_without_its_ca(chain):
    refused = chain.openssl("verify", "-CAfile", "leaf.pem", "leaf.pem")
    assert refused.returncode != 0
    assert "unable to get local issuer certificate" in refused.stdout + refused.stderr


def _text(chain: Chain, name: str) -> str:
    shown = chain.openssl("x509", "-in", name, "-noout", "-text")
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


def _extension_lines(text: str) -> dict[str, list[str]]:
    """openssl's "X509v3 extensions" block: header line (with ": critical" when so) -> the value lines."""
    block = text.split("X509v3 extensions:\n", 1)[1].split("    Signature Algorithm:", 1)[0]
    extensions: dict[str, list[str]] = {}
    current = None
    for line in block.splitlines():
        if line.startswith(" " * 12) and not line.startswith(" " * 16):
            current = line.strip()
            extensions[current] = []
        elif current is not None and line.strip():
            extensions[current].append(line.strip())
    return extensions


def test_leaf_extensions_follow_the_code_signing_profile(chain):
    text = _text(chain, "leaf.pem")
    assert "Version: 3 (0x2)" in text
    assert f"Signature Algorithm: {SIGNATURE_ALGORITHM_NAME[chain.algorithm]}" in text
    extensions = _extension_lines(text)
    assert extensions["X509v3 Basic Constraints: critical"] == ["CA:FALSE"]
    assert extensions["X509v3 Key Usage: critical"] == ["Digital Signature"]
    assert extensions["X509v3 Extended Key Usage:"] == ["Code Signing"]  # not critical
    assert extensions["X509v3 CRL Distribution Points:"] == ["Full Name:", f"URI:{CRL_URL}"]
    ca_extensions = _extension_lines(_text(chain, "ca.pem"))
    ski = extensions["X509v3 Subject Key Identifier:"]
    assert extensions["X509v3 Authority Key Identifier:"] == ca_extensions["X509v3 Subject Key Identifier:"]
    assert ski != ca_extensions["X509v3 Subject Key Identifier:"]
    assert set(extensions) == {"X509v3 Basic Constraints: critical", "X509v3 Key Usage: critical",
                               "X509v3 Extended Key Usage:", "X509v3 Subject Key Identifier:",
                               "X509v3 Authority Key Identifier:", "X509v3 CRL Distribution Points:"}
    # RFC 5280 method 1, as the cryptography package computes it from the key
    public_key = serialization.load_der_public_key(chain.leaf_key)
    expected = crypto_x509.SubjectKeyIdentifier.from_public_key(public_key).digest
    assert ski == [":".join(f"{byte:02X}" for byte in expected)]


def test_ca_extensions_follow_the_profile(chain):
    text = _text(chain, "ca.pem")
    extensions = _extension_lines(text)
    assert extensions["X509v3 Basic Constraints: critical"] == ["CA:TRUE, pathlen:0"]
    assert extensions["X509v3 Key Usage: critical"] == ["Certificate Sign, CRL Sign"]
    assert "X509v3 Extended Key Usage:" not in extensions
    assert extensions["X509v3 Authority Key Identifier:"] == extensions["X509v3 Subject Key Identifier:"]
    subject = re.search(r"Subject: (.*)", text).group(1)
    assert subject == "C = DE, O = Keyroom Test, OU = Team A, CN = Team A Code Signing CA"
    assert re.search(r"Issuer: (.*)", text).group(1) == subject


def test_signature_algorithm_is_encoded_as_formats_md_says(chain):
    expected = SIGNATURE_ALGORITHM_DER[chain.algorithm]
    for der in (chain.ca, chain.leaf):
        certificate = crypto_x509.load_der_x509_certificate(der)
        # once inside the TBS, once beside the signature, and identical
        assert expected in certificate.tbs_certificate_bytes
        assert der.count(expected) == 2


def test_the_callback_signs_the_digest_of_the_certificate_it_returns(chain, hsm_token):
    hsm_token.calls.clear()
    serial = x509.new_serial()
    leaf = x509.build_certificate(
        subject=LEAF_SUBJECT, subject_public_key_der=chain.leaf_key, issuer_certificate_der=chain.ca,
        issuer_public_key_der=chain.ca_key, not_before=NOW, not_after=NOW + datetime.timedelta(days=1),
        serial=serial, sign=chain.ca_sign, key_algorithm=chain.algorithm)
    digest_algorithm = "SHA384" if chain.algorithm == "ECDSA_P384" else "SHA256"
    tbs = crypto_x509.load_der_x509_certificate(leaf).tbs_certificate_bytes
    assert hsm_token.calls == [(f"ca-{chain.algorithm.lower()}", hashlib.new(digest_algorithm, tbs).digest(),
                                digest_algorithm)]


def test_serial_and_validity_as_openssl_reads_them(chain):
    shown = chain.openssl("x509", "-in", "leaf.pem", "-noout", "-serial", "-startdate", "-enddate",
                          "-fingerprint", "-sha256", "-nameopt", "RFC2253", "-subject")
    assert shown.returncode == 0, shown.stderr
    fields = dict(line.split("=", 1) for line in shown.stdout.splitlines())
    described = x509.describe(chain.leaf)
    assert int(fields["serial"], 16) == chain.leaf_serial
    assert described["serialNumber"] == fields["serial"].lower().lstrip("0")
    assert 0 < chain.leaf_serial < 2 ** 127
    assert fields["notBefore"] == (NOW - datetime.timedelta(minutes=5)).strftime("%b %e %H:%M:%S %Y GMT")
    assert fields["notAfter"] == (NOW + datetime.timedelta(days=90)).strftime("%b %e %H:%M:%S %Y GMT")
    assert described["notBefore"] == (NOW - datetime.timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert described["subject"] == fields["subject"] == "CN=keyroom-release,O=Keyroom Test,C=DE"
    assert described["fingerprint"] == "sha256:" + fields["sha256 Fingerprint"].replace(":", "").lower()
    assert described["fingerprint"] == x509.fingerprint(chain.leaf)


def test_a_tampered_certificate_fails_verification(chain):
    tbs = crypto_x509.load_der_x509_certificate(chain.leaf).tbs_certificate_bytes
    at = chain.leaf.index(b"keyroom-release")
    assert chain.leaf.index(tbs) < at < chain.leaf.index(tbs) + len(tbs)  # a byte of the TBS: the subject's CN
    tampered = bytearray(chain.leaf)
    tampered[at] ^= 0x01  # "keyroom-release" -> "jeyroom-release"
    write(chain.directory, "tampered.pem", bytes(tampered), "CERTIFICATE")
    refused = chain.openssl("verify", "-CAfile", "ca.pem", "tampered.pem")
    assert refused.returncode != 0
    assert "certificate signature failure" in refused.stdout + refused.stderr


def test_a_self_signed_code_signing_leaf_verifies(chain):
    leaf = x509.build_certificate(
        subject=LEAF_SUBJECT, subject_public_key_der=chain.leaf_key, issuer_certificate_der=None,
        issuer_public_key_der=chain.leaf_key, not_before=NOW, not_after=NOW + datetime.timedelta(days=30),
        serial=x509.new_serial(), sign=chain.leaf_sign, key_algorithm=chain.algorithm)
    write(chain.directory, "self.pem", leaf, "CERTIFICATE")
    verified = chain.openssl("verify", "-CAfile", "self.pem", "self.pem")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    extensions = _extension_lines(_text(chain, "self.pem"))
    assert extensions["X509v3 Basic Constraints: critical"] == ["CA:FALSE"]
    assert extensions["X509v3 Authority Key Identifier:"] == extensions["X509v3 Subject Key Identifier:"]


# --------------------------------------------------------------------------- CRLs


def test_the_crls_verify_under_the_ca(chain):
    for name in ("empty-crl.pem", "other-crl.pem", "crl.pem"):
        checked = chain.openssl("crl", "-in", name, "-CAfile", "ca.pem", "-noout")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "verify OK" in checked.stdout + checked.stderr


def test_a_revoked_leaf_fails_the_crl_check(chain):
    refused = chain.openssl("verify", "-crl_check", "-CAfile", "ca.pem", "-CRLfile", "crl.pem", "leaf.pem")
    assert refused.returncode != 0
    assert "error 23 at 0 depth lookup: certificate revoked" in refused.stdout + refused.stderr


@pytest.mark.parametrize("crl", ["empty-crl.pem", "other-crl.pem"])
def test_a_leaf_not_on_the_crl_passes_the_crl_check(chain, crl):
    verified = chain.openssl("verify", "-crl_check", "-CAfile", "ca.pem", "-CRLfile", crl, "leaf.pem")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.strip() == "leaf.pem: OK"


def test_crl_check_without_a_crl_fails(chain):
    refused = chain.openssl("verify", "-crl_check", "-CAfile", "ca.pem", "leaf.pem")
    assert refused.returncode != 0
    assert "error 3 at 0 depth lookup: unable to get certificate CRL" in refused.stdout + refused.stderr


def test_crl_contents(chain):
    empty = chain.openssl("crl", "-in", "empty-crl.pem", "-noout", "-text")
    assert "Version 2 (0x1)" in empty.stdout
    assert "No Revoked Certificates." in empty.stdout
    assert f"Signature Algorithm: {SIGNATURE_ALGORITHM_NAME[chain.algorithm]}" in empty.stdout
    assert re.search(r"X509v3 CRL Number: \n\s+1\n", empty.stdout)
    ca_extensions = _extension_lines(_text(chain, "ca.pem"))
    aki = re.search(r"X509v3 Authority Key Identifier: \n\s+(\S+)\n", empty.stdout).group(1)
    assert [aki] == ca_extensions["X509v3 Subject Key Identifier:"]
    # revokedCertificates is left out, not an empty SEQUENCE: the TBS goes from nextUpdate straight to [0]
    assert _tbs_fields(_asn1parse(chain, "empty-crl.pem", "crl")) == [
        "INTEGER", "SEQUENCE", "SEQUENCE", "UTCTIME", "UTCTIME", "cont [ 0 ]"]
    assert _tbs_fields(_asn1parse(chain, "crl.pem", "crl")) == [
        "INTEGER", "SEQUENCE", "SEQUENCE", "UTCTIME", "UTCTIME", "SEQUENCE", "cont [ 0 ]"]

    revoked = chain.openssl("crl", "-in", "crl.pem", "-noout", "-text")
    assert re.search(r"X509v3 CRL Number: \n\s+3\n", revoked.stdout)
    entries = revoked.stdout.split("Revoked Certificates:", 1)[1]
    lines = [line.strip() for line in entries.splitlines()]
    serials = [int(found, 16) for found in re.findall(r"Serial Number: ([0-9A-F]+)", entries)]
    assert serials == [chain.leaf_serial, chain.leaf_serial + 1]  # in ascending order
    assert "Key Compromise" in lines and "Superseded" in lines
    assert lines.count("X509v3 CRL Reason Code:") == 2


def _asn1parse(chain: Chain, name: str, kind: str) -> list[tuple[int, str]]:
    """(depth, type) of every element, as ``openssl asn1parse`` reads the DER of ``name``."""
    der = chain.directory / (name + ".der")
    converted = chain.openssl(kind, "-in", name, "-outform", "DER", "-out", der.name)
    assert converted.returncode == 0, converted.stderr
    parsed = chain.openssl("asn1parse", "-inform", "DER", "-in", der.name)
    assert parsed.returncode == 0, parsed.stderr
    elements = [re.search(r"d=(\d+)\s+hl=\s*\d+\s+l=\s*\d+\s+(?:prim|cons):\s+(.*?)\s*(?::|$)", line)
                for line in parsed.stdout.splitlines()]
    return [(int(found.group(1)), found.group(2)) for found in elements if found]


def _tbs_fields(elements: list[tuple[int, str]]) -> list[str]:
    """The types of the top-level fields of the TBS (the first element at depth 1)."""
    starts = [index for index, (depth, _) in enumerate(elements) if depth == 1]
    return [kind for depth, kind in elements[starts[0] + 1:starts[1]] if depth == 2]


def test_a_tampered_crl_fails_verification(chain):
    tampered = bytearray(chain.revoking_crl)
    at = tampered.index(chain.leaf_serial.to_bytes(16, "big").lstrip(b"\0"))
    tampered[at + 3] ^= 0x01  # another serial is revoked now
    write(chain.directory, "tampered-crl.pem", bytes(tampered), "X509 CRL")
    checked = chain.openssl("crl", "-in", "tampered-crl.pem", "-CAfile", "ca.pem", "-noout")
    # OpenSSL 3.0's "crl -CAfile" exits 0 after "verify failure" too: only its message is the verdict
    assert "verify OK" not in checked.stdout + checked.stderr
    assert "verify failure" in checked.stdout + checked.stderr


# --------------------------------------------------------------------------- CSRs


def test_the_csr_verifies(chain):
    checked = chain.openssl("req", "-in", "req.pem", "-verify", "-noout", "-text")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Certificate request self-signature verify OK" in checked.stdout + checked.stderr
    assert "Subject: C = DE, O = Keyroom Test, CN = keyroom-release" in checked.stdout
    requested = checked.stdout.split("Requested Extensions:", 1)[1]
    assert "X509v3 Basic Constraints: critical\n                    CA:FALSE" in requested
    assert "X509v3 Key Usage: critical\n                    Digital Signature" in requested
    assert "X509v3 Extended Key Usage: \n                    Code Signing" in requested
    public_key = chain.openssl("req", "-in", "req.pem", "-noout", "-pubkey")
    assert serialization.load_pem_public_key(public_key.stdout.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == chain.leaf_key


# --------------------------------------------------------------------------- an external issuer (openssl as the CA)


@pytest.fixture(scope="module")
def external(tmp_path_factory, hsm_token, key_pairs):
    """An external CA made by openssl, and our P-256 leaf key's CSR (RSA generation in SoftHSM is slow)."""
    directory = tmp_path_factory.mktemp("external-ca")
    made = openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                   "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=External CA", "-days", "30",
                   "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                   cwd=directory)
    assert made.returncode == 0, made.stderr
    key = key_pairs("leaf", "ECDSA_P256")
    csr = x509.build_csr(subject=LEAF_SUBJECT, public_key_der=key, sign=signer_of(hsm_token, "leaf", "ECDSA_P256"),
                         key_algorithm="ECDSA_P256")
    write(directory, "req.pem", csr, "CERTIFICATE REQUEST")
    return directory, key, csr


def issue(directory: pathlib.Path, *extra: str, name: str = "issued.pem", csr: str = "req.pem") -> bytes:
    issued = openssl("x509", "-req", "-in", csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial",
                     str(x509.new_serial()), "-days", "10", "-out", name, *extra, cwd=directory)
    assert issued.returncode == 0, issued.stderr
    return crypto_x509.load_pem_x509_certificate((directory / name).read_bytes()).public_bytes(
        serialization.Encoding.DER)


def test_check_issued_accepts_a_certificate_made_from_our_csr(external):
    directory, key, csr = external
    issued = issue(directory, "-copy_extensions", "copy")
    assert x509.check_issued(issued, public_key_der=key, csr_der=csr) == []
    now = datetime.datetime.now(UTC)  # openssl issues from this moment on
    assert x509.check_issued(issued, public_key_der=key, csr_der=csr, now=now) == []
    verified = openssl("verify", "-CAfile", "ca.pem", "issued.pem", cwd=directory)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_check_issued_refuses_an_issuer_that_dropped_the_extensions(external):
    directory, key, csr = external
    issued = issue(directory, "-copy_extensions", "none", name="bare.pem")
    problems = x509.check_issued(issued, public_key_der=key, csr_der=csr)
    assert any("keyUsage lacks digitalSignature" in problem for problem in problems), problems
    assert any("extendedKeyUsage lacks codeSigning" in problem for problem in problems), problems


def test_check_issued_refuses_a_ca_certificate(external):
    directory, key, csr = external
    (directory / "ca-ext.cnf").write_text("basicConstraints=critical,CA:TRUE\n"
                                          "keyUsage=critical,digitalSignature,keyCertSign\n"
                                          "extendedKeyUsage=codeSigning\n")
    issued = issue(directory, "-extfile", "ca-ext.cnf", name="as-ca.pem")
    problems = x509.check_issued(issued, public_key_der=key, csr_der=csr)
    assert any("is a CA certificate" in problem for problem in problems), problems
    assert any("keyCertSign or cRLSign" in problem for problem in problems), problems


def test_check_issued_refuses_another_subject_or_key(external, key_pairs, hsm_token):
    directory, key, csr = external
    issued = issue(directory, "-copy_extensions", "copy")
    other = dict(LEAF_SUBJECT, commonName="someone-else")
    other_csr = x509.build_csr(subject=other, public_key_der=key, sign=signer_of(hsm_token, "leaf", "ECDSA_P256"),
                               key_algorithm="ECDSA_P256")
    assert [p for p in x509.check_issued(issued, public_key_der=key, csr_der=other_csr)
            if "subject differs" in p]
    # the issuer returned a certificate for another key (here: our CA key's) than the CSR's
    other_key = key_pairs("ca", "ECDSA_P256")
    problems = x509.check_issued(issued, public_key_der=other_key, csr_der=csr)
    assert "the CSR is for another public key than this key version" in problems
    assert "the certificate is for another public key than the one the CSR asked for" in problems


def test_check_issued_refuses_expired_and_garbage(external):
    directory, key, csr = external
    issued = issue(directory, "-copy_extensions", "copy")
    problems = x509.check_issued(issued, public_key_der=key, csr_der=csr, now=NOW + datetime.timedelta(days=11))
    assert len(problems) == 1 and "expired" in problems[0]
    assert x509.check_issued(b"not a certificate", public_key_der=key, csr_der=csr)[0].startswith(
        "the issued certificate is not a DER X.509 certificate")


def test_check_issued_knows_a_case_difference_is_the_same_name(external):
    directory, key, csr = external
    (directory / "upper.cnf").write_text("keyUsage=critical,digitalSignature\nextendedKeyUsage=codeSigning\n")
    issued = openssl("x509", "-req", "-in", "req.pem", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", "7",
                     "-days", "10", "-extfile", "upper.cnf", "-subj", "/C=DE/O=KEYROOM TEST/CN=Keyroom-Release",
                     "-out", "upper.pem", cwd=directory)
    assert issued.returncode == 0, issued.stderr
    der = crypto_x509.load_pem_x509_certificate((directory / "upper.pem").read_bytes()).public_bytes(
        serialization.Encoding.DER)
    assert x509.check_issued(der, public_key_der=key, csr_der=csr) == []


# --------------------------------------------------------------------------- refusals (nothing is signed)


@pytest.fixture(scope="module")
def p256(tmp_path_factory, hsm_token, key_pairs) -> Chain:
    return Chain("ECDSA_P256", tmp_path_factory.mktemp("p256"), hsm_token, key_pairs)


def _leaf(p256: Chain, **overrides):
    arguments = dict(subject=LEAF_SUBJECT, subject_public_key_der=p256.leaf_key, issuer_certificate_der=p256.ca,
                     issuer_public_key_der=p256.ca_key, not_before=NOW, not_after=NOW + datetime.timedelta(days=1),
                     serial=x509.new_serial(), sign=p256.ca_sign, key_algorithm="ECDSA_P256")
    arguments.update(overrides)
    return x509.build_certificate(**arguments)


@pytest.mark.parametrize("overrides,message", [
    ({"issuer_certificate_der": "leaf", "issuer_public_key_der": "leaf_key"}, "is not a CA certificate"),
    ({"issuer_public_key_der": "leaf_key"}, "the issuer certificate is for another key"),
    ({"key_algorithm": "ECDSA_P384"}, "the issuer's key is ECDSA_P256, not ECDSA_P384"),
    ({"key_algorithm": "DSA_1024"}, "unknown key algorithm"),
    ({"not_after": NOW + datetime.timedelta(days=400)}, "must lie within the issuer's"),
    ({"not_after": NOW}, "must come after not_before"),
    ({"not_before": datetime.datetime(2026, 1, 1)}, "timezone-aware"),
    ({"serial": 0}, "positive integer"),
    ({"serial": 2 ** 159}, "at most 20 octets"),
    ({"is_ca": True}, "pathLenConstraint is 0"),
    ({"usages": ["digitalSignature"]}, "must include codeSigning"),
    ({"usages": ["codeSigning", "keyCertSign"]}, "belong to a CA certificate"),
    ({"usages": ["codeSigning", "serverAuth"]}, "unknown usage"),
    ({"path_length": 1}, "only for a CA certificate"),
    ({"crl_distribution_point": "file:///etc/passwd"}, "http(s) or ldap URL"),
    ({"subject": {"organization": ["x"]}}, "commonName is required"),
    ({"subject": {"commonName": "x" * 65}}, "commonName is required"),
    ({"subject": {"commonName": "x", "country": ["Germany"]}}, "two-letter code"),
    ({"subject": {"commonName": "x", "organization": "Acme"}}, "list of strings"),
    ({"subject": {"commonName": "x", "emailAddress": "a@b"}}, "unknown subject field"),
    ({"subject_public_key_der": b"\x30\x00"}, "not a DER SubjectPublicKeyInfo"),
])
def test_bad_arguments_are_refused_before_anything_is_signed(p256, hsm_token, overrides, message):
    overrides = {name: getattr(p256, value) if value in ("leaf", "leaf_key") else value
                 for name, value in overrides.items()}
    hsm_token.calls.clear()
    with pytest.raises(x509.X509Error, match=re.escape(message)):
        _leaf(p256, **overrides)
    assert hsm_token.calls == []


def test_self_signed_needs_the_subjects_own_key(p256, hsm_token):
    hsm_token.calls.clear()
    with pytest.raises(x509.X509Error, match="signed by its own key"):
        _leaf(p256, issuer_certificate_der=None)
    assert hsm_token.calls == []


def test_a_signature_by_the_wrong_key_is_never_returned(p256, hsm_token):
    # the callback signs with the leaf key where the CA key should: a wrong key version, a confused token
    with pytest.raises(x509.X509Error, match="does not verify with the issuer's public key"):
        _leaf(p256, sign=p256.leaf_sign)
    with pytest.raises(x509.X509Error, match="does not verify"):
        x509.build_crl(issuer_certificate_der=p256.ca, revoked=[], this_update=NOW,
                       next_update=NOW + datetime.timedelta(days=1), crl_number=9, sign=p256.leaf_sign,
                       key_algorithm="ECDSA_P256")
    with pytest.raises(x509.X509Error, match="does not verify"):
        x509.build_csr(subject=LEAF_SUBJECT, public_key_der=p256.leaf_key, sign=p256.ca_sign,
                       key_algorithm="ECDSA_P256")


@pytest.mark.parametrize("overrides,message", [
    ({"issuer_certificate_der": "leaf"}, "is not a CA certificate"),
    ({"revoked": [(5, NOW, "keyCompromise"), (5, NOW, "superseded")]}, "listed twice"),
    ({"revoked": [(5, NOW, "removeFromCRL")]}, "unknown revocation reason"),
    ({"revoked": [(5, NOW)]}, "(serial, revocation time, reason)"),
    ({"revoked": [(5, datetime.datetime(2026, 1, 1), None)]}, "timezone-aware"),
    ({"revoked": [(5, NOW + datetime.timedelta(seconds=1), None)]}, "after this CRL's this_update"),
    ({"crl_number": 0}, "CRL number"),
    ({"next_update": NOW - datetime.timedelta(days=1)}, "must come after this_update"),
    ({"key_algorithm": "RSA_3072"}, "the issuer's key is ECDSA_P256"),
])
def test_bad_crl_arguments_are_refused(p256, hsm_token, overrides, message):
    arguments = dict(issuer_certificate_der=p256.ca, revoked=[], this_update=NOW,
                     next_update=NOW + datetime.timedelta(days=1), crl_number=4, sign=p256.ca_sign,
                     key_algorithm="ECDSA_P256")
    arguments.update({name: p256.leaf if value == "leaf" else value for name, value in overrides.items()})
    hsm_token.calls.clear()
    with pytest.raises(x509.X509Error, match=re.escape(message)):
        x509.build_crl(**arguments)
    assert hsm_token.calls == []


def test_unspecified_reason_is_written_as_no_reason_code(p256):
    der = x509.build_crl(issuer_certificate_der=p256.ca, revoked=[(77, NOW, "unspecified"), (78, NOW, None)],
                         this_update=NOW, next_update=NOW + datetime.timedelta(days=1), crl_number=5,
                         sign=p256.ca_sign, key_algorithm="ECDSA_P256")
    write(p256.directory, "unspecified.pem", der, "X509 CRL")
    shown = p256.openssl("crl", "-in", "unspecified.pem", "-CAfile", "ca.pem", "-noout", "-text")
    assert "verify OK" in shown.stdout + shown.stderr
    assert "Serial Number: 4D" in shown.stdout and "Serial Number: 4E" in shown.stdout
    assert "CRL Reason Code" not in shown.stdout


def test_times_after_2049_are_generalized_time(p256):
    ca = x509.build_certificate(
        subject=CA_SUBJECT, subject_public_key_der=p256.ca_key, issuer_certificate_der=None,
        issuer_public_key_der=p256.ca_key, not_before=NOW, not_after=datetime.datetime(2051, 1, 1, tzinfo=UTC),
        serial=x509.new_serial(), is_ca=True, sign=p256.ca_sign, key_algorithm="ECDSA_P256")
    write(p256.directory, "long-ca.pem", ca, "CERTIFICATE")
    assert _text(p256, "long-ca.pem").count("Not After : Jan  1 00:00:00 2051 GMT") == 1
    times = [kind for _, kind in _asn1parse(p256, "long-ca.pem", "x509") if kind.endswith("TIME")]
    assert times == ["UTCTIME", "GENERALIZEDTIME"]


def test_new_serials_are_positive_127_bit_and_distinct():
    serials = {x509.new_serial() for _ in range(1000)}
    assert len(serials) == 1000
    assert all(0 < serial < 2 ** 127 for serial in serials)
    assert max(serials).bit_length() >= 120


def test_pem_armor():
    pem = x509.to_pem(b"\x30\x03\x02\x01\x01", "CERTIFICATE")
    assert pem.startswith("-----BEGIN CERTIFICATE-----\n") and pem.endswith("-----END CERTIFICATE-----\n")
    assert x509.fingerprint(b"abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()


def test_subject_without_optional_fields(p256):
    der = _leaf(p256, subject={"commonName": "only-cn", "organization": [], "country": None})
    assert x509.describe(der)["subject"] == "CN=only-cn"


def test_describe_refuses_garbage():
    with pytest.raises(x509.X509Error):
        x509.describe(b"garbage")


def test_the_module_offers_no_way_to_sign_outside_bytes():
    # the only public builders take typed fields; none takes a TBS or arbitrary bytes to sign
    public = {name for name in dir(x509) if not name.startswith("_") and callable(getattr(x509, name))}
    builders = {name for name in public if name.startswith("build_")}
    assert builders == {"build_certificate", "build_crl", "build_csr", "build_name"}
    assert not {name for name in public if "tbs" in name.lower() or name.startswith("sign")}

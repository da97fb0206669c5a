"""Signed JARs: the manifest the client writes, the .SF and block the signer derives, checked by jarsigner.

Proof that a signed JAR is right comes only from ``jarsigner -verify -strict``
(OpenJDK 17) with the CA in a PKCS12 truststore made by ``keytool``: it
recomputes every digest from the JAR's bytes and checks the chain. The keys
are real SoftHSM2 keys in a child process (:class:`tests.token_process.TokenProcess`),
the CA and leaf come from :func:`keyroom.signer.x509.build_certificate`; each
key is generated once per session (RSA-3072 generation is slow in SoftHSM).

The pure parts (manifest grammar, the .SF's layout and determinism, refusals)
are tested on literal bytes.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import pathlib
import re
import subprocess
import zipfile

import pytest
from asn1crypto import cms as asn1_cms

from keyroom.cli import jar as cli_jar
from keyroom.signer import x509
from keyroom.signer.formats import FormatError
from keyroom.signer.formats import jar
from tests.token_process import TokenProcess

STORE_PASSWORD = "jar-truststore-3b8f"
UTC = datetime.timezone.utc
NOW = datetime.datetime.now(UTC).replace(microsecond=0)
#: each key algorithm with the digest algorithm its JARs are signed with, and what jarsigner then reports
ALGORITHMS = {
    "ECDSA_P256": ("SHA256", "SHA-256", "SHA256withECDSA, 256-bit key"),
    "ECDSA_P384": ("SHA384", "SHA-384", "SHA384withECDSA, 384-bit key"),
    "RSA_3072": ("SHA512", "SHA-512", "SHA512withRSA, 3072-bit key"),
}
LONG_NAME = "com/example/" + "resources/" * 7 + "messages_de.properties"
ENTRIES = {
    "com/example/App.class": b"\xca\xfe\xba\xbe\x00\x00\x00\x3d" + bytes(range(256)) * 4,
    "com/example/util/Strings.class": b"\xca\xfe\xba\xbe\x00\x00\x00\x3d strings",
    LONG_NAME: "greeting=Grüß dich\n".encode("utf-8"),
    "META-INF/services/com.example.Plugin": b"com.example.App\n",
    "README.txt": b"hello from a JAR\n",
}


# --------------------------------------------------------------------------- the token, the chains, the verifier


def run(*args: str | pathlib.Path, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(arg) for arg in args], cwd=cwd, capture_output=True, text=True, timeout=120)


class Chain:
    """A CA and a code-signing leaf for one key algorithm, a truststore holding the CA, and one holding a stranger."""

    def __init__(self, algorithm: str, directory: pathlib.Path, format_token: TokenProcess) -> None:
        self.algorithm, self.directory = algorithm, directory
        self.digest_algorithm, self.jar_digest_name, self.signature_shown = ALGORITHMS[algorithm]
        ca_key = format_token.key(f"ca-{algorithm.lower()}", algorithm)
        self.leaf_key = format_token.key(f"leaf-{algorithm.lower()}", algorithm)
        self.ca_sign = format_token.signer(f"ca-{algorithm.lower()}")
        self.leaf_sign = format_token.signer(f"leaf-{algorithm.lower()}")
        self.ca = x509.build_certificate(
            subject={"commonName": f"Keyroom JAR Test CA {algorithm}", "organization": ["Keyroom Test"]},
            subject_public_key_der=ca_key, issuer_certificate_der=None, issuer_public_key_der=ca_key,
            not_before=NOW - datetime.timedelta(hours=1), not_after=NOW + datetime.timedelta(days=365),
            serial=x509.new_serial(), is_ca=True, path_length=0, sign=self.ca_sign, key_algorithm=algorithm)
        self.leaf = x509.build_certificate(
            subject={"commonName": "keyroom-jar-release", "organization": ["Keyroom Test"]},
            subject_public_key_der=self.leaf_key, issuer_certificate_der=self.ca, issuer_public_key_der=ca_key,
            not_before=NOW - datetime.timedelta(minutes=5), not_after=NOW + datetime.timedelta(days=300),
            serial=x509.new_serial(), sign=self.ca_sign, key_algorithm=algorithm)
        self.truststore = self._truststore("trust.p12", self.ca)
        # CAs that did not issue the leaf: a stranger, and an impostor with the real CA's name (and the leaf's key)
        self.stranger_truststore = self._truststore("stranger.p12", self._other_ca("Keyroom JAR Stranger CA"))
        self.impostor_truststore = self._truststore("impostor.p12", self._other_ca(f"Keyroom JAR Test CA {algorithm}"))

    def _other_ca(self, common_name: str) -> bytes:
        return x509.build_certificate(
            subject={"commonName": common_name, "organization": ["Keyroom Test"]},
            subject_public_key_der=self.leaf_key, issuer_certificate_der=None, issuer_public_key_der=self.leaf_key,
            not_before=NOW - datetime.timedelta(hours=1), not_after=NOW + datetime.timedelta(days=365),
            serial=x509.new_serial(), is_ca=True, path_length=0, sign=self.leaf_sign, key_algorithm=self.algorithm)

    def _truststore(self, name: str, certificate: bytes) -> pathlib.Path:
        pem = self.directory / f"{name}.pem"
        pem.write_text(x509.to_pem(certificate))
        made = run("keytool", "-importcert", "-noprompt", "-alias", "ca", "-file", pem, "-keystore", name,
                   "-storetype", "PKCS12", "-storepass", STORE_PASSWORD, cwd=self.directory)
        assert made.returncode == 0, made.stdout + made.stderr
        return self.directory / name

    def sign(self, source: pathlib.Path, out: pathlib.Path, *, replace_signatures: bool = False) -> bytes:
        """Sign ``source`` into ``out`` the way the plugin and the signer do; the manifest signed."""
        manifest = cli_jar.manifest(source, self.digest_algorithm, replace_signatures=replace_signatures)
        block = jar.block(manifest=manifest, digest_algorithm=self.digest_algorithm, certificate_der=self.leaf,
                          chain_der=[self.ca], signing_time=NOW, sign=self.leaf_sign)
        cli_jar.write_signed(source, out, manifest=manifest,
                             signature_file=jar.signature_file(manifest, digest_algorithm=self.digest_algorithm),
                             block=block, block_name=jar.block_extension(self.leaf))
        return manifest

    def jarsigner(self, signed: pathlib.Path, *, truststore: pathlib.Path | None = None,
                  strict: bool = True) -> subprocess.CompletedProcess:
        return run("jarsigner", "-verify", *(["-strict"] if strict else []), "-verbose",
                   "-keystore", truststore or self.truststore, "-storetype", "PKCS12", "-storepass", STORE_PASSWORD,
                   signed, cwd=self.directory)


@pytest.fixture(scope="session")
def chains() -> dict[str, Chain]:
    """The chains made so far, by key algorithm."""
    return {}


@pytest.fixture(params=list(ALGORITHMS))
def chain(request, chains, tmp_path_factory, format_token) -> Chain:
    """The chain of one key algorithm, made (and its keys generated) once per session."""
    if request.param not in chains:
        chains[request.param] = Chain(request.param, tmp_path_factory.mktemp(f"jar-{request.param.lower()}"),
                                      format_token)
    return chains[request.param]


@pytest.fixture
def p256(chains, tmp_path_factory, format_token) -> Chain:
    if "ECDSA_P256" not in chains:
        chains["ECDSA_P256"] = Chain("ECDSA_P256", tmp_path_factory.mktemp("jar-ecdsa_p256"), format_token)
    return chains["ECDSA_P256"]


def make_jar(path: pathlib.Path, *, manifest: bytes | None = None, entries: dict[str, bytes] = ENTRIES) -> pathlib.Path:
    """A JAR as build tools write one: directories, classes, resources, optionally a manifest first."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        if manifest is not None:
            archive.writestr("META-INF/", b"")
            archive.writestr("META-INF/MANIFEST.MF", manifest)
        directories = sorted({name[:index + 1] for name in entries for index in range(len(name)) if name[index] == "/"})
        for directory in directories:
            if directory != "META-INF/" or manifest is None:
                archive.writestr(directory, b"")
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def tamper(signed: pathlib.Path, out: pathlib.Path, name: str, change) -> pathlib.Path:
    """A copy of ``signed`` whose entry ``name`` is ``change(bytes)``, everything else as it was."""
    with zipfile.ZipFile(signed) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            target.writestr(info, change(data) if info.filename == name else data)
    return out


def verified_entries(output: str) -> set[str]:
    """The entries jarsigner -verbose marks "s" (signature verified) and "m" (listed in the manifest)."""
    return {line.split()[-1] for line in output.splitlines() if re.match(r"^smk? ", line)}


# --------------------------------------------------------------------------- jarsigner accepts what keyroom signs


def test_signed_jar_verifies_with_jarsigner(chain, tmp_path):
    signed = tmp_path / "signed.jar"
    chain.sign(make_jar(tmp_path / "app.jar"), signed)
    verified = chain.jarsigner(signed)
    output = verified.stdout + verified.stderr
    assert verified.returncode == 0, output
    assert "jar verified." in output
    assert verified_entries(output) == set(ENTRIES)
    assert f"Digest algorithm: {chain.jar_digest_name}" in output
    assert f"Signature algorithm: {chain.signature_shown}" in output
    assert "POSIX" not in output and "unsigned" not in output
    with zipfile.ZipFile(signed) as archive:
        names = archive.namelist()
        extension = "EC" if chain.algorithm.startswith("ECDSA") else "RSA"
        assert names[:3] == ["META-INF/MANIFEST.MF", "META-INF/KEYROOM.SF", f"META-INF/KEYROOM.{extension}"]
        assert all(info.create_system == 0 and info.external_attr >> 16 == 0 for info in archive.infolist())
        manifest = archive.read("META-INF/MANIFEST.MF")
        assert archive.read("META-INF/KEYROOM.SF") == jar.signature_file(manifest,
                                                                         digest_algorithm=chain.digest_algorithm)
        assert {name: archive.read(name) for name in ENTRIES} == ENTRIES
    # the long entry name needed a continuation line, and jarsigner matched it to its entry all the same
    assert b"\r\n " in manifest and LONG_NAME.encode() not in manifest


def test_a_tampered_entry_fails(chain, tmp_path):
    signed = tmp_path / "signed.jar"
    chain.sign(make_jar(tmp_path / "app.jar"), signed)
    assert chain.jarsigner(signed).returncode == 0
    tampered = tamper(signed, tmp_path / "tampered.jar", "com/example/App.class", lambda data: data[:-1] + b"\x00")
    checked = chain.jarsigner(tampered)
    output = checked.stdout + checked.stderr
    assert checked.returncode != 0, output
    assert "digest error for com/example/App.class" in output


def test_a_jar_whose_ca_is_not_trusted_fails(chain, tmp_path):
    signed = tmp_path / "signed.jar"
    chain.sign(make_jar(tmp_path / "app.jar"), signed)
    checked = chain.jarsigner(signed, truststore=chain.stranger_truststore)
    output = checked.stdout + checked.stderr
    assert checked.returncode != 0, output
    assert "PKIX path building failed" in output
    # a CA of the same name but another key is no trust anchor of this leaf either
    checked = chain.jarsigner(signed, truststore=chain.impostor_truststore)
    output = checked.stdout + checked.stderr
    assert checked.returncode != 0, output
    assert "Path does not chain with any of the trust anchors" in output


def test_main_attributes_and_package_sections_of_an_existing_manifest_are_kept(p256, tmp_path):
    class_path = " ".join(f"lib/dependency-{number}.jar" for number in range(8))  # needs continuation lines
    existing = (b"Manifest-Version: 1.0\r\nMain-Class: com.example.App\r\n"
                + jar.header_lines("Class-Path", class_path)
                + b"Created-By: 17.0.12 (Eclipse Adoptium)\r\n\r\n"
                b"Name: com/example/\r\nSealed: true\r\n\r\n"
                b"Name: README.txt\r\nContent-Type: text/plain\r\nSHA-256-Digest: c3RhbGU=\r\n\r\n")
    signed = tmp_path / "signed.jar"
    manifest = p256.sign(make_jar(tmp_path / "app.jar", manifest=existing), signed)
    verified = p256.jarsigner(signed)
    output = verified.stdout + verified.stderr
    assert verified.returncode == 0, output
    assert verified_entries(output) == set(ENTRIES)
    parsed = jar.parse_manifest(manifest)
    assert parsed.main.headers == (("Manifest-Version", "1.0"), ("Main-Class", "com.example.App"),
                                   ("Class-Path", class_path), ("Created-By", "17.0.12 (Eclipse Adoptium)"))
    sections = {section.name: section.headers[1:] for section in parsed.sections}
    assert sections["com/example/"] == (("Sealed", "true"),)
    readme_digest = base64.b64encode(hashlib.sha256(ENTRIES["README.txt"]).digest()).decode()
    assert sections["README.txt"] == (("Content-Type", "text/plain"), ("SHA-256-Digest", readme_digest))
    with zipfile.ZipFile(signed) as archive:
        assert archive.read("META-INF/MANIFEST.MF") == manifest
        assert archive.namelist().count("META-INF/MANIFEST.MF") == 1


def test_section_digests_of_the_signature_file_hold_when_the_manifest_grows(p256, tmp_path):
    # Once the manifest changes, jarsigner no longer trusts the whole-manifest digest and checks the main
    # attributes' digest and each entry's section digest instead: an entry added later stays unsigned,
    # the signed ones still verify. A changed section must then fail.
    signed = tmp_path / "signed.jar"
    p256.sign(make_jar(tmp_path / "app.jar"), signed)
    added = b"Name: added.txt\r\nSHA-256-Digest: " + base64.b64encode(hashlib.sha256(b"new").digest()) + b"\r\n\r\n"
    grown = tmp_path / "grown.jar"
    tamper(signed, grown, "META-INF/MANIFEST.MF", lambda data: data + added)
    with zipfile.ZipFile(grown, "a") as archive:
        archive.writestr("added.txt", b"new")
    checked = p256.jarsigner(grown, strict=False)
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0, output
    assert verified_entries(output) == set(ENTRIES)
    assert "unsigned entries" in output

    changed = tmp_path / "changed.jar"
    tamper(grown, changed, "META-INF/MANIFEST.MF",
           lambda data: data.replace(b"Name: README.txt\r\n", b"Name: README.txt\r\nX-Note: changed\r\n"))
    checked = p256.jarsigner(changed, strict=False)
    assert checked.returncode != 0
    assert "invalid SHA-256 signature file digest for README.txt" in checked.stdout + checked.stderr


def test_an_already_signed_jar_is_signed_again_only_when_asked(p256, tmp_path):
    signed = tmp_path / "signed.jar"
    p256.sign(make_jar(tmp_path / "app.jar"), signed)
    with pytest.raises(cli_jar.JarError, match=r"already signed \(META-INF/KEYROOM.SF, META-INF/KEYROOM.EC\)"):
        cli_jar.manifest(signed)
    again = tmp_path / "again.jar"
    p256.sign(signed, again, replace_signatures=True)
    verified = p256.jarsigner(again)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    with zipfile.ZipFile(again) as archive:
        meta = [name for name in archive.namelist() if name.startswith("META-INF/") and name.count("/") == 1]
    assert meta == ["META-INF/MANIFEST.MF", "META-INF/KEYROOM.SF", "META-INF/KEYROOM.EC", "META-INF/"]


# --------------------------------------------------------------------------- the client refuses what would not verify


def _signature_parts(chain: Chain, manifest: bytes) -> dict:
    return {"manifest": manifest, "signature_file": jar.signature_file(manifest), "block_name": "EC",
            "block": jar.block(manifest=manifest, digest_algorithm="SHA256", certificate_der=chain.leaf,
                               chain_der=[chain.ca], signing_time=NOW, sign=chain.leaf_sign)}


def test_the_output_is_never_overwritten_unless_asked(p256, tmp_path):
    source = make_jar(tmp_path / "app.jar")
    parts = _signature_parts(p256, cli_jar.manifest(source))
    out = tmp_path / "out.jar"
    out.write_bytes(b"precious")
    with pytest.raises(cli_jar.JarError, match="exists; name another output or ask to overwrite it"):
        cli_jar.write_signed(source, out, **parts)
    assert out.read_bytes() == b"precious"
    with pytest.raises(cli_jar.JarError, match="exists; name another output or ask to overwrite it"):
        cli_jar.write_signed(source, source, **parts)
    cli_jar.write_signed(source, out, **parts, overwrite=True)
    assert p256.jarsigner(out).returncode == 0
    # in place: the signed JAR replaces its source once it is complete
    cli_jar.write_signed(source, source, **parts, overwrite=True)
    verified = p256.jarsigner(source)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["app.jar", "out.jar"]  # no partial file left


def test_a_jar_changed_after_its_manifest_was_written_is_refused(p256, tmp_path):
    source = make_jar(tmp_path / "app.jar")
    parts = _signature_parts(p256, cli_jar.manifest(source))
    make_jar(source, entries={**ENTRIES, "README.txt": b"changed\n"})
    with pytest.raises(cli_jar.JarError, match="README.txt in .* changed since its manifest was written"):
        cli_jar.write_signed(source, tmp_path / "out.jar", **parts)
    make_jar(source, entries={**ENTRIES, "extra.txt": b"new\n"})
    with pytest.raises(cli_jar.JarError, match="the manifest has no digest of extra.txt"):
        cli_jar.write_signed(source, tmp_path / "out.jar", **parts)
    assert not (tmp_path / "out.jar").exists()


@pytest.mark.parametrize("arguments,message", [
    ({"alias": "keyroom"}, "the alias 'keyroom' must be 1 to 8 characters"),
    ({"alias": "TOOLONGNAME"}, "must be 1 to 8 characters"),
    ({"block_name": "DSA"}, "EC or RSA, not 'DSA'"),
    ({"block_name": "KEYROOM.EC"}, "EC or RSA"),
    ({"manifest": b"Name: x\r\n\r\n"}, "the manifest to write is malformed"),
])
def test_write_signed_refuses_bad_arguments(tmp_path, arguments, message):
    source = make_jar(tmp_path / "app.jar")
    manifest = cli_jar.manifest(source)
    given = {"manifest": manifest, "signature_file": jar.signature_file(manifest), "block": b"\x30\x00",
             "block_name": "EC", **arguments}
    with pytest.raises(cli_jar.JarError, match=re.escape(message)):
        cli_jar.write_signed(source, tmp_path / "out.jar", **given)
    assert not (tmp_path / "out.jar").exists()


def test_client_manifest_without_an_existing_one(tmp_path):
    manifest = cli_jar.manifest(make_jar(tmp_path / "app.jar"), "SHA512")
    parsed = jar.parse_manifest(manifest)
    assert parsed.main.headers == (("Manifest-Version", "1.0"), ("Created-By", "keyroom"))
    assert [section.name for section in parsed.sections] == list(ENTRIES)  # files only, in the JAR's order
    for section in parsed.sections:
        assert section.headers[1:] == (("SHA-512-Digest",
                                        base64.b64encode(hashlib.sha512(ENTRIES[section.name]).digest()).decode()),)
    assert all(len(line) <= 72 for line in manifest.split(b"\r\n"))
    assert manifest.endswith(b"\r\n\r\n") and b"\n" not in manifest.replace(b"\r\n", b"")


def test_client_refuses_what_is_not_a_jar(tmp_path):
    (tmp_path / "not.jar").write_bytes(b"plain text")
    with pytest.raises(cli_jar.JarError, match="is not a readable JAR"):
        cli_jar.manifest(tmp_path / "not.jar")
    with pytest.raises(cli_jar.JarError, match="unknown digest algorithm 'MD5'"):
        cli_jar.manifest(make_jar(tmp_path / "app.jar"), "MD5")
    broken = make_jar(tmp_path / "broken.jar", manifest=b"Main-Class: x\r\n\r\n")
    with pytest.raises(cli_jar.JarError, match="malformed META-INF/MANIFEST.MF: .* must start with Manifest-Version"):
        cli_jar.manifest(broken)


@pytest.mark.parametrize("name,related", [
    ("META-INF/MANIFEST.MF", True), ("META-INF/KEYROOM.SF", True), ("META-INF/A.RSA", True),
    ("META-INF/a.dsa", True), ("META-INF/B.EC", True), ("META-INF/SIG-X", True),
    ("META-INF/services/x.SF", False), ("META-INF/maven/pom.xml", False), ("META-INF/INDEX.LIST", False),
    ("com/META-INF/A.SF", False), ("A.SF", False),
])
def test_signature_related_names(name, related):
    assert cli_jar.is_signature_related(name) is related


# --------------------------------------------------------------------------- the manifest grammar (pure)

MANIFEST = (b"Manifest-Version: 1.0\r\nCreated-By: test\r\n\r\n"
            b"Name: a/b.class\r\nSHA-256-Digest: AAAA\r\n\r\n"
            b"Name: c/long/na\r\n me.txt\r\nSHA-256-Digest: BBBB\r\n\r\n")
MAIN_RAW = b"Manifest-Version: 1.0\r\nCreated-By: test\r\n\r\n"
SECTION_RAW = [b"Name: a/b.class\r\nSHA-256-Digest: AAAA\r\n\r\n",
               b"Name: c/long/na\r\n me.txt\r\nSHA-256-Digest: BBBB\r\n\r\n"]


def b64(data: bytes, algorithm: str = "sha256") -> str:
    return base64.b64encode(hashlib.new(algorithm, data).digest()).decode()


def test_signature_file_layout():
    sf = jar.signature_file(MANIFEST)
    assert sf == jar.manifest_bytes([
        [("Signature-Version", "1.0"), ("Created-By", "keyroom"), ("SHA-256-Digest-Manifest", b64(MANIFEST)),
         ("SHA-256-Digest-Manifest-Main-Attributes", b64(MAIN_RAW))],
        [("Name", "a/b.class"), ("SHA-256-Digest", b64(SECTION_RAW[0]))],
        [("Name", "c/long/name.txt"), ("SHA-256-Digest", b64(SECTION_RAW[1]))],
    ])
    assert sf.startswith(b"Signature-Version: 1.0\r\nCreated-By: keyroom\r\nSHA-256-Digest-Manifest: ")
    assert jar.signature_file(MANIFEST) == sf  # deterministic
    sha384 = jar.parse_manifest(jar.signature_file(MANIFEST, digest_algorithm="SHA384"),
                                version_header="Signature-Version")
    assert sha384.main.get("SHA-384-Digest-Manifest-Main-Attributes") == b64(MAIN_RAW, "sha384")
    assert sha384.sections[1].get("SHA-384-Digest") == b64(SECTION_RAW[1], "sha384")
    sha512 = jar.parse_manifest(jar.signature_file(MANIFEST, digest_algorithm="SHA512"),
                                version_header="Signature-Version")
    assert sha512.main.get("SHA-512-Digest-Manifest") == b64(MANIFEST, "sha512")


def test_sections_keep_their_raw_bytes_whatever_the_line_ends():
    for line_end in (b"\n", b"\r"):
        manifest = MANIFEST.replace(b"\r\n", line_end)
        parsed = jar.parse_manifest(manifest)
        assert parsed.main.headers == (("Manifest-Version", "1.0"), ("Created-By", "test"))
        assert [section.name for section in parsed.sections] == ["a/b.class", "c/long/name.txt"]
        assert parsed.main.raw == MAIN_RAW.replace(b"\r\n", line_end)
        assert [section.raw for section in parsed.sections] == [raw.replace(b"\r\n", line_end)
                                                                for raw in SECTION_RAW]
        assert b"".join([parsed.main.raw, *(section.raw for section in parsed.sections)]) == manifest
    # the digests are of the bytes as they are, so another line end is another .SF
    assert jar.signature_file(MANIFEST.replace(b"\r\n", b"\n")) != jar.signature_file(MANIFEST)


def test_the_last_section_may_end_without_a_blank_line():
    manifest = MANIFEST[:-2]
    parsed = jar.parse_manifest(manifest)
    assert parsed.sections[-1].raw == SECTION_RAW[1][:-2]
    assert jar.parse_manifest(b"Manifest-Version: 1.0\n").sections == ()


def test_continuation_lines_join_bytes_even_inside_a_character():
    # "ü" is two bytes in UTF-8; a writer may cut between them, the value is the joined bytes
    manifest = b"Manifest-Version: 1.0\r\nX-Title: Gr\xc3\r\n \xbc\xc3\x9f\r\n\r\n"
    assert jar.parse_manifest(manifest).main.get("x-title") == "Grüß"


@pytest.mark.parametrize("value", ["x" * 200, "ü" * 70, "a" + "€" * 40, "", "short", "trailing space  "])
def test_header_lines_wrap_at_72_bytes_between_characters(value):
    written = jar.header_lines("X-Value", value)
    lines = written.split(b"\r\n")[:-1]
    assert all(len(line) <= 72 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:])
    for line in lines:
        line.decode("utf-8")  # no character is cut in two
    parsed = jar.parse_manifest(b"Manifest-Version: 1.0\r\n" + written)
    assert parsed.main.get("X-Value") == value


def test_header_lines_use_the_whole_line():
    lines = jar.header_lines("Name", "n" * 200).split(b"\r\n")[:-1]
    assert [len(line) for line in lines] == [72, 72, 64]  # 6 + 200 bytes: 72, then 1 + 71, then 1 + 63


@pytest.mark.parametrize("manifest,message", [
    (b"", "the manifest is empty"),
    (b"Manifest-Version: 1.0", "last line has no line end"),
    (b"Manifest-Version: 1.0\r\n\r\nName: a\r\nSHA-256-Digest: x", "last line has no line end"),
    (b"Manifest-Version: 1.0\r\nX-Long: " + b"x" * 65 + b"\r\n", "is 73 bytes long; the limit is 72"),
    (b" continued: 1\r\nManifest-Version: 1.0\r\n", "continues a header, but none came before it"),
    (b"Name: a.class\r\nSHA-256-Digest: x\r\n\r\n", "has no main section"),
    (b"Main-Class: a\r\nManifest-Version: 1.0\r\n\r\n", "must start with Manifest-Version"),
    (b"Manifest-Version: 1.0\r\n\r\nName: a\r\n\r\nName: a\r\n\r\n", "two sections named 'a'"),
    (b"Manifest-Version: 1.0\r\n\r\nName: a\r\nX: 1\r\nx: 2\r\n\r\n", "names the header x twice"),
    (b"Manifest-Version: 1.0\r\nmanifest-version: 2\r\n", "names the header manifest-version twice"),
    (b"Manifest-Version: 1.0\r\n\r\nSHA-256-Digest: x\r\nName: a\r\n\r\n", "every section after the main one"),
    (b"Manifest-Version: 1.0\r\n\r\nName: \r\n\r\n", "an empty Name"),
    (b"Manifest-Version: 1.0\r\n\r\n\r\nName: a\r\n\r\n", "line 3 of the manifest is an empty section"),
    (b"Manifest-Version: 1.0\r\n\r\n\r\n", "empty section"),
    (b"Manifest-Version: 1.0\r\nMain-Class:x\r\n", "is not a header 'Name: value'"),
    (b"Manifest-Version: 1.0\r\nMain Class: x\r\n", "is not a header"),
    (b"Manifest-Version: 1.0\r\n-Bad: x\r\n", "is not a header"),
    (b"Manifest-Version: 1.0\r\nX-Bad: \xff\xfe\r\n", "is not UTF-8"),
    (b"Manifest-Version: 1.0\r\nX-Bad: a\x00b\r\n", "holds a NUL byte"),
    ("Manifest-Version: 1.0\r\n", "a manifest is bytes, not str"),
])
def test_malformed_manifests_are_refused(manifest, message):
    with pytest.raises(FormatError, match=re.escape(message)):
        jar.signature_file(manifest)


def test_unknown_digest_algorithm_and_unwritable_headers():
    with pytest.raises(FormatError, match="unknown digest algorithm 'SHA1'"):
        jar.signature_file(MANIFEST, digest_algorithm="SHA1")
    with pytest.raises(FormatError, match="line break or a NUL"):
        jar.header_lines("Name", "a\nb")
    with pytest.raises(FormatError, match="not a manifest header name"):
        jar.header_lines("Bad Name", "x")


def test_block_extension(p256):
    assert jar.block_extension(p256.leaf) == "EC"
    with pytest.raises(FormatError, match="not a DER X.509 certificate"):
        jar.block_extension(b"\x30\x03\x02\x01\x01")


def test_block_refuses_a_bad_manifest_before_anything_is_signed(p256, format_token):
    format_token.calls.clear()
    with pytest.raises(FormatError, match="has no main section"):
        jar.block(manifest=b"Name: a\r\n\r\n", digest_algorithm="SHA256", certificate_der=p256.leaf,
                  chain_der=[p256.ca], signing_time=NOW, sign=p256.leaf_sign)
    with pytest.raises(FormatError, match="unknown digest algorithm"):
        jar.block(manifest=MANIFEST, digest_algorithm="MD5", certificate_der=p256.leaf,
                  chain_der=[p256.ca], signing_time=NOW, sign=p256.leaf_sign)
    assert format_token.calls == []


def test_block_signs_the_digest_of_the_signature_file(p256, format_token):
    format_token.calls.clear()
    der = jar.block(manifest=MANIFEST, digest_algorithm="SHA384", certificate_der=p256.leaf, chain_der=[p256.ca],
                    signing_time=NOW, sign=p256.leaf_sign)
    signer_info = asn1_cms.ContentInfo.load(der)["content"]["signer_infos"][0]
    attributes = {attribute["type"].native: attribute["values"][0].native for attribute in signer_info["signed_attrs"]}
    sf = jar.signature_file(MANIFEST, digest_algorithm="SHA384")
    assert attributes["message_digest"] == hashlib.sha384(sf).digest()
    assert [call[2] for call in format_token.calls] == ["SHA384"]  # one signature, over the signed attributes

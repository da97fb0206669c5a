"""The signer as a certificate authority: keyroom.signer.issuing on a real SoftHSM2 token, checked by openssl.

The signer reads Certificates, SigningKeys and SigningPolicies from the same
in-memory API server as tests/unit/test_signer_authority.py and signs every
certificate, CSR and CRL in the session's token. Chains, CRLs and revocation
are checked with the ``openssl`` command line, never with code of our own.
The signer's clock (``issuing._now``) is moved forward to reach renewal times
without sleeping.
"""
from __future__ import annotations

import datetime
import pathlib
import subprocess

import pytest
from cryptography import x509 as crypto_x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyroom.api.common import GROUP, ISSUED_CERTIFICATE_ANNOTATION, ROTATE_ANNOTATION, VERSION
from keyroom.signer import certificates, issuing
from tests.unit.test_signer_authority import NS, World, _meta, policy_object, run, uid_of
from tests.unit.test_signer_authority import world  # noqa: F401  (the fixture)

UTC = datetime.timezone.utc
SUBJECT = {"commonName": "Team A Release Signing", "organization": ["Example Corp"], "country": ["DE"]}
CA_SUBJECT = {"commonName": "Team A Code Signing CA", "organization": ["Example Corp"]}
#: a status that would change the outcome if the signer read it
FORGED_STATUS = {"serialNumber": "1", "revision": 99, "keyVersion": 7,
                 "certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}


class Clock:
    def __init__(self) -> None:
        self.offset = datetime.timedelta()

    def __call__(self) -> datetime.datetime:
        return (datetime.datetime.now(UTC) + self.offset).replace(microsecond=0)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    made = Clock()
    monkeypatch.setattr(issuing, "_now", made)
    return made


def certificate_object(name: str, *, key: str = "release", issuer: dict | None = None, **spec) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Certificate", "metadata": _meta(name),
            "spec": {"keyRef": {"name": key}, "issuerRef": issuer or {"selfSigned": {}}, "subject": SUBJECT,
                     "duration": "90d", "renewBefore": "30d", "isCA": False, "usages": ["codeSigning"],
                     "followRotation": True, **spec}, "status": dict(FORGED_STATUS)}


async def reconcile(world: World, signer, body: dict) -> dict:
    authority = issuing.CertificateAuthority(signer)
    return await authority.reconcile(namespace=NS, name=body["metadata"]["name"], uid=uid_of(body))


async def team(world: World, *, ca_algorithm: str = "ECDSA_P256", leaf: dict | None = None, ca: dict | None = None):
    """A CA key and Certificate, a release key and a leaf Certificate issued by the CA."""
    signer = await world.signer()
    world.cluster.put("signingpolicies", policy_object())
    await world.key(signer, name="ca-key", algorithm=ca_algorithm)
    await world.key(signer, name="release")
    ca_body = world.cluster.put("certificates", certificate_object(
        "team-ca", key="ca-key", isCA=True, subject=CA_SUBJECT, duration="365d",
        crlDistributionPoint="http://crl.example.test/team-ca.crl", **(ca or {})))
    leaf_body = world.cluster.put("certificates", certificate_object(
        "release-cert", issuer={"ca": {"name": "team-ca"}}, **(leaf or {})))
    ca_answer = await reconcile(world, signer, ca_body)
    leaf_answer = await reconcile(world, signer, leaf_body)
    return signer, ca_body, leaf_body, ca_answer, leaf_answer


def openssl(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)


def files(tmp_path: pathlib.Path, **pems: str) -> pathlib.Path:
    for name, text in pems.items():
        (tmp_path / f"{name}.pem").write_text(text)
    return tmp_path


def public_pem(key_answer: dict, version: int) -> str:
    return next(v["publicKey"] for v in key_answer["versions"] if v["version"] == version)


def certificate_public_pem(pem: str) -> str:
    return crypto_x509.load_pem_x509_certificate(pem.encode()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


# =========================================================================== issuing

def test_a_self_signed_certificate_is_issued_from_spec_and_verifies(world, clock, tmp_path):
    async def scenario():
        signer = await world.signer()
        world.cluster.put("signingpolicies", policy_object())
        _, key_answer = await world.key(signer)
        body = world.cluster.put("certificates", certificate_object("release-cert"))
        answer = await reconcile(world, signer, body)
        again = await reconcile(world, signer, body)
        return key_answer, answer, again
    key_answer, answer, again = run(scenario())
    current = answer["current"]
    assert answer["revision"] == 1 and again["revision"] == 1, "a second reconcile issues nothing new"
    assert world.events().count("CertificateIssued") == 1
    assert current["keyVersion"] == 1
    assert certificate_public_pem(current["certificate"]) == public_pem(key_answer, 1), "it certifies the key's version"
    parsed = crypto_x509.load_pem_x509_certificate(current["certificate"].encode())
    assert parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == SUBJECT["commonName"]
    assert parsed.extensions.get_extension_for_class(crypto_x509.ExtendedKeyUsage).value == \
        crypto_x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING])
    lifetime = parsed.not_valid_after_utc - parsed.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=90) + issuing.CLOCK_SKEW
    assert current["renewalTime"] == issuing._time(parsed.not_valid_after_utc - datetime.timedelta(days=30))
    assert format(parsed.serial_number, "x") == current["serialNumber"] != FORGED_STATUS["serialNumber"]
    directory = files(tmp_path, cert=current["certificate"])
    result = openssl("verify", "-CAfile", "cert.pem", "cert.pem", cwd=directory)
    assert result.returncode == 0, result.stderr


def test_a_ca_issues_leaves_and_openssl_verifies_the_chain(world, clock, tmp_path):
    signer, ca_body, leaf_body, ca_answer, leaf_answer = run(team(world))
    leaf = leaf_answer["current"]
    assert leaf["chain"] == ca_answer["current"]["certificate"] == leaf["root"]
    parsed = crypto_x509.load_pem_x509_certificate(leaf["certificate"].encode())
    points = parsed.extensions.get_extension_for_class(crypto_x509.CRLDistributionPoints).value
    assert points[0].full_name[0].value == "http://crl.example.test/team-ca.crl"
    assert ca_answer["crl"]["number"] == 1 and ca_answer["crl"]["revokedSerials"] == []
    directory = files(tmp_path, ca=ca_answer["current"]["certificate"], leaf=leaf["certificate"],
                      crl=ca_answer["crl"]["crl"])
    assert openssl("verify", "-CAfile", "ca.pem", "leaf.pem", cwd=directory).returncode == 0
    checked = openssl("verify", "-crl_check", "-CAfile", "ca.pem", "-CRLfile", "crl.pem", "leaf.pem", cwd=directory)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    crl = openssl("crl", "-in", "crl.pem", "-CAfile", "ca.pem", "-noout", cwd=directory)
    assert crl.returncode == 0 and "verify OK" in crl.stderr + crl.stdout


def test_a_leaf_waits_for_its_ca_and_is_issued_once_the_ca_is(world, clock):
    async def scenario():
        signer = await world.signer()
        world.cluster.put("signingpolicies", policy_object())
        await world.key(signer, name="ca-key")
        await world.key(signer, name="release")
        leaf_body = world.cluster.put("certificates", certificate_object("release-cert",
                                                                           issuer={"ca": {"name": "team-ca"}}))
        missing = await reconcile(world, signer, leaf_body)
        not_ca = world.cluster.put("certificates", certificate_object("team-ca", key="ca-key"))
        refused = await reconcile(world, signer, leaf_body)
        ca_body = dict(not_ca, spec={**not_ca["spec"], "isCA": True})
        world.cluster.put("certificates", ca_body)
        before_ca = await reconcile(world, signer, leaf_body)
        await reconcile(world, signer, ca_body)
        return missing, refused, before_ca, await reconcile(world, signer, leaf_body)
    missing, refused, before_ca, issued = run(scenario())
    assert missing["waiting"]["reason"] == "IssuerNotReady" and "does not exist" in missing["waiting"]["message"]
    assert refused["waiting"]["reason"] == "IssuerNotReady" and "not a CA" in refused["waiting"]["message"]
    assert before_ca["waiting"]["reason"] == "IssuerNotReady" and before_ca["current"] is None
    assert issued["current"] is not None and issued["waiting"] is None


def test_renewal_reissues_on_the_same_key_pair_at_the_renewal_time(world, clock, tmp_path):
    async def scenario():
        signer = await world.signer()
        world.cluster.put("signingpolicies", policy_object())
        await world.key(signer)
        body = world.cluster.put("certificates", certificate_object("release-cert", duration="10d", renewBefore="3d"))
        first = await reconcile(world, signer, body)
        clock.offset = datetime.timedelta(days=7) - datetime.timedelta(minutes=1)
        early = await reconcile(world, signer, body)
        clock.offset = datetime.timedelta(days=7, seconds=1)
        renewed = await reconcile(world, signer, body)
        return first, early, renewed
    first, early, renewed = run(scenario())
    assert early["revision"] == 1, "nothing is renewed before the renewal time"
    assert renewed["revision"] == 2
    assert renewed["current"]["serialNumber"] != first["current"]["serialNumber"]
    assert renewed["current"]["keyVersion"] == first["current"]["keyVersion"] == 1
    assert certificate_public_pem(renewed["current"]["certificate"]) == \
        certificate_public_pem(first["current"]["certificate"]), "renewal keeps the key pair"
    assert [p["serialNumber"] for p in renewed["pool"]] == [renewed["current"]["serialNumber"],
                                                             first["current"]["serialNumber"]]
    assert [e["reason"] for e in world.entries() if e["event"] == "CertificateIssued"] == ["Issued", "Renewed"]


@pytest.mark.parametrize("follow", [True, False])
def test_a_rotation_gets_a_certificate_only_with_follow_rotation(world, clock, follow):
    async def scenario():
        signer = await world.signer()
        world.cluster.put("signingpolicies", policy_object())
        key_body, _ = await world.key(signer)
        body = world.cluster.put("certificates", certificate_object("release-cert", followRotation=follow))
        first = await reconcile(world, signer, body)
        key_body["metadata"]["annotations"][ROTATE_ANNOTATION] = "now"
        world.cluster.put("signingkeys", key_body)
        rotated_key = await world.reconcile(signer, key_body)
        return first, rotated_key, await reconcile(world, signer, body)
    first, rotated_key, after = run(scenario())
    assert rotated_key["currentVersion"] == 2
    if follow:
        assert after["current"]["keyVersion"] == 2 and after["revision"] == 2
        assert certificate_public_pem(after["current"]["certificate"]) == public_pem(rotated_key, 2)
        assert {p["keyVersion"] for p in after["pool"]} == {1, 2}, "the older version's certificate stays in the pool"
    else:
        assert after["current"]["keyVersion"] == 1 and after["revision"] == 1


def test_a_changed_subject_is_issued_again(world, clock):
    async def scenario():
        signer = await world.signer()
        world.cluster.put("signingpolicies", policy_object())
        await world.key(signer)
        body = world.cluster.put("certificates", certificate_object("release-cert"))
        await reconcile(world, signer, body)
        body["spec"]["subject"] = {**SUBJECT, "commonName": "Team A Release Signing 2027"}
        body["spec"]["renewBefore"] = "20d"  # does not shape the certificate
        world.cluster.put("certificates", body)
        return await reconcile(world, signer, body)
    answer = run(scenario())
    assert answer["revision"] == 2
    parsed = crypto_x509.load_pem_x509_certificate(answer["current"]["certificate"].encode())
    assert parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Team A Release Signing 2027"


def test_status_is_never_read(world, clock):
    """Every body carries FORGED_STATUS (revision 99, key version 7, a bogus PEM): none of it shows."""
    _, _, _, ca_answer, leaf_answer = run(team(world))
    for answer in (ca_answer, leaf_answer):
        assert answer["revision"] == 1 and answer["current"]["keyVersion"] == 1
        assert "AAAA" not in answer["current"]["certificate"]


# =========================================================================== revocation and CRLs

def test_revoking_a_leaf_publishes_a_crl_that_openssl_enforces(world, clock, tmp_path):
    async def scenario():
        signer, ca_body, leaf_body, ca_answer, leaf_answer = await team(world)
        since = issuing._time(issuing._now() - datetime.timedelta(hours=1))
        leaf_body["spec"]["revocation"] = {"reason": "keyCompromise", "since": since}
        world.cluster.put("certificates", leaf_body)
        revoked = await reconcile(world, signer, leaf_body)
        ca_after = await reconcile(world, signer, ca_body)
        clock.offset = datetime.timedelta(days=80)
        renewal_time = await reconcile(world, signer, leaf_body)
        return leaf_answer, revoked, ca_after, renewal_time
    leaf_answer, revoked, ca_after, renewal_time = run(scenario())
    assert revoked["revoked"] == {"reason": "keyCompromise", "since": revoked["revoked"]["since"]}
    assert ca_after["crl"]["number"] == 2
    assert ca_after["crl"]["revokedSerials"] == [leaf_answer["current"]["serialNumber"]]
    assert renewal_time["revision"] == 1, "a revoked certificate is never renewed"
    directory = files(tmp_path, ca=ca_after["current"]["certificate"], leaf=leaf_answer["current"]["certificate"],
                      crl=ca_after["crl"]["crl"])
    checked = openssl("verify", "-crl_check", "-CAfile", "ca.pem", "-CRLfile", "crl.pem", "leaf.pem", cwd=directory)
    assert checked.returncode != 0 and "certificate revoked" in checked.stdout + checked.stderr
    text = openssl("crl", "-in", "crl.pem", "-noout", "-text", cwd=directory).stdout
    assert "Key Compromise" in text and "X509v3 CRL Number" in text


def test_the_crl_is_refreshed_before_its_next_update(world, clock):
    async def scenario():
        signer, ca_body, _, ca_answer, _ = await team(world)
        clock.offset = certificates.CRL_VALIDITY - certificates.CRL_REFRESH_BEFORE - datetime.timedelta(minutes=1)
        early = await reconcile(world, signer, ca_body)
        clock.offset = certificates.CRL_VALIDITY - certificates.CRL_REFRESH_BEFORE
        return ca_answer, early, await reconcile(world, signer, ca_body)
    ca_answer, early, refreshed = run(scenario())
    assert early["crl"]["number"] == 1
    assert refreshed["crl"]["number"] == 2
    assert refreshed["crl"]["nextUpdate"] > ca_answer["crl"]["nextUpdate"]


def test_a_revoked_ca_issues_nothing_more(world, clock):
    async def scenario():
        signer, ca_body, leaf_body, _, _ = await team(world)
        ca_body["spec"]["revocation"] = {"reason": "cACompromise", "since": issuing._time(issuing._now())}
        world.cluster.put("certificates", ca_body)
        await reconcile(world, signer, ca_body)
        other = world.cluster.put("certificates", certificate_object("other-cert",
                                                                       issuer={"ca": {"name": "team-ca"}}))
        return await reconcile(world, signer, other)
    answer = run(scenario())
    assert answer["current"] is None and answer["waiting"]["reason"] == "IssuerNotReady"
    assert "revoked" in answer["waiting"]["message"]


# =========================================================================== external issuers

def _outside_ca():
    key = ec.generate_private_key(ec.SECP256R1())
    name = crypto_x509.Name([crypto_x509.NameAttribute(NameOID.COMMON_NAME, "Outside CA")])
    now = datetime.datetime.now(UTC)
    certificate = (crypto_x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(crypto_x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=400))
                   .add_extension(crypto_x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    return key, certificate


def _issue_outside(ca_key, ca_certificate, csr_pem: str, *, public_key=None) -> str:
    csr = crypto_x509.load_pem_x509_csr(csr_pem.encode())
    now = datetime.datetime.now(UTC)
    issued = (crypto_x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca_certificate.subject)
              .public_key(public_key or csr.public_key()).serial_number(crypto_x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
              .add_extension(crypto_x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(crypto_x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                             critical=True)
              .add_extension(crypto_x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    return (issued.public_bytes(serialization.Encoding.PEM) + ca_certificate.public_bytes(serialization.Encoding.PEM)
            ).decode()


def test_an_external_ca_signs_the_csr_and_the_certificate_is_accepted_back(world, clock, tmp_path):
    ca_key, ca_certificate = _outside_ca()

    async def scenario():
        signer = await world.signer()
        world.cluster.put("signingpolicies", policy_object())
        await world.key(signer)
        body = world.cluster.put("certificates", certificate_object("release-cert", issuer={"external": {}}))
        requested = await reconcile(world, signer, body)
        wrong = _issue_outside(ca_key, ca_certificate, requested["csr"],
                               public_key=ec.generate_private_key(ec.SECP256R1()).public_key())
        body["metadata"]["annotations"] = {ISSUED_CERTIFICATE_ANNOTATION: wrong}
        world.cluster.put("certificates", body)
        refused = await reconcile(world, signer, body)
        body["metadata"]["annotations"] = {ISSUED_CERTIFICATE_ANNOTATION: _issue_outside(
            ca_key, ca_certificate, requested["csr"])}
        world.cluster.put("certificates", body)
        accepted = await reconcile(world, signer, body)
        return requested, refused, accepted, await reconcile(world, signer, body)
    requested, refused, accepted, again = run(scenario())
    assert requested["current"] is None and requested["waiting"]["reason"] == "AwaitingExternalCertificate"
    directory = files(tmp_path, csr=requested["csr"])
    assert openssl("req", "-in", "csr.pem", "-verify", "-noout", cwd=directory).returncode == 0, \
        "the CSR is signed by the key it is for"
    assert refused["current"] is None and refused["waiting"]["reason"] == "InvalidExternalCertificate"
    assert accepted["revision"] == 1 and again["revision"] == 1
    assert accepted["current"]["chain"] == ca_certificate.public_bytes(serialization.Encoding.PEM).decode()
    assert [e["issuer"] for e in world.entries() if e["event"] == "CertificateIssued"] == [{"kind": "external"}]


# =========================================================================== policy profile

def test_the_code_signing_baseline_refuses_a_validity_over_460_days(world, clock):
    async def scenario():
        signer = await world.signer()
        world.cluster.put("signingpolicies", policy_object(certificateProfile="CABForumCodeSigning"))
        await world.key(signer)
        long_lived = world.cluster.put("certificates", certificate_object("long", duration="500d"))
        within = world.cluster.put("certificates", certificate_object("within", duration="460d"))
        return await reconcile(world, signer, long_lived), await reconcile(world, signer, within)
    long_lived, within = run(scenario())
    assert long_lived["current"] is None and long_lived["waiting"]["reason"] == "ProfileViolation"
    assert "460 days" in long_lived["waiting"]["message"]
    assert within["current"] is not None


def test_profile_problems_name_the_key_algorithm_and_the_validity():
    spec = {"duration": "461d"}
    problems = certificates.profile_problems([{"certificateProfile": "CABForumCodeSigning"}],
                                             key_algorithm="RSA_2048", spec=spec)
    assert len(problems) == 2 and "RSA_2048" in problems[0] and "460" in problems[1]
    assert certificates.profile_problems([{}], key_algorithm="RSA_2048", spec=spec) == []


# =========================================================================== which certificate a signature embeds

def test_only_a_valid_unrevoked_certificate_of_the_signing_version_is_usable(world, clock):
    async def scenario():
        return await team(world)
    signer, ca_body, leaf_body, _, leaf_answer = run(scenario())
    records = signer.log.certificates
    specs = {uid_of(b): b["spec"] for b in (ca_body, leaf_body)}
    key_uid = records[uid_of(leaf_body)].key_uid
    at = issuing._now()
    chosen = certificates.usable_certificate(records, specs, key_uid=key_uid, version=1, at=at)
    assert chosen.record.name == "release-cert" and chosen.chain[0].serial == records[uid_of(ca_body)].latest.serial
    assert "no usable certificate" in certificates.usable_certificate(records, specs, key_uid=key_uid, version=2,
                                                                      at=at)
    expired = certificates.usable_certificate(records, specs, key_uid=key_uid, version=1,
                                              at=at + datetime.timedelta(days=91))
    assert isinstance(expired, str) and "expired" in expired
    revoked_in_spec = dict(specs, **{uid_of(leaf_body): {**leaf_body["spec"], "revocation": {"since": "x"}}})
    assert "revoked" in certificates.usable_certificate(records, revoked_in_spec, key_uid=key_uid, version=1, at=at)
    ca_revoked = dict(specs, **{uid_of(ca_body): {**ca_body["spec"], "revocation": {"since": "x"}}})
    assert "CA team-ca is revoked" in certificates.usable_certificate(records, ca_revoked, key_uid=key_uid,
                                                                      version=1, at=at)
    gone = {uid_of(ca_body): ca_body["spec"]}
    assert isinstance(certificates.usable_certificate(records, gone, key_uid=key_uid, version=1, at=at), str)

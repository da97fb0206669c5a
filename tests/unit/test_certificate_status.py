"""The Certificate controller's pure steps: status, conditions, events and the published Secret and ConfigMap."""
from __future__ import annotations

import base64
import datetime

from keyroom.controllers import certificate
from keyroom.signer.client import SignerError

UTC = datetime.timezone.utc
AT = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
SPEC = {"keyRef": {"name": "release"}, "issuerRef": {"ca": {"name": "team-ca"}}, "subject": {"commonName": "x"}}
LEAF, ROOT = "-----BEGIN CERTIFICATE-----\nLEAF\n-----END CERTIFICATE-----\n", \
    "-----BEGIN CERTIFICATE-----\nROOT\n-----END CERTIFICATE-----\n"


def record(**changes) -> dict:
    made = {"uid": "u", "revision": 1, "csr": None, "revoked": None, "crl": None, "waiting": None, "pool": [],
            "nextChangeAt": "2027-01-26T12:00:00Z",
            "current": {"serialNumber": "ab", "notBefore": "2026-11-27T11:55:00Z", "notAfter": "2027-02-25T12:00:00Z",
                        "renewalTime": "2027-01-26T12:00:00Z", "fingerprint": "sha256:00", "keyVersion": 1,
                        "certificate": LEAF, "chain": ROOT, "root": ROOT, "issuer": "CN=CA"}}
    made.update(changes)
    return made


def conditions_of(status: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def desired(record_: dict | None, status: dict | None = None, error: SignerError | None = None, at=AT) -> dict:
    return certificate.desired_status(spec=SPEC, status=status or {}, record=record_, generation=3, at=at,
                                      name="release-cert", error=error)


def test_a_valid_certificate_is_ready_and_mirrors_the_record():
    status = desired(record())
    assert conditions_of(status)["Ready"] == ("True", "Issued")
    assert conditions_of(status)["Issuing"][0] == "False" and conditions_of(status)["Expired"][0] == "False"
    assert status["serialNumber"] == "ab" and status["certificate"] == LEAF and status["chain"] == ROOT
    assert status["issuer"] == "ca/team-ca" and status["revision"] == 1 and status["observedGeneration"] == 3


def test_waiting_for_the_ca_is_issuing_and_not_ready():
    status = desired(record(current=None, revision=0,
                            waiting={"reason": "IssuerNotReady", "message": "the CA team-ca has no certificate yet"}))
    assert conditions_of(status)["Ready"] == ("False", "IssuerNotReady")
    assert conditions_of(status)["Issuing"] == ("True", "IssuerNotReady")
    assert "no certificate yet" in status["message"] and "certificate" not in status


def test_a_revoked_certificate_is_not_ready_and_says_since_when():
    status = desired(record(revoked={"reason": "keyCompromise", "since": "2026-11-01T00:00:00Z"}))
    assert conditions_of(status)["Ready"] == ("False", "Revoked")
    assert conditions_of(status)["Revoked"] == ("True", "Revoked")
    assert status["revokedAt"] == "2026-11-01T00:00:00Z" and "keyCompromise" in status["message"]
    # final, so that kstatus, Flux and Argo CD report it as failed instead of waiting for it forever
    assert conditions_of(status)["Stalled"] == ("True", "Revoked") and "Reconciling" not in conditions_of(status)


def test_an_expired_certificate_is_expired_and_not_ready():
    status = desired(record(), at=datetime.datetime(2027, 2, 25, 12, 0, tzinfo=UTC))
    assert conditions_of(status)["Expired"] == ("True", "Expired")
    assert conditions_of(status)["Ready"] == ("False", "Expired")


def test_without_the_signer_what_was_shown_stays_and_the_error_shows():
    shown = desired(record())
    status = desired(None, status=shown, error=SignerError("SignerUnreachable", "cannot reach the signer"))
    assert status["certificate"] == LEAF and status["serialNumber"] == "ab"
    assert conditions_of(status)["Reconciling"] == ("True", "SignerUnreachable")
    assert "Stalled" not in conditions_of(status), "abnormal-true conditions are left out while False"
    stalled = desired(None, status=shown, error=SignerError("SignerForbidden", "the signer refused the operator"))
    assert conditions_of(stalled)["Stalled"] == ("True", "SignerForbidden")


def test_events_say_issued_then_renewed_then_revoked_and_crl_published():
    first = desired(record())
    assert [e[1] for e in certificate.events({}, first)] == ["Issued"]
    renewed = desired(record(revision=2), status=first)
    assert [e[1] for e in certificate.events(first, renewed)] == ["Renewed"]
    assert certificate.events(renewed, desired(record(revision=2), status=renewed)) == []
    revoked = desired(record(revision=2, revoked={"reason": "superseded", "since": "2026-11-27T00:00:00Z"}),
                      status=renewed)
    assert [e[1] for e in certificate.events(renewed, revoked)] == ["Revoked"]
    crl = {"number": 2, "thisUpdate": "x", "nextUpdate": "y", "crl": "PEM", "revokedSerials": ["ab"]}
    published = desired(record(revision=2, crl=crl), status=renewed)
    assert ("Normal", "CrlPublished") in [e[:2] for e in certificate.events(renewed, published)]
    assert published["crl"] == {"number": 2, "thisUpdate": "x", "nextUpdate": "y", "revoked": 1,
                                "configMap": "release-cert-crl"}


CA_SPEC = {"keyRef": {"name": "ca-key"}, "isCA": True, "subject": {"commonName": "Team CA"}}
CRL = {"number": 2, "thisUpdate": "x", "nextUpdate": "y", "crl": "PEM", "revokedSerials": ["ab"]}
REVOKED = {"since": "2026-11-27T12:00:00Z", "reason": "keyCompromise"}


def test_a_ca_wakes_its_certificates_only_when_its_certificate_revocation_or_crl_changed():
    ca = record(crl=CRL)
    shown = certificate.desired_status(spec=CA_SPEC, status={}, record=ca, generation=1, at=AT, name="team-ca")
    assert certificate.follow_ups(spec=CA_SPEC, shown={}, record=ca) == (True, None)  # its first certificate
    assert certificate.follow_ups(spec=CA_SPEC, shown=shown, record=ca) == (False, None)  # nothing new
    assert certificate.follow_ups(spec=CA_SPEC, shown=shown, record=record(crl={**CRL, "number": 3})) == (True, None)
    assert certificate.follow_ups(spec=CA_SPEC, shown=shown, record=record(revision=2, crl=CRL)) == (True, None)
    assert certificate.follow_ups(spec=CA_SPEC, shown=shown, record=record(crl=CRL, revoked=REVOKED)) == (True, None)
    assert certificate.follow_ups(spec=CA_SPEC, shown=shown, record=None) == (False, None)


def test_a_revoked_certificate_wakes_its_ca_once_not_on_every_pass():
    """A revoked certificate that woke its CA on every pass, while the CA woke it on every pass, was a loop."""
    revoked = record(revoked=REVOKED)
    assert certificate.follow_ups(spec=SPEC, shown=desired(record()), record=revoked) == (False, "team-ca")
    assert certificate.follow_ups(spec=SPEC, shown=desired(revoked), record=revoked) == (False, None)
    assert certificate.follow_ups(spec=SPEC, shown=desired(record()), record=record()) == (False, None)
    assert certificate.follow_ups(spec={**SPEC, "issuerRef": None}, shown={}, record=revoked) == (False, None)


def test_the_secret_holds_public_certificates_only():
    body = certificate.secret_body(name="release-cert", namespace="team-a", owner={"name": "c", "uid": "u"},
                                   current=record()["current"])
    assert body["type"] == "keyroom.dev/certificate" and sorted(body["data"]) == ["ca.crt", "tls.crt"]
    assert base64.b64decode(body["data"]["tls.crt"]).decode() == LEAF, "the root is not repeated in tls.crt"
    assert base64.b64decode(body["data"]["ca.crt"]).decode() == ROOT
    assert body["metadata"]["ownerReferences"][0]["uid"] == "u"
    assert body["metadata"]["labels"] == {"keyroom.dev/certificate": "c"}


def test_a_self_signed_certificate_is_its_own_ca():
    current = dict(record()["current"], chain="", root=LEAF)
    body = certificate.secret_body(name="s", namespace="team-a", owner={"name": "c", "uid": "u"}, current=current)
    assert base64.b64decode(body["data"]["ca.crt"]).decode() == LEAF == base64.b64decode(body["data"]["tls.crt"]).decode()


def test_the_crl_config_map_is_named_after_the_ca():
    body = certificate.crl_config_map_body(namespace="team-a", owner={"name": "team-ca", "uid": "u"},
                                           crl={"crl": "CRL PEM"}, current=record()["current"])
    assert body["metadata"]["name"] == "team-ca-crl" and body["data"] == {"ca.crl": "CRL PEM", "ca.crt": LEAF}


def test_the_next_wakeup_is_the_earliest_of_the_next_change_and_the_expiry():
    assert certificate.next_wakeup(record(), AT) == datetime.datetime(2027, 1, 26, 12, 0, tzinfo=UTC)
    assert certificate.next_wakeup(record(nextChangeAt=None), AT) == datetime.datetime(2027, 2, 25, 12, 0, tzinfo=UTC)
    assert certificate.next_wakeup(None, AT) is None

"""Certificate: a short-lived X.509 certificate for one SigningKey.

The certificate is renewed before it expires, on the same key pair unless the
key rotated, and can be revoked from a point in time onward. Its Secret holds
the certificate and its chain, never a private key.
"""
from __future__ import annotations

from keyroom.api.common import Kind, age_column, object_reference, printer_column, ready_column
from keyroom.api.schema import (
    NAME_PATTERN, array, boolean, integer, obj, printable, rule, string, string_list, timestamp,
)

USAGES = ["codeSigning", "digitalSignature", "timeStamping", "keyCertSign", "cRLSign"]
REVOCATION_REASONS = ["unspecified", "keyCompromise", "cACompromise", "affiliationChanged",
                      "superseded", "cessationOfOperation", "privilegeWithdrawn"]
CONDITION_TYPES = ["Ready", "Issuing", "Revoked", "Expired", "Reconciling", "Stalled"]
#: durations of certificates: whole days, hours, minutes and seconds (so that admission can compare them; nine
#: digits keep the seconds inside CEL's integers)
CERTIFICATE_DURATION_PATTERN = r"^([0-9]{1,9}d)?([0-9]{1,9}h)?([0-9]{1,9}m)?([0-9]{1,9}s)?$"
#: the longest validity a certificate may ask for: a root CA's lifetime, and far inside the calendar of X.509
MAX_CERTIFICATE_DAYS = 36500


def _seconds(field: str) -> str:
    """CEL: the seconds of a duration field matching CERTIFICATE_DURATION_PATTERN."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return "(" + " + ".join(
        f"(self.{field}.find('[0-9]+{unit}') != '' ? int(self.{field}.find('[0-9]+{unit}').replace('{unit}', '')) "
        f"* {factor} : 0)" for unit, factor in units.items()) + ")"


def _certificate_duration(description: str, default: str) -> dict:
    return string(description + " Whole days, hours, minutes and seconds, e.g. 90d, 36h or 1d12h.",
                  pattern=CERTIFICATE_DURATION_PATTERN, min_length=2, max_length=32, default=default)


_issuer = obj(
    "Who signs the certificate; exactly one of selfSigned, ca or external.",
    {
        "selfSigned": obj("The key signs its own certificate.", {}),
        "ca": object_reference("A Certificate with isCA: true whose key signs this one.", what="CA Certificate"),
        "external": obj("An outside CA: the CSR is published in status.csr and the issued certificate "
                        "is supplied back through the keyroom.dev/issued-certificate annotation.", {}),
    },
    rules=[rule("(has(self.selfSigned) ? 1 : 0) + (has(self.ca) ? 1 : 0) + (has(self.external) ? 1 : 0) == 1",
                "issuerRef needs exactly one of selfSigned, ca or external")],
)

_subject = obj(
    "The certificate's subject distinguished name.",
    {
        "commonName": string("The subject's common name (CN).", min_length=1, max_length=64,
                             rules=[printable("spec.subject.commonName")]),
        "organization": string_list("Organizations (O).", max_items=8, item_max_length=64,
                                    item_rules=[printable("an organization")]),
        "organizationalUnit": string_list("Organizational units (OU).", max_items=8, item_max_length=64,
                                          item_rules=[printable("an organizational unit")]),
        "country": string_list("Two-letter country codes (C).", max_items=4, item_max_length=2,
                               pattern=r"^[A-Z]{2}$"),
        "locality": string_list("Localities (L).", max_items=4, item_max_length=128,
                                item_rules=[printable("a locality")]),
        "province": string_list("States or provinces (ST).", max_items=4, item_max_length=128,
                                item_rules=[printable("a province")]),
    },
    required=["commonName"],
)

SPEC = obj(
    "The desired state of a Certificate.",
    {
        "keyRef": object_reference("The SigningKey in the same namespace whose public key is certified. Immutable.",
                                   what="SigningKey"),
        "issuerRef": _issuer,
        "subject": _subject,
        "duration": _certificate_duration("How long each issued certificate is valid.", default="90d"),
        "renewBefore": _certificate_duration("How long before expiry the certificate is renewed; less than "
                                             "duration.", default="30d"),
        "isCA": boolean("Whether this certificate may sign other certificates (keyCertSign, cRLSign).",
                        default=False),
        "usages": string_list("Key usages. codeSigning by default; CA certificates get keyCertSign and cRLSign.",
                              max_items=5, enum=USAGES, min_items=1, default=["codeSigning"]),
        "followRotation": boolean("Issue a certificate for each new key version, keeping a pool of them.",
                                  default=True),
        "crlDistributionPoint": string("CA certificates only: the URL where this CA's CRL is published, written "
                                       "into the certificates it issues (the CRL itself is also in the ConfigMap "
                                       "<name>-crl).", max_length=512, pattern=r"^https?://[!-~]+$"),
        "secretName": string("A Secret to write tls.crt and ca.crt into (never a private key).",
                             pattern=NAME_PATTERN, max_length=253),
        "revocation": obj(
            "Revokes the certificate from a point in time onward. Once set it cannot be withdrawn or changed.",
            {
                "reason": string("The CRL reason.", enum=REVOCATION_REASONS, default="unspecified"),
                "since": timestamp("From when signatures under this certificate are no longer trusted."),
            },
        ),
    },
    required=["keyRef", "issuerRef", "subject"],
    rules=[
        rule("self.keyRef == oldSelf.keyRef", "spec.keyRef is immutable; create a new Certificate instead",
             field_path=".keyRef"),
        rule("!has(oldSelf.revocation) || (has(self.revocation) && self.revocation == oldSelf.revocation)",
             "a revocation cannot be withdrawn or changed", field_path=".revocation"),
        rule(f"{_seconds('duration')} > 0", "spec.duration must be positive", field_path=".duration"),
        rule(f"{_seconds('duration')} <= {MAX_CERTIFICATE_DAYS * 86400}",
             f"spec.duration may be at most {MAX_CERTIFICATE_DAYS}d (100 years)", field_path=".duration"),
        rule(f"{_seconds('renewBefore')} > 0", "spec.renewBefore must be positive", field_path=".renewBefore"),
        rule(f"{_seconds('renewBefore')} < {_seconds('duration')}",
             "spec.renewBefore must be less than spec.duration, or the certificate would be renewed as soon as "
             "it is issued", field_path=".renewBefore"),
        rule("self.isCA || !has(self.crlDistributionPoint)",
             "crlDistributionPoint belongs to a CA certificate (isCA: true)", field_path=".crlDistributionPoint"),
        rule("self.isCA || !self.usages.exists(u, u == 'keyCertSign' || u == 'cRLSign')",
             "keyCertSign and cRLSign are for CA certificates: set isCA: true or remove them", field_path=".usages"),
    ],
)

KIND = Kind(
    kind="Certificate",
    plural="certificates",
    short_names=["kcert"],
    description="An X.509 code-signing certificate for one SigningKey, renewed before it expires.",
    spec=SPEC,
    status_properties={
        "serialNumber": string("The current certificate's serial number, hex.", max_length=64),
        "notBefore": timestamp("Start of the current certificate's validity."),
        "notAfter": timestamp("End of the current certificate's validity."),
        "renewalTime": timestamp("When the certificate will be renewed."),
        "fingerprint": string("sha256 of the DER certificate, as sha256:<hex>.", max_length=80),
        "keyVersion": integer("The SigningKey version the current certificate certifies.", minimum=1),
        "certificate": string("The current certificate, PEM.", max_length=16384),
        "chain": string("The issuing chain up to the root, PEM.", max_length=65536),
        "csr": string("The certificate signing request, PEM (external issuer only).", max_length=16384),
        "revision": integer("How many certificates have been issued.", minimum=0),
        "issuer": string("Who issued the current certificate: selfSigned, ca/<name> or external.", max_length=300),
        "pool": array("The unexpired certificates, newest first (one per key version with followRotation).",
                      obj("One certificate.", {
                          "keyVersion": integer("The key version it certifies.", minimum=1),
                          "serialNumber": string("Its serial number, hex.", max_length=64),
                          "notAfter": timestamp("When it expires."),
                          "fingerprint": string("sha256 of the DER certificate.", max_length=80),
                      }), max_items=16, list_type="atomic"),
        "revokedAt": timestamp("From when the certificate is revoked (spec.revocation.since)."),
        "crl": obj("CA certificates: the CRL the signer last published (also in the ConfigMap <name>-crl).", {
            "number": integer("The CRL number.", minimum=1),
            "thisUpdate": timestamp("When it was published."),
            "nextUpdate": timestamp("When the next one is due at the latest."),
            "revoked": integer("How many certificates it lists.", minimum=0),
            "configMap": string("The ConfigMap holding it.", max_length=253),
        }),
        "message": string("A human summary of the certificate's state.", max_length=4096),
    },
    condition_types=CONDITION_TYPES,
    printer_columns=[
        printer_column("Key", ".spec.keyRef.name"),
        printer_column("Issuer", ".status.issuer"),
        ready_column(),
        printer_column("Expires", ".status.notAfter"),
        printer_column("Serial", ".status.serialNumber", priority=1),
        age_column(),
    ],
)

"""SignRequest: a request to sign digests that the client computed locally.

The artifact never travels, only its digests. The spec is immutable after
creation except that approvers append their own entries to ``approvals`` and
builders theirs to ``attestations`` (the digests their own, independent build
of the same release produced); the ValidatingAdmissionPolicy in
``admission.py`` makes the API server check that the requester, every approval
and every attestation are who they claim to be.
"""
from __future__ import annotations

from keyroom.api.common import Kind, age_column, object_reference, printer_column
from keyroom.api.signingpolicy import CERTIFICATE_FORMATS, DIGEST_ALGORITHMS, FORMATS, MAX_DIGESTS_PER_REQUEST
from keyroom.api.schema import array, integer, obj, printable, rule, string, string_list, timestamp

PHASES = ["Pending", "Approved", "Signing", "Signed", "Denied", "Expired", "Failed"]
TERMINAL_PHASES = ["Signed", "Denied", "Expired", "Failed"]
DECISIONS = ["Approve", "Deny"]
CONDITION_TYPES = ["Approved", "Denied", "Signed", "Ready", "Reconciling", "Stalled"]
MAX_APPROVALS = 32
#: build attestations one request may carry (a policy asks for at most 6 matching builds)
MAX_ATTESTATIONS = 16
#: hex characters per digest, by algorithm
DIGEST_HEX_LENGTH = {"SHA256": 64, "SHA384": 96, "SHA512": 128}
#: the most digests of one request whose signatures embed a certificate chain (the status must stay small)
MAX_CERTIFICATE_DIGESTS = 100
#: the longest JAR manifest a request carries, base64
MAX_MANIFEST_LENGTH = 1_048_576
#: format cosign: a digest's name is an image reference, host[:port]/path[:tag]; the host has a dot or a port or is
#: localhost (as Docker tells a registry from a path), and no @digest
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})+(?::[0-9]+)?|{_LABEL}:[0-9]+|localhost)"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE_PATTERN = rf"^{_DOMAIN}(?:/{_PATH})+(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?$"
#: the longest APK signed data block a request carries, base64 (16 KiB: one digest, certificate and attribute)
MAX_SIGNED_DATA_LENGTH = 21_848
APK_SCHEMES = ["v2", "v3"]

#: a digest's name is shown to approvers: no control characters (newlines, ANSI escapes), DEL, C1 controls or
#: bidirectional overrides that would make "invoice\u202efdp.exe" read as "invoiceexe.pdf" (RE2 syntax)
DIGEST_NAME_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\x{202a}-\x{202e}\x{2066}-\x{2069}]+$"

_groups = string_list("Groups, as the API server authenticated them.", max_items=64)

_approval = obj(
    "One approver's decision, appended by the approver themself.",
    {
        "user": string("The approver's username; must be the user making the update.", min_length=1, max_length=253),
        "groups": _groups,
        "decision": string("Approve or Deny.", enum=DECISIONS),
        "reason": string("Why.", max_length=1024, rules=[printable("an approval's reason")]),
    },
    required=["user", "decision"],
)

_digest = obj(
    "One digest to sign.",
    {
        "name": string("The artifact's name, e.g. its file name; unique within the request.",
                       min_length=1, max_length=253, pattern=DIGEST_NAME_PATTERN),
        "value": string("The digest, hex-encoded.", min_length=64, max_length=128, pattern=r"^[0-9a-fA-F]+$"),
    },
    required=["name", "value"],
)

def _unique_names(what: str) -> dict:
    """Digest names are unique. The list is atomic (one value, as the digests never change after creation): a
    list keyed by name made the API server track each of up to 500 entries in managedFields and merge them on
    every write, which doubled the cost of creating and of each status write of a large request."""
    return rule("self.map(d, d.name).distinct().size() == self.size()",
                f"Duplicate value: two digests share a name; each of {what} needs a name of its own")


def _at_creation(check: dict) -> dict:
    """``check`` evaluated when the object is created, and not on its updates.

    For rules over spec.digests with spec.format and spec.digestAlgorithm:
    none of them changes after creation (the rules of :func:`_unchanged`), so
    what held at creation holds on every update. The API server evaluates a
    CRD's rules over the whole object on every write, status writes included:
    at 500 digests these took 7 of the 40 ms of each status write.
    """
    return {**check, "rule": f"oldSelf.hasValue() || ({check['rule']})", "optionalOldSelf": True}


_attestation = obj(
    "One builder's digests of the release, from a build of its own, appended by the builder themself "
    "(kubectl keyroom attest NAME FILE...).",
    {
        "user": string("The builder's username; must be the user making the update.", min_length=1, max_length=253),
        "groups": _groups,
        "build": string("The build that computed the digests, e.g. the CI run's URL (shown in status and audited).",
                        max_length=1024, rules=[printable("an attestation's build")]),
        "digests": array("The digests this builder computed, with the request's names and digestAlgorithm.",
                         _digest, min_items=1, max_items=MAX_DIGESTS_PER_REQUEST, list_type="atomic",
                         rules=[_unique_names("an attestation's digests")]),
    },
    required=["user", "digests"],
)

_apk = obj(
    "format apk only: what the signer signs for the APK, built by the client around the APK's content digest "
    "(the request's one digest) and the certificate of certificateRef. The signer checks each block before "
    "signing it and returns the APK Signing Block.",
    {
        "signedData": array("The signed data of each APK Signature Scheme, one block per scheme.", obj(
            "One scheme's signed data.",
            {
                "scheme": string("v2 (Android 7+) or v3 (Android 9+).", enum=APK_SCHEMES),
                "value": string("The signed data, base64.", min_length=4, max_length=MAX_SIGNED_DATA_LENGTH,
                                pattern=r"^[A-Za-z0-9+/]*={0,2}$"),
            },
            required=["scheme", "value"],
        ), min_items=1, max_items=len(APK_SCHEMES), list_type="map", map_keys=["scheme"]),
    },
    required=["signedData"],
)

_length_by_algorithm = " : ".join(
    f"self.digestAlgorithm == '{algorithm}' ? {length}" for algorithm, length in DIGEST_HEX_LENGTH.items()
) + " : 0"


def _unchanged(field: str) -> dict:
    return rule(f"has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || self.{field} == oldSelf.{field})",
                f"spec.{field} cannot change after creation; only approvals and attestations may be appended",
                field_path=f".{field}")


SPEC = obj(
    "What to sign, with which key, for whom and why. Immutable after creation, except approvals.",
    {
        "keyRef": object_reference("The SigningKey in the request's namespace that signs.", what="SigningKey"),
        "requester": obj(
            "Who asks; must equal the identity that creates the request (checked by the API server).",
            {"username": string("The requester's username.", min_length=1, max_length=253), "groups": _groups},
            required=["username"],
        ),
        "reason": string("Why the signatures are needed, shown to approvers, e.g. 'release 1.4.2'.", max_length=1024,
                         rules=[printable("spec.reason")]),
        "format": string("raw: a signature over each digest; cms: a detached CMS SignedData with the certificate "
                         "chain; authenticode: the PKCS#7 for a PE file's Authenticode digest; jar: the signature "
                         "block for the JAR manifest in spec.manifest; sigstore: a Sigstore bundle v0.3; apk: the "
                         "APK Signing Block (v2, v3) over the signed data in spec.apk; cosign: a container image "
                         "signature as cosign makes it (the simple-signing payload the signer builds for each digest, "
                         "named by the image reference, valued by its manifest's SHA-256, and the signature over it).",
                         enum=FORMATS, default="raw"),
        "certificateRef": object_reference("The Certificate whose certificate cms, authenticode, jar and apk "
                                           "signatures embed; by default the key version's valid certificate.",
                                           what="Certificate"),
        "manifest": string("format jar only: the JAR's META-INF/MANIFEST.MF, base64. The digest is the manifest's "
                           "digest; the signer derives the signature file from it.",
                           max_length=MAX_MANIFEST_LENGTH, pattern=r"^[A-Za-z0-9+/]*={0,2}$"),
        "apk": _apk,
        "digestAlgorithm": string("The algorithm the digests were computed with.", enum=DIGEST_ALGORITHMS,
                                  default="SHA256"),
        "digests": array("The digests to sign, at most 500, each with a name unique within the request.",
                         _digest, min_items=1, max_items=MAX_DIGESTS_PER_REQUEST, list_type="atomic",
                         rules=[_at_creation(_unique_names("spec.digests"))]),
        "approvals": array("Approvers' decisions, append-only; each entry is added by the approver themself "
                           "(kubectl keyroom approve NAME).", _approval, max_items=MAX_APPROVALS,
                           list_type="atomic"),
        "attestations": array("Builders' attestations of the digests, append-only; each entry is added by the "
                              "builder themself (kubectl keyroom attest NAME FILE...). Counted against the "
                              "policies' matchingBuilds.", _attestation, max_items=MAX_ATTESTATIONS,
                              list_type="atomic"),
    },
    required=["keyRef", "requester", "digests"],
    rules=[
        _at_creation(rule(f"self.digests.all(d, size(d.value) == ({_length_by_algorithm}))",
                          "each digest must be the hex of a digest of digestAlgorithm "
                          "(SHA256: 64, SHA384: 96, SHA512: 128 hex characters)", field_path=".digests")),
        rule("self.format == 'jar' ? (has(self.manifest) && size(self.digests) == 1) : !has(self.manifest)",
             "format jar signs one JAR: exactly one digest (the manifest's) and spec.manifest; other formats carry "
             "no manifest", field_path=".manifest"),
        rule("self.format == 'apk' ? (has(self.apk) && size(self.digests) == 1) : !has(self.apk)",
             "format apk signs one APK: exactly one digest (its content digest) and spec.apk; other formats carry "
             "no spec.apk", field_path=".apk"),
        _at_creation(rule(
            f"self.format != 'cosign' || (self.digestAlgorithm == 'SHA256' && "
            f"self.digests.all(d, d.name.matches(r'{IMAGE_REFERENCE_PATTERN}')))",
            "format cosign signs container images by digest: digestAlgorithm SHA256, each digest's value the hex "
            "of the image manifest's sha256 and its name the image reference registry.example/path/name[:tag] "
            "(the registry named, no @digest; a tag alone is never signed)", field_path=".digests")),
        rule(f"!(self.format in {CERTIFICATE_FORMATS!r}) || size(self.digests) <= {MAX_CERTIFICATE_DIGESTS}",
             f"cms, authenticode and jar requests carry at most {MAX_CERTIFICATE_DIGESTS} digests (each signature "
             "embeds the certificate chain); split the files over several requests", field_path=".digests"),
        *(_unchanged(field) for field in ("keyRef", "requester", "reason", "format", "digestAlgorithm", "digests",
                                          "certificateRef", "manifest", "apk")),
        rule("!has(oldSelf.approvals) || (has(self.approvals) && size(self.approvals) >= size(oldSelf.approvals) && "
             "self.approvals.slice(0, size(oldSelf.approvals)) == oldSelf.approvals)",
             "approvals are append-only: existing entries cannot be removed or edited", field_path=".approvals"),
        rule(f"!has(self.attestations) || self.attestations.all(a, a.digests.all(d, size(d.value) == "
             f"({_length_by_algorithm})))",
             "each attested digest must be the hex of a digest of the request's digestAlgorithm "
             "(SHA256: 64, SHA384: 96, SHA512: 128 hex characters)", field_path=".attestations"),
    ],
)

KIND = Kind(
    kind="SignRequest",
    plural="signrequests",
    short_names=["sr"],
    description="A request to sign digests computed by the client, with a SigningKey of the namespace.",
    spec=SPEC,
    status_properties={
        "phase": string("Pending, Approved, Signing, Signed, Denied, Expired or Failed. "
                        "Signed, Denied, Expired and Failed are final.", enum=PHASES),
        "keyVersion": integer("The key version that signed.", minimum=1),
        "certificate": obj("The certificate the signatures embed (cms, authenticode, jar, apk).", {
            "name": string("The Certificate's name.", max_length=253),
            "serialNumber": string("Its serial number, hex.", max_length=64),
            "fingerprint": string("sha256 of the DER certificate, as sha256:<hex>.", max_length=80),
        }),
        "signatures": array("One signature per digest.", obj("A signature.", {
            "name": string("The digest's name.", max_length=253),
            "value": string("The signature, base64.", max_length=65536),
        }, required=["name", "value"]), max_items=MAX_DIGESTS_PER_REQUEST, list_type="atomic"),
        "signedAt": timestamp("When the signatures were made."),
        "expiresAt": timestamp("When a pending request expires."),
        "finishedAt": timestamp("When the request reached its final phase."),
        "audit": obj("The request's entry in the signer's audit log.", {
            "index": integer("The entry's index.", minimum=0),
            "entryHash": string("The entry's hash, sha256:<hex>.", max_length=80),
        }),
        "approvals": array("The approvals as the operator counted them.", obj("A counted decision.", {
            "user": string("The approver.", max_length=253),
            "decision": string("Approve or Deny.", enum=DECISIONS),
            "counted": {"type": "boolean", "description": "Whether the entry counted toward the policy."},
            "reason": string("Why it did not count, when it did not.", max_length=1024),
            "observedAt": timestamp("When the operator saw it."),
        }, required=["user", "decision"]), max_items=MAX_APPROVALS),
        "approvalSummary": string("Counted approvals over required ones, e.g. 1/2.", max_length=16),
        "builds": array("The build attestations as the operator counted them.", obj("A counted attestation.", {
            "user": string("The builder.", max_length=253),
            "counted": {"type": "boolean", "description": "Whether the build counted as matching."},
            "reason": string("Why it did not count, when it did not: not a builder, or the first file whose "
                             "digest differs.", max_length=1024),
            "build": string("The build, as its attestation names it.", max_length=1024),
            "observedAt": timestamp("When the operator saw it."),
        }, required=["user"]), max_items=MAX_ATTESTATIONS),
        "buildSummary": string("Matching builds over required ones, e.g. 1/2 (absent when no policy asks for "
                               "builds).", max_length=16),
        "message": string("What happens next, for people.", max_length=4096),
    },
    condition_types=CONDITION_TYPES,
    printer_columns=[
        printer_column("Key", ".spec.keyRef.name"),
        printer_column("Requester", ".spec.requester.username"),
        printer_column("Approvals", ".status.approvalSummary"),
        printer_column("Builds", ".status.buildSummary"),
        printer_column("Phase", ".status.phase"),
        printer_column("Digests", ".spec.digestAlgorithm", priority=1),
        age_column(),
    ],
)

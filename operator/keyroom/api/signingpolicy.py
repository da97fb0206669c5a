"""SigningPolicy: who may sign with which keys, and what approval and matching builds a signature needs.

A key that no policy selects cannot sign (fail closed); where several policies
select one key, a request must satisfy all of them.
"""
from __future__ import annotations

from keyroom.api.common import Kind, age_column, printer_column, ready_column
from keyroom.api.schema import (
    NAME_PATTERN, array, boolean, duration, integer, name, obj, rule, string, string_list,
)

DIGEST_ALGORITHMS = ["SHA256", "SHA384", "SHA512"]
#: raw: a signature over each digest; cms: a detached CMS SignedData; authenticode: the PKCS#7 of a PE file;
#: jar: the signature block of a JAR's manifest; sigstore: a Sigstore bundle v0.3 with a public-key hint;
#: apk: the APK Signing Block (v2 and v3) of an APK; cosign: a container image's simple-signing payload and signature
FORMATS = ["raw", "cms", "authenticode", "jar", "sigstore", "apk", "cosign"]
#: the formats that embed the key version's certificate
CERTIFICATE_FORMATS = ["cms", "authenticode", "jar", "apk"]
CERTIFICATE_PROFILES = ["CABForumCodeSigning"]
MAX_DIGESTS_PER_REQUEST = 500
#: independent builds a policy may ask to agree: at least two (one build agreeing with itself proves nothing)
MIN_MATCHING_BUILDS, MAX_MATCHING_BUILDS = 2, 6
CONDITION_TYPES = ["Ready", "Reconciling", "Stalled"]


def _count(field: str) -> str:
    return f"(has(self.{field}) ? size(self.{field}) : 0)"


_label_selector = obj(
    "Selects SigningKeys in the policy's namespace by label.",
    {
        "matchLabels": obj("Labels a key must have, all of them.",
                           additional=string("", max_length=63), max_properties=32),
        "matchExpressions": array(
            "Label requirements, all of which must hold.",
            obj("A label requirement.", {
                "key": string("The label key.", min_length=1, max_length=317),
                "operator": string("In, NotIn, Exists or DoesNotExist.", enum=["In", "NotIn", "Exists", "DoesNotExist"]),
                "values": string_list("Values for In and NotIn.", max_items=32, item_max_length=63),
            }, required=["key", "operator"], rules=[
                rule("(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
                     "In and NotIn need values; Exists and DoesNotExist take none"),
            ]),
            max_items=16),
    },
)

SPEC = obj(
    "The desired state of a SigningPolicy.",
    {
        "keySelector": _label_selector,
        "keys": string_list("SigningKeys in the policy's namespace, by name.", max_items=64, pattern=NAME_PATTERN),
        "requesters": obj(
            "Who may request signatures. A request's requester is authenticated by the API server.",
            {
                "users": string_list("Usernames."),
                "groups": string_list("Groups; a member of any of them may request."),
                "serviceAccounts": string_list("ServiceAccounts of the policy's namespace, by name.",
                                               pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
            },
            rules=[rule(f"{_count('users')} + {_count('groups')} + {_count('serviceAccounts')} > 0",
                        "requesters must name at least one user, group or serviceAccount")],
        ),
        "approvers": obj(
            "Who may approve or deny requests.",
            {"users": string_list("Usernames."), "groups": string_list("Groups; any member may approve.")},
        ),
        "matchingBuilds": obj(
            "Sign only what independent builds agree on: a request needs this many distinct builders whose "
            "attested digests equal the request's (kubectl keyroom attest NAME FILE...). One builder whose digests "
            "differ fails the request (BuildMismatch). Where requiredApprovals is set too, both are needed.",
            {
                "required": integer("Distinct eligible builders whose digests must match; a builder who attests "
                                    "twice, the requester included, counts once.", minimum=MIN_MATCHING_BUILDS,
                                    maximum=MAX_MATCHING_BUILDS, default=MIN_MATCHING_BUILDS),
                "builders": obj(
                    "Whose attestations count. Each attestation's identity is checked by the API server.",
                    {
                        "users": string_list("Usernames."),
                        "groups": string_list("Groups; a member of any of them is a builder."),
                        "serviceAccounts": string_list("ServiceAccounts of the policy's namespace, by name "
                                                       "(e.g. one per CI system).",
                                                       pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
                    },
                    rules=[rule(f"{_count('users')} + {_count('groups')} + {_count('serviceAccounts')} > 0",
                                "matchingBuilds.builders must name at least one user, group or serviceAccount")],
                ),
            },
            required=["builders"],
        ),
        "requiredApprovals": integer("Approvals from distinct eligible approvers a request needs; 0 means no "
                                     "human approval.", minimum=0, maximum=10, default=1),
        "separationOfDuties": boolean("A requester never counts as an approver of their own request.",
                                      default=True),
        "allowedDigestAlgorithms": string_list("Digest algorithms a request may use.", max_items=3,
                                               enum=DIGEST_ALGORITHMS, min_items=1,
                                               default=list(DIGEST_ALGORITHMS)),
        "allowedFormats": string_list("Signature formats a request may ask for.", max_items=len(FORMATS),
                                      enum=FORMATS, min_items=1, default=list(FORMATS)),
        "maxDigestsPerRequest": integer("The most digests one request may carry.", minimum=1,
                                        maximum=MAX_DIGESTS_PER_REQUEST, default=MAX_DIGESTS_PER_REQUEST),
        "maxSignaturesPerHour": integer("The most signatures per hour across the selected keys.",
                                        minimum=1, maximum=10_000_000, default=1000),
        "certificateProfile": string("A baseline the certificates of the selected keys must meet. "
                                     "CABForumCodeSigning: RSA 3072+ or ECDSA P-256/P-384 keys and at most 460 days "
                                     "of validity; a Certificate that does not meet it is not issued.",
                                     enum=CERTIFICATE_PROFILES),
        "requestTTL": duration("How long a request may wait for approval before it expires.", default="24h",
                               at_least_a_second=True),
    },
    required=["requesters"],
    rules=[
        rule("has(self.keySelector) != has(self.keys)",
             "name the keys with exactly one of keySelector or keys"),
        rule(f"self.requiredApprovals == 0 || (has(self.approvers) && "
             f"{_count('approvers.users')} + {_count('approvers.groups')} > 0)",
             "requiredApprovals > 0 needs approvers (users or groups)", field_path=".approvers"),
    ],
)

KIND = Kind(
    kind="SigningPolicy",
    plural="signingpolicies",
    short_names=["spol"],
    description="Who may sign with which SigningKeys of the namespace, and what approval a signature needs.",
    spec=SPEC,
    status_properties={
        "matchedKeyCount": integer("How many SigningKeys this policy selects now.", minimum=0),
        "matchedKeys": array("The SigningKeys this policy selects now, sorted; the first 100 when it selects more "
                             "(matchedKeyCount counts them all).", name("A SigningKey name."),
                             max_items=100, list_type="set"),
        "message": string("A human summary of the policy's state.", max_length=4096),
    },
    condition_types=CONDITION_TYPES,
    printer_columns=[
        printer_column("Approvals", ".spec.requiredApprovals", type="integer",
                       description="Approvals a request needs"),
        printer_column("Builds", ".spec.matchingBuilds.required", type="integer",
                       description="Matching builds a request needs"),
        printer_column("Keys", ".status.matchedKeyCount", type="integer", description="SigningKeys the policy selects"),
        ready_column(),
        age_column(),
    ],
)

"""SigningKey: a key pair that lives only inside the HSM.

The private key is generated in the token, sensitive and non-extractable; only
the public key ever leaves it. A key has versions: rotation adds one, old ones
stay for verification and are destroyed once they fall out of
``rotation.keepVersions``. An offline key may sign only inside its windows.
"""
from __future__ import annotations

from keyroom.api.common import Kind, age_column, printer_column, ready_column
from keyroom.api.schema import (
    array, boolean, duration, immutable, integer, obj, rule, string, timestamp,
)

ALGORITHMS = ["ECDSA_P256", "ECDSA_P384", "RSA_3072", "RSA_4096"]
USAGES = ["Reusable", "OneTime"]
PHASES = ["Pending", "Active", "Offline", "Consumed", "Destroyed", "Failed"]
VERSION_STATES = ["Enabled", "Disabled", "PendingDestruction", "Destroyed"]
DELETION_POLICIES = ["Destroy", "Retain"]
CONDITION_TYPES = ["Ready", "Online", "Reconciling", "Stalled"]

#: Five cron fields (minute hour day-of-month month day-of-week) or a @-macro; a field holds numbers, names
#: (mon, jan), ``* / , - ?``, and croniter's ``L W #``: nothing a shell or a terminal would act on.
CRON_FIELD = r"[0-9A-Za-z*/,?#-]+"
CRON_PATTERN = rf"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|({CRON_FIELD}[ \t]+){{4}}{CRON_FIELD})$"

_window = obj(
    "A time in which an offline key may sign: either an absolute window (start and end) "
    "or a recurring one (a cron schedule with a duration, in an optional time zone).",
    {
        "start": timestamp("Start of an absolute window."),
        "end": timestamp("End of an absolute window; after start."),
        "schedule": string("When a recurring window opens, as a five-field cron expression "
                           "(minute hour day-of-month month day-of-week), e.g. '0 9 * * 1-5'.",
                           pattern=CRON_PATTERN, max_length=128),
        "duration": duration("How long a recurring window stays open.", at_least_a_second=True),
        "timeZone": string("IANA time zone of the schedule, e.g. Europe/Berlin. Default UTC.",
                           pattern=r"^[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*$", max_length=64),
    },
    rules=[
        rule("has(self.start) != has(self.schedule)",
             "a window is either absolute (start and end) or recurring (schedule and duration), not both or neither"),
        rule("has(self.start) == has(self.end)", "an absolute window needs both start and end"),
        rule("has(self.schedule) == has(self.duration)", "a recurring window needs both schedule and duration"),
        rule("!has(self.timeZone) || has(self.schedule)", "timeZone applies to recurring windows (schedule) only"),
        rule("!has(self.start) || !has(self.end) || timestamp(self.end) > timestamp(self.start)",
             "a window's end must be after its start", field_path=".end"),
    ],
)

SPEC = obj(
    "The desired state of a SigningKey.",
    {
        "algorithm": string("The key pair's algorithm. Immutable: rotate to a new SigningKey to change it.",
                            enum=ALGORITHMS, rules=[immutable("spec.algorithm")]),
        "usage": string("Reusable signs any number of requests; OneTime signs exactly one SignRequest "
                        "and is then destroyed. Immutable.",
                        enum=USAGES, default="Reusable", rules=[immutable("spec.usage")]),
        "rotation": obj(
            "Scheduled rotation. Without it the key is never rotated on a schedule "
            "(a manual rotation is still possible with the keyroom.dev/rotate annotation).",
            {
                "every": duration("How often a new key version is generated.", at_least_a_second=True),
                "keepVersions": integer("How many old versions are kept (disabled for signing, public key "
                                        "kept for verification) before they are scheduled for destruction.",
                                        minimum=0, maximum=100, default=3),
            },
            required=["every"],
        ),
        "offline": obj(
            "Keep the key offline: it may sign only inside one of its windows. Absent means always online.",
            {
                "enabled": boolean("Whether the key is kept offline outside its windows.", default=True),
                "windows": array("When the key may sign. An offline key with no windows never signs.",
                                 _window, max_items=32),
            },
        ),
        "destructionDelay": duration(
            "How long a version scheduled for destruction (deleted key, trimmed version, consumed "
            "one-time key) waits before it is destroyed in the HSM; it can be cancelled until then.",
            default="7d"),
        "deletionPolicy": string(
            "What deleting the SigningKey does to its key material. Destroy (default) schedules every "
            "version for destruction after destructionDelay; Retain leaves the objects in the HSM.",
            enum=DELETION_POLICIES, default="Destroy"),
    },
    required=["algorithm"],
    rules=[rule("self.usage != 'OneTime' || !has(self.rotation)",
                "a OneTime key signs once and is destroyed, so it cannot have spec.rotation",
                field_path=".rotation")],
)

_version = obj(
    "One key pair generated for this SigningKey.",
    {
        "version": integer("The version number, counting from 1.", minimum=1),
        "state": string("Enabled (signs), Disabled (kept for verification), PendingDestruction, Destroyed.",
                        enum=VERSION_STATES),
        "publicKey": string("The public key, PEM SubjectPublicKeyInfo.", max_length=4096),
        "fingerprint": string("sha256 of the DER SubjectPublicKeyInfo, as sha256:<hex>.", max_length=80),
        "createdAt": timestamp("When the key pair was generated."),
        "destroyAt": timestamp("When a PendingDestruction version will be destroyed."),
        "destroyedAt": timestamp("When the version was destroyed in the HSM."),
        "missing": boolean("The private key was found missing from the HSM (destroyed outside keyroom)."),
    },
    required=["version", "state"],
)

KIND = Kind(
    kind="SigningKey",
    plural="signingkeys",
    short_names=["sk"],
    description="A signing key pair generated and kept inside the HSM; only its public key leaves it.",
    spec=SPEC,
    status_properties={
        "phase": string("Pending, Active, Offline, Consumed (a OneTime key that signed its request; its version awaits "
                        "destruction), Destroyed or Failed. Consumed and Destroyed are final.", enum=PHASES),
        "currentVersion": integer("The version that signs now.", minimum=0),
        "versions": array("Every version of the key, newest first.", _version, max_items=128,
                          list_type="map", map_keys=["version"]),
        "online": boolean("Whether the key may sign right now."),
        "nextRotationAt": timestamp("When the next scheduled rotation happens."),
        "nextWindowAt": timestamp("For an offline key: when it may next sign."),
        "signatureCount": integer("Signatures made with this key.", minimum=0),
        "consumedBy": string("For a OneTime key: the SignRequest that used it.", max_length=253),
        "lastRotationRequest": string("The last keyroom.dev/rotate annotation value acted on.", max_length=253),
        "message": string("A human summary of the key's state.", max_length=4096),
    },
    condition_types=CONDITION_TYPES,
    printer_columns=[
        printer_column("Algorithm", ".spec.algorithm"),
        printer_column("Usage", ".spec.usage", priority=1),
        printer_column("Phase", ".status.phase"),
        printer_column("Version", ".status.currentVersion", type="integer"),
        printer_column("Online", ".status.online", type="boolean"),
        ready_column(),
        age_column(),
    ],
)

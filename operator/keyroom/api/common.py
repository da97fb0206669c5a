"""What every keyroom kind shares: the group, status conditions, and the CRD frame.

A kind module (``signingkey.py`` ...) describes its spec, status, printer
columns and names as a :class:`Kind`; :func:`crd` turns a Kind into the
CustomResourceDefinition the API server serves.
"""
from __future__ import annotations

import dataclasses

from keyroom.api.schema import Schema, array, integer, name, obj, string, timestamp

GROUP = "keyroom.dev"
#: the annotation that asks for a manual rotation: an input to the signer, so people\'s alone to write
ROTATE_ANNOTATION = f"{GROUP}/rotate"
#: where a platform admin supplies the certificate an external CA issued for a Certificate's CSR (PEM, chain after it)
ISSUED_CERTIFICATE_ANNOTATION = f"{GROUP}/issued-certificate"
#: the type of the Secrets the operator writes for Certificates (public material only: tls.crt and ca.crt)
CERTIFICATE_SECRET_TYPE = f"{GROUP}/certificate"
CERTIFICATE_SECRET_KEYS = ("tls.crt", "ca.crt")
#: the label on those Secrets and on the CRL ConfigMaps: the Certificate they belong to
CERTIFICATE_LABEL = f"{GROUP}/certificate"
#: the keys of a CA's CRL ConfigMap <name>-crl
CRL_CONFIGMAP_KEYS = ("ca.crl", "ca.crt")
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "keyroom"

#: A condition reason: a CamelCase word, as metav1.Condition requires.
REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


@dataclasses.dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    short_names: list[str]
    description: str
    spec: Schema
    status_properties: dict[str, Schema]
    condition_types: list[str]
    printer_columns: list[dict]

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


def conditions(types: list[str]) -> Schema:
    """``status.conditions`` in the metav1.Condition shape."""
    condition = obj(
        "One aspect of the object's state.",
        {
            "type": string(f"The condition's type, one of {', '.join(types)}.", max_length=316,
                           pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                                   r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"),
            "status": string("True, False or Unknown.", enum=["True", "False", "Unknown"]),
            "reason": string("A CamelCase word that says why, for programs.", pattern=REASON_PATTERN,
                             min_length=1, max_length=1024),
            "message": string("What happened and what to do about it, for people.", max_length=32768),
            "lastTransitionTime": timestamp("When the status last changed."),
            "observedGeneration": integer("The .metadata.generation this condition was computed from.",
                                          minimum=0),
        },
        required=["type", "status", "reason", "message", "lastTransitionTime"],
    )
    return array(f"The object's conditions: {', '.join(types)}. Ready summarises the others; "
                 "Reconciling and Stalled are present and True only while the operator works on "
                 "the object or cannot make progress.",
                 condition, max_items=16, list_type="map", map_keys=["type"])


def status_schema(kind: Kind) -> Schema:
    properties = {
        "observedGeneration": integer("The .metadata.generation the operator last acted on.", minimum=0),
        "conditions": conditions(kind.condition_types),
        **kind.status_properties,
    }
    return obj(f"The observed state of the {kind.kind}, written by the keyroom operator only.", properties)


def printer_column(name: str, json_path: str, *, type: str = "string", description: str = "",
                   priority: int = 0) -> dict:
    column = {"name": name, "type": type, "jsonPath": json_path}
    if description:
        column["description"] = description
    if priority:
        column["priority"] = priority
    return column


def ready_column() -> dict:
    return printer_column("Ready", '.status.conditions[?(@.type=="Ready")].status',
                          description="Whether the object is ready for use")


def age_column() -> dict:
    return printer_column("Age", ".metadata.creationTimestamp", type="date")


def crd(kind: Kind) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.crd_name, "labels": {"app.kubernetes.io/part-of": "keyroom"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.kind.lower(),
                "shortNames": kind.short_names,
                "categories": [CATEGORY],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": kind.printer_columns,
                "schema": {"openAPIV3Schema": obj(
                    kind.description,
                    {
                        "apiVersion": string("The API version: keyroom.dev/v1alpha1."),
                        "kind": string(f"{kind.kind}."),
                        "metadata": {"type": "object"},
                        "spec": kind.spec,
                        "status": status_schema(kind),
                    },
                    required=["spec"],
                )},
            }],
        },
    }


def object_reference(description: str, *, what: str) -> Schema:
    return obj(description, {"name": name(f"The name of the {what} in the same namespace.")},
               required=["name"])

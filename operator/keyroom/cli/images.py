"""``sign-image`` and ``verify-image``: container image signatures that cosign and admission controllers verify.

``sign-image REF...`` resolves each reference to the digest of its manifest in
the registry (a tag is only ever a way to find that digest), asks for their
signatures in one SignRequest of format cosign, and once it is signed attaches
each signature to the registry the way cosign does (:mod:`keyroom.cli.registry`).
The signer builds each simple-signing payload itself from the request's image
reference and digest; the plugin checks that what came back claims exactly the
image it asked for before attaching it.

``verify-image REF`` is for people without cosign: it reads the signatures
attached to the image's current digest and checks them with the public keys
``kubectl keyroom export`` wrote, as ``cosign verify --key`` does.
"""
from __future__ import annotations

import base64
import hashlib
import pathlib

import click
import kubernetes
from cryptography.hazmat.primitives import serialization

from keyroom.cli import offline, registry
from keyroom.cli.common import (ERROR, GROUP, INTERRUPTED, NOT_VERIFIED, OK, USAGE_OR_TIMEOUT, VERSION, CliError,
                                emit, note, output_option, with_target)
from keyroom.signer.formats import FormatError, cosign

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
PLURAL = "signrequests"


def request_name(reference: registry.Reference) -> str:
    """The digest's name in the SignRequest: the repository's full name, with the tag it was resolved from."""
    return reference.name + (f":{reference.tag}" if reference.tag else "")


def resolve_all(texts: tuple[str, ...], *, insecure: bool) -> list[tuple[registry.Reference, str]]:
    """[(reference, manifest digest)] for each REF, each resolved in its registry now."""
    resolved, names = [], set()
    for text in texts:
        try:
            reference = registry.parse_reference(text)
            digest = registry.Registry(reference.registry, insecure=insecure).resolve(reference)
        except registry.RegistryError as error:
            raise CliError(str(error)) from None
        if request_name(reference) in names:
            raise CliError(f"{request_name(reference)} is named twice; one request signs each image reference once")
        names.add(request_name(reference))
        note(f"{text}: {reference.name}@{digest}")
        resolved.append((reference, digest))
    return resolved


def sign_image_body(resolved: list[tuple[registry.Reference, str]], *, key: str, namespace: str, identity: dict,
                    reason: str, name: str | None) -> dict:
    """The SignRequest of format cosign: one digest per image, named by its reference, valued by its digest."""
    metadata = {"namespace": namespace, **({"name": name} if name else {"generateName": f"{key}-"})}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SignRequest", "metadata": metadata,
            "spec": {"keyRef": {"name": key}, "requester": identity, "reason": reason, "format": "cosign",
                     "digestAlgorithm": "SHA256",
                     "digests": [{"name": request_name(reference), "value": digest.removeprefix("sha256:")}
                                 for reference, digest in resolved]}}


def signed_payload(value: str, reference: registry.Reference, digest: str) -> tuple[bytes, bytes]:
    """(payload, signature) from a status signature, if the payload claims exactly this image."""
    try:
        payload, signature = cosign.parse(base64.b64decode(value))
        claimed = cosign.claims(payload)
    except (FormatError, ValueError) as error:
        raise CliError(f"{reference}: the signer returned no usable cosign signature: {error}") from None
    if claimed != (reference.name, digest):
        raise CliError(f"{reference}: the signed payload names {claimed[0]}@{claimed[1]}, not "
                       f"{reference.name}@{digest}; nothing attached")
    return payload, signature


def _create_or_resume(cluster, body: dict) -> dict:
    """The new SignRequest; or, when --name names one that asks exactly for these images, that one (a retry)."""
    try:
        return cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, body)
    except kubernetes.client.ApiException as error:
        name = body["metadata"].get("name")
        if error.status != 409 or not name:
            raise
    existing = cluster.get(name)
    spec = existing.get("spec") or {}
    if spec.get("format") != "cosign" or spec.get("digests") != body["spec"]["digests"]:
        raise CliError(f"SignRequest {name} exists and asks for other images; choose another --name")
    note(f"{name} exists and asks for exactly these images: following it")
    return existing


@click.command("sign-image", context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True, metavar="REF...")
@click.option("--key", required=True, help="the SigningKey of the namespace")
@click.option("--reason", default="", help="shown to approvers, e.g. 'release 1.4.2'")
@click.option("--name", help="the SignRequest's name (default: generated from the key's)")
@click.option("--attach/--no-attach", default=True, show_default=True,
              help="attach the signatures to the registry (the sha256-<hex>.sig tag, as cosign does)")
@click.option("--allow-insecure-registry", "insecure", is_flag=True,
              help="speak plain HTTP to the registries (always so for localhost and 127.0.0.1)")
@click.option("--timeout", type=float, default=600, show_default=True, help="seconds to wait for the signatures")
@output_option
@with_target
def sign_image(images, key, reason, name, attach, insecure, timeout, output, target) -> int:
    """Sign container images by digest with KEY, in one SignRequest, and attach the signatures like cosign.

    \b
    Each REF (registry.example/team/app:1.4, or ...@sha256:<hex>) is resolved
    to its manifest digest in its registry now; a given digest is checked
    there. The request names each image and digest, so approvers see exactly
    what they approve; the signer builds the simple-signing payload itself.
    Once signed, each signature is checked to claim exactly its image and
    attached under the tag sha256-<hex>.sig of the image's repository.
    Verify with: cosign verify --key KEY.pub.pem --insecure-ignore-tlog=true REF
    or: kubectl keyroom verify-image REF --trust DIR
    """
    from keyroom.cli import plugin

    resolved = resolve_all(images, insecure=insecure)
    cluster = target.cluster
    body = sign_image_body(resolved, key=key, namespace=cluster.namespace, identity=cluster.whoami(),
                           reason=reason, name=name)
    created = _create_or_resume(cluster, body)
    request = created["metadata"]["name"]
    if output == "text":
        print(request)
    note(f"waiting up to {timeout:.0f}s for {request} in {cluster.namespace} to be signed; Ctrl-C stops waiting, "
         "the request stays")
    try:
        final = plugin.wait_final(cluster, created, timeout)
    except (TimeoutError, KeyboardInterrupt) as stopped:
        note(f"stopped waiting; {request} stays, check it with: kubectl keyroom status {request} "
             f"-n {cluster.namespace}")
        return USAGE_OR_TIMEOUT if isinstance(stopped, TimeoutError) else INTERRUPTED
    status = final["status"]
    if status["phase"] != "Signed":
        note(f"{request}: {status['phase']}: {status.get('message', '')}")
        emit({"name": request, "phase": status["phase"], "message": status.get("message", "")}, output,
             lambda: None)
        return ERROR
    values = {s["name"]: s["value"] for s in status["signatures"]}
    results = []
    for reference, digest in resolved:
        payload, signature = signed_payload(values[request_name(reference)], reference, digest)
        entry = {"image": f"{reference.name}@{digest}", "signatureTag": None,
                 "payload": base64.b64encode(payload).decode(), "signature": base64.b64encode(signature).decode()}
        if attach:
            try:
                registry.attach(registry.Registry(reference.registry, insecure=insecure), reference.repository,
                                digest, payload=payload, signature=signature)
            except registry.RegistryError as error:
                raise CliError(f"{reference}: signed by {request}, but attaching failed: {error}; the same "
                               f"command with --name {request} attaches the signatures again") from None
            entry["signatureTag"] = f"{reference.name}:{registry.signature_tag(digest)}"
        results.append(entry)
        if output == "text":
            print(f"{entry['image']}" + (f"  attached as {entry['signatureTag']}" if attach else ""))
    emit({"name": request, "namespace": cluster.namespace, "phase": "Signed", "keyVersion": status.get("keyVersion"),
          "audit": status.get("audit"), "images": results}, output, lambda: None)
    return OK


def _fingerprint(key) -> str:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def check_image(reg: registry.Registry, reference: registry.Reference, *, public_keys: list) -> dict:
    """What verifies of the signatures attached to ``reference``'s current digest, with ``public_keys``.

    A signature counts when its payload is the layer's blob, claims the image's
    current digest and verifies with one of the keys over SHA-256(payload), as
    cosign verify --key checks it. The docker-reference the payload names is
    reported, not required (cosign does not require it either: a copy of the
    image in another registry keeps its signatures).
    """
    digest = reg.resolve(reference)
    layers = registry.signature_layers(reg, reference.repository, digest)
    verified, rejected = [], []
    for layer in layers:
        annotation = (layer.get("annotations") or {}).get(cosign.SIGNATURE_ANNOTATION, "")
        try:
            payload = reg.blob(reference.repository, layer["digest"])
            claimed_reference, claimed_digest = cosign.claims(payload)
            if claimed_digest != digest:
                raise FormatError(f"the payload is for {claimed_digest}, not the image's {digest}")
            signature = base64.b64decode(annotation, validate=True)
            for key in public_keys:
                der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
                try:
                    cosign.check_signature(public_key_der=der, data=payload, signature=signature)
                except FormatError:
                    continue
                verified.append({"key": _fingerprint(key), "dockerReference": claimed_reference})
                break
            else:
                raise FormatError("the signature verifies with none of the trusted keys")
        except (FormatError, ValueError, registry.RegistryError) as error:
            rejected.append({"layer": layer.get("digest"), "error": str(error)})
    return {"image": f"{reference.name}@{digest}", "signatureTag": registry.signature_tag(digest),
            "verified": bool(verified), "signatures": verified, "rejected": rejected}


@click.command("verify-image", context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True, metavar="REF...")
@click.option("--trust", "trust_dir", type=click.Path(path_type=pathlib.Path, file_okay=False),
              help="a directory written by kubectl keyroom export (its public keys are trusted)")
@click.option("--key", "keys", multiple=True, type=click.Path(path_type=pathlib.Path, exists=True, dir_okay=False),
              help="a PEM file of public keys to trust (repeatable)")
@click.option("--allow-insecure-registry", "insecure", is_flag=True,
              help="speak plain HTTP to the registries (always so for localhost and 127.0.0.1)")
@output_option
def verify_image(images, trust_dir, keys, insecure, output) -> int:
    """Verify the cosign signatures attached to images, with keys from kubectl keyroom export; no cluster needed.

    \b
    For each REF: its manifest digest now (a tag is resolved, a given digest checked), the signature
    manifest under sha256-<hex>.sig, and for each simple-signing layer: the blob's digest, that the
    payload claims this digest, and the signature over SHA-256(payload) with a trusted key.
    Not checked, and said so: transparency logs, timestamps, the payload's docker-reference.
    Exit code 0 only when every image has a verified signature; 3 otherwise.
    """
    trust = offline._trust(trust_dir=trust_dir, keys=keys, cas=(), chains=(), crls=())
    if not trust.public_keys:
        raise CliError("no public key to trust: give --trust DIR (from kubectl keyroom export) or --key PEM")
    reports = []
    for text in images:
        try:
            reference = registry.parse_reference(text)
            reports.append(check_image(registry.Registry(reference.registry, insecure=insecure), reference,
                                       public_keys=trust.public_keys))
        except registry.RegistryError as error:
            reports.append({"image": text, "verified": False, "signatures": [], "rejected": [],
                            "error": str(error)})

    def text() -> str:
        lines = []
        for report in reports:
            if report["verified"]:
                lines.append(f"verified: {report['image']}")
                lines += [f"  signed by {s['key']} for {s['dockerReference']}" for s in report["signatures"]]
            else:
                reason = report.get("error") or ("no signature attached" if not report["rejected"]
                                                 else "no signature verifies")
                lines.append(f"NOT VERIFIED: {report['image']}: {reason}")
            lines += [f"  rejected {r['layer']}: {r['error']}" for r in report["rejected"]]
        lines.append("  not checked: transparency log, timestamps, the payload's docker-reference")
        return "\n".join(lines)
    emit(reports, output, text)
    return OK if all(r["verified"] for r in reports) else NOT_VERIFIED

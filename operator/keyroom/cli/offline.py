"""``export`` and ``verify``: what a verifier needs from the cluster, and checking signatures without it.

``export KEY`` writes public material only (public keys, certificates, the
chain, CRLs) into a directory that can be handed to anyone; ``verify`` reads
those files and never talks to the API server (:mod:`keyroom.cli.verify`).
"""
from __future__ import annotations

import datetime
import json
import pathlib

import click
import kubernetes
from cryptography import x509

from keyroom.cli import verify as verification
from keyroom.cli.common import (GROUP, NOT_VERIFIED, OK, VERSION, CliError, emit, note, output_option,
                                with_target)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
PUBLIC_KEYS = "public-keys.pem"
ROOTS, CHAIN, CRLS, MANIFEST = "ca.pem", "chain.pem", "crl.pem", "export.json"


def _pem_certificates(text: str | None) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(text.encode()) if text and text.strip() else []


def _id(certificate: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import hashes
    return certificate.fingerprint(hashes.SHA256())


def _self_signed(certificate: x509.Certificate) -> bool:
    return certificate.issuer == certificate.subject


def _pem(certificate: x509.Certificate) -> str:
    from cryptography.hazmat.primitives import serialization
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def gather(*, key: dict, certificates: list[dict], read_certificate, read_crl) -> dict:
    """What to export for ``key``: its versions' public keys, its Certificates, their chains, roots and CRLs.

    ``read_certificate(name)`` returns a Certificate of the namespace (for the
    issuing CAs), ``read_crl(name)`` the CRL PEM of CA ``name`` or raises
    PermissionError when the caller may not read it.
    """
    name = key["metadata"]["name"]
    versions = [v for v in (key.get("status") or {}).get("versions") or [] if v.get("publicKey")]
    leaves = [c for c in certificates if (c.get("spec") or {}).get("keyRef", {}).get("name") == name
              and (c.get("status") or {}).get("certificate")]
    roots: dict[bytes, x509.Certificate] = {}
    chain: dict[bytes, x509.Certificate] = {}
    crls: dict[str, str] = {}
    missing: list[str] = []
    for leaf in leaves:
        status = leaf["status"]
        parsed = _pem_certificates(status["certificate"])
        for certificate in [*parsed, *_pem_certificates(status.get("chain"))]:
            target = roots if _self_signed(certificate) else chain
            if certificate is not parsed[0] or _self_signed(certificate):
                target[_id(certificate)] = certificate
        issuer = ((leaf.get("spec") or {}).get("issuerRef") or {}).get("ca", {}).get("name")
        seen = set()
        while issuer and issuer not in seen:
            seen.add(issuer)
            try:
                crls[issuer] = read_crl(issuer)
            except PermissionError as error:
                missing.append(str(error))
            except LookupError:
                missing.append(f"CA {issuer} has published no CRL (ConfigMap {issuer}-crl)")
            ca = read_certificate(issuer)
            for certificate in _pem_certificates(((ca or {}).get("status") or {}).get("certificate")):
                target = roots if _self_signed(certificate) else chain
                target[_id(certificate)] = certificate
            issuer = (((ca or {}).get("spec") or {}).get("issuerRef") or {}).get("ca", {}).get("name")
    if not leaves:
        missing.append(f"no issued Certificate for {name}: only its public keys are exported (enough for raw and "
                       "sigstore signatures)")
    return {"versions": versions, "leaves": leaves, "roots": list(roots.values()), "chain": list(chain.values()),
            "crls": crls, "missing": missing}


def write_export(directory: pathlib.Path, *, namespace: str, key: str, found: dict) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"namespace": namespace, "key": key,
                      "exportedAt": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                      "publicKeys": [], "certificates": [], "roots": [], "chain": [], "crls": [],
                      "missing": found["missing"]}
    for version in found["versions"]:
        path = directory / f"{key}-v{version['version']}.pub.pem"
        path.write_text(version["publicKey"])
        manifest["publicKeys"].append({"version": version["version"], "state": version.get("state"),
                                       "fingerprint": version.get("fingerprint"), "file": path.name})
    if found["versions"]:
        (directory / PUBLIC_KEYS).write_text("".join(v["publicKey"] for v in found["versions"]))
    for leaf in found["leaves"]:
        path = directory / f"{leaf['metadata']['name']}.crt.pem"
        path.write_text(leaf["status"]["certificate"])
        manifest["certificates"].append({"name": leaf["metadata"]["name"], "file": path.name,
                                         "serialNumber": leaf["status"].get("serialNumber"),
                                         "keyVersion": leaf["status"].get("keyVersion"),
                                         "notAfter": leaf["status"].get("notAfter")})
    for field, file, items in (("roots", ROOTS, found["roots"]), ("chain", CHAIN, found["chain"])):
        if items:
            (directory / file).write_text("".join(_pem(c) for c in items))
            manifest[field] = [{"subject": c.subject.rfc4514_string(), "file": file} for c in items]
    if found["crls"]:
        (directory / CRLS).write_text("".join(found["crls"].values()))
        manifest["crls"] = [{"ca": name, "file": CRLS} for name in found["crls"]]
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@click.command(context_settings=CONTEXT)
@click.argument("key")
@click.option("--out", "directory", type=click.Path(path_type=pathlib.Path), default=None,
              help="the directory to write (default: ./KEY-trust)")
@output_option
@with_target
def export(key, directory, output, target) -> int:
    """Write what a verifier needs for KEY: public keys, certificates, chain, root and CRLs (public material only).

    \b
    Files in the directory:
      KEY-vN.pub.pem    each key version's public key (from the SigningKey's status)
      public-keys.pem   all of them
      CERT.crt.pem      each Certificate of the key
      chain.pem         the issuing CAs below the root
      ca.pem            the root(s) to trust
      crl.pem           the CAs' CRLs (ConfigMap <ca>-crl; needs read access to it)
      export.json       what was written and what could not be
    Then: kubectl keyroom verify FILE --sig FILE.sig --trust DIR
    """
    cluster = target.cluster
    body = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "signingkeys", key)

    def read_certificate(name: str) -> dict | None:
        try:
            return cluster.custom.get_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "certificates",
                                                               name)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def read_crl(name: str) -> str:
        try:
            data = cluster.core.read_namespaced_config_map(f"{name}-crl", cluster.namespace).data or {}
        except kubernetes.client.ApiException as error:
            if error.status == 403:
                raise PermissionError(f"the CRL of CA {name} (ConfigMap {name}-crl) is not readable with your "
                                      "rights: revocation cannot be checked with this export; ask a platform admin "
                                      "for it") from None
            if error.status == 404:
                raise LookupError(name) from None
            raise
        if "ca.crl" not in data:
            raise LookupError(name)
        return data["ca.crl"]

    found = gather(key=body, certificates=cluster.list("certificates"), read_certificate=read_certificate,
                   read_crl=read_crl)
    directory = directory or pathlib.Path(f"{key}-trust")
    manifest = write_export(directory, namespace=cluster.namespace, key=key, found=found)
    for message in found["missing"]:
        note(f"warning: {message}")

    def text() -> str:
        return (f"exported {cluster.namespace}/{key} into {directory}: {len(manifest['publicKeys'])} public key(s), "
                f"{len(manifest['certificates'])} certificate(s), {len(manifest['roots'])} root(s), "
                f"{len(manifest['crls'])} CRL(s)\n"
                f"verify with: kubectl keyroom verify FILE --sig SIGNATURE --trust {directory}")
    emit(manifest, output, text)
    return OK


def _read(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror}") from None


def _trust(*, trust_dir, keys, cas, chains, crls) -> verification.Trust:
    trust = verification.Trust()
    try:
        if trust_dir is not None:
            if not trust_dir.is_dir():
                raise CliError(f"{trust_dir} is not a directory written by kubectl keyroom export")
            if (trust_dir / PUBLIC_KEYS).exists():
                trust.public_keys += verification.load_public_keys(_read(trust_dir / PUBLIC_KEYS), PUBLIC_KEYS)
            for name, field, loader in ((ROOTS, "roots", verification.load_certificates),
                                        (CHAIN, "intermediates", verification.load_certificates),
                                        (CRLS, "crls", verification.load_crls)):
                if (trust_dir / name).exists():
                    getattr(trust, field).extend(loader(_read(trust_dir / name), str(trust_dir / name)))
        for path in keys:
            trust.public_keys += verification.load_public_keys(_read(path), str(path))
        for path in cas:
            trust.roots += verification.load_certificates(_read(path), str(path))
        for path in chains:
            trust.intermediates += verification.load_certificates(_read(path), str(path))
        for path in crls:
            trust.crls += verification.load_crls(_read(path), str(path))
    except verification.TrustError as error:
        raise CliError(str(error)) from None
    return trust


def _moment(text: str) -> datetime.datetime | None:
    if text == "now":
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not now or an RFC 3339 time", param_hint="--at") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


_path = click.Path(path_type=pathlib.Path, exists=True, dir_okay=False)


@click.command(context_settings=CONTEXT)
@click.argument("file", type=_path)
@click.option("--sig", "signature", type=_path,
              help="the signature: FILE.sig (raw), FILE.p7s (cms), FILE.sigstore.json (sigstore); authenticode, "
                   "jar and apk carry theirs inside FILE (a detached Authenticode PKCS#7 may be given)")
@click.option("--format", "fmt", type=click.Choice(verification.FORMATS),
              help="default: from the file names (.sig, .p7s, .sigstore.json, .exe/.dll, .jar, .apk)")
@click.option("--trust", "trust_dir", type=click.Path(path_type=pathlib.Path, file_okay=False),
              help="a directory written by kubectl keyroom export (public keys, root, chain, CRLs)")
@click.option("--key", "keys", multiple=True, type=_path, help="a PEM file of public keys to trust (repeatable)")
@click.option("--ca", "cas", multiple=True, type=_path, help="a PEM file of root certificates to trust (repeatable)")
@click.option("--chain", "chains", multiple=True, type=_path, help="intermediate CA certificates (repeatable)")
@click.option("--cert", "certificate", type=_path, help="raw, sigstore: the signing certificate, checked against "
                                                        "--ca (instead of --key)")
@click.option("--crl", "crls", multiple=True, type=_path, help="CRLs of the CAs (repeatable)")
@click.option("--digest", default="SHA256", type=click.Choice(list(verification.HASHES)), show_default=True,
              help="raw: the digest algorithm the request used")
@click.option("--at", "at", default="now", show_default=True,
              help="when the certificates must be valid: now, or an RFC 3339 time")
@output_option
def verify(file, signature, fmt, trust_dir, keys, cas, chains, certificate, crls, digest, at, output) -> int:
    """Verify FILE's signature offline, with material from kubectl keyroom export; no cluster is needed.

    \b
    What is checked, per format:
      raw           the signature over FILE's digest (--digest), with a trusted public key (--key),
                    or with --cert's key after its chain to --ca is checked
      cms           messageDigest = FILE's digest; the signature over the signed attributes
      authenticode  the Authenticode digest of FILE (computed as kubectl keyroom sign does)
                    = the signed SpcIndirectDataContent's; the PKCS#7 signature over it
      jar           the block's signature over the .SF; the .SF's digest of MANIFEST.MF;
                    every entry's digest; no unsigned entry
      sigstore      the bundle's digest = FILE's; its signature with a trusted public key
      apk           each v2/v3 signer's signature over its signed data; the signed content
                    digest = FILE's (entries, central directory, end record); no stripped v3 block
    For cms, authenticode, jar and apk, the signing certificate must carry a trusted key (--key) and/or chain
    to a trusted root (--ca): each link's signature, CA constraints, codeSigning on the leaf, validity
    at --at, and, where a CRL of the issuer is given (--crl), that no certificate is revoked.
    Not checked, and said so in the output: trusted timestamps (the signing time is the signer's
    claim), transparency logs, revocation without a CRL, CRLs fetched from the network.
    Exit code 0 only when every check passed; 3 when any failed.
    """
    trust = _trust(trust_dir=trust_dir, keys=keys, cas=cas, chains=chains, crls=crls)
    try:
        fmt = fmt or verification.guess_format(str(file), str(signature) if signature else None)
        leaf = verification.load_certificates(_read(certificate), str(certificate))[0] if certificate else None
        report = verification.verify(fmt, artifact_path=file, artifact=_read(file),
                                     signature=_read(signature) if signature else None, trust=trust,
                                     algorithm=digest, certificate=leaf, at=_moment(at))
    except verification.TrustError as error:
        raise CliError(str(error)) from None
    except verification.NotVerified as error:
        emit({"verified": False, "format": fmt, "artifact": str(file), "error": str(error)}, output,
             lambda: None)
        note(f"NOT VERIFIED: {file}: {error}")
        return NOT_VERIFIED

    def text() -> str:
        lines = [f"verified: {file} ({fmt})"]
        lines += [f"  checked:     {line}" for line in report.checked]
        lines += [f"  not checked: {line}" for line in report.not_checked]
        return "\n".join(lines)
    emit(report.as_dict(), output, text)
    return OK

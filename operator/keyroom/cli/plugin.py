"""``kubectl keyroom``: request, approve, attest, verify and audit signatures from the command line.

Installed as the ``kubectl-keyroom`` console script, so kubectl finds it as a
plugin (and ``kubectl_complete-keyroom`` for its completion). The verbs are
click commands: this module holds the requester's, approver's and builder's
(sign, status, get, whoami, pending, approve, deny, attest, rotate) and the
pure functions they stand on; :mod:`keyroom.cli.offline` holds export and
verify, :mod:`keyroom.cli.admin` keys, access, audit and report. Files are
hashed locally; only their digests travel. The caller's identity comes from a
SelfSubjectReview (what ``kubectl auth whoami`` shows), so the requester, each
approval and each build attestation carry exactly what the API server's
admission policy expects. Exit codes: :mod:`keyroom.cli.common`.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterable, Iterator

import click
import kubernetes

from keyroom import policy
from keyroom.cli import apk, jar, pe
from keyroom.cli.common import (ERROR, GROUP, INTERRUPTED, OK, USAGE_OR_TIMEOUT, VERSION, CliError, Cluster,
                                api_error, emit, note, output_option, progress, render_table, with_target)
from keyroom.signer.formats import FormatError
from keyroom.signer.formats import jar as jar_format

PLURAL = "signrequests"
ROTATE_ANNOTATION = f"{GROUP}/rotate"
FINAL = ("Signed", "Denied", "Expired", "Failed")
MAX_FILES = 500
#: digests of one request whose signatures embed a certificate chain (the API's limit for cms, authenticode, jar)
MAX_CERTIFICATE_DIGESTS = 100
CERTIFICATE_FORMATS = ("cms", "authenticode", "jar", "apk")
_note = note


# ---------------------------------------------------------------- pure parts

def file_digest(path: pathlib.Path, algorithm: str = "SHA256",
                advance: Callable[[int], None] | None = None) -> str:
    digest = hashlib.new(algorithm.lower())
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
            if advance is not None:
                advance(len(chunk))
    return digest.hexdigest()


#: what each format writes: a signature file beside the input (suffix), or a signed copy of the input
FORMAT_OUTPUTS = {"raw": ".sig", "cms": ".p7s", "sigstore": ".sigstore.json", "authenticode": None, "jar": None,
                  "apk": None}


def format_digest(path: pathlib.Path, fmt: str, algorithm: str,
                  advance: Callable[[int], None] | None = None) -> tuple[str, bytes | None]:
    """(the digest the request carries for ``path`` in ``fmt``, the JAR manifest for jar)."""
    try:
        if fmt == "authenticode":
            data = path.read_bytes()
            if advance is not None:
                advance(len(data))
            return pe.authenticode_digest(data, algorithm).hex(), None
        if fmt == "jar":
            manifest = jar.manifest(path, algorithm)
            if advance is not None:
                advance(path.stat().st_size)
            return hashlib.new(algorithm.lower(), manifest).hexdigest(), manifest
        if fmt == "apk":
            digest = apk.content_digest(path, algorithm, replace_signature=True).hex()
            if advance is not None:
                advance(path.stat().st_size)
            return digest, None
    except (pe.PEError, jar.JarError, apk.ApkError) as error:
        raise CliError(f"{path}: {error}") from None
    return file_digest(path, algorithm, advance), None


def sign_request_body(files: list[pathlib.Path], *, key: str, namespace: str, identity: dict, reason: str = "",
                      algorithm: str = "SHA256", fmt: str = "raw", name: str | None = None,
                      certificate: str | None = None, advance: Callable[[int], None] | None = None,
                      hashing: Callable[[pathlib.Path], None] | None = None,
                      apk_certificate: bytes | None = None, replace: bool = False) -> dict:
    """The SignRequest for ``files``: one digest per file, named by its base name.

    authenticode digests are Authenticode digests of PE files; jar signs one
    JAR, whose manifest the request carries (the signer derives what it signs
    from it); apk signs one APK: its content digest, and the v2 and v3 signed
    data built around it and ``apk_certificate`` (the DER certificate of
    ``certificate``), whose key's algorithm decides the digest algorithm.
    """
    if not files:
        raise CliError("name at least one file to sign")
    if fmt in ("jar", "apk") and len(files) != 1:
        raise CliError(f"format {fmt} signs one {fmt.upper()} per request: run kubectl keyroom sign once per "
                       f"{fmt.upper()}")
    apk_fields = None
    if fmt == "apk":
        if not certificate or apk_certificate is None:
            raise CliError("format apk puts the certificate into what is signed: name it with --certificate")
        try:
            algorithm, _, blocks = apk.signed_data(files[0], certificate_der=apk_certificate,
                                                   replace_signature=replace)
        except apk.ApkError as error:
            raise CliError(str(error)) from None
        apk_fields = {"signedData": [{"scheme": scheme, "value": base64.b64encode(data).decode()}
                                     for scheme, data in blocks]}
    if len(files) > MAX_FILES:
        raise CliError(f"at most {MAX_FILES} files fit in one SignRequest, not {len(files)}")
    names = [f.name for f in files]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CliError(f"files with the same name cannot share a request: {', '.join(repeated)}")
    metadata: dict[str, Any] = {"namespace": namespace}
    if name:
        metadata["name"] = name
    else:
        metadata["generateName"] = f"{key}-"
    digests, manifest = [], None
    for path in files:
        if hashing is not None:
            hashing(path)
        value, manifest = format_digest(path, fmt, algorithm, advance)
        digests.append({"name": path.name, "value": value})
    spec = {"keyRef": {"name": key}, "requester": identity, "format": fmt, "digestAlgorithm": algorithm,
            "digests": digests}
    if manifest is not None:
        spec["manifest"] = base64.b64encode(manifest).decode()
    if apk_fields is not None:
        spec["apk"] = apk_fields
    if certificate:
        spec["certificateRef"] = {"name": certificate}
    if reason:
        spec["reason"] = reason
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SignRequest", "metadata": metadata, "spec": spec}


def approval_patch(current: list | None, entry: dict, field: str = "approvals") -> list[dict]:
    """A JSON patch appending ``entry`` to ``spec.<field>``; it fails if someone else appended meanwhile."""
    if current is None:
        return [{"op": "add", "path": f"/spec/{field}", "value": [entry]}]
    return [{"op": "test", "path": f"/spec/{field}", "value": current},
            {"op": "add", "path": f"/spec/{field}/-", "value": entry}]


def build_reference(environ: dict[str, str]) -> str:
    """The CI run this process belongs to, from the variables GitLab CI and GitHub Actions set ("" elsewhere)."""
    if environ.get("CI_JOB_URL"):
        return environ["CI_JOB_URL"]
    if all(environ.get(v) for v in ("GITHUB_SERVER_URL", "GITHUB_REPOSITORY", "GITHUB_RUN_ID")):
        return f"{environ['GITHUB_SERVER_URL']}/{environ['GITHUB_REPOSITORY']}/actions/runs/{environ['GITHUB_RUN_ID']}"
    return ""


def attestation(spec: dict, files: list[pathlib.Path], *, identity: dict,
                build: str = "") -> tuple[dict, tuple[str, str] | None]:
    """(the caller's attestation of a request's digests from ``files``, where it differs from the request's).

    Each file is hashed as the request's format and digest algorithm say, and
    named by its base name; the files must be exactly the request's, so that
    a forgotten file does not fail a release that a full build would match.
    """
    names = [f.name for f in files]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CliError(f"files with the same name cannot be attested together: {', '.join(repeated)}")
    wanted = [d["name"] for d in spec["digests"]]
    missing, extra = [n for n in wanted if n not in names], sorted(set(names) - set(wanted))
    if missing or extra:
        raise CliError("attest exactly the request's files: "
                       + "; ".join(filter(None, [missing and f"missing {', '.join(missing)}",
                                                 extra and f"not in the request {', '.join(extra)}"])))
    fmt, algorithm = spec.get("format", "raw"), spec.get("digestAlgorithm", "SHA256")
    digests = [{"name": path.name, "value": format_digest(path, fmt, algorithm)[0]} for path in files]
    entry = {"user": identity["username"], "groups": identity["groups"], "digests": digests}
    if build:
        entry["build"] = build
    return entry, policy.first_difference(spec["digests"], digests)


def signature_paths(files: list[pathlib.Path], out: pathlib.Path | None, fmt: str = "raw",
                    in_place: bool = False) -> dict[str, pathlib.Path]:
    """Where each file's output goes: FILE.sig/.p7s/.sigstore.json beside it or in DIR; a signed PE or JAR
    into DIR (or over the input with ``in_place``)."""
    suffix = FORMAT_OUTPUTS[fmt]
    if suffix is None:
        if in_place:
            return {f.name: f for f in files}
        if out is None:
            raise CliError(f"format {fmt} writes a signed copy of each file: give --out DIR (or --in-place to "
                           "replace the input)")
        paths = {f.name: out / f.name for f in files}
        if any(path.resolve() == f.resolve() for f, path in zip(files, paths.values())):
            raise CliError("--out names the input's own directory: the input is never overwritten unless --in-place")
        return paths
    return {f.name: (out / f"{f.name}{suffix}" if out else f.with_name(f"{f.name}{suffix}")) for f in files}


def write_output(fmt: str, source: pathlib.Path, path: pathlib.Path, signature: bytes, *, algorithm: str,
                 manifest: bytes | None = None, replace: bool = False) -> None:
    """Write what the signer returned for ``source``: a signature file, or the signed PE or JAR."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if fmt == "authenticode":
            signed = pe.attach_signature(source.read_bytes(), signature, replace=replace)
            temporary = path.with_name(f".{path.name}.keyroom-tmp")
            temporary.write_bytes(signed)
            os.replace(temporary, path)
        elif fmt == "jar":
            from asn1crypto import cms as asn1_cms
            certificate = asn1_cms.ContentInfo.load(signature)["content"]["certificates"][0].chosen.dump()
            jar.write_signed(source, path, manifest=manifest, block=signature, overwrite=path == source,
                             signature_file=jar_format.signature_file(manifest, digest_algorithm=algorithm),
                             block_name=jar_format.block_extension(certificate))
        elif fmt == "apk":
            apk.write_signed(source, path, signature, overwrite=path == source)
        else:
            path.write_bytes(signature)
    except (pe.PEError, jar.JarError, apk.ApkError, FormatError) as error:
        raise CliError(f"{source}: {error}") from None


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return ""
    seconds = int((datetime.datetime.now(datetime.timezone.utc)
                   - datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def table(rows: Iterable[list[str]]) -> str:
    rows = list(rows)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def describe(body: dict) -> str:
    """What an approver should see before deciding, and what anyone asks of a request."""
    spec, status, meta = body["spec"], body.get("status") or {}, body["metadata"]
    lines = [f"SignRequest {meta['namespace']}/{meta['name']}",
             f"  phase:      {status.get('phase', 'new')}  {status.get('message', '')}".rstrip(),
             f"  requester:  {spec['requester']['username']}",
             f"  key:        {spec['keyRef']['name']}" + (f" version {status['keyVersion']}" if status.get("keyVersion") else ""),
             f"  reason:     {spec.get('reason', '')}",
             f"  format:     {spec.get('format', 'raw')}, {len(spec['digests'])} digest(s) "
             f"({spec.get('digestAlgorithm', 'SHA256')})",
             f"  approvals:  {status.get('approvalSummary', '')}"]
    for approval in status.get("approvals") or []:
        note = "counted" if approval.get("counted") else f"not counted: {approval.get('reason', '')}"
        lines.append(f"    {approval['user']}: {approval['decision']} ({note})")
    if status.get("buildSummary") or status.get("builds") or spec.get("attestations"):
        lines.append(f"  builds:     {status.get('buildSummary', '')}".rstrip())
        for build in status.get("builds") or []:
            note = "matches, counted" if build.get("counted") else f"not counted: {build.get('reason', '')}"
            lines.append(f"    {build['user']}: {note}" + (f" [{build['build']}]" if build.get("build") else ""))
    for label, field in (("expires", "expiresAt"), ("signed", "signedAt")):
        if status.get(field):
            lines.append(f"  {label + ':':<12}{status[field]}")
    if status.get("audit"):
        lines.append(f"  audit:      entry {status['audit']['index']} {status['audit']['entryHash']}")
    signed = {s["name"] for s in status.get("signatures") or []}
    if spec.get("format") == "cosign":  # what is signed: each image's repository and manifest digest, not a tag
        lines.append("  images (reference, manifest digest; a tag is shown, never signed):")
        for digest in spec["digests"]:
            lines.append(f"    {digest['name']}  sha256:{digest['value']}" + ("  signed" if digest["name"] in signed
                                                                              else ""))
        return "\n".join(lines)
    lines.append(f"  digests ({spec.get('digestAlgorithm', 'SHA256')}):")
    for digest in spec["digests"]:
        lines.append(f"    {digest['name']}  {digest['value']}" + ("  signed" if digest["name"] in signed else ""))
    return "\n".join(lines)


def expand_inputs(paths: Iterable[pathlib.Path]) -> list[pathlib.Path]:
    """Files as given, and each directory's regular files (recursively, sorted), without earlier signature files."""
    suffixes = tuple(s for s in FORMAT_OUTPUTS.values() if s)
    found: list[pathlib.Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.endswith(suffixes))
            if not inside:
                raise CliError(f"{path} holds no file to sign")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise CliError(f"{path} is not a readable file")
    return found


def digest_limit(policies: list[dict], *, key: dict | None, fmt: str) -> int:
    """The most digests one request for ``key`` may carry: every selecting policy's maxDigestsPerRequest and the
    API's own limits (fewer for the formats that embed a certificate chain)."""
    limit = MAX_CERTIFICATE_DIGESTS if fmt in CERTIFICATE_FORMATS else MAX_FILES
    if key is not None:
        meta = key["metadata"]
        for item in policies:
            spec = item.get("spec") or {}
            if policy.policy_selects(spec, key_name=meta["name"], key_labels=meta.get("labels")):
                limit = min(limit, int(spec.get("maxDigestsPerRequest") or MAX_FILES))
    return limit


def batches(files: list[pathlib.Path], limit: int) -> list[list[pathlib.Path]]:
    """``files`` in requests of at most ``limit`` digests each, in order."""
    return [files[start:start + limit] for start in range(0, len(files), limit)] or [[]]


def waiting_line(body: dict) -> str:
    """What a waiting requester reads: what the request waits for, in the operator's words."""
    status = body.get("status") or {}
    meta = body["metadata"]
    line = f"{meta['namespace']}/{meta['name']}: {status.get('phase', 'Pending')}"
    if status.get("message"):
        line += f": {status['message']}"
    return line


def decision_summary(bodies: list[dict], decision: str) -> str:
    """What a batch of approvals or denials covers: requests, digests, keys, requesters, formats."""
    digests = sum(len(b["spec"]["digests"]) for b in bodies)
    keys = sorted({b["spec"]["keyRef"]["name"] for b in bodies})
    requesters = sorted({b["spec"]["requester"]["username"] for b in bodies})
    formats = sorted({b["spec"].get("format", "raw") for b in bodies})
    verb = "approving" if decision == "Approve" else "denying"
    return (f"{verb} {len(bodies)} request(s), {digests} digest(s) in all; key(s) {', '.join(keys)}; "
            f"requester(s) {', '.join(requesters)}; format(s) {', '.join(formats)}")


def request_view(body: dict) -> dict:
    """A SignRequest as ``-o json`` shows it: spec and status as the API server holds them."""
    return {"namespace": body["metadata"]["namespace"], "name": body["metadata"]["name"],
            "spec": body.get("spec") or {}, "status": body.get("status") or {}}


# ---------------------------------------------------------------- following objects

def _versions(cluster: Cluster, body: dict, deadline: float, plural: str = PLURAL) -> Iterator[dict]:
    """``body``, then each later version of it as the API server's watch delivers them, until ``deadline``."""
    yield body
    name, version = body["metadata"]["name"], body["metadata"]["resourceVersion"]
    namespace = body["metadata"].get("namespace") or cluster.namespace
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            for event in kubernetes.watch.Watch().stream(
                    cluster.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, plural,
                    field_selector=f"metadata.name={name}", resource_version=version,
                    timeout_seconds=max(1, min(int(remaining), 60))):
                if event["type"] == "DELETED":
                    raise CliError(f"{name} was deleted while waiting for it")
                body, version = event["object"], event["object"]["metadata"]["resourceVersion"]
                yield body
                if time.monotonic() >= deadline:
                    return
        except kubernetes.client.ApiException as error:
            if error.status == 403:  # may get but not watch (keyroom-builder): read it again until the deadline
                yield from _polled(cluster, namespace, plural, name, version, deadline)
                return
            if error.status != 410:  # 410: the watch fell behind; reading again catches up
                raise
            body = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
            version = body["metadata"]["resourceVersion"]
            yield body


def _polled(cluster: Cluster, namespace: str, plural: str, name: str, version: str,
            deadline: float) -> Iterator[dict]:
    """Each new version of the object, read every 0.2 s until ``deadline``: for callers without watch rights."""
    while time.monotonic() < deadline:
        body = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        if body["metadata"]["resourceVersion"] != version:
            version = body["metadata"]["resourceVersion"]
            yield body
        time.sleep(0.2)


def wait_final(cluster: Cluster, created: dict, timeout: float) -> dict:
    """Follow the request from its creation until it is final, printing each new message."""
    last_message = None
    for body in _versions(cluster, created, time.monotonic() + timeout):
        status = body.get("status") or {}
        if status.get("message") and status["message"] != last_message:
            last_message = status["message"]
            _note(f"{body['metadata']['name']}: {status.get('phase', 'Pending')}: {last_message}")
        if status.get("phase") in FINAL:
            return body
    raise TimeoutError


def _counted(cluster: Cluster, body: dict, field: str, user: str, seconds: float = 3) -> dict | None:
    """The operator's verdict on ``user``'s entry in ``status.<field>``, once it shows (within ``seconds``)."""
    for version in _versions(cluster, body, time.monotonic() + seconds):
        mine = [a for a in (version.get("status") or {}).get(field) or [] if a["user"] == user]
        if mine:
            return {"status": version["status"], "entry": mine[-1]}
    return None


# ---------------------------------------------------------------- verbs

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@click.group(name="kubectl keyroom", context_settings=CONTEXT)
def cli() -> None:
    """Code signing with keyroom: request, approve, verify and audit signatures.

    \b
    Requesters:  sign, status, get, whoami
    Approvers:   pending, approve, deny
    Builders:    attest
    Images:      sign-image, verify-image  (container images, as cosign signs them)
    Android:     apksigner  (apksigner's own signing, with keyroom's provider jar)
    Verifiers:   export, verify  (verify needs no cluster)
    Admins:      keys, rotate, audit show, audit verify, access, report
    Anyone:      completion

    \b
    Exit codes: 0 done; 1 error (refused, not found, bad input, request Denied/Expired/Failed);
    2 usage error or --wait timed out (the request stays); 3 not verified; 130 interrupted.
    """


@cli.command(context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=pathlib.Path), metavar="FILE|DIR...")
@click.option("--key", required=True, help="the SigningKey of the namespace")
@click.option("--reason", default="", help="shown to approvers, e.g. 'release 1.4.2'")
@click.option("--digest", default="SHA256", type=click.Choice(["SHA256", "SHA384", "SHA512"]), show_default=True)
@click.option("--format", "fmt", default="raw", type=click.Choice(list(FORMAT_OUTPUTS)), show_default=True,
              help="raw: FILE.sig; cms: FILE.p7s (detached CMS with the certificate chain); authenticode: a signed "
                   "copy of the PE file; jar: a signed copy of the JAR; sigstore: FILE.sigstore.json; apk: a signed "
                   "copy of the APK (v2 and v3)")
@click.option("--certificate", help="the Certificate cms, authenticode, jar and apk embed (default: the key "
                                    "version's valid certificate; apk needs it named)")
@click.option("--in-place", is_flag=True, help="authenticode, jar, apk: replace the input (and an existing signature) "
                                               "with the signed file")
@click.option("--name", help="the SignRequest's name (default: generated from the key's); NAME-1, NAME-2... when "
                             "the files are split over several requests")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="wait for the outcome and write the signatures")
@click.option("--timeout", type=float, default=600, show_default=True, help="seconds to wait")
@click.option("--out", type=click.Path(path_type=pathlib.Path),
              help="write signatures into this directory instead of beside the files")
@output_option
@with_target
def sign(files, key, reason, digest, fmt, certificate, in_place, name, wait, timeout, out, output, target) -> int:
    """Hash FILEs (or every file in DIRs) locally and request their signatures.

    Only digests travel. More files than one request may carry (the policy's
    maxDigestsPerRequest; 100 for cms, authenticode and jar) are split over
    several requests. With --wait (the default) it follows each request until
    it is final and writes the signatures: FILE.sig (raw), FILE.p7s (cms),
    FILE.sigstore.json (sigstore), or a signed copy (authenticode, jar; needs
    --out DIR or --in-place).
    """
    files = expand_inputs(files)
    paths = signature_paths(files, out, fmt, in_place)
    cluster = target.cluster
    limit = _digest_limit(cluster, key, fmt)
    groups = batches(files, limit)
    if len(groups) > 1:
        _note(f"{len(files)} files exceed the {limit} digests one request for {key} may carry: "
              f"splitting into {len(groups)} requests")
    identity = cluster.whoami()
    apk_certificate = _certificate_der(cluster, certificate) if fmt == "apk" and certificate else None
    created = []
    total = sum(f.stat().st_size for f in files)
    with progress(total, len(files)) as bar:
        task = bar.add_task("hashing", total=total, current="")
        for number, group in enumerate(groups, 1):
            group_name = f"{name}-{number}" if name and len(groups) > 1 else name
            body = sign_request_body(group, key=key, namespace=cluster.namespace, identity=identity, reason=reason,
                                     algorithm=digest, fmt=fmt, name=group_name, certificate=certificate,
                                     apk_certificate=apk_certificate, replace=in_place,
                                     advance=lambda n: bar.advance(task, n),
                                     hashing=lambda p: bar.update(task, current=p.name))
            created.append(cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace,
                                                                          PLURAL, body))
            if output == "text":
                print(created[-1]["metadata"]["name"])
    names = [c["metadata"]["name"] for c in created]
    if not wait:
        emit([{"name": n, "namespace": cluster.namespace} for n in names], output, lambda: None)
        return OK
    _note(f"waiting up to {timeout:.0f}s for {', '.join(names)} in {cluster.namespace} to be signed; Ctrl-C stops "
          "waiting, the request stays")
    deadline = time.monotonic() + timeout
    finals, code = [], OK
    sources = {f.name: f for f in files}
    for body in created:
        request = body["metadata"]["name"]
        try:
            body = wait_final(cluster, body, max(0.0, deadline - time.monotonic()))
        except (TimeoutError, KeyboardInterrupt) as stopped:
            when = "now" if isinstance(stopped, KeyboardInterrupt) else f"after {timeout:.0f}s"
            _note(f"stopped waiting {when}; {request} stays, check it with: "
                  f"kubectl keyroom status {request} -n {cluster.namespace}")
            emit(finals, output, lambda: None)
            return USAGE_OR_TIMEOUT if isinstance(stopped, TimeoutError) else INTERRUPTED
        status = body["status"]
        written = []
        if status["phase"] != "Signed":
            _note(f"{request}: {status['phase']}: {status.get('message', '')}")
            code = ERROR
        else:
            manifest = base64.b64decode(body["spec"]["manifest"]) if body["spec"].get("manifest") else None
            for signature in status["signatures"]:
                path = paths[signature["name"]]
                write_output(fmt, sources[signature["name"]], path, base64.b64decode(signature["value"]),
                             algorithm=digest, manifest=manifest, replace=in_place)
                written.append(str(path))
                if output == "text":
                    print(path)
        finals.append({"name": request, "namespace": cluster.namespace, "phase": status["phase"],
                       "message": status.get("message", ""), "files": written})
    emit(finals, output, lambda: None)
    return code


def _certificate_der(cluster: Cluster, name: str) -> bytes:
    """The DER certificate the Certificate ``name`` was last issued (what an APK's signed data carries)."""
    from cryptography import x509 as crypto_x509
    from cryptography.hazmat.primitives import serialization

    try:
        found = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "certificates", name)
    except kubernetes.client.ApiException as error:
        raise api_error(error) from None
    pem = (found.get("status") or {}).get("certificate")
    if not pem:
        raise CliError(f"Certificate {cluster.namespace}/{name} has no certificate yet; wait until it is Ready")
    return crypto_x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


def _digest_limit(cluster: Cluster, key: str, fmt: str) -> int:
    """The split size for ``key``: from its policies when the caller may read them, else the API's limits."""
    try:
        found = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "signingkeys", key)
        return digest_limit(cluster.list("signingpolicies"), key=found, fmt=fmt)
    except kubernetes.client.ApiException:
        return digest_limit([], key=None, fmt=fmt)


def append_decision(cluster: Cluster, name: str, entry: dict, *, attempts: int = 5, field: str = "approvals",
                    body: dict | None = None) -> None:
    """Append ``entry`` to the request's approvals (or attestations), after showing the request once.

    The patch tests the list it appends to (or creates it when there is none), so
    a decision someone else appends at the same moment makes it fail instead of
    racing. The API server answers a failed test with a bare 422, and a list
    created meanwhile with the append-only rule's refusal, so a list that has
    changed on re-reading is what tells a lost race from a real refusal.
    """
    body = body or cluster.get(name)
    _note(describe(body))
    for _ in range(attempts):
        phase = (body.get("status") or {}).get("phase")
        if phase in FINAL:
            raise CliError(f"{name} is already {phase}; nothing to {entry.get('decision', 'attest').lower()}")
        seen = body["spec"].get(field)
        try:
            cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, name,
                                                          approval_patch(seen, entry, field),
                                                          _content_type="application/json-patch+json")
            return
        except kubernetes.client.ApiException:
            body = cluster.get(name)
            if body["spec"].get(field) == seen:
                raise
            _note("someone else decided at the same moment; trying again on the new list")
    raise CliError(f"could not append to {name}: its approvals keep changing")


def _decide(names: tuple[str, ...], reason: str, output: str, target, decision: str) -> int:
    cluster = target.cluster
    identity = cluster.whoami()
    bodies = [cluster.get(name) for name in names]  # every request is read (and shown) before any is decided
    if len(bodies) > 1:
        _note(decision_summary(bodies, decision))
    results, code = [], OK
    for body in bodies:
        name = body["metadata"]["name"]
        entry = {"user": identity["username"], "groups": identity["groups"], "decision": decision}
        if reason:
            entry["reason"] = reason
        try:
            append_decision(cluster, name, entry, body=body)
        except (CliError, kubernetes.client.ApiException) as error:
            if len(bodies) == 1:
                raise
            message = str(api_error(error) if isinstance(error, kubernetes.client.ApiException) else error)
            _note(f"error: {name}: {message}")
            results.append({"name": name, "namespace": cluster.namespace, "decided": False, "error": message})
            code = ERROR
            continue
        counted = _counted(cluster, cluster.get(name), "approvals", identity["username"])
        summary = ""
        result = {"name": name, "namespace": cluster.namespace, "decided": True, "decision": decision,
                  "user": identity["username"]}
        if counted:
            mine = counted["entry"]
            summary = f" ({counted['status'].get('approvalSummary', '')}" + (
                "" if mine.get("counted") else f"; not counted: {mine.get('reason')}") + ")"
            result.update(counted=bool(mine.get("counted")), approvals=counted["status"].get("approvalSummary"),
                          phase=counted["status"].get("phase"))
            if not mine.get("counted"):
                result["reason"] = mine.get("reason")
        results.append(result)
        verb = "approved" if decision == "Approve" else "denied"
        if output == "text":
            print(f"{verb} {cluster.namespace}/{name} as {identity['username']}{summary}")
    if output == "text" and len(bodies) > 1:
        done = sum(1 for r in results if r["decided"])
        print(f"{done} of {len(bodies)} request(s) {'approved' if decision == 'Approve' else 'denied'}")
    emit(results, output, lambda: None)
    return code


@cli.command(context_settings=CONTEXT)
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option("--reason", default="", help="why (recorded with your approval)")
@click.option("--yes", is_flag=True, help="accepted for scripts; what is approved is always shown, nothing is asked")
@output_option
@with_target
def approve(names, reason, yes, output, target) -> int:
    """Approve SignRequests as yourself, after showing each: requester, key, reason, format, digests.

    With several NAMEs, a summary of the batch comes first; each request is
    then shown and approved in turn. The API server records your identity
    with the approval; the operator decides whether it counts.
    """
    return _decide(names, reason, output, target, "Approve")


@cli.command(context_settings=CONTEXT)
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option("--reason", required=True, help="why (a denial needs one; the requester reads it)")
@click.option("--yes", is_flag=True, help="accepted for scripts; nothing is asked")
@output_option
@with_target
def deny(names, reason, yes, output, target) -> int:
    """Deny SignRequests as yourself, after showing each; one eligible denial ends a request."""
    return _decide(names, reason, output, target, "Deny")


@cli.command(context_settings=CONTEXT)
@click.argument("name")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=pathlib.Path), metavar="FILE...")
@click.option("--build", help="the build that produced them, e.g. the CI run's URL (default: $CI_JOB_URL, or the "
                              "GitHub Actions run)")
@with_target
def attest(name, files, build, target) -> int:
    """Hash the files your own build produced and attest them for SignRequest NAME (exactly its files)."""
    for path in files:
        if not path.is_file():
            raise CliError(f"{path} is not a readable file")
    cluster = target.cluster
    identity = cluster.whoami()
    body = cluster.get(name)
    if any(a["user"] == identity["username"] for a in body["spec"].get("attestations") or []):
        raise CliError(f"{identity['username']} already attested {name}; a builder attests once")
    entry, difference = attestation(body["spec"], list(files), identity=identity,
                                    build=build if build is not None else build_reference(dict(os.environ)))
    append_decision(cluster, name, entry, field="attestations", body=body)
    if difference is not None:
        _note(f"error: your build differs from the request's at {difference[0]}: {difference[1]}; "
              f"{name} fails (BuildMismatch) and will not be signed")
        return ERROR
    counted = _counted(cluster, cluster.get(name), "builds", identity["username"])
    summary = ""
    if counted:
        mine = counted["entry"]
        summary = f" ({counted['status'].get('buildSummary', '')}" + (
            "" if mine.get("counted") else f"; not counted: {mine.get('reason')}") + ")"
    print(f"attested {cluster.namespace}/{name} as {identity['username']}: {len(files)} digest(s) match{summary}")
    return OK


@cli.command(context_settings=CONTEXT)
@click.argument("name", required=False)
@click.option("-A", "--all-namespaces", is_flag=True, help="every namespace you may read")
@output_option
@with_target
def get(name, all_namespaces, output, target) -> int:
    """List SignRequests (or show one) with their approvals and phase."""
    cluster = target.cluster
    if name:
        items = [cluster.get(name)]
    elif all_namespaces:
        items = cluster.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
    else:
        items = cluster.list(PLURAL)
    if output != "text":
        emit([request_view(item) for item in items], output, lambda: None)
        return OK
    if not items:
        _note(f"no SignRequests in {'any namespace' if all_namespaces else cluster.namespace}")
        return OK
    builds = any((item.get("status") or {}).get("buildSummary") for item in items)  # a column only when in use
    header = ((["NAMESPACE"] if all_namespaces else []) + ["NAME", "KEY", "REQUESTER", "APPROVALS"]
              + (["BUILDS"] if builds else []) + ["PHASE", "AGE"])
    rows = []
    for item in items:
        status = item.get("status") or {}
        rows.append(([item["metadata"]["namespace"]] if all_namespaces else []) + [
            item["metadata"]["name"], item["spec"]["keyRef"]["name"], item["spec"]["requester"]["username"],
            status.get("approvalSummary", "")] + ([status.get("buildSummary", "")] if builds else []) + [
            status.get("phase", ""), _age(item["metadata"].get("creationTimestamp"))])
    print(render_table(header, rows))
    return OK


@cli.command(context_settings=CONTEXT)
@click.argument("name")
@output_option
@with_target
def status(name, output, target) -> int:
    """Everything about one SignRequest: phase, what it waits for, approvals, builds, digests, audit entry."""
    body = target.cluster.get(name)
    emit(request_view(body), output, lambda: describe(body))
    return OK


#: what ``whoami`` asks the API server about, in the caller's namespace (None: the signer's namespace)
CAPABILITIES = [
    ("request signatures (sign)", GROUP, "signrequests", "create", None, False),
    ("approve or deny (approve, deny)", GROUP, "signrequests", "patch", None, False),
    ("attest builds (attest)", GROUP, "signrequests", "attest", None, False),
    ("read requests (get, status, pending)", GROUP, "signrequests", "list", None, False),
    ("read keys and policies (keys, access, export)", GROUP, "signingkeys", "list", None, False),
    ("manage keys and policies", GROUP, "signingpolicies", "create", None, False),
    ("rotate keys (rotate)", GROUP, "signingkeys", "patch", None, False),
    ("read RBAC bindings (access)", "rbac.authorization.k8s.io", "rolebindings", "list", None, False),
    ("read the audit checkpoint (audit)", "", "configmaps", "get", "keyroom-audit-checkpoint", True),
    ("read the signer's audit log (audit, report)", "", "pods/exec", "create", None, True),
]


@cli.command(context_settings=CONTEXT)
@click.option("--signer-namespace", default="keyroom-system", show_default=True, help="where the signer runs")
@output_option
@with_target
def whoami(signer_namespace, output, target) -> int:
    """Who the API server says you are, and what you may do with keyroom in the namespace."""
    cluster = target.cluster
    identity = cluster.whoami()
    client = kubernetes.client
    abilities = []
    for label, group, resource, verb, name, signer_side in CAPABILITIES:
        namespace = signer_namespace if signer_side else cluster.namespace
        subresource = ""
        if "/" in resource:
            resource, subresource = resource.split("/", 1)
        review = cluster.authorization.create_self_subject_access_review(client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=client.V1ResourceAttributes(
                group=group, resource=resource, subresource=subresource or None, verb=verb, name=name,
                namespace=namespace))))
        abilities.append({"what": label, "namespace": namespace, "allowed": bool(review.status.allowed),
                          "check": f"{verb} {resource}{'/' + subresource if subresource else ''}"
                                   f"{'.' + group if group else ''}{' ' + name if name else ''}"})
    rules = cluster.authorization.create_self_subject_rules_review(client.V1SelfSubjectRulesReview(
        spec=client.V1SelfSubjectRulesReviewSpec(namespace=cluster.namespace))).status
    keyroom_rules = [{"verbs": r.verbs, "resources": r.resources, "resourceNames": r.resource_names}
                     for r in rules.resource_rules or [] if GROUP in (r.api_groups or []) or "*" in (r.api_groups or [])]
    data = {"username": identity["username"], "groups": identity["groups"], "namespace": cluster.namespace,
            "may": abilities, "keyroomRules": keyroom_rules, "rulesIncomplete": bool(rules.incomplete)}

    def text() -> str:
        lines = [f"user:       {identity['username']}", f"groups:     {', '.join(identity['groups'])}",
                 f"namespace:  {cluster.namespace}", ""]
        rows = [["yes" if a["allowed"] else "no", a["what"], a["namespace"], a["check"]] for a in abilities]
        return "\n".join(lines) + render_table(["MAY", "WHAT", "NAMESPACE", "CHECKED AS"], rows)
    emit(data, output, text)
    return OK


def _readable_namespaces(cluster: Cluster, explicit: bool) -> list[str] | None:
    """The namespaces to look in: the one given, else every namespace if listable (None: list cluster-wide)."""
    if explicit:
        return [cluster.namespace]
    try:
        cluster.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, limit=1)
        return None
    except kubernetes.client.ApiException as error:
        if error.status != 403:
            raise
    try:
        return [n.metadata.name for n in cluster.core.list_namespace().items]
    except kubernetes.client.ApiException as error:
        if error.status != 403:
            raise
    contexts, _ = kubernetes.config.list_kube_config_contexts(config_file=cluster.kubeconfig)
    found = {cluster.namespace} | {(c.get("context") or {}).get("namespace") for c in contexts}
    _note(f"you may not list namespaces: looking in {', '.join(sorted(n for n in found if n))} (your kubeconfig's); "
          "name others with -n")
    return sorted(n for n in found if n)


@cli.command(context_settings=CONTEXT)
@output_option
@with_target
def pending(output, target) -> int:
    """Requests your approval could still count for, across the namespaces you can see, with what each waits for.

    A request is listed when it is Pending, you have not decided it yet, you
    are an eligible approver in a policy that selects its key, that policy
    still misses approvals, and separation of duties does not exclude you.
    -n NAMESPACE looks in that namespace only.
    """
    cluster = target.cluster
    identity = cluster.whoami()
    me = policy.Identity(identity["username"], tuple(identity["groups"]))
    namespaces = _readable_namespaces(cluster, explicit=target.namespace is not None)
    if namespaces is None:
        requests = cluster.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
        namespaces = sorted({r["metadata"]["namespace"] for r in requests})
    else:
        requests = []
        for namespace in list(namespaces):
            try:
                requests.extend(cluster.list(PLURAL, namespace))
            except kubernetes.client.ApiException as error:
                if error.status != 403:
                    raise
                namespaces.remove(namespace)
    from keyroom.cli import access

    found = []
    context: dict[str, tuple[list, dict]] = {}
    for request in requests:
        namespace = request["metadata"]["namespace"]
        if (request.get("status") or {}).get("phase", "Pending") != "Pending":
            continue
        if namespace not in context:
            keys = {k["metadata"]["name"]: k["metadata"].get("labels") for k in cluster.list("signingkeys", namespace)}
            context[namespace] = (cluster.list("signingpolicies", namespace), keys)
        policies, keys = context[namespace]
        counts, why = access.approval_prospect(request, policies=policies,
                                               key_labels=keys.get(request["spec"]["keyRef"]["name"]), identity=me)
        if counts:
            spec, status = request["spec"], request.get("status") or {}
            found.append({"namespace": namespace, "name": request["metadata"]["name"],
                          "requester": spec["requester"]["username"], "key": spec["keyRef"]["name"],
                          "format": spec.get("format", "raw"), "digests": len(spec["digests"]),
                          "reason": spec.get("reason", ""), "approvals": status.get("approvalSummary", ""),
                          "waitingFor": status.get("message", ""), "yourApproval": why,
                          "age": _age(request["metadata"].get("creationTimestamp")),
                          **({"images": [f"{d['name']}@sha256:{d['value']}" for d in spec["digests"]]}
                             if spec.get("format") == "cosign" else {})})

    def text() -> str:
        if not found:
            return f"nothing waits for your approval in {', '.join(namespaces) or 'any namespace you can read'}"
        rows = [[f["namespace"], f["name"], f["requester"], f["key"], f["format"], str(f["digests"]), f["approvals"],
                 f["age"], f["reason"], f["waitingFor"]] for f in found]
        images = [f"{f['namespace']}/{f['name']} signs image {image}" for f in found for image in f.get("images", [])]
        return "\n".join([render_table(["NAMESPACE", "NAME", "REQUESTER", "KEY", "FORMAT", "DIGESTS", "APPROVALS",
                                         "AGE", "REASON", "WAITING FOR"], rows), *images])
    emit(found, output, text)
    return OK


@cli.command(context_settings=CONTEXT)
@click.argument("key")
@click.option("--request", "value", help="the annotation value (default: the current time); a repeated value "
                                         "rotates nothing")
@click.option("--wait/--no-wait", default=True, show_default=True, help="wait until the new version is current")
@click.option("--timeout", type=float, default=60, show_default=True, help="seconds to wait")
@with_target
def rotate(key, value, wait, timeout, target) -> int:
    """Generate a new version of SigningKey KEY (platform admins), through the keyroom.dev/rotate annotation."""
    cluster = target.cluster
    keys = "signingkeys"
    before = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, cluster.namespace, keys, key)
    current = (before.get("status") or {}).get("currentVersion")
    value = value or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    patched = cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, keys, key, {"metadata": {"annotations": {ROTATE_ANNOTATION: value}}})
    _note(f"{key}: rotation requested ({ROTATE_ANNOTATION}={value}); current version {current}")
    if not wait:
        return OK
    for body in _versions(cluster, patched, time.monotonic() + timeout, plural=keys):
        status = body.get("status") or {}
        if status.get("lastRotationRequest") == value and status.get("currentVersion") != current:
            print(f"{key}: version {status['currentVersion']} is current; version {current} is disabled")
            return OK
    _note(f"{key}: no new version within {timeout:.0f}s; `kubectl get sk {key}` shows why")
    return USAGE_OR_TIMEOUT


COMPLETE_VAR = "_KUBECTL_KEYROOM_COMPLETE"


@cli.command(context_settings=CONTEXT)
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell) -> int:
    """Print the shell completion script for kubectl-keyroom.

    \b
    bash:  source <(kubectl-keyroom completion bash)
    zsh:   source <(kubectl-keyroom completion zsh)
    fish:  kubectl-keyroom completion fish | source
    `kubectl keyroom <TAB>` (kubectl 1.26+) uses the kubectl_complete-keyroom command installed beside it.
    """
    from click.shell_completion import get_completion_class

    print(get_completion_class(shell)(cli, {}, "kubectl-keyroom", COMPLETE_VAR).source())
    return OK


def _register() -> None:
    from keyroom.cli import admin, apksigner, images, offline

    for command in (offline.export, offline.verify, images.sign_image, images.verify_image, apksigner.apksigner,
                    admin.keys, admin.access, admin.audit, admin.report):
        cli.add_command(command)


_register()


def main(argv: list[str] | None = None) -> int:
    try:
        result = cli.main(args=argv, prog_name="kubectl keyroom", standalone_mode=False, complete_var=COMPLETE_VAR)
    except click.exceptions.ClickException as error:
        error.show()
        return error.exit_code
    except click.exceptions.Abort:
        return INTERRUPTED
    except CliError as error:
        _note(f"error: {error}")
    except kubernetes.client.ApiException as error:
        _note(f"error: {api_error(error)}")
    except (OSError, kubernetes.config.ConfigException) as error:
        _note(f"error: {error}")
    except Exception as error:  # urllib3 connection errors and the like
        if type(error).__module__.startswith("urllib3"):
            host = kubernetes.client.Configuration.get_default_copy().host
            _note(f"error: cannot reach the API server at {host}: {getattr(error, 'reason', None) or error}; "
                  "check --kubeconfig and --context")
        else:
            raise
    else:
        return result if isinstance(result, int) else OK
    return ERROR


def complete_for_kubectl(argv: list[str] | None = None) -> int:
    """``kubectl_complete-keyroom``: the completions kubectl asks a plugin for (``kubectl keyroom <TAB>``).

    kubectl passes the words after ``keyroom``, the last being the one to
    complete, and reads candidates one per line followed by a Cobra directive
    (``:4``, no file completion, or ``:0`` when files may follow).
    """
    from click.shell_completion import ShellComplete

    words = list(sys.argv[1:] if argv is None else argv)
    incomplete = words.pop() if words else ""
    items = ShellComplete(cli, {}, "kubectl keyroom", COMPLETE_VAR).get_completions(words, incomplete)
    for item in items:
        if item.type == "plain":
            print(item.value)
    print(":0" if any(item.type in ("file", "dir") for item in items) else ":4")
    return OK


if __name__ == "__main__":
    sys.exit(main())

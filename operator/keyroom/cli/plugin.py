"""``kubectl keyroom``: sign files, approve, deny and attest SignRequests, and read them, from the command line.

Installed as the ``kubectl-keyroom`` console script, so kubectl finds it as a
plugin. Files are hashed locally; only their digests travel. The caller's
identity comes from a SelfSubjectReview (what ``kubectl auth whoami`` shows),
so the requester, each approval and each build attestation carry exactly what
the API server's admission policy expects.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import os
import pathlib
import sys
import time
from typing import Any, Iterable, Iterator

import kubernetes

from keyroom import policy
from keyroom.cli import jar, pe
from keyroom.signer.formats import FormatError
from keyroom.signer.formats import jar as jar_format

GROUP, VERSION, PLURAL = "keyroom.dev", "v1alpha1", "signrequests"
ROTATE_ANNOTATION = f"{GROUP}/rotate"
FINAL = ("Signed", "Denied", "Expired", "Failed")
MAX_FILES = 500


class CliError(Exception):
    """An expected failure: printed as one line, exit status 1."""


# ---------------------------------------------------------------- pure parts

def file_digest(path: pathlib.Path, algorithm: str = "SHA256") -> str:
    digest = hashlib.new(algorithm.lower())
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


#: what each format writes: a signature file beside the input (suffix), or a signed copy of the input
FORMAT_OUTPUTS = {"raw": ".sig", "cms": ".p7s", "sigstore": ".sigstore.json", "authenticode": None, "jar": None}


def format_digest(path: pathlib.Path, fmt: str, algorithm: str) -> tuple[str, bytes | None]:
    """(the digest the request carries for ``path`` in ``fmt``, the JAR manifest for jar)."""
    try:
        if fmt == "authenticode":
            return pe.authenticode_digest(path.read_bytes(), algorithm).hex(), None
        if fmt == "jar":
            manifest = jar.manifest(path, algorithm)
            return hashlib.new(algorithm.lower(), manifest).hexdigest(), manifest
    except (pe.PEError, jar.JarError) as error:
        raise CliError(f"{path}: {error}") from None
    return file_digest(path, algorithm), None


def sign_request_body(files: list[pathlib.Path], *, key: str, namespace: str, identity: dict, reason: str = "",
                      algorithm: str = "SHA256", fmt: str = "raw", name: str | None = None,
                      certificate: str | None = None) -> dict:
    """The SignRequest for ``files``: one digest per file, named by its base name.

    authenticode digests are Authenticode digests of PE files; jar signs one
    JAR, whose manifest the request carries (the signer derives what it signs
    from it).
    """
    if not files:
        raise CliError("name at least one file to sign")
    if fmt == "jar" and len(files) != 1:
        raise CliError("format jar signs one JAR per request: run kubectl keyroom sign once per JAR")
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
        value, manifest = format_digest(path, fmt, algorithm)
        digests.append({"name": path.name, "value": value})
    spec = {"keyRef": {"name": key}, "requester": identity, "format": fmt, "digestAlgorithm": algorithm,
            "digests": digests}
    if manifest is not None:
        spec["manifest"] = base64.b64encode(manifest).decode()
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
        else:
            path.write_bytes(signature)
    except (pe.PEError, jar.JarError, FormatError) as error:
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
    lines.append(f"  digests ({spec.get('digestAlgorithm', 'SHA256')}):")
    for digest in spec["digests"]:
        lines.append(f"    {digest['name']}  {digest['value']}" + ("  signed" if digest["name"] in signed else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------- the API

class Cluster:
    def __init__(self, args: argparse.Namespace) -> None:
        default_namespace = _load_config(args.kubeconfig, args.context)
        self.namespace = args.namespace or default_namespace
        self.custom = kubernetes.client.CustomObjectsApi()
        self.auth = kubernetes.client.AuthenticationV1Api()

    def whoami(self) -> dict:
        review = self.auth.create_self_subject_review(kubernetes.client.V1SelfSubjectReview())
        user = review.status.user_info
        return {"username": user.username, "groups": list(user.groups or [])}

    def get(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)


_SERVICE_ACCOUNT = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount")


def _load_config(kubeconfig: str | None, context: str | None) -> str:
    """Load the kubeconfig (or, inside a pod without one, the pod's own credentials); return the default namespace."""
    try:
        kubernetes.config.load_kube_config(config_file=kubeconfig, context=context)
    except kubernetes.config.ConfigException as error:
        if kubeconfig or context or not (_SERVICE_ACCOUNT / "token").exists():
            where = kubeconfig or "$KUBECONFIG or ~/.kube/config"
            raise CliError(f"cannot load a kubeconfig from {where}: {error}") from None
        kubernetes.config.load_incluster_config()
        return (_SERVICE_ACCOUNT / "namespace").read_text().strip()
    contexts, active = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
    chosen = next((c for c in contexts if c["name"] == context), active) if context else active
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"


def _api_error(error: kubernetes.client.ApiException) -> CliError:
    try:
        message = json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        message = error.reason
    return CliError(message)


def _note(message: str) -> None:
    print(message, file=sys.stderr)


# ---------------------------------------------------------------- verbs

def _versions(cluster: Cluster, body: dict, deadline: float) -> Iterator[dict]:
    """``body``, then each later version of it as the API server's watch delivers them, until ``deadline``."""
    yield body
    name, version = body["metadata"]["name"], body["metadata"]["resourceVersion"]
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            for event in kubernetes.watch.Watch().stream(
                    cluster.custom.list_namespaced_custom_object, GROUP, VERSION, cluster.namespace, PLURAL,
                    field_selector=f"metadata.name={name}", resource_version=version,
                    timeout_seconds=max(1, min(int(remaining), 60))):
                if event["type"] == "DELETED":
                    raise CliError(f"{name} was deleted while waiting for it")
                body, version = event["object"], event["object"]["metadata"]["resourceVersion"]
                yield body
        except kubernetes.client.ApiException as error:
            if error.status != 410:  # 410: the watch fell behind; reading again catches up
                raise
            body = cluster.get(name)
            version = body["metadata"]["resourceVersion"]
            yield body


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


def cmd_sign(cluster: Cluster, args: argparse.Namespace) -> int:
    files = [pathlib.Path(f) for f in args.files]
    for path in files:
        if not path.is_file():
            raise CliError(f"{path} is not a readable file")
    paths = signature_paths(files, pathlib.Path(args.out) if args.out else None, args.format, args.in_place)
    body = sign_request_body(files, key=args.key, namespace=cluster.namespace, identity=cluster.whoami(),
                             reason=args.reason, algorithm=args.digest, fmt=args.format, name=args.name,
                             certificate=args.certificate)
    created = cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, body)
    name = created["metadata"]["name"]
    print(name)
    if not args.wait:
        return 0
    try:
        body = wait_final(cluster, created, args.timeout)
    except (TimeoutError, KeyboardInterrupt) as stopped:
        when = "now" if isinstance(stopped, KeyboardInterrupt) else f"after {args.timeout:.0f}s"
        _note(f"stopped waiting {when}; {name} stays, check it with: "
              f"kubectl keyroom status {name} -n {cluster.namespace}")
        return 2 if isinstance(stopped, TimeoutError) else 130
    status = body["status"]
    if status["phase"] != "Signed":
        _note(f"{name}: {status['phase']}: {status.get('message', '')}")
        return 1
    manifest = base64.b64decode(body["spec"]["manifest"]) if body["spec"].get("manifest") else None
    sources = {f.name: f for f in files}
    for signature in status["signatures"]:
        path = paths[signature["name"]]
        write_output(args.format, sources[signature["name"]], path, base64.b64decode(signature["value"]),
                     algorithm=args.digest, manifest=manifest, replace=args.in_place)
        print(path)
    return 0


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


def cmd_decide(cluster: Cluster, args: argparse.Namespace, decision: str) -> int:
    identity = cluster.whoami()
    entry = {"user": identity["username"], "groups": identity["groups"], "decision": decision}
    if args.reason:
        entry["reason"] = args.reason
    append_decision(cluster, args.name, entry)
    summary = ""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # the operator counts it within moments
        status = cluster.get(args.name).get("status") or {}
        mine = [a for a in status.get("approvals") or [] if a["user"] == identity["username"]]
        if mine:
            summary = f" ({status.get('approvalSummary', '')}" + ("" if mine[-1].get("counted") else
                                                                   f"; not counted: {mine[-1].get('reason')}") + ")"
            break
        time.sleep(0.2)
    verb = "approved" if decision == "Approve" else "denied"
    print(f"{verb} {cluster.namespace}/{args.name} as {identity['username']}{summary}")
    return 0


def cmd_attest(cluster: Cluster, args: argparse.Namespace) -> int:
    """Hash the files of one's own build and append them as one's attestation of the request's digests."""
    files = [pathlib.Path(f) for f in args.files]
    for path in files:
        if not path.is_file():
            raise CliError(f"{path} is not a readable file")
    identity = cluster.whoami()
    body = cluster.get(args.name)
    if any(a["user"] == identity["username"] for a in body["spec"].get("attestations") or []):
        raise CliError(f"{identity['username']} already attested {args.name}; a builder attests once")
    entry, difference = attestation(body["spec"], files, identity=identity,
                                    build=args.build if args.build is not None else build_reference(dict(os.environ)))
    append_decision(cluster, args.name, entry, field="attestations", body=body)
    if difference is not None:
        _note(f"error: your build differs from the request's at {difference[0]}: {difference[1]}; "
              f"{args.name} fails (BuildMismatch) and will not be signed")
        return 1
    summary = ""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # the operator counts it within moments
        status = cluster.get(args.name).get("status") or {}
        mine = [b for b in status.get("builds") or [] if b["user"] == identity["username"]]
        if mine:
            summary = f" ({status.get('buildSummary', '')}" + ("" if mine[-1].get("counted") else
                                                                f"; not counted: {mine[-1].get('reason')}") + ")"
            break
        time.sleep(0.2)
    print(f"attested {cluster.namespace}/{args.name} as {identity['username']}: {len(files)} digest(s) match"
          f"{summary}")
    return 0


def cmd_get(cluster: Cluster, args: argparse.Namespace) -> int:
    if args.name:
        items = [cluster.get(args.name)]
    elif args.all_namespaces:
        items = cluster.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
    else:
        items = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL)["items"]
    if not items:
        _note(f"no SignRequests in {'any namespace' if args.all_namespaces else cluster.namespace}")
        return 0
    builds = any((item.get("status") or {}).get("buildSummary") for item in items)  # a column only when in use
    header = ((["NAMESPACE"] if args.all_namespaces else []) + ["NAME", "KEY", "REQUESTER", "APPROVALS"]
              + (["BUILDS"] if builds else []) + ["PHASE", "AGE"])
    rows = [header]
    for item in items:
        status = item.get("status") or {}
        rows.append(([item["metadata"]["namespace"]] if args.all_namespaces else []) + [
            item["metadata"]["name"], item["spec"]["keyRef"]["name"], item["spec"]["requester"]["username"],
            status.get("approvalSummary", "")] + ([status.get("buildSummary", "")] if builds else []) + [
            status.get("phase", ""), _age(item["metadata"].get("creationTimestamp"))])
    print(table(rows))
    return 0


def cmd_status(cluster: Cluster, args: argparse.Namespace) -> int:
    print(describe(cluster.get(args.name)))
    return 0


def cmd_rotate(cluster: Cluster, args: argparse.Namespace) -> int:
    """Ask for a new key version through the keyroom.dev/rotate annotation; wait until the signer made it."""
    keys = "signingkeys"
    before = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, cluster.namespace, keys, args.key)
    current = (before.get("status") or {}).get("currentVersion")
    value = args.request or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, cluster.namespace, keys, args.key,
                                                  {"metadata": {"annotations": {ROTATE_ANNOTATION: value}}})
    _note(f"{args.key}: rotation requested ({ROTATE_ANNOTATION}={value}); current version {current}")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        status = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, cluster.namespace, keys,
                                                             args.key).get("status") or {}
        if status.get("lastRotationRequest") == value and status.get("currentVersion") != current:
            print(f"{args.key}: version {status['currentVersion']} is current; version {current} is disabled")
            return 0
        time.sleep(0.5)
    _note(f"{args.key}: no new version within {args.timeout:.0f}s; `kubectl get sk {args.key}` shows why")
    return 2


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    common.add_argument("--context", help="kubeconfig context")
    common.add_argument("-n", "--namespace", help="the team's namespace (default: the context's)")
    top = argparse.ArgumentParser(prog="kubectl keyroom", description=__doc__.splitlines()[0])
    verbs = top.add_subparsers(dest="verb", required=True)

    sign = verbs.add_parser("sign", parents=[common], help="hash files locally and request their signatures")
    sign.add_argument("files", nargs="+", metavar="FILE")
    sign.add_argument("--key", required=True, help="the SigningKey of the namespace")
    sign.add_argument("--reason", default="", help="shown to approvers, e.g. 'release 1.4.2'")
    sign.add_argument("--digest", default="SHA256", choices=["SHA256", "SHA384", "SHA512"])
    sign.add_argument("--format", default="raw", choices=list(FORMAT_OUTPUTS),
                      help="raw: FILE.sig; cms: FILE.p7s (detached CMS with the certificate chain); authenticode: a "
                           "signed copy of the PE file; jar: a signed copy of the JAR; sigstore: FILE.sigstore.json")
    sign.add_argument("--certificate", help="the Certificate cms, authenticode and jar embed (default: the key "
                                            "version's valid certificate)")
    sign.add_argument("--in-place", action="store_true", help="authenticode, jar: replace the input (and an existing "
                                                              "signature) with the signed file")
    sign.add_argument("--name", help="the SignRequest's name (default: generated from the key's)")
    sign.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                      help="wait for the outcome and write FILE.sig (default)")
    sign.add_argument("--timeout", type=float, default=600, help="seconds to wait (default 600)")
    sign.add_argument("--out", help="write signatures into this directory instead of beside the files")
    sign.set_defaults(run=cmd_sign)

    for verb, decision in (("approve", "Approve"), ("deny", "Deny")):
        sub = verbs.add_parser(verb, parents=[common], help=f"{verb} a SignRequest as yourself")
        sub.add_argument("name")
        sub.add_argument("--reason", default="", required=decision == "Deny", help="why")
        sub.add_argument("--yes", action="store_true", help="accepted for scripts; nothing is asked anyway")
        sub.set_defaults(run=lambda cluster, args, decision=decision: cmd_decide(cluster, args, decision))

    attest = verbs.add_parser("attest", parents=[common],
                              help="hash the files your own build produced and attest them for a SignRequest")
    attest.add_argument("name")
    attest.add_argument("files", nargs="+", metavar="FILE", help="exactly the request's files, from your build")
    attest.add_argument("--build", help="the build that produced them, e.g. the CI run's URL (default: $CI_JOB_URL, "
                                        "or the GitHub Actions run)")
    attest.set_defaults(run=cmd_attest)

    get = verbs.add_parser("get", parents=[common], help="list SignRequests")
    get.add_argument("name", nargs="?")
    get.add_argument("-A", "--all-namespaces", action="store_true")
    get.set_defaults(run=cmd_get)
    rotate = verbs.add_parser("rotate", parents=[common], help="generate a new version of a SigningKey (admins)")
    rotate.add_argument("key")
    rotate.add_argument("--request", help="the annotation value (default: the current time); a repeated value "
                                          "rotates nothing")
    rotate.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                        help="wait until the new version is current (default)")
    rotate.add_argument("--timeout", type=float, default=60, help="seconds to wait (default 60)")
    rotate.set_defaults(run=cmd_rotate)
    status = verbs.add_parser("status", parents=[common], help="everything about one SignRequest")
    status.add_argument("name")
    status.set_defaults(run=cmd_status)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(Cluster(args), args)
    except CliError as error:
        _note(f"error: {error}")
    except kubernetes.client.ApiException as error:
        _note(f"error: {_api_error(error)}")
    except (OSError, kubernetes.config.ConfigException) as error:
        _note(f"error: {error}")
    except Exception as error:  # urllib3 connection errors and the like
        if type(error).__module__.startswith("urllib3"):
            host = kubernetes.client.Configuration.get_default_copy().host
            _note(f"error: cannot reach the API server at {host}: {getattr(error, 'reason', None) or error}")
        else:
            raise
    return 1


if __name__ == "__main__":
    sys.exit(main())

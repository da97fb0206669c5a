"""``kubectl keyroom``: sign files, approve and deny SignRequests, and read them, from the command line.

Installed as the ``kubectl-keyroom`` console script, so kubectl finds it as a
plugin. Files are hashed locally; only their digests travel. The caller's
identity comes from a SelfSubjectReview (what ``kubectl auth whoami`` shows),
so the requester and each approval carry exactly what the API server's
admission policy expects.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import pathlib
import sys
import time
from typing import Any, Iterable

import kubernetes

GROUP, VERSION, PLURAL = "keyroom.dev", "v1alpha1", "signrequests"
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


def sign_request_body(files: list[pathlib.Path], *, key: str, namespace: str, identity: dict, reason: str = "",
                      algorithm: str = "SHA256", fmt: str = "raw", name: str | None = None) -> dict:
    """The SignRequest for ``files``: one digest per file, named by its base name."""
    if not files:
        raise CliError("name at least one file to sign")
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
    spec = {"keyRef": {"name": key}, "requester": identity, "format": fmt, "digestAlgorithm": algorithm,
            "digests": [{"name": f.name, "value": file_digest(f, algorithm)} for f in files]}
    if reason:
        spec["reason"] = reason
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SignRequest", "metadata": metadata, "spec": spec}


def approval_patch(current: list | None, entry: dict) -> list[dict]:
    """A JSON patch appending ``entry``; it fails if someone else appended meanwhile."""
    if current is None:
        return [{"op": "add", "path": "/spec/approvals", "value": [entry]}]
    return [{"op": "test", "path": "/spec/approvals", "value": current},
            {"op": "add", "path": "/spec/approvals/-", "value": entry}]


def signature_paths(files: list[pathlib.Path], out: pathlib.Path | None) -> dict[str, pathlib.Path]:
    """Where each file's signature goes: FILE.sig beside it, or DIR/NAME.sig."""
    return {f.name: (out / f"{f.name}.sig" if out else f.with_name(f"{f.name}.sig")) for f in files}


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
        try:
            if args.kubeconfig or not _in_cluster():
                kubernetes.config.load_kube_config(config_file=args.kubeconfig, context=args.context)
                contexts, active = kubernetes.config.list_kube_config_contexts(config_file=args.kubeconfig)
                chosen = next((c for c in contexts if c["name"] == args.context), active) if args.context else active
                default_namespace = ((chosen or {}).get("context") or {}).get("namespace") or "default"
            else:
                kubernetes.config.load_incluster_config()
                default_namespace = pathlib.Path(_SERVICE_ACCOUNT, "namespace").read_text().strip()
        except (kubernetes.config.ConfigException, OSError) as error:
            raise CliError(f"cannot load a kubeconfig: {error}") from None
        self.namespace = args.namespace or default_namespace
        self.custom = kubernetes.client.CustomObjectsApi()
        self.auth = kubernetes.client.AuthenticationV1Api()

    def whoami(self) -> dict:
        review = self.auth.create_self_subject_review(kubernetes.client.V1SelfSubjectReview())
        user = review.status.user_info
        return {"username": user.username, "groups": list(user.groups or [])}

    def get(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)


_SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def _in_cluster() -> bool:
    return pathlib.Path(_SERVICE_ACCOUNT, "token").exists()


def _api_error(error: kubernetes.client.ApiException) -> CliError:
    try:
        message = json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        message = error.reason
    return CliError(message)


def _note(message: str) -> None:
    print(message, file=sys.stderr)


# ---------------------------------------------------------------- verbs

def wait_final(cluster: Cluster, name: str, timeout: float) -> dict:
    """Watch the request until it is final, printing each new message."""
    deadline, last_message = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        body = cluster.get(name)
        status = body.get("status") or {}
        if status.get("message") and status["message"] != last_message:
            last_message = status["message"]
            _note(f"{name}: {status.get('phase', 'Pending')}: {last_message}")
        if status.get("phase") in FINAL:
            return body
        remaining = max(1, int(deadline - time.monotonic()))
        stream = kubernetes.watch.Watch().stream(
            cluster.custom.list_namespaced_custom_object, GROUP, VERSION, cluster.namespace, PLURAL,
            field_selector=f"metadata.name={name}", resource_version=body["metadata"]["resourceVersion"],
            timeout_seconds=min(remaining, 60))
        for event in stream:
            status = event["object"].get("status") or {}
            if status.get("message") != last_message or status.get("phase") in FINAL:
                break
    raise TimeoutError


def cmd_sign(cluster: Cluster, args: argparse.Namespace) -> int:
    files = [pathlib.Path(f) for f in args.files]
    for path in files:
        if not path.is_file():
            raise CliError(f"{path} is not a readable file")
    body = sign_request_body(files, key=args.key, namespace=cluster.namespace, identity=cluster.whoami(),
                             reason=args.reason, algorithm=args.digest, fmt=args.format, name=args.name)
    created = cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, body)
    name = created["metadata"]["name"]
    print(name)
    if not args.wait:
        return 0
    try:
        body = wait_final(cluster, name, args.timeout)
    except TimeoutError:
        _note(f"{name} is not finished after {args.timeout:.0f}s; it stays, check it with: "
              f"kubectl keyroom status {name} -n {cluster.namespace}")
        return 2
    status = body["status"]
    if status["phase"] != "Signed":
        _note(f"{name}: {status['phase']}: {status.get('message', '')}")
        return 1
    paths = signature_paths(files, pathlib.Path(args.out) if args.out else None)
    for signature in status["signatures"]:
        path = paths[signature["name"]]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(signature["value"]))
        print(path)
    return 0


def cmd_decide(cluster: Cluster, args: argparse.Namespace, decision: str) -> int:
    identity = cluster.whoami()
    entry = {"user": identity["username"], "groups": identity["groups"], "decision": decision}
    if args.reason:
        entry["reason"] = args.reason
    for _ in range(5):
        body = cluster.get(args.name)
        phase = (body.get("status") or {}).get("phase")
        if phase in FINAL:
            raise CliError(f"{args.name} is already {phase}; nothing to {decision.lower()}")
        _note(describe(body))
        try:
            cluster.custom.patch_namespaced_custom_object(
                GROUP, VERSION, cluster.namespace, PLURAL, args.name,
                approval_patch(body["spec"].get("approvals"), entry), _content_type="application/json-patch+json")
            break
        except kubernetes.client.ApiException as error:
            if error.status not in (409, 422) or "test" not in (error.body or ""):
                raise
            _note("someone else decided at the same moment; reading the request again")
    else:
        raise CliError(f"could not append to {args.name}: it keeps changing")
    summary = ""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # the operator counts it within moments
        status = cluster.get(args.name).get("status") or {}
        counted = next((a for a in status.get("approvals") or [] if a["user"] == identity["username"]), None)
        if counted is not None:
            summary = f" ({status.get('approvalSummary', '')}" + ("" if counted.get("counted") else
                                                                   f"; not counted: {counted.get('reason')}") + ")"
            break
        time.sleep(0.2)
    verb = "approved" if decision == "Approve" else "denied"
    print(f"{verb} {cluster.namespace}/{args.name} as {identity['username']}{summary}")
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
    header = (["NAMESPACE"] if args.all_namespaces else []) + ["NAME", "KEY", "REQUESTER", "APPROVALS", "PHASE", "AGE"]
    rows = [header]
    for item in items:
        status = item.get("status") or {}
        rows.append(([item["metadata"]["namespace"]] if args.all_namespaces else []) + [
            item["metadata"]["name"], item["spec"]["keyRef"]["name"], item["spec"]["requester"]["username"],
            status.get("approvalSummary", ""), status.get("phase", ""), _age(item["metadata"].get("creationTimestamp"))])
    print(table(rows))
    return 0


def cmd_status(cluster: Cluster, args: argparse.Namespace) -> int:
    print(describe(cluster.get(args.name)))
    return 0


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
    sign.add_argument("--format", default="raw", choices=["raw", "cms"])
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

    get = verbs.add_parser("get", parents=[common], help="list SignRequests")
    get.add_argument("name", nargs="?")
    get.add_argument("-A", "--all-namespaces", action="store_true")
    get.set_defaults(run=cmd_get)
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
            _note(f"error: cannot reach the API server: {error}")
        else:
            raise
    return 1


if __name__ == "__main__":
    sys.exit(main())

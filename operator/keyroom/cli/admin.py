"""The platform admin's verbs: ``keys``, ``access``, ``audit show``/``audit verify`` and ``report``.

The signer's audit log is a file on the signer's volume, not an API object,
so these verbs read it the way an admin reaches a pod's file: ``kubectl exec``
into the signer's Deployment (``cat`` of the log), or ``--file`` for a copy.
Either way it is verified before anything is shown or counted: its hash chain
(:func:`keyroom.signer.audit.read_entries`) and the checkpoint the signer keeps
outside its volume, in the ConfigMap ``keyroom-audit-checkpoint`` (or one given
with ``--index``/``--hash``), so a truncated or rewritten log is caught.
"""
from __future__ import annotations

import datetime
import os
import pathlib
import shutil
import subprocess
import tempfile

import click
import kubernetes

from keyroom import schedule
from keyroom.cli import access as access_rules
from keyroom.cli import report as reporting
from keyroom.cli.common import (GROUP, NOT_VERIFIED, OK, VERSION, CliError, Target, emit, note, output_option,
                                render_table, with_target)
from keyroom.signer import audit as audit_log

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
SIGNER_NAMESPACE = "keyroom-system"
SIGNER_DEPLOYMENT = "keyroom-signer"
SIGNER_LOG = "/var/lib/keyroom/audit.jsonl"


# ---------------------------------------------------------------- keys

def key_view(body: dict) -> dict:
    """A SigningKey as ``keys`` shows it: versions, online state, next window, rotation and destruction."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    versions = [{"version": v["version"], "state": v.get("state"), "fingerprint": v.get("fingerprint"),
                 "createdAt": v.get("createdAt"), "destroyAt": v.get("destroyAt")}
                for v in status.get("versions") or []]
    return {"namespace": body["metadata"]["namespace"], "name": body["metadata"]["name"],
            "algorithm": spec.get("algorithm"), "usage": spec.get("usage", "Reusable"), "phase": status.get("phase"),
            "currentVersion": status.get("currentVersion"), "versions": versions,
            "online": status.get("online"), "nextWindowAt": status.get("nextWindowAt"),
            "rotationEvery": (spec.get("rotation") or {}).get("every"), "nextRotationAt": status.get("nextRotationAt"),
            "destruction": [{"version": v["version"], "destroyAt": v["destroyAt"]} for v in versions
                            if v.get("destroyAt") and v.get("state") == "PendingDestruction"],
            "signatureCount": status.get("signatureCount", 0)}


def _key_row(view: dict, all_namespaces: bool) -> list:
    versions = ", ".join(f"v{v['version']} {v['state']}" for v in view["versions"])
    destruction = ", ".join(f"v{d['version']} at {d['destroyAt']}" for d in view["destruction"])
    online = {True: "yes", False: "no", None: ""}[view["online"]]
    return ([view["namespace"]] if all_namespaces else []) + [
        view["name"], view["algorithm"], view["phase"] or "", view["currentVersion"] or "", versions, online,
        view["nextWindowAt"] or "", view["nextRotationAt"] or ("-" if not view["rotationEvery"] else ""),
        destruction, view["signatureCount"]]


@click.command(context_settings=CONTEXT)
@click.option("-A", "--all-namespaces", is_flag=True, help="every namespace you may read")
@output_option
@with_target
def keys(all_namespaces, output, target) -> int:
    """SigningKeys: versions, online state, next window, next rotation, destruction schedule."""
    cluster = target.cluster
    items = (cluster.custom.list_cluster_custom_object(GROUP, VERSION, "signingkeys")["items"] if all_namespaces
             else cluster.list("signingkeys"))
    views = [key_view(item) for item in items]

    def text() -> str:
        if not views:
            return f"no SigningKeys in {'any namespace' if all_namespaces else cluster.namespace}"
        header = (["NAMESPACE"] if all_namespaces else []) + ["NAME", "ALGORITHM", "PHASE", "CURRENT", "VERSIONS",
                                                              "ONLINE", "NEXT WINDOW", "NEXT ROTATION",
                                                              "DESTRUCTION", "SIGNATURES"]
        return render_table(header, [_key_row(v, all_namespaces) for v in views])
    emit(views, output, text)
    return OK


# ---------------------------------------------------------------- access

def _bindings(call) -> list[dict] | None:
    try:
        return [kubernetes.client.ApiClient().sanitize_for_serialization(item) for item in call().items]
    except kubernetes.client.ApiException as error:
        if error.status == 403:
            return None
        raise


def access_text(resolved: dict) -> str:
    key = resolved["key"]
    lines = [f"SigningKey {key['namespace']}/{key['name']} ({key['phase'] or 'unknown'}, version "
             f"{key['currentVersion']})"]
    for item in resolved["policies"]:
        lines.append(f"  policy {item['name']}: {item['requiredApprovals']} approval(s)"
                     + (", separation of duties" if item["separationOfDuties"] else "")
                     + (f", {item['matchingBuilds']} matching build(s)" if item["matchingBuilds"] else ""))
    availability = resolved["availability"]
    if availability["online"]:
        lines.append("  online:     yes" + (f", until {availability['until']}" if availability["until"] else ""))
    else:
        lines.append("  online:     no" + (f", next window at {availability['nextWindowAt']}"
                                          if availability["nextWindowAt"] else ", no window ahead"))
    for part, field in (("may request", "requesters"), ("may approve", "approvers"), ("may attest", "builders")):
        rows = resolved[field]
        if not rows and field == "builders":
            continue
        lines.append(f"  {part}:")
        if not rows:
            lines.append("    nobody")
        for row in rows:
            who = f"{row['kind']} {row.get('namespace', '') + '/' if row.get('namespace') else ''}{row['name']}"
            rbac = ("" if "rbac" not in row else
                    f"  [{', '.join(row['boundBy'])}]" if row["rbac"] else "  [NO ROLE BINDING]")
            lines.append(f"    {who}  (policy {', '.join(row['policies'])}){rbac}")
    for problem in resolved["problems"]:
        lines.append(f"  problem: {problem}")
    for text in resolved["notes"]:
        lines.append(f"  note: {text}")
    return "\n".join(lines)


@click.command(context_settings=CONTEXT)
@click.argument("key")
@output_option
@with_target
def access(key, output, target) -> int:
    """Who may request, approve and attest for KEY, how many approvals it needs, and when it is online.

    Resolved from the SigningPolicies that select the key and the RBAC bindings
    (RoleBindings in the namespace, ClusterRoleBindings) to ClusterRoles that
    grant create (request), patch (approve) or attest on SignRequests, read from
    the roles' rules (the shipped keyroom-requester, keyroom-approver,
    keyroom-builder, keyroom-admin, or custom ones), so a misconfiguration
    shows as a problem: e.g. a policy naming an approver group that no binding
    lets approve. Reading bindings needs RBAC read rights (a platform admin's);
    without them the RBAC side is reported as not checked. Exit code 0 even
    when problems are found; -o json lists them under "problems".
    """
    cluster = target.cluster
    body = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "signingkeys", key)
    role_bindings = _bindings(lambda: cluster.rbac.list_namespaced_role_binding(cluster.namespace))
    cluster_role_bindings = _bindings(cluster.rbac.list_cluster_role_binding)
    cluster_roles = _bindings(cluster.rbac.list_cluster_role)
    resolved = access_rules.resolve(key=body, policies=cluster.list("signingpolicies"), role_bindings=role_bindings,
                                    cluster_role_bindings=cluster_role_bindings,
                                    at=datetime.datetime.now(datetime.timezone.utc),
                                    roles=access_rules.granting_roles(cluster_roles) if cluster_roles else None)
    emit(resolved, output, lambda: access_text(resolved))
    return OK


# ---------------------------------------------------------------- the audit log

def _kubectl() -> str:
    found = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if not found:
        raise CliError("kubectl is not on PATH (or $KUBECTL): copy the signer's log and pass it with --file")
    return found


def fetch_log(target: Target, *, file: pathlib.Path | None, signer_namespace: str, signer: str,
              log_path: str, directory: pathlib.Path) -> tuple[pathlib.Path, str]:
    """The log to read: ``file``, or a copy fetched with ``kubectl exec`` into the signer."""
    if file is not None:
        if not file.is_file():
            raise CliError(f"{file} is not a readable file")
        return file, str(file)
    command = [_kubectl()]
    if target.kubeconfig:
        command.append(f"--kubeconfig={target.kubeconfig}")
    if target.context:
        command.append(f"--context={target.context}")
    command += ["-n", signer_namespace, "exec", f"deploy/{signer}", "--", "cat", log_path]
    copy = directory / audit_log.LOG_NAME
    with open(copy, "wb") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.PIPE, text=False, timeout=300)
    if result.returncode != 0:
        raise CliError(f"cannot read the signer's log with `{' '.join(command[1:])}`: "
                       f"{result.stderr.decode(errors='replace').strip()}; an admin with pods/exec in "
                       f"{signer_namespace} can, or copy the log and pass it with --file")
    return copy, f"{signer_namespace}/deploy/{signer}:{log_path}"


def fetch_checkpoint(target: Target, *, index: int | None, entry_hash: str | None, skip: bool,
                     signer_namespace: str) -> tuple[audit_log.Head | None, str]:
    """The checkpoint to verify against: given, skipped on request, or the signer's ConfigMap."""
    if (index is None) != (entry_hash is None):
        raise click.UsageError("--index and --hash go together")
    if index is not None:
        return audit_log.Head(index, entry_hash), "given"
    if skip:
        return None, "skipped (--no-checkpoint): only the hash chain is checked"
    try:
        data = target.cluster.core.read_namespaced_config_map(audit_log.CHECKPOINT_NAME, signer_namespace).data or {}
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            return None, f"none: ConfigMap {signer_namespace}/{audit_log.CHECKPOINT_NAME} does not exist"
        if error.status == 403:
            raise CliError(f"you may not read ConfigMap {signer_namespace}/{audit_log.CHECKPOINT_NAME}; ask an admin "
                           "for its index and entryHash (--index, --hash), or check only the chain with "
                           "--no-checkpoint") from None
        raise
    try:
        return (audit_log.Head(int(data["index"]), str(data["entryHash"])),
                f"ConfigMap {signer_namespace}/{audit_log.CHECKPOINT_NAME}")
    except (KeyError, ValueError):
        raise CliError(f"ConfigMap {signer_namespace}/{audit_log.CHECKPOINT_NAME} holds no index and entryHash: "
                       "it was emptied or edited") from None


def verified_entries(path: pathlib.Path, checkpoint: audit_log.Head | None,
                     checkpoint_source: str) -> tuple[list[dict], dict]:
    """Every entry, after the chain and the checkpoint are verified; AuditError when they are not."""
    entries = list(audit_log.read_entries(path))
    head = audit_log.Head(entries[-1]["index"], entries[-1]["hash"]) if entries else None
    checkpointed = {e["index"]: e["hash"] for e in entries if checkpoint and e["index"] == checkpoint.index}
    if checkpoint is not None or checkpoint_source.startswith("none"):
        audit_log.check_checkpoint(checkpointed, head, checkpoint)
    return entries, {"valid": True, "entries": len(entries),
                     "head": {"index": head.index, "hash": head.hash} if head else None,
                     "checkpoint": {"index": checkpoint.index, "hash": checkpoint.hash} if checkpoint else None,
                     "checkpointSource": checkpoint_source}


def audit_options(function):
    function = click.option("--file", type=click.Path(path_type=pathlib.Path),
                            help="a copy of the signer's audit.jsonl (default: read it with kubectl exec)")(function)
    function = click.option("--signer-namespace", default=SIGNER_NAMESPACE, show_default=True)(function)
    function = click.option("--signer", default=SIGNER_DEPLOYMENT, show_default=True,
                            help="the signer's Deployment")(function)
    function = click.option("--log-path", default=SIGNER_LOG, show_default=True,
                            help="the log's path in the signer's container")(function)
    function = click.option("--index", type=int, help="the checkpointed entry index (instead of the ConfigMap)")(
        function)
    function = click.option("--hash", "entry_hash", help="the checkpointed entry hash, sha256:...")(function)
    function = click.option("--no-checkpoint", is_flag=True,
                            help="check only the hash chain (a truncated or rewritten log then goes unnoticed)")(
        function)
    return function


def _load(target, file, signer_namespace, signer, log_path, index, entry_hash, no_checkpoint, directory):
    checkpoint, source = fetch_checkpoint(target, index=index, entry_hash=entry_hash, skip=no_checkpoint,
                                          signer_namespace=signer_namespace)
    path, where = fetch_log(target, file=file, signer_namespace=signer_namespace, signer=signer,
                            log_path=log_path, directory=directory)
    return path, where, checkpoint, source


@click.group(context_settings=CONTEXT)
def audit() -> None:
    """The signer's hash-chained audit log: show entries, verify it against its checkpoint (admins)."""


@audit.command(name="verify", context_settings=CONTEXT)
@audit_options
@output_option
@with_target
def audit_verify(file, signer_namespace, signer, log_path, index, entry_hash, no_checkpoint, output, target) -> int:
    """Verify the signer's log: every entry chained to the one before, and the checkpointed entry still in it.

    Exit code 0 when valid, 3 when not (edited, cut, reordered, truncated or
    rewritten), 1 when the log or checkpoint cannot be read.
    """
    with tempfile.TemporaryDirectory(prefix="keyroom-audit-") as directory:
        path, where, checkpoint, source = _load(target, file, signer_namespace, signer, log_path, index, entry_hash,
                                                no_checkpoint, pathlib.Path(directory))
        try:
            _, result = verified_entries(path, checkpoint, source)
        except audit_log.AuditError as error:
            emit({"valid": False, "log": where, "checkpointSource": source, "error": str(error)}, output,
                 lambda: None)
            note(f"audit log INVALID: {where}: {error}")
            return NOT_VERIFIED
    result["log"] = where

    def text() -> str:
        head = result["head"]
        line = f"audit log valid: {where}: {result['entries']} entries"
        if head:
            line += f", head {head['index']} {head['hash']}"
        if checkpoint is not None:
            line += f"; checkpoint {checkpoint.index} ({source}) is in the log with its hash"
        else:
            line += f"; checkpoint: {source}"
        return line
    emit(result, output, text)
    return OK


@audit.command(name="show", context_settings=CONTEXT)
@audit_options
@click.option("--event", "events", multiple=True, help="only these events (Intent, Signed, Refused, ...)")
@click.option("--key", help="only entries of this key")
@click.option("--request", help="only entries of this SignRequest")
@click.option("--since", help="only entries since: a duration (24h, 7d) or an RFC 3339 time")
@click.option("--last", type=int, help="only the last N entries (after the filters)")
@output_option
@with_target
def audit_show(file, signer_namespace, signer, log_path, index, entry_hash, no_checkpoint, events, key, request,
               since, last, output, target) -> int:
    """Show the signer's log entries (verified first); -n NAMESPACE shows one team's."""
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        since_at = reporting.parse_moment(since, now) if since else None
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--since") from None
    with tempfile.TemporaryDirectory(prefix="keyroom-audit-") as directory:
        path, where, checkpoint, source = _load(target, file, signer_namespace, signer, log_path, index, entry_hash,
                                                no_checkpoint, pathlib.Path(directory))
        try:
            entries, _ = verified_entries(path, checkpoint, source)
        except audit_log.AuditError as error:
            note(f"audit log INVALID: {where}: {error}; nothing is shown from a log that does not verify")
            return NOT_VERIFIED
    chosen = [e for e in entries if reporting.matches(e, namespace=target.namespace, key=key, request=request,
                                                      events=events, since=since_at)]
    if last:
        chosen = chosen[-last:]

    def text() -> str:
        rows = [[e["index"], e["time"][:19] + "Z", e["event"], reporting.summary(e)] for e in chosen]
        return render_table(["INDEX", "TIME", "EVENT", "WHAT"], rows) if rows else "no entries match"
    emit(chosen, output, text)
    return OK


@click.command(context_settings=CONTEXT)
@audit_options
@click.option("--since", default="30d", show_default=True, help="a duration (30d) or an RFC 3339 time")
@click.option("--until", default=None, help="an RFC 3339 time (default: now)")
@output_option
@with_target
def report(file, signer_namespace, signer, log_path, index, entry_hash, no_checkpoint, since, until, output,
           target) -> int:
    """Signatures per team, key and requester over a period, from the signer's verified audit log.

    Counts completed signings (an Intent followed by its Signed entry);
    -n NAMESPACE limits it to one team. -o json for compliance tooling.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        since_at = reporting.parse_moment(since, now)
        until_at = schedule.parse_time(until) if until else now
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    with tempfile.TemporaryDirectory(prefix="keyroom-audit-") as directory:
        path, where, checkpoint, source = _load(target, file, signer_namespace, signer, log_path, index, entry_hash,
                                                no_checkpoint, pathlib.Path(directory))
        try:
            entries, verified = verified_entries(path, checkpoint, source)
        except audit_log.AuditError as error:
            note(f"audit log INVALID: {where}: {error}; no report from a log that does not verify")
            return NOT_VERIFIED
    found = [s for s in reporting.signings(entries) if not target.namespace or s["namespace"] == target.namespace]
    result = reporting.aggregate(found, since=since_at, until=until_at)
    result["log"] = {"source": where, "entries": verified["entries"], "checkpointSource": source}

    def text() -> str:
        period, total = result["period"], result["total"]
        lines = [f"signatures {period['since']} .. {period['until']}: {total['signatures']} in {total['requests']} "
                 f"request(s) (log {where}, verified; checkpoint: {source})", ""]
        for title, field, columns in (("per team", "byTeam", ["namespace"]),
                                      ("per key", "byKey", ["namespace", "key"]),
                                      ("per requester", "byRequester", ["namespace", "requester"])):
            lines.append(title)
            rows = [[row[c] for c in columns] + [row["requests"], row["signatures"]] for row in result[field]]
            lines.append(render_table([c.upper() for c in columns] + ["REQUESTS", "SIGNATURES"], rows)
                         if rows else "  none")
            lines.append("")
        return "\n".join(lines).rstrip()
    emit(result, output, text)
    return OK

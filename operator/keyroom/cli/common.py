"""What every verb of ``kubectl keyroom`` shares: the connection, errors, exit codes and output.

Exit codes are part of the plugin's interface (scripts and CI branch on them)
and never change meaning:

== ==========================================================================
0  done (signed, approved, verified, valid, listed)
1  an error: refused by the API server, not found, bad input, or a request
   that ended Denied, Expired or Failed
2  a usage error (a missing or unknown option), or ``--wait`` stopped at its
   ``--timeout`` (the request stays and can be followed with ``status``)
3  not verified: a signature, certificate chain or audit log does not check out
130 interrupted (Ctrl-C); a request already created stays
== ==========================================================================

Output is text for people, and ``-o json``/``-o yaml`` for scripts wherever a
verb prints data: the same fields, documented in docs/reference/kubectl-keyroom.md.
Messages about progress and errors go to stderr, data to stdout.
"""
from __future__ import annotations

import functools
import io
import json
import pathlib
import sys
from typing import Any, Callable, Sequence

import click
import kubernetes
import yaml

OK, ERROR, USAGE_OR_TIMEOUT, NOT_VERIFIED, INTERRUPTED = 0, 1, 2, 3, 130
GROUP, VERSION = "keyroom.dev", "v1alpha1"


class CliError(Exception):
    """An expected failure: printed as one line, exit status 1."""


def note(message: str) -> None:
    print(message, file=sys.stderr)


# ---------------------------------------------------------------- the API

class Cluster:
    def __init__(self, args) -> None:
        default_namespace = _load_config(args.kubeconfig, args.context)
        self.kubeconfig, self.context = args.kubeconfig, args.context
        self.namespace = args.namespace or default_namespace
        self.custom = kubernetes.client.CustomObjectsApi()
        self.auth = kubernetes.client.AuthenticationV1Api()
        self.core = kubernetes.client.CoreV1Api()
        self.rbac = kubernetes.client.RbacAuthorizationV1Api()
        self.authorization = kubernetes.client.AuthorizationV1Api()

    def whoami(self) -> dict:
        review = self.auth.create_self_subject_review(kubernetes.client.V1SelfSubjectReview())
        user = review.status.user_info
        return {"username": user.username, "groups": list(user.groups or [])}

    def get(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "signrequests", name)

    def list(self, plural: str, namespace: str | None = None) -> list[dict]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace or self.namespace,
                                                         plural)["items"]


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


def api_error(error: kubernetes.client.ApiException) -> CliError:
    """The API server's own message, plus what to do next where that is clear."""
    try:
        message = json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        message = error.reason
    if error.status == 401:
        message += "; the API server does not accept your credentials: log in again or check --kubeconfig"
    elif error.status == 403:
        message += "; `kubectl keyroom whoami` shows what you may do here"
    return CliError(message)


class Target:
    """Where a verb connects: the kubeconfig, context and namespace given, connected on first use."""

    def __init__(self, kubeconfig: str | None, context: str | None, namespace: str | None) -> None:
        self.kubeconfig, self.context, self.namespace = kubeconfig, context, namespace
        self._cluster: Cluster | None = None

    @property
    def cluster(self) -> Cluster:
        if self._cluster is None:
            self._cluster = Cluster(self)
        return self._cluster


def with_target(function: Callable) -> Callable:
    """The options every verb that talks to the API server takes; passes ``target`` instead."""
    @click.option("--kubeconfig", metavar="FILE", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    @click.option("--context", help="kubeconfig context")
    @click.option("-n", "--namespace", help="the team's namespace (default: the context's)")
    @functools.wraps(function)
    def wrapper(*args, kubeconfig, context, namespace, **kwargs):
        return function(*args, target=Target(kubeconfig, context, namespace), **kwargs)
    return wrapper


output_option = click.option("-o", "--output", type=click.Choice(["text", "json", "yaml"]), default="text",
                             show_default=True, help="text for people; json or yaml for scripts")


# ---------------------------------------------------------------- output

def emit(data: Any, output: str, text: Callable[[], str | None]) -> None:
    """``data`` as JSON or YAML, or what ``text`` renders for people."""
    if output == "json":
        print(json.dumps(data, indent=2, default=str))
    elif output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), end="")
    else:
        rendered = text()
        if rendered:
            print(rendered)


def render_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A table with rich: aligned columns, never wrapped when piped (a terminal gets its width)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for name in header:
        table.add_column(name, no_wrap=True, overflow="ignore")
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    terminal = sys.stdout.isatty()
    console = Console(file=io.StringIO(), width=None if terminal else 10_000, force_terminal=terminal,
                      no_color=not terminal, highlight=False)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


def progress(total_bytes: int, files: int):
    """A progress bar on stderr for hashing, when a person watches (a terminal) and it is worth showing."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    shown = console.is_terminal and (files >= 20 or total_bytes >= 64 << 20)
    return Progress(TextColumn("hashing {task.fields[current]}"), BarColumn(), DownloadColumn(),
                    TimeRemainingColumn(), console=console, transient=True, disable=not shown)

"""A real Kubernetes control plane as local processes (an "envtest").

``up`` starts etcd, kube-apiserver (TLS, RBAC, ValidatingAdmissionPolicy,
ServiceAccount token issuance) and kube-controller-manager (garbage collection,
namespace deletion) on free loopback ports, installs keyroom's CRDs, admission
policy and roles, creates the fixture identities and team namespaces, and
writes one kubeconfig per identity into the state directory. ``down`` stops
every process that ``up`` recorded in the state directory and nothing else.

With ``node=True`` the API server also listens on the host's address and
publishes it as the ``kubernetes`` Service, authorizes kubelets with the Node
authorizer, the controller manager runs every default controller (Deployments,
EndpointSlices, PersistentVolume binding, the ``kube-root-ca.crt`` publisher,
...), and a local node (:mod:`keyroom.devenv.node`) joins, so that pods run.

The state directory is the whole environment: ``state.json`` (what runs where),
``pki/``, ``etcd/``, ``logs/`` and the kubeconfigs. Tests, ``make dev`` and
people all go through these two functions.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from typing import TYPE_CHECKING, Callable, Iterable

import yaml

from keyroom.devenv import binaries as binaries_module
from keyroom.devenv import fixtures, pki, prerequisites
from keyroom.signer.client import SIGNER_AUDIENCE

if TYPE_CHECKING:
    from keyroom.devenv.node import NodeInfo

STATE_FILE = "state.json"
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 10.0

Log = Callable[[str], None]


class DevEnvError(RuntimeError):
    """The local control plane cannot start or stop; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Environment:
    """A running local control plane, as recorded in its state directory."""

    state_dir: pathlib.Path
    server: str
    kubectl: pathlib.Path
    signer_url: str | None = None
    node: NodeInfo | None = None

    def kubeconfig(self, identity: str = "admin") -> pathlib.Path:
        name = "kubeconfig" if identity == "admin" else f"kubeconfig-{identity}"
        return self.state_dir / name

    def run_kubectl(self, *args: str, identity: str = "admin", input: str | None = None,
                    check: bool = True) -> subprocess.CompletedProcess:
        """Run kubectl as one of the fixture identities."""
        result = subprocess.run(
            [str(self.kubectl), f"--kubeconfig={self.kubeconfig(identity)}", *args],
            input=input, capture_output=True, text=True,
        )
        if check and result.returncode != 0:
            raise DevEnvError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result


# ---------------------------------------------------------------- state file

def _read_state(state_dir: pathlib.Path) -> dict | None:
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _write_state(state_dir: pathlib.Path, state: dict) -> None:
    temporary = state_dir / (STATE_FILE + ".tmp")
    temporary.write_text(json.dumps(state, indent=2))
    os.replace(temporary, state_dir / STATE_FILE)


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process from /proc, or None when it is gone."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], fields[19]


def _alive(process: dict) -> bool:
    """Is the recorded process still running, and still the one we started (not a recycled pid)?"""
    stat = _proc_stat(process["pid"])
    return stat is not None and stat[0] != "Z" and stat[1] == process["started"]


def load(state_dir: pathlib.Path) -> Environment:
    """The environment recorded in ``state_dir``; raises if it is not running."""
    state = _read_state(state_dir)
    if state is None or not state.get("ready"):
        raise DevEnvError(f"no local control plane is running in {state_dir}; "
                          f"start one with: python -m keyroom.devenv up --state-dir {state_dir}")
    node = None
    if state.get("node", {}).get("ready"):
        from keyroom.devenv.node import NodeInfo

        node = NodeInfo.from_state(state["node"])
    return Environment(state_dir=state_dir, server=state["server"], kubectl=pathlib.Path(state["kubectl"]),
                       signer_url=state.get("signer_url"), node=node)


# ---------------------------------------------------------------- processes

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(path: pathlib.Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class _Supervisor:
    """Starts processes for one state directory and records each in state.json at once,
    so that ``down`` can stop whatever a failed ``up`` left behind."""

    def __init__(self, state_dir: pathlib.Path, state: dict) -> None:
        self.state_dir = state_dir
        self.state = state
        self.logs = state_dir / "logs"
        self.logs.mkdir(exist_ok=True)

    def spawn(self, name: str, argv: list[str], *, env: dict | None = None) -> subprocess.Popen:
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env, cwd=self.state_dir,
            )
        # The start time tells our process apart from a later one that reuses the pid.
        stat = _proc_stat(process.pid)
        self.state["processes"][name] = {"pid": process.pid, "started": stat[1] if stat else "",
                                         "log": str(log_path)}
        if env is None:
            # what restart_process runs again; a process given its own environment (the operator, the signer:
            # tokens, the PIN's path) is recorded without it and is started again by its own function
            self.state["processes"][name]["argv"] = list(argv)
        _write_state(self.state_dir, self.state)
        return process

    def wait_until(self, name: str, process: subprocess.Popen, check: Callable[[], bool], *,
                   what: str, timeout: float = _START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise DevEnvError(f"{name} exited with code {process.returncode} before {what}. "
                                  f"Last lines of {self.logs / (name + '.log')}:\n"
                                  f"{_log_tail(self.logs / (name + '.log'))}")
            with contextlib.suppress(Exception):
                if check():
                    return
            time.sleep(0.1)
        raise DevEnvError(f"{name} did not become {what} within {timeout:.0f}s. "
                          f"Last lines of its log:\n{_log_tail(self.logs / (name + '.log'))}")


def _gone(process: dict) -> bool:
    """Whether the recorded process ended within the stop timeout (reaping it if it is our child)."""
    deadline = time.monotonic() + _STOP_TIMEOUT
    while _alive(process) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(process["pid"], os.WNOHANG)
        time.sleep(0.05)
    return not _alive(process)


def _stop_processes(processes: dict[str, dict], log: Log) -> None:
    # Reverse start order: the operator before the API server before etcd.
    for name in reversed(list(processes)):
        process = processes[name]
        if not _alive(process):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process["pid"], signal.SIGTERM)
        if not _gone(process):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process["pid"], signal.SIGKILL)
            log(f"{name} (pid {process['pid']}) did not stop within {_STOP_TIMEOUT:.0f}s; killed it")
        with contextlib.suppress(ChildProcessError):
            os.waitpid(process["pid"], os.WNOHANG)


# ---------------------------------------------------------------- kubeconfigs

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_kubeconfig(path: pathlib.Path, *, server: str, ca_pem: bytes, user: str,
                     client: pki.Issued | None = None, token: str | None = None) -> None:
    credentials: dict = {}
    if client is not None:
        credentials = {"client-certificate-data": _b64(client.cert_pem), "client-key-data": _b64(client.key_pem)}
    if token is not None:
        credentials = {"token": token}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "keyroom-dev", "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": {"cluster": "keyroom-dev", "user": user}}],
        "current-context": user,
    }
    pki.write_secret(path, yaml.safe_dump(config, sort_keys=False).encode())


# ---------------------------------------------------------------- up / down

def _check_state_dir(state_dir: pathlib.Path) -> None:
    state = _read_state(state_dir)
    if state is None:
        if state_dir.exists() and any(state_dir.iterdir()):
            raise DevEnvError(f"{state_dir} is not empty and holds no keyroom environment; "
                              "pick an empty or new directory")
        return
    running = [name for name, process in state.get("processes", {}).items() if _alive(process)]
    if running:
        raise DevEnvError(f"a local control plane already runs in {state_dir} ({', '.join(running)}); "
                          f"use it, or stop it first: python -m keyroom.devenv down --state-dir {state_dir}")
    raise DevEnvError(f"{state_dir} holds a stopped environment from an earlier run; clear it with: "
                      f"python -m keyroom.devenv down --state-dir {state_dir}")


def up(state_dir: pathlib.Path, *, operator: bool = True, signer: bool = True, node: bool = False,
       log: Log = print) -> Environment:
    """Start the local control plane in ``state_dir`` and return it once it is ready; with ``node``, also
    a local node, and return once that node is Ready."""
    state_dir = state_dir.resolve()
    _check_state_dir(state_dir)
    missing = prerequisites.problems(signer=signer)
    if missing:
        raise DevEnvError("\n".join(missing))
    found = binaries_module.ensure(log=log)
    node_ip = None
    if node:
        from keyroom.devenv import node as node_module
        from keyroom.devenv import pause

        node_module.check_host()
        node_module.check_no_other_node(state_dir)
        node_ip = node_module.host_ip()
        binaries_module.ensure_node(log=log)  # built before anything starts: a first build takes minutes
        pause.ensure_image(log=log)
    started = time.monotonic()
    state_dir.mkdir(parents=True, exist_ok=True)
    state: dict = {"processes": {}, "ready": False, "kubectl": str(found.kubectl)}
    _write_state(state_dir, state)
    supervisor = _Supervisor(state_dir, state)
    try:
        environment = _start(supervisor, found, operator=operator, signer=signer, node_ip=node_ip, log=log)
    except BaseException:
        if state.get("node"):
            from keyroom.devenv import node as node_module

            node_module.teardown(state_dir, state, log)
        _stop_processes(state["processes"], log)
        raise
    state.update(ready=True, server=environment.server, signer_url=environment.signer_url)
    if environment.node is not None:
        state["node"]["ready"] = True
    _write_state(state_dir, state)
    log(f"local control plane up in {time.monotonic() - started:.1f}s (Kubernetes "
        f"{binaries_module.pinned_versions()['kubernetes']}, state in {state_dir})")
    return environment


def _start(supervisor: _Supervisor, found: binaries_module.Binaries, *, operator: bool, signer: bool,
           node_ip: str | None, log: Log) -> Environment:
    state_dir = supervisor.state_dir
    pki_dir = state_dir / "pki"
    pki_dir.mkdir(exist_ok=True)
    ca = pki.CertificateAuthority()
    (pki_dir / "ca.crt").write_bytes(ca.cert_pem)
    hosts = ("127.0.0.1", "localhost", "kubernetes.default.svc")
    if node_ip:
        from keyroom.devenv import node as node_module

        hosts += (node_ip, node_module.KUBERNETES_SERVICE_IP, "kubernetes", "kubernetes.default",
                  f"kubernetes.default.svc.{node_module.CLUSTER_DOMAIN}")
        node_module.issue_control_plane_certificates(ca, pki_dir)
    serving = ca.issue(common_name="kube-apiserver", server_hosts=hosts)
    (pki_dir / "apiserver.crt").write_bytes(serving.cert_pem)
    pki.write_secret(pki_dir / "apiserver.key", serving.key_pem)
    sa_private, sa_public = pki.write_service_account_key_pair(pki_dir)

    etcd_port, etcd_peer_port, api_port, kcm_port = (_free_port() for _ in range(4))
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    etcd = supervisor.spawn("etcd", [
        str(found.etcd), "--name=keyroom-dev", f"--data-dir={state_dir / 'etcd'}",
        f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
        f"--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}",
        f"--initial-cluster=keyroom-dev=http://127.0.0.1:{etcd_peer_port}",
        "--unsafe-no-fsync=true", "--log-level=warn",
    ])
    supervisor.wait_until("etcd", etcd, lambda: urllib.request.urlopen(f"{etcd_url}/health", timeout=1).status == 200,
                          what="healthy")

    server = f"https://127.0.0.1:{api_port}"
    admin = ca.issue(common_name="keyroom-admin", organizations=("system:masters",))
    write_kubeconfig(state_dir / "kubeconfig", server=server, ca_pem=ca.cert_pem, user="admin", client=admin)
    if node_ip:
        # Pods reach the API server on the host's address, through the kubernetes Service; kubelets are
        # authorized as nodes, and the API server calls theirs (logs, exec) with its own client certificate.
        addresses = ["--bind-address=0.0.0.0", f"--advertise-address={node_ip}"]
        authorization = ["--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
                         f"--kubelet-client-certificate={pki_dir / 'apiserver-kubelet-client.crt'}",
                         f"--kubelet-client-key={pki_dir / 'apiserver-kubelet-client.key'}",
                         f"--kubelet-certificate-authority={pki_dir / 'ca.crt'}",
                         "--kubelet-preferred-address-types=InternalIP,Hostname"]
    else:
        addresses = ["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                     "--endpoint-reconciler-type=none"]  # loopback may not be published as the kubernetes Service
        authorization = ["--authorization-mode=RBAC"]
    apiserver = supervisor.spawn("kube-apiserver", [
        str(found.kube_apiserver),
        f"--etcd-servers={etcd_url}", f"--etcd-prefix=/keyroom-{api_port}",
        *addresses, f"--secure-port={api_port}",
        f"--tls-cert-file={pki_dir / 'apiserver.crt'}", f"--tls-private-key-file={pki_dir / 'apiserver.key'}",
        f"--client-ca-file={pki_dir / 'ca.crt'}",
        *authorization,
        f"--service-account-issuer={server}", f"--service-account-key-file={sa_public}",
        f"--service-account-signing-key-file={sa_private}", "--api-audiences=" + server,
        "--service-account-max-token-expiration=48h",
        "--service-cluster-ip-range=10.0.0.0/24", "--allow-privileged=false",
        "--enable-priority-and-fairness=false", "--v=1",
        # SO_REUSEADDR: a restarted API server (restart_process) binds its port at once, not after the kernel
        # released the killed one's connections (FIN-WAIT-2 while a client holds its end open, then TIME-WAIT)
        "--permit-address-sharing",
    ])
    context = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
    with _temporary_pem(pki_dir, admin) as (cert_file, key_file):
        context.load_cert_chain(cert_file, key_file)
    supervisor.wait_until("kube-apiserver", apiserver,
                          lambda: urllib.request.urlopen(f"{server}/readyz", context=context, timeout=2).status == 200,
                          what="ready")

    if node_ip:
        # what pods need: Deployments and ReplicaSets, EndpointSlices, PersistentVolume binding,
        # kube-root-ca.crt in every namespace, the node lifecycle (the not-ready taint), ...
        controllers = ["--controllers=*", f"--root-ca-file={pki_dir / 'ca.crt'}"]
    else:
        # clusterrole-aggregation fills the built-in admin/edit/view roles, as in any real cluster (RBAC tests
        # check that keyroom's roles are not aggregated into them)
        controllers = ["--controllers=garbagecollector,namespace,serviceaccount,clusterrole-aggregation-controller"]
    kcm = supervisor.spawn("kube-controller-manager", [
        str(found.kube_controller_manager), f"--kubeconfig={state_dir / 'kubeconfig'}",
        f"--authentication-kubeconfig={state_dir / 'kubeconfig'}",
        f"--authorization-kubeconfig={state_dir / 'kubeconfig'}",
        *controllers,
        "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={kcm_port}", "--v=1",
    ])
    environment = Environment(state_dir=state_dir, server=server, kubectl=found.kubectl)
    install(environment)
    _write_identity_kubeconfigs(environment, ca)
    supervisor.wait_until("kube-controller-manager", kcm, lambda: True, what="running", timeout=1)
    if node_ip:
        from keyroom.devenv import node as node_module

        environment = dataclasses.replace(
            environment, node=node_module.start(environment, supervisor, ca, node_ip=node_ip, log=log))
    if signer:
        environment = dataclasses.replace(environment, signer_url=_start_signer(environment, supervisor, ca))
    if operator:
        start_operator(environment, supervisor=supervisor)
    return environment


def _start_signer(environment: Environment, supervisor: _Supervisor, ca: pki.CertificateAuthority) -> str:
    """A fresh SoftHSM token in the state dir and the signer serving it, authenticated as its ServiceAccount."""
    from keyroom.signer import softhsm

    state_dir = environment.state_dir
    hsm_dir = state_dir / "hsm"
    hsm_dir.mkdir()
    pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
    softhsm.init_token(hsm_dir, label="keyroom-dev", pin=pin, so_pin=so_pin)
    pki.write_secret(hsm_dir / "pin", pin.encode())
    serving = ca.issue(common_name="keyroom-signer", server_hosts=("127.0.0.1", "localhost"))
    (state_dir / "pki" / "signer.crt").write_bytes(serving.cert_pem)
    pki.write_secret(state_dir / "pki" / "signer.key", serving.key_pem)
    url = f"https://127.0.0.1:{_free_port()}"
    start_signer(dataclasses.replace(environment, signer_url=url), supervisor=supervisor)
    return url


def start_signer(environment: Environment, *, supervisor: _Supervisor | None = None) -> subprocess.Popen:
    """Run the signer on the environment's token, port and state directory (again, after a stop)."""
    from keyroom.signer import softhsm

    if supervisor is None:
        supervisor = _Supervisor(environment.state_dir, _read_state(environment.state_dir))
    state_dir = environment.state_dir
    hsm_dir = state_dir / "hsm"
    token = softhsm.SoftHSMToken(module_path=softhsm.find_module(), config_path=hsm_dir / "softhsm2.conf",
                                 token_label="keyroom-dev")
    port = int(environment.signer_url.rsplit(":", 1)[1])
    env = dict(os.environ, **token.env(),
               KUBECONFIG=str(environment.kubeconfig("signer")),
               KEYROOM_PKCS11_MODULE=token.module_path, KEYROOM_TOKEN_LABEL=token.token_label,
               KEYROOM_PIN_FILE=str(hsm_dir / "pin"), KEYROOM_SIGNER_LISTEN=f"127.0.0.1:{port}",
               KEYROOM_SIGNER_TLS_CERT=str(state_dir / "pki" / "signer.crt"),
               KEYROOM_SIGNER_TLS_KEY=str(state_dir / "pki" / "signer.key"),
               KEYROOM_SIGNER_STATE_DIR=str(state_dir / "signer"),
               KEYROOM_SIGNER_NAMESPACE=fixtures.SERVICE_ACCOUNTS["signer"][0])
    env.pop("KEYROOM_PIN", None)
    process = supervisor.spawn("signer", [sys.executable, "-m", "keyroom.signer"], env=env)
    context = ssl.create_default_context(cafile=str(state_dir / "pki" / "ca.crt"))
    supervisor.wait_until("signer", process,
                          lambda: urllib.request.urlopen(f"{environment.signer_url}/healthz", context=context,
                                                         timeout=2).status == 200,
                          what="healthy")
    return process


@contextlib.contextmanager
def _temporary_pem(directory: pathlib.Path, issued: pki.Issued):
    cert_file, key_file = directory / ".probe.crt", directory / ".probe.key"
    cert_file.write_bytes(issued.cert_pem)
    pki.write_secret(key_file, issued.key_pem)
    try:
        yield str(cert_file), str(key_file)
    finally:
        cert_file.unlink()
        key_file.unlink()


def apply(environment: Environment, manifests: Iterable[dict]) -> None:
    """Server-side apply of manifests as admin."""
    documents = yaml.safe_dump_all(list(manifests), sort_keys=False)
    environment.run_kubectl("apply", "--server-side", "--force-conflicts",
                            "--field-manager=keyroom-devenv", "-f", "-", input=documents)


def install(environment: Environment) -> None:
    """Install keyroom's API (CRDs, admission policy, roles) and the fixtures."""
    from keyroom.api import manifests

    documents = manifests.all_manifests()
    apply(environment, documents)
    crd_names = [d["metadata"]["name"] for d in documents if d["kind"] == "CustomResourceDefinition"]
    environment.run_kubectl("wait", "--for=condition=Established", "--timeout=60s",
                            *(f"crd/{name}" for name in crd_names))
    # Established precedes discovery by a moment; `kubectl get keyroom` needs the category served.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        served = environment.run_kubectl("api-resources", "--categories=keyroom", "-o", "name", check=False)
        if len(served.stdout.split()) == len(crd_names):
            break
        time.sleep(0.1)
    else:
        raise DevEnvError("the keyroom API did not appear in discovery within 30s; see logs/kube-apiserver.log")
    apply(environment, fixtures.manifests())


def _write_identity_kubeconfigs(environment: Environment, ca: pki.CertificateAuthority) -> None:
    for identity, groups in fixtures.IDENTITIES.items():
        if identity == "admin":
            continue
        client = ca.issue(common_name=identity, organizations=tuple(groups))
        write_kubeconfig(environment.kubeconfig(identity), server=environment.server,
                         ca_pem=ca.cert_pem, user=identity, client=client)
    for name, (namespace, service_account) in fixtures.SERVICE_ACCOUNTS.items():
        token = request_token(environment, namespace=namespace, service_account=service_account)
        ca_pem = (environment.state_dir / "pki" / "ca.crt").read_bytes()
        write_kubeconfig(environment.kubeconfig(name), server=environment.server,
                         ca_pem=ca_pem, user=f"system:serviceaccount:{namespace}:{service_account}", token=token)


def request_token(environment: Environment, *, namespace: str, service_account: str,
                  audience: str | None = None, duration: str = "48h") -> str:
    """A ServiceAccount token from the TokenRequest API, as a pod would get one."""
    args = ["create", "token", service_account, "-n", namespace, f"--duration={duration}"]
    if audience:
        args.append(f"--audience={audience}")
    return environment.run_kubectl(*args).stdout.strip()


def start_operator(environment: Environment, *, supervisor: _Supervisor | None = None,
                   as_deployed: bool = False) -> subprocess.Popen:
    """Run the keyroom operator as a local process, authenticated as its ServiceAccount.

    For development and tests it logs debug messages and audits the token every
    5 s; ``as_deployed`` runs it as the chart does (info messages, the token
    audit at its default interval), for measurements.
    """
    if supervisor is None:
        state = _read_state(environment.state_dir)
        supervisor = _Supervisor(environment.state_dir, state)
    env = dict(os.environ, KUBECONFIG=str(environment.kubeconfig("operator")))
    if not as_deployed:
        env["KEYROOM_TOKEN_AUDIT_SECONDS"] = "5"
    if environment.signer_url:
        namespace, service_account = fixtures.SERVICE_ACCOUNTS["operator"]
        token_file = environment.state_dir / "operator-signer-token"
        pki.write_secret(token_file, request_token(environment, namespace=namespace, service_account=service_account,
                                                   audience=SIGNER_AUDIENCE).encode())
        env.update(KEYROOM_SIGNER_URL=environment.signer_url, KEYROOM_SIGNER_TOKEN_FILE=str(token_file),
                   KEYROOM_SIGNER_CA_FILE=str(environment.state_dir / "pki" / "ca.crt"))
    process = supervisor.spawn("operator", [sys.executable, "-m", "keyroom.operator",
                                            *(() if as_deployed else ("--verbose",))], env=env)
    log_path = supervisor.logs / "operator.log"
    supervisor.wait_until("operator", process, lambda: "keyroom operator ready" in log_path.read_text(errors="replace"),
                          what="ready")
    return process


def stop_process(state_dir: pathlib.Path, name: str, *, log: Log = print) -> None:
    """Stop one recorded process (for tests that restart a component)."""
    state = _read_state(state_dir) or {"processes": {}}
    if name in state["processes"]:
        _stop_processes({name: state["processes"].pop(name)}, log)
        _write_state(state_dir, state)


def _listen_addresses(argv: list[str]) -> list[tuple[str, int]]:
    """The loopback or wildcard addresses a recorded control-plane process listens on, from its argv."""
    flags = dict(arg[2:].split("=", 1) for arg in argv[1:] if arg.startswith("--") and "=" in arg)
    addresses = []
    for flag in ("listen-client-urls", "listen-peer-urls"):  # etcd
        for url in filter(None, flags.get(flag, "").split(",")):
            host, port = url.split("://", 1)[1].rstrip("/").rsplit(":", 1)
            addresses.append((host, int(port)))
    if "secure-port" in flags:  # kube-apiserver, kube-controller-manager
        addresses.append((flags.get("bind-address", "0.0.0.0"), int(flags["secure-port"])))
    return addresses


def _wait_for_ports(name: str, argv: list[str], timeout: float = 60.0) -> None:
    """Wait until the addresses of a killed process can be bound again (with SO_REUSEADDR, as etcd and, with
    --permit-address-sharing, kube-apiserver bind them): a client's connection may briefly take the port."""
    deadline = time.monotonic() + timeout
    for address in _listen_addresses(argv):
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(address)
                    break
                except OSError as error:
                    if time.monotonic() > deadline:
                        raise DevEnvError(f"{name} cannot listen on {address[0]}:{address[1]} again: {error}") from None
            time.sleep(0.2)


def restart_process(environment: Environment, name: str, *, kill: bool = True, log: Log = print) -> subprocess.Popen:
    """Start a recorded process (etcd, kube-apiserver, kube-controller-manager) again with its recorded argv and
    return once it is healthy again: with ``kill``, after a SIGKILL of its process group (a crash); without, after
    the graceful stop ``down`` makes. The operator and the signer are started again with ``start_operator`` and
    ``start_signer``."""
    state_dir = environment.state_dir
    state = _read_state(state_dir) or {"processes": {}}
    process = state["processes"].get(name)
    if process is None or "argv" not in process:
        raise DevEnvError(f"{name} is not a process recorded with its command line in {state_dir}; "
                          "restart the operator and the signer with start_operator and start_signer")
    argv = process["argv"]
    if kill:
        if _alive(process):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process["pid"], signal.SIGKILL)
        if not _gone(process):
            raise DevEnvError(f"{name} (pid {process['pid']}) did not die of SIGKILL within {_STOP_TIMEOUT:.0f}s")
    else:
        _stop_processes({name: process}, log)
    _wait_for_ports(name, argv)
    supervisor = _Supervisor(state_dir, state)
    started = supervisor.spawn(name, argv)
    if name == "etcd":
        client_url = next(arg.split("=", 1)[1].split(",")[0] for arg in argv
                          if arg.startswith("--listen-client-urls="))
        supervisor.wait_until(name, started, lambda: urllib.request.urlopen(f"{client_url}/health",
                                                                            timeout=1).status == 200, what="healthy")
    elif name == "kube-apiserver":
        supervisor.wait_until(name, started, lambda: environment.run_kubectl(
            "get", "--raw", "/readyz", "--request-timeout=2s", check=False).returncode == 0, what="ready")
    else:
        supervisor.wait_until(name, started, lambda: True, what="running", timeout=1)
    return started


def down(state_dir: pathlib.Path, *, log: Log = print) -> None:
    """Stop everything ``up`` started in ``state_dir`` and remove its state."""
    state_dir = state_dir.resolve()
    state = _read_state(state_dir)
    if state is None:
        if state_dir.exists() and any(state_dir.iterdir()):
            raise DevEnvError(f"{state_dir} holds no keyroom environment (no {STATE_FILE}); nothing to stop")
        log(f"nothing runs in {state_dir}")
        return
    problems: list[str] = []
    if state.get("node"):
        from keyroom.devenv import node as node_module

        problems = node_module.teardown(state_dir, state, log)
    _stop_processes(state.get("processes", {}), log)
    left = [name for name, process in state.get("processes", {}).items() if _alive(process)]
    if left:
        raise DevEnvError(f"could not stop: {', '.join(left)}")
    if problems:
        _write_state(state_dir, state)
        raise DevEnvError(f"{state_dir} stays: {'; '.join(problems)}. Fix that, then run: "
                          f"python -m keyroom.devenv down --state-dir {state_dir}")
    shutil.rmtree(state_dir)
    log(f"stopped and removed {state_dir}")


def wait_forever(state_dir: pathlib.Path) -> str:
    """Block until a recorded process exits; return its name."""
    state = _read_state(state_dir)
    while True:
        for name, process in state["processes"].items():
            if not _alive(process):
                return name
        time.sleep(0.5)


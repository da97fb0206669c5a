"""A local Kubernetes node beside the local control plane, so that real pods run.

``controlplane.up(state_dir, node=True)`` calls :func:`start` once the API
server and the controller manager are up. It runs, as local processes recorded
in the state directory like the rest of the control plane:

- **containerd** (CRI, runc through its shim, the cgroupfs driver) with its
  root, state, sockets and the pods' network namespaces under
  ``STATE/node/containerd``. Images never come from a registry: the pause image
  is compiled locally (:mod:`keyroom.devenv.pause`) and other images are
  imported from archives (:func:`load_image`, ``python -m keyroom.devenv
  load-image``); pods use them with ``imagePullPolicy: IfNotPresent`` or
  ``Never``.
- **kubelet** as ``system:node:keyroom-node`` (a client certificate from the
  environment's CA; the API server runs the Node authorizer), serving its API
  with a certificate from the same CA so that ``kubectl logs`` and ``exec``
  work.
- **kube-scheduler** and **kube-proxy** (iptables mode), so that Service
  ClusterIPs work from pods and from the host.
- **CoreDNS** on the host's address, published as the ``kube-dns`` Service
  (``10.0.0.10``) through a hand-made EndpointSlice, so pods resolve
  ``SERVICE.NAMESPACE.svc`` and everything else through the host's resolver.

Pods get addresses from ``10.244.0.0/24`` on the bridge ``keyroom0`` (CNI
bridge, host-local, portmap and loopback plugins from the system's CNI
directory). Storage is a default StorageClass ``keyroom-local`` with
pre-made hostPath PersistentVolumes under ``STATE/node/volumes`` (mode 0777, so
any pod user can write to them), bound as soon as a claim appears.

The node needs root, cgroups (v1 or v2), ``runc``, the CNI plugins,
``iptables``, ``conntrack`` and ``ip``; :func:`check_host` says which package
provides what is missing. It enables IPv4 forwarding while it runs.
:func:`teardown` (called by ``controlplane.down``) stops the pods through the
CRI, then the node's processes, kills any container left behind, unmounts what
the node mounted under the state directory, removes the bridge and the
iptables rules of the node and kube-proxy and restores the forwarding setting,
so that the next ``up`` starts from a clean host.
"""
from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import pathlib
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import tarfile
import time
import urllib.request

import yaml

from keyroom.devenv import binaries as binaries_module
from keyroom.devenv import controlplane, pause, pki

NODE_NAME = "keyroom-node"
CLUSTER_DOMAIN = "cluster.local"
#: all pod addresses (kube-proxy's cluster CIDR); this node hands out the first /24
CLUSTER_CIDR = "10.244.0.0/16"
POD_CIDR = "10.244.0.0/24"
#: the control plane's Service range and the addresses the node takes from it
SERVICE_CIDR = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"
DNS_SERVICE_IP = "10.0.0.10"
BRIDGE = "keyroom0"
CNI_NETWORK = "keyroom"
CNI_BIN_DIR = pathlib.Path("/usr/lib/cni")
STORAGE_CLASS = "keyroom-local"
VOLUME_COUNT = 8
VOLUME_CAPACITY = "10Gi"
#: the processes of the node, in start order (``controlplane.down`` stops them through :func:`teardown`)
PROCESSES = ("containerd", "kubelet", "kube-proxy", "kube-scheduler", "coredns")

_RULE_COMMENT = "keyroom local node"
#: names the state directory of the node that runs on this host (there is one bridge, one set of rules)
_HOST_MARKER = pathlib.Path("/run/keyroom/node")
_READY_TIMEOUT = 180.0

Log = controlplane.Log


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """Where the node runs and how to reach its parts (``state.json``'s ``node``)."""

    name: str
    ip: str
    directory: pathlib.Path
    containerd_socket: pathlib.Path
    ctr: pathlib.Path
    crictl: pathlib.Path
    pod_cidr: str
    dns_service_ip: str
    dns_address: str
    cluster_domain: str
    storage_class: str
    volumes_dir: pathlib.Path

    def to_state(self) -> dict:
        return {field.name: str(getattr(self, field.name)) for field in dataclasses.fields(self)}

    @classmethod
    def from_state(cls, state: dict) -> NodeInfo:
        values = dict(state)
        for name in ("directory", "containerd_socket", "ctr", "crictl", "volumes_dir"):
            values[name] = pathlib.Path(values[name])
        return cls(**{field.name: values[field.name] for field in dataclasses.fields(cls)})


# ---------------------------------------------------------------- the host

def check_host() -> dict[str, str]:
    """The system tools the node runs with; raises DevEnvError naming the package of a missing one."""
    if os.geteuid() != 0:
        raise controlplane.DevEnvError("the local node needs root (the kubelet, containerd and runc run rootful)")
    tools = {"runc": "runc", "iptables": "iptables", "conntrack": "conntrack", "ip": "iproute2",
             "mount": "mount", "umount": "mount"}
    found = {}
    for tool, package in tools.items():
        path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
        if path is None:
            raise controlplane.DevEnvError(f"{tool} not found: apt-get install {package}")
        found[tool] = path
    for plugin in ("bridge", "host-local", "portmap", "loopback"):
        if not (CNI_BIN_DIR / plugin).exists():
            raise controlplane.DevEnvError(f"the CNI plugin {plugin} is not in {CNI_BIN_DIR}: "
                                           "apt-get install containernetworking-plugins")
    if not pathlib.Path("/sys/fs/cgroup").is_dir():
        raise controlplane.DevEnvError("/sys/fs/cgroup is not mounted; the kubelet needs cgroups")
    return found


def check_no_other_node(state_dir: pathlib.Path) -> None:
    """Refuse to start a second node on this host: the bridge, the iptables rules and the kubelet's
    cgroups exist once per host."""
    with contextlib.suppress(OSError):
        other = pathlib.Path(_HOST_MARKER.read_text().strip())
        if other != state_dir:
            with contextlib.suppress(OSError, ValueError):
                state = json.loads((other / controlplane.STATE_FILE).read_text())
                running = [name for name in PROCESSES
                           if name in state.get("processes", {}) and controlplane._alive(state["processes"][name])]
                if running:
                    raise controlplane.DevEnvError(
                        f"a local node already runs on this host, from {other}; stop it first: "
                        f"python -m keyroom.devenv down --state-dir {other}")


def host_ip() -> str:
    """The host's address on its default route (``KEYROOM_NODE_IP`` wins): the API server and DNS listen there."""
    if os.environ.get("KEYROOM_NODE_IP"):
        return str(ipaddress.ip_address(os.environ["KEYROOM_NODE_IP"]))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("203.0.113.1", 9))  # nothing is sent: this only picks the route's source address
            return probe.getsockname()[0]
    except OSError as error:
        raise controlplane.DevEnvError(f"cannot find this host's address on its default route ({error}); "
                                       "set KEYROOM_NODE_IP to an address of this host that is not loopback") from None


def _free_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP on ``host``."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise controlplane.DevEnvError(f"no free port on {host}")


def _sysctl_path(name: str) -> pathlib.Path:
    return pathlib.Path("/proc/sys") / name.replace(".", "/")


def _set_sysctl(name: str, value: str) -> str | None:
    """Set a kernel setting; return its previous value (None when this kernel has no such setting)."""
    path = _sysctl_path(name)
    if not path.exists():
        return None
    before = path.read_text().strip()
    if before != value:
        path.write_text(value)
    return before


def _iptables_rules(pod_cidr: str) -> list[tuple[str, list[str]]]:
    """(table, rule) pairs the node adds: traffic from pods to elsewhere leaves with the host's address,
    and the bridge is forwarded even where the FORWARD policy drops."""
    comment = ["-m", "comment", "--comment", _RULE_COMMENT]
    return [
        ("nat", ["POSTROUTING", "-s", pod_cidr, "!", "-d", CLUSTER_CIDR, *comment, "-j", "MASQUERADE"]),
        ("filter", ["FORWARD", "-i", BRIDGE, *comment, "-j", "ACCEPT"]),
        ("filter", ["FORWARD", "-o", BRIDGE, *comment, "-j", "ACCEPT"]),
    ]


def _iptables(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True)


def _add_iptables_rules() -> None:
    for table, rule in _iptables_rules(POD_CIDR):
        if _iptables("-t", table, "-C", *rule).returncode != 0:
            added = _iptables("-t", table, "-A", *rule)
            if added.returncode != 0:
                raise controlplane.DevEnvError(f"iptables -t {table} -A {' '.join(rule)} failed: {added.stderr.strip()}")


def _remove_iptables_rules() -> None:
    for table, rule in _iptables_rules(POD_CIDR):
        while _iptables("-t", table, "-C", *rule).returncode == 0:
            if _iptables("-t", table, "-D", *rule).returncode != 0:
                break


#: the chains the kubelet makes in each table (kube-proxy --cleanup removes kube-proxy's own)
_KUBELET_CHAINS = {"mangle": ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"),
                   "nat": ("KUBE-KUBELET-CANARY",),
                   "filter": ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY")}


def _remove_kubelet_chains() -> None:
    """The kubelet's iptables chains (IPv4 and IPv6) and the rules that jump to them."""
    for command in ("iptables", "ip6tables"):
        if shutil.which(command) is None:
            continue
        for table, chains in _KUBELET_CHAINS.items():
            listed = subprocess.run([command, "-w", "5", "-t", table, "-S"], capture_output=True, text=True)
            for line in listed.stdout.splitlines():
                words = shlex.split(line)
                if words[:1] == ["-A"] and words[1] not in chains and "-j" in words \
                        and words[words.index("-j") + 1] in chains:
                    subprocess.run([command, "-w", "5", "-t", table, "-D", *words[1:]], capture_output=True)
            for chain in chains:
                subprocess.run([command, "-w", "5", "-t", table, "-F", chain], capture_output=True)
                subprocess.run([command, "-w", "5", "-t", table, "-X", chain], capture_output=True)


# ---------------------------------------------------------------- configuration files

def _containerd_config(directory: pathlib.Path, runc: str) -> str:
    root = directory / "containerd"
    return f"""\
version = 3
root = '{root / "root"}'
state = '{root / "state"}'
imports = []

[grpc]
  address = '{root / "containerd.sock"}'

[ttrpc]
  address = '{root / "containerd.sock.ttrpc"}'

[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = '{root / "opt"}'

  [plugins.'io.containerd.nri.v1.nri']
    disable = true

  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{pause.IMAGE}'

  [plugins.'io.containerd.cri.v1.runtime']
    netns_mounts_under_state_dir = true
    # Containers never get a lower OOM score than containerd's own: lowering it needs CAP_SYS_RESOURCE,
    # which a root shell in a container or a sandboxed VM may lack (runc then fails to start any pod).
    restrict_oom_score_adj = true
    enable_cdi = false
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = '{runc}'
          Root = '{directory / "runc"}'
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['{CNI_BIN_DIR}']
      conf_dir = '{directory / "cni" / "net.d"}'
      max_conf_num = 1
"""


def _cni_config(directory: pathlib.Path) -> dict:
    gateway = str(next(ipaddress.ip_network(POD_CIDR).hosts()))
    return {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR, "gateway": gateway}]],
                      "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(directory / "cni" / "ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def _kubelet_config(directory: pathlib.Path, *, node_ip: str, port: int, healthz_port: int) -> dict:
    state_dir = directory.parent
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{directory / 'containerd' / 'containerd.sock'}",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,  # a host that still runs cgroup v1 is allowed
        "failSwapOn": False,
        "address": node_ip,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(state_dir / "pki" / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(state_dir / "pki" / "kubelet-serving.key"),
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(state_dir / "pki" / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDNS": [DNS_SERVICE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": "/etc/resolv.conf",
        "podLogsDir": str(directory / "kubelet" / "pod-logs"),
        "maxPods": 110,
        "serializeImagePulls": False,
        # a development machine: evict only when it is really out of memory or disk, never collect images
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "nodefs.inodesFree": "1%",
                         "imagefs.available": "1%"},
        "evictionPressureTransitionPeriod": "10s",
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "nodeStatusReportFrequency": "10s",
        "shutdownGracePeriod": "0s",
        "oomScoreAdj": 0,  # as containerd's pods (restrict_oom_score_adj): lowering it needs CAP_SYS_RESOURCE
    }


def _kube_proxy_config(directory: pathlib.Path, *, healthz_port: int, metrics_port: int) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(directory / "kube-proxy" / "kubeconfig")},
        "hostnameOverride": NODE_NAME,
        "clusterCIDR": CLUSTER_CIDR,
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        # leave the host's conntrack settings and route_localnet as they are
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"localhostNodePorts": False, "syncPeriod": "30s", "minSyncPeriod": "1s"},
    }


def _corefile(*, node_ip: str, port: int, ready_port: int, kubeconfig: pathlib.Path) -> str:
    return f"""\
.:{port} {{
    bind {node_ip}
    errors
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} coredns
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    forward . /etc/resolv.conf
    cache 5
    loop
    reload
}}
"""


def _cluster_manifests(*, node_ip: str, dns_port: int, volumes_dir: pathlib.Path) -> list[dict]:
    """What the cluster needs for the node's DNS and storage: the kube-dns Service backed by CoreDNS on the
    host, CoreDNS's read access, the default StorageClass and its PersistentVolumes."""
    documents: list[dict] = [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "keyroom-devenv:coredns"},
         "rules": [{"apiGroups": [""], "resources": ["services", "pods", "namespaces"],
                    "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                    "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "keyroom-devenv:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "keyroom-devenv:coredns"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:coredns"}]},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system",
                      "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}},
         "spec": {"clusterIP": DNS_SERVICE_IP,
                  "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": dns_port},
                            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": dns_port}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "kube-dns-host", "namespace": "kube-system",
                      "labels": {"kubernetes.io/service-name": "kube-dns",
                                 "endpointslice.kubernetes.io/managed-by": "keyroom-devenv"}},
         "addressType": "IPv4",
         "endpoints": [{"addresses": [node_ip], "conditions": {"ready": True}, "nodeName": NODE_NAME}],
         "ports": [{"name": "dns", "port": dns_port, "protocol": "UDP"},
                   {"name": "dns-tcp", "port": dns_port, "protocol": "TCP"}]},
        {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
         "metadata": {"name": STORAGE_CLASS,
                      "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
         "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "Immediate",
         "reclaimPolicy": "Retain"},
    ]
    for index in range(VOLUME_COUNT):
        path = volumes_dir / f"pv-{index}"
        documents.append({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"keyroom-local-{index}", "labels": {"keyroom.dev/local-volume": "true"}},
            "spec": {"capacity": {"storage": VOLUME_CAPACITY}, "accessModes": ["ReadWriteOnce"],
                     "persistentVolumeReclaimPolicy": "Retain", "storageClassName": STORAGE_CLASS,
                     "volumeMode": "Filesystem", "hostPath": {"path": str(path), "type": "Directory"}},
        })
    return documents


# ---------------------------------------------------------------- start

def _write_yaml(path: pathlib.Path, document: dict) -> None:
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def _issue(ca: pki.CertificateAuthority, pki_dir: pathlib.Path, name: str, **kwargs) -> pki.Issued:
    issued = ca.issue(**kwargs)
    (pki_dir / f"{name}.crt").write_bytes(issued.cert_pem)
    pki.write_secret(pki_dir / f"{name}.key", issued.key_pem)
    return issued


def issue_control_plane_certificates(ca: pki.CertificateAuthority, pki_dir: pathlib.Path) -> None:
    """The API server's client certificate for the kubelet API (``pki/apiserver-kubelet-client.*``)."""
    _issue(ca, pki_dir, "apiserver-kubelet-client", common_name="kube-apiserver-kubelet-client",
           organizations=("system:masters",))


def start(environment: controlplane.Environment, supervisor: controlplane._Supervisor,
          ca: pki.CertificateAuthority, *, node_ip: str, log: Log = print) -> NodeInfo:
    """Start containerd, the kubelet, kube-proxy, kube-scheduler and CoreDNS; return once the node is Ready."""
    tools = check_host()
    found = binaries_module.ensure_node(log=log)
    pause_archive = pause.ensure_image(log=log)
    started = time.monotonic()
    state_dir = environment.state_dir
    directory = state_dir / "node"
    pki_dir = state_dir / "pki"
    for sub in ("containerd", "runc", "cni/net.d", "cni/ipam", "kubelet/root", "kubelet/pod-logs",
                "kube-proxy", "coredns", "volumes"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    info = NodeInfo(
        name=NODE_NAME, ip=node_ip, directory=directory,
        containerd_socket=directory / "containerd" / "containerd.sock", ctr=found.ctr, crictl=found.crictl,
        pod_cidr=POD_CIDR, dns_service_ip=DNS_SERVICE_IP, dns_address="", cluster_domain=CLUSTER_DOMAIN,
        storage_class=STORAGE_CLASS, volumes_dir=directory / "volumes",
    )
    node_state: dict = supervisor.state.setdefault("node", {})
    node_state.update(info.to_state())
    # What teardown must undo, recorded before it is done.
    node_state["sysctls"] = {}
    for name in ("net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables"):
        before = _set_sysctl(name, "1")
        if before is not None:
            node_state["sysctls"][name] = before
    node_state["iptables"] = True
    node_state["kube_proxy"] = str(found.kube_proxy)
    controlplane._write_state(state_dir, supervisor.state)
    _HOST_MARKER.parent.mkdir(parents=True, exist_ok=True)
    _HOST_MARKER.write_text(str(state_dir))
    _add_iptables_rules()

    ca_pem = ca.cert_pem
    write = controlplane.write_kubeconfig
    kubelet_client = _issue(ca, pki_dir, "kubelet-client", common_name=f"system:node:{NODE_NAME}",
                            organizations=("system:nodes",))
    _issue(ca, pki_dir, "kubelet-serving", common_name=f"system:node:{NODE_NAME}",
           server_hosts=(node_ip, NODE_NAME, "127.0.0.1", "localhost"))
    write(directory / "kubelet" / "kubeconfig", server=environment.server, ca_pem=ca_pem,
          user=f"system:node:{NODE_NAME}", client=kubelet_client)
    write(directory / "kube-proxy" / "kubeconfig", server=environment.server, ca_pem=ca_pem,
          user="system:kube-proxy", client=ca.issue(common_name="system:kube-proxy"))
    write(directory / "coredns" / "kubeconfig", server=environment.server, ca_pem=ca_pem,
          user="coredns", client=ca.issue(common_name="system:coredns"))
    (directory / "crictl.yaml").write_text(yaml.safe_dump({
        "runtime-endpoint": f"unix://{info.containerd_socket}", "image-endpoint": f"unix://{info.containerd_socket}",
        "timeout": 30}))

    # containerd, with the pause image and the pod network
    (directory / "containerd" / "config.toml").write_text(_containerd_config(directory, tools["runc"]))
    (directory / "cni" / "net.d" / "10-keyroom.conflist").write_text(json.dumps(_cni_config(directory), indent=2))
    path = f"{found.directory}:{os.environ.get('PATH', '/usr/bin:/bin')}:/usr/sbin:/sbin"
    node_env = dict(os.environ, PATH=path)
    containerd = supervisor.spawn("containerd", [
        str(found.containerd), f"--config={directory / 'containerd' / 'config.toml'}", "--log-level=info",
    ], env=node_env)
    supervisor.wait_until("containerd", containerd, lambda: _ctr(info, "version").returncode == 0, what="serving")
    load_image(info, pause_archive)

    # kubelet
    kubelet_port, kubelet_healthz = _free_port(node_ip), _free_port()
    _write_yaml(directory / "kubelet" / "config.yaml",
                _kubelet_config(directory, node_ip=node_ip, port=kubelet_port, healthz_port=kubelet_healthz))
    kubelet = supervisor.spawn("kubelet", [
        str(found.kubelet), f"--config={directory / 'kubelet' / 'config.yaml'}",
        f"--kubeconfig={directory / 'kubelet' / 'kubeconfig'}", f"--root-dir={directory / 'kubelet' / 'root'}",
        f"--hostname-override={NODE_NAME}", f"--node-ip={node_ip}", "--v=1",
    ], env=node_env)

    # kube-proxy and the scheduler
    proxy_healthz = _free_port()
    _write_yaml(directory / "kube-proxy" / "config.yaml",
                _kube_proxy_config(directory, healthz_port=proxy_healthz, metrics_port=_free_port()))
    proxy = supervisor.spawn("kube-proxy", [
        str(found.kube_proxy), f"--config={directory / 'kube-proxy' / 'config.yaml'}", "--v=1",
    ], env=node_env)
    scheduler_port = _free_port()
    admin = str(environment.kubeconfig("admin"))
    scheduler = supervisor.spawn("kube-scheduler", [
        str(found.kube_scheduler), f"--kubeconfig={admin}", f"--authentication-kubeconfig={admin}",
        f"--authorization-kubeconfig={admin}", "--leader-elect=false", "--bind-address=127.0.0.1",
        f"--secure-port={scheduler_port}", "--v=1",
    ])

    # DNS and storage
    dns_port, ready_port = _free_port(node_ip), _free_port()
    info = dataclasses.replace(info, dns_address=f"{node_ip}:{dns_port}")
    node_state["dns_address"] = info.dns_address
    controlplane._write_state(state_dir, supervisor.state)
    for index in range(VOLUME_COUNT):
        volume = info.volumes_dir / f"pv-{index}"
        volume.mkdir(exist_ok=True)
        volume.chmod(0o777)  # hostPath volumes ignore fsGroup: any pod user may write
    controlplane.apply(environment, _cluster_manifests(node_ip=node_ip, dns_port=dns_port,
                                                       volumes_dir=info.volumes_dir))
    (directory / "coredns" / "Corefile").write_text(
        _corefile(node_ip=node_ip, port=dns_port, ready_port=ready_port,
                  kubeconfig=directory / "coredns" / "kubeconfig"))
    coredns = supervisor.spawn("coredns", [
        str(found.coredns), "-conf", str(directory / "coredns" / "Corefile"),
    ])

    supervisor.wait_until("kube-proxy", proxy, lambda: _http_ok(f"http://127.0.0.1:{proxy_healthz}/healthz"),
                          what="healthy", timeout=_READY_TIMEOUT)
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    supervisor.wait_until("kube-scheduler", scheduler,
                          lambda: _http_ok(f"https://127.0.0.1:{scheduler_port}/healthz", context=insecure),
                          what="healthy", timeout=_READY_TIMEOUT)
    supervisor.wait_until("coredns", coredns, lambda: _http_ok(f"http://127.0.0.1:{ready_port}/ready"),
                          what="ready", timeout=_READY_TIMEOUT)
    supervisor.wait_until("kubelet", kubelet, lambda: _node_ready(environment), what="a Ready node",
                          timeout=_READY_TIMEOUT)
    log(f"node {NODE_NAME} Ready in {time.monotonic() - started:.1f}s (address {node_ip}, pods {POD_CIDR}, "
        f"DNS {DNS_SERVICE_IP} -> {info.dns_address})")
    return info


def _http_ok(url: str, *, context: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(url, context=context, timeout=2) as response:
        return response.status == 200


def _node_ready(environment: controlplane.Environment) -> bool:
    result = environment.run_kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
    if result.returncode != 0:
        return False
    conditions = json.loads(result.stdout).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


# ---------------------------------------------------------------- images

def _ctr(info: NodeInfo, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(info.ctr), f"--address={info.containerd_socket}", "--namespace=k8s.io", *args],
                          capture_output=True, text=True, timeout=timeout)


def load(state_dir: pathlib.Path) -> NodeInfo:
    """The node recorded in ``state_dir``; raises if the environment runs without one."""
    environment = controlplane.load(state_dir.resolve())
    if environment.node is None:
        raise controlplane.DevEnvError(f"the environment in {state_dir} runs without a node; "
                                       "start it with: python -m keyroom.devenv up --node ...")
    return environment.node


def load_image(node: NodeInfo | pathlib.Path, archive: pathlib.Path) -> list[str]:
    """Import an image archive (OCI or docker format, e.g. from ``podman save``) into the node's containerd,
    where pods with ``imagePullPolicy: IfNotPresent`` or ``Never`` find it; return the image names it holds."""
    info = node if isinstance(node, NodeInfo) else load(node)
    archive = pathlib.Path(archive).resolve()
    if not archive.is_file():
        raise controlplane.DevEnvError(f"no image archive at {archive}")
    names = archive_image_names(archive)
    if not names:
        raise controlplane.DevEnvError(f"{archive} names no image (an OCI archive needs an "
                                       "org.opencontainers.image.ref.name annotation, a docker archive RepoTags)")
    result = _ctr(info, "images", "import", "--all-platforms", str(archive))
    if result.returncode != 0:
        raise controlplane.DevEnvError(f"importing {archive} into the node's containerd failed: "
                                       f"{(result.stderr or result.stdout).strip()}")
    missing = sorted(set(names) - set(_image_names(info)))
    if missing:
        raise controlplane.DevEnvError(f"containerd imported {archive} but does not list {', '.join(missing)}")
    return names


def _normalize_reference(name: str) -> str:
    """An image name as containerd's CRI spells it (``busybox`` -> ``docker.io/library/busybox:latest``)."""
    first, _, rest = name.partition("/")
    if not rest:
        name = f"docker.io/library/{name}"
    elif "." not in first and ":" not in first and first != "localhost":
        name = f"docker.io/{name}"
    last = name.rsplit("/", 1)[-1]
    if ":" not in last and "@" not in last:
        name += ":latest"
    return name


def archive_image_names(archive: pathlib.Path) -> list[str]:
    """The image names an OCI or docker archive carries, as containerd will list them."""
    with tarfile.open(archive) as tar:
        members = {member.name.removeprefix("./"): member for member in tar.getmembers()}
        if "index.json" in members:
            index = json.load(tar.extractfile(members["index.json"]))
            names = []
            for manifest in index.get("manifests", []):
                annotations = manifest.get("annotations", {})
                name = annotations.get("io.containerd.image.name") or annotations.get(
                    "org.opencontainers.image.ref.name", "")
                if "/" in name or ":" in name:  # a full reference, not a bare tag
                    names.append(_normalize_reference(name))
            return names
        if "manifest.json" in members:
            manifest = json.load(tar.extractfile(members["manifest.json"]))
            return [_normalize_reference(tag) for entry in manifest for tag in entry.get("RepoTags") or []]
    raise controlplane.DevEnvError(f"{archive} is neither an OCI nor a docker image archive")


def _image_names(info: NodeInfo) -> list[str]:
    result = _ctr(info, "images", "list", "--quiet")
    return [line for line in result.stdout.splitlines() if line and not line.startswith("sha256:")]


def images(node: NodeInfo | pathlib.Path) -> list[str]:
    """The image names the node's containerd holds."""
    return _image_names(node if isinstance(node, NodeInfo) else load(node))


# ---------------------------------------------------------------- teardown

def _crictl(info: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run([info["crictl"], f"--config={pathlib.Path(info['directory']) / 'crictl.yaml'}", *args],
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _processes_referring_to(text: str) -> list[int]:
    """Processes whose command line mentions ``text`` (the node's containerd socket: its shims)."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(entry.name))
    return found


def _mounts_under(directory: pathlib.Path) -> list[str]:
    """Mount points at or below ``directory``, deepest first."""
    prefix = str(directory)
    points = []
    for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        point = point.encode().decode("unicode_escape") if "\\" in point else point
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(set(points), key=lambda p: (p.count("/"), p), reverse=True)


def _unmount_all(directory: pathlib.Path) -> list[str]:
    """Unmount everything below ``directory``; return what is still mounted."""
    for _ in range(5):
        points = _mounts_under(directory)
        if not points:
            return []
        for point in points:
            subprocess.run(["umount", "--lazy", point], capture_output=True)
    return _mounts_under(directory)


def _remove_cgroups() -> None:
    """The kubelet's pod cgroups (``kubepods``), empty once every container is gone."""
    for hierarchy in pathlib.Path("/sys/fs/cgroup").iterdir():
        root = hierarchy / "kubepods"
        if not root.is_dir():
            continue
        for directory in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                                reverse=True) + [root]:
            with contextlib.suppress(OSError):
                directory.rmdir()


def teardown(state_dir: pathlib.Path, state: dict, log: Log = print) -> list[str]:
    """Stop the node recorded in ``state`` and undo what it changed on the host; the processes it stopped
    leave ``state['processes']``. Returns what could not be undone (the state directory must then stay)."""
    info = state.get("node")
    processes: dict = state.get("processes", {})
    if not info:
        return []
    directory = pathlib.Path(info["directory"])

    def stop(*names: str) -> None:
        controlplane._stop_processes({name: processes[name] for name in names if name in processes}, log)

    # The kubelet first, so that it starts nothing new; then every pod through the CRI, which also
    # releases their network (CNI DEL) while containerd still runs.
    stop("kubelet")
    if "containerd" in processes and controlplane._alive(processes["containerd"]):
        removed = _crictl(info, "rmp", "--all", "--force", timeout=120)
        if removed is None or removed.returncode != 0:
            log(f"removing the node's pods through the CRI failed: {removed.stderr.strip() if removed else 'timeout'}")
    stop("coredns", "kube-scheduler", "kube-proxy", "containerd")

    # Whatever the CRI left running: containers (runc's state is ours alone), then the shims.
    runc = shutil.which("runc") or "/usr/sbin/runc"
    runc_root = directory / "runc" / "k8s.io"
    if runc_root.is_dir():
        listed = subprocess.run([runc, "--root", str(runc_root), "list", "--quiet"], capture_output=True, text=True)
        for container in listed.stdout.split():
            subprocess.run([runc, "--root", str(runc_root), "kill", container, "KILL"], capture_output=True)
            subprocess.run([runc, "--root", str(runc_root), "delete", "--force", container], capture_output=True)
    socket_path = str(directory / "containerd" / "containerd.sock")
    for pid in _processes_referring_to(socket_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    still_mounted = _unmount_all(directory)

    # Network: kube-proxy's rules, the node's own rules, the bridge; then the kernel settings as they were.
    if info.get("kube_proxy") and pathlib.Path(info["kube_proxy"]).exists():
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([info["kube_proxy"], "--cleanup", f"--config={directory / 'kube-proxy' / 'config.yaml'}"],
                           capture_output=True, timeout=60)
    if info.get("iptables"):
        _remove_iptables_rules()
        _remove_kubelet_chains()
    if pathlib.Path(f"/sys/class/net/{BRIDGE}").exists():
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
    for name, value in info.get("sysctls", {}).items():
        with contextlib.suppress(OSError):
            _sysctl_path(name).write_text(value)
    _remove_cgroups()
    with contextlib.suppress(OSError):
        if _HOST_MARKER.read_text().strip() == str(state_dir):
            _HOST_MARKER.unlink()
    for name in PROCESSES:
        if name in processes and not controlplane._alive(processes[name]):
            processes.pop(name)
    return [f"still mounted: {point}" for point in still_mounted]

"""The local node runs real pods: images from archives, cluster DNS, Services, the API server from inside a
pod, and PersistentVolumeClaims of the default StorageClass.

The pods run a small image: a static busybox (Debian's busybox-static) and the
control plane's kubectl (an in-cluster client that verifies the API server's
certificate, as the operator does), built with podman and imported with
``python -m keyroom.devenv load-image``, as the chart's images are. Run with
``KEYROOM_E2E=1`` as root.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from keyroom.devenv import controlplane, images, node
from tests.e2e.conftest import node_skip_reason


def _skip_reason() -> str | None:
    reason = node_skip_reason()
    if reason:
        return reason
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman)"
    if not pathlib.Path("/bin/busybox").exists():
        return "no static busybox for the test image (apt-get install busybox-static)"
    return None


pytestmark = [pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
              pytest.mark.timeout(1800)]  # the first run builds the node's binaries

IMAGE = "localhost/keyroom-e2e/busybox:test"
POD_USER = 10001


def _podman(*args: str, cwd: pathlib.Path | None = None) -> None:
    result = subprocess.run(["podman", *args], env=images.podman_environment(), cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"podman {' '.join(args)} failed:\n{result.stdout}{result.stderr}"


@pytest.fixture(scope="module")
def archives(tmp_path_factory, node_environment) -> dict[str, pathlib.Path]:
    """The test image, saved by podman in both archive formats."""
    context = tmp_path_factory.mktemp("busybox-image")
    shutil.copy("/bin/busybox", context / "busybox")
    shutil.copy(node_environment.kubectl, context / "kubectl")
    (context / "Containerfile").write_text(
        "FROM scratch\n"
        "COPY busybox kubectl /bin/\n"
        'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
        'ENTRYPOINT ["/bin/sh"]\n')
    _podman("build", "--quiet", "--tag", IMAGE, str(context))
    saved = {"oci-archive": context / "busybox.oci.tar", "docker-archive": context / "busybox.docker.tar"}
    for archive_format, path in saved.items():
        _podman("save", "--format", archive_format, "--output", str(path), IMAGE)
    return saved


@pytest.fixture(scope="module")
def image(node_environment, archives) -> str:
    """The test image in the node's containerd, imported from its OCI archive through the command line."""
    loaded = subprocess.run([sys.executable, "-m", "keyroom.devenv", "load-image", "--state-dir",
                             str(node_environment.state_dir), str(archives["oci-archive"])],
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert IMAGE in loaded.stdout.split()
    return IMAGE


@pytest.fixture
def namespace(node_environment):
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    node_environment.run_kubectl("create", "namespace", name)
    yield name
    node_environment.run_kubectl("delete", "namespace", name, "--wait=false", check=False)


def apply(environment: controlplane.Environment, *documents: dict) -> None:
    environment.run_kubectl("apply", "-f", "-", input=yaml.safe_dump_all(documents))


def pod(name: str, script: str, *, image: str, namespace: str, labels: dict | None = None) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {"restartPolicy": "Never",
                 "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never",
                                 "command": ["/bin/sh", "-c", script]}]},
    }


def wait_for_phase(environment: controlplane.Environment, namespace: str, name: str, phases: set[str], *,
                   timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    phase = ""
    while time.monotonic() < deadline:
        got = environment.run_kubectl("get", "pod", name, "-n", namespace, "-o", "jsonpath={.status.phase}",
                                      check=False)
        phase = got.stdout.strip()
        if phase in phases:
            return phase
        time.sleep(0.5)
    described = environment.run_kubectl("describe", "pod", name, "-n", namespace, check=False).stdout
    pytest.fail(f"pod {namespace}/{name} is {phase or 'unknown'}, not {phases}, after {timeout:.0f}s:\n{described}")


def logs(environment: controlplane.Environment, namespace: str, name: str) -> str:
    return environment.run_kubectl("logs", name, "-n", namespace).stdout


def test_the_node_is_ready_and_recorded(node_environment):
    info = node_environment.node
    assert info is not None and info.name == node.NODE_NAME
    state = json.loads((node_environment.state_dir / controlplane.STATE_FILE).read_text())
    assert state["node"]["ready"] and state["node"]["dns_service_ip"] == node.DNS_SERVICE_IP
    assert controlplane.load(node_environment.state_dir).node == info
    described = json.loads(node_environment.run_kubectl("get", "node", node.NODE_NAME, "-o", "json").stdout)
    assert {"type": "InternalIP", "address": info.ip} in described["status"]["addresses"]
    assert not [taint for taint in described["spec"].get("taints", []) if taint["effect"] == "NoSchedule"]
    default_classes = [item["metadata"]["name"] for item in json.loads(node_environment.run_kubectl(
        "get", "storageclass", "-o", "json").stdout)["items"]
        if item["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class") == "true"]
    assert default_classes == [node.STORAGE_CLASS]


def test_docker_archives_load_too(node_environment, archives):
    assert node.load_image(node_environment.state_dir, archives["docker-archive"]) == [IMAGE]
    assert IMAGE in node.images(node_environment.state_dir)
    assert any(name.startswith("localhost/keyroom/pause:") for name in node.images(node_environment.node))


def test_a_pod_resolves_services_and_calls_the_api_server_with_its_token(node_environment, image, namespace):
    token = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    ca = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    script = (
        # busybox nslookup asks for the name as given; kubectl below resolves through the search path (ndots:5),
        # as every resolver in the pods does
        "set -e; cat /etc/resolv.conf; "
        f"nslookup kubernetes.default.svc.{node.CLUSTER_DOMAIN}; "
        f"nslookup kube-dns.kube-system.svc.{node.CLUSTER_DOMAIN}; "
        'echo "service host: $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT"; '
        # who am I: in-cluster (the Service IP, the kube-root-ca.crt the pod gets and its projected token) ...
        'echo "in-cluster: $(kubectl auth whoami -o jsonpath={.status.userInfo.username})"; '
        # ... and by the Service's DNS name, through the search path
        "echo \"by name: $(kubectl --server=https://kubernetes.default.svc "
        f"--certificate-authority={ca} --token=$(cat {token}) auth whoami -o jsonpath={{.status.userInfo.username}})\""
    )
    apply(node_environment, pod("client", script, image=image, namespace=namespace))
    phase = wait_for_phase(node_environment, namespace, "client", {"Succeeded", "Failed"})
    output = logs(node_environment, namespace, "client")
    assert phase == "Succeeded", output
    assert f"nameserver {node.DNS_SERVICE_IP}" in output
    assert f"Address: {node.KUBERNETES_SERVICE_IP}" in output  # kubernetes.default.svc.cluster.local
    assert f"Address: {node.DNS_SERVICE_IP}\n" in output  # kube-dns.kube-system.svc.cluster.local
    assert f"service host: {node.KUBERNETES_SERVICE_IP}:443" in output
    assert f"in-cluster: system:serviceaccount:{namespace}:default" in output
    assert f"by name: system:serviceaccount:{namespace}:default" in output


def test_a_pod_reaches_another_through_its_service_name(node_environment, image, namespace):
    server = pod("server", "mkdir -p /www && echo hello from the server > /www/index.html && "
                 "exec httpd -f -p 8080 -h /www", image=image, namespace=namespace, labels={"app": "server"})
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": namespace},
               "spec": {"selector": {"app": "server"}, "ports": [{"port": 8443, "targetPort": 8080}]}}
    apply(node_environment, server, service)
    wait_for_phase(node_environment, namespace, "server", {"Running"})
    client = pod("client", f"for i in $(seq 30); do wget -q -O - http://web.{namespace}.svc:8443/ && exit 0; "
                 "sleep 1; done; exit 1", image=image, namespace=namespace)
    apply(node_environment, client)
    assert wait_for_phase(node_environment, namespace, "client", {"Succeeded", "Failed"}) == "Succeeded"
    assert "hello from the server" in logs(node_environment, namespace, "client")


def test_a_deployment_claims_a_volume_and_writes_to_it_as_a_non_root_user(node_environment, image, namespace):
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data", "namespace": namespace},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
    marker = f"written by {namespace}"
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "writer", "namespace": namespace},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "writer"}},
                 "template": {"metadata": {"labels": {"app": "writer"}}, "spec": {
                     "securityContext": {"runAsUser": POD_USER, "runAsGroup": POD_USER, "fsGroup": POD_USER,
                                         "runAsNonRoot": True},
                     "containers": [{"name": "main", "image": image, "imagePullPolicy": "IfNotPresent",
                                     "command": ["/bin/sh", "-c",
                                                 f"echo '{marker}' > /data/marker && id && exec sleep 3600"],
                                     "securityContext": {"allowPrivilegeEscalation": False,
                                                         "readOnlyRootFilesystem": True,
                                                         "capabilities": {"drop": ["ALL"]}},
                                     "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                     "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}}},
    }
    apply(node_environment, claim, deployment)
    node_environment.run_kubectl("wait", "-n", namespace, "--for=jsonpath={.status.phase}=Bound", "pvc/data",
                                 "--timeout=60s")
    node_environment.run_kubectl("rollout", "status", "-n", namespace, "deployment/writer", "--timeout=120s")
    volume = node_environment.run_kubectl("get", "pvc", "data", "-n", namespace, "-o",
                                          "jsonpath={.spec.volumeName}").stdout.strip()
    path = pathlib.Path(node_environment.run_kubectl("get", "pv", volume, "-o",
                                                     "jsonpath={.spec.hostPath.path}").stdout.strip())
    assert path.parent == node_environment.node.volumes_dir
    deadline = time.monotonic() + 30
    while not (path / "marker").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (path / "marker").read_text().strip() == marker
    assert (path / "marker").stat().st_uid == POD_USER

"""The end-to-end flow's cluster on kind (``make e2e-kind``), for machines with Docker.

The same images (built by Docker from images/Dockerfile, whose base is then pulled), the same chart and the
same tests as on the local node. The fixture identities (alice, bob, carol, ...) are the cluster admin's
kubeconfig impersonating each user with its groups, so the API server's ``request.userInfo`` (what the
admission policy checks) is exactly the identity's. The signer's volume comes from kind's local-path
provisioner, whose directory is mounted from the host so the tests can read the audit log.
"""
from __future__ import annotations

import copy
import pathlib
import shutil
import subprocess

import yaml

from keyroom.devenv import controlplane, fixtures, images

CLUSTER = "keyroom-e2e"


class KindError(RuntimeError):
    pass


def _run(*command: str, input: str | None = None) -> str:
    result = subprocess.run(command, capture_output=True, text=True, input=input)
    if result.returncode != 0:
        raise KindError(f"{' '.join(command)} failed: {result.stderr.strip()[-2000:]}")
    return result.stdout


def skip_reason() -> str | None:
    for tool in ("kind", "docker", "kubectl"):
        if shutil.which(tool) is None:
            return f"make e2e-kind needs {tool} on PATH"
    return None


def up(state_dir: pathlib.Path) -> controlplane.Environment:
    """A kind cluster with the fixture namespaces and bindings, and one kubeconfig per identity."""
    volumes = state_dir / "volumes"
    volumes.mkdir(parents=True, exist_ok=True)
    config = {"kind": "Cluster", "apiVersion": "kind.x-k8s.io/v1alpha4",
              "nodes": [{"role": "control-plane", "extraMounts": [
                  {"hostPath": str(volumes), "containerPath": "/var/local-path-provisioner"}]}]}
    (state_dir / "kind.yaml").write_text(yaml.safe_dump(config))
    _run("kind", "create", "cluster", "--name", CLUSTER, "--config", str(state_dir / "kind.yaml"), "--wait", "120s")
    admin = yaml.safe_load(_run("kind", "get", "kubeconfig", "--name", CLUSTER))
    (state_dir / "kubeconfig").write_text(yaml.safe_dump(admin))
    identities = {name: ("", groups) for name, groups in fixtures.IDENTITIES.items() if name != "admin"}
    identities |= {name: (f"system:serviceaccount:{namespace}:{account}", [])
                   for name, (namespace, account) in fixtures.SERVICE_ACCOUNTS.items()}
    for name, (username, groups) in identities.items():
        config = copy.deepcopy(admin)
        user = config["users"][0]["user"]
        user["as"] = username or name
        if groups:
            user["as-groups"] = groups
        (state_dir / f"kubeconfig-{name}").write_text(yaml.safe_dump(config))
    environment = controlplane.Environment(state_dir=state_dir, server=admin["clusters"][0]["cluster"]["server"],
                                           kubectl=pathlib.Path(shutil.which("kubectl")))
    # the chart installs keyroom's roles; the teams' namespaces and bindings are the fixtures'
    environment.run_kubectl("apply", "-f", "-", input=yaml.safe_dump_all(fixtures.manifests()))
    return environment


def load_images() -> None:
    """Build both images with Docker and load them into the kind node."""
    for target in images.TARGETS:
        name = images.image_name(target)
        _run("docker", "build", "--target", target, "--tag", name, "--file", str(images.DOCKERFILE),
             "--build-arg", f"VERSION={images.version()}", "--build-arg", f"REVISION={images.revision()}",
             str(images.REPO_ROOT))
        _run("kind", "load", "docker-image", name, "--name", CLUSTER)


def volume_path(state_dir: pathlib.Path, host_path: str) -> pathlib.Path:
    """Where the host sees a local-path volume of the kind node."""
    return state_dir / "volumes" / pathlib.Path(host_path).relative_to("/var/local-path-provisioner")


def down() -> None:
    subprocess.run(["kind", "delete", "cluster", "--name", CLUSTER], capture_output=True, text=True)

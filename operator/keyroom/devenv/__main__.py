"""``python -m keyroom.devenv up|down|check|load-image|binaries``: the local control plane for people and scripts."""
from __future__ import annotations

import argparse
import pathlib
import signal
import sys

from keyroom.devenv import binaries, controlplane, pause, prerequisites, samples


def _print_usage(environment: controlplane.Environment) -> None:
    state_dir = environment.state_dir
    print(f"""
keyroom is running. Kubeconfigs, one per identity:
  export KUBECONFIG={environment.kubeconfig('admin')}          # admin (system:masters)
  export KUBECONFIG={environment.kubeconfig('alice')}    # alice, team-a-devs (requester in team-a)
  export KUBECONFIG={environment.kubeconfig('bob')}      # bob, team-a-approvers (carol likewise)
  export KUBECONFIG={environment.kubeconfig('dave')}     # dave, team-b-devs (requester in team-b)
kubectl: {environment.kubectl}
Try:
  {environment.kubectl} --kubeconfig {environment.kubeconfig('admin')} apply -f examples/
  {environment.kubectl} --kubeconfig {environment.kubeconfig('alice')} -n team-a get keyroom
Logs: {state_dir / 'logs'}
Stop: python -m keyroom.devenv down --state-dir {state_dir}
""", flush=True)
    if environment.node is not None:
        node = environment.node
        print(f"""Node {node.name} ({node.ip}) runs pods: pod network {node.pod_cidr}, cluster DNS {node.dns_service_ip} \
({node.cluster_domain}, served on {node.dns_address}), default StorageClass {node.storage_class} \
(volumes in {node.volumes_dir}).
Images come from archives only (imagePullPolicy IfNotPresent or Never):
  podman save --format oci-archive -o image.tar IMAGE
  python -m keyroom.devenv load-image --state-dir {state_dir} image.tar
Containers: {node.crictl} --config {node.directory / 'crictl.yaml'} ps
""", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyroom.devenv",
                                     description="A local keyroom: real kube-apiserver, etcd and the operator.")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the local control plane (and the operator)")
    up.add_argument("--state-dir", type=pathlib.Path, required=True)
    up.add_argument("--detach", action="store_true", help="leave it running in the background and return")
    up.add_argument("--no-operator", dest="operator", action="store_false", help="do not start the operator")
    up.add_argument("--no-signer", dest="signer", action="store_false",
                    help="do not start the signer (nor create its SoftHSM token)")
    up.add_argument("--node", action="store_true",
                    help="also run a local node (containerd, kubelet, kube-proxy, scheduler, DNS; needs root) "
                         "so that pods run")
    down = commands.add_parser("down", help="stop everything started in the state dir and remove it")
    down.add_argument("--state-dir", type=pathlib.Path, required=True)
    load_image = commands.add_parser("load-image", help="import image archives (OCI or docker, e.g. from "
                                                        "podman save) into the local node's containerd")
    load_image.add_argument("--state-dir", type=pathlib.Path, required=True)
    load_image.add_argument("archives", type=pathlib.Path, nargs="+", metavar="ARCHIVE")
    binaries_command = commands.add_parser("binaries", help="build (if needed) and print the control-plane binaries")
    binaries_command.add_argument("--node", action="store_true",
                                  help="the local node's binaries and pause image instead")
    check = commands.add_parser("check", help="say what to install before `up` can run (Go, SoftHSM2, COMMANDs)")
    check.add_argument("--no-signer", dest="signer", action="store_false", help="the signer's SoftHSM2 is not needed")
    check.add_argument("commands", nargs="*", metavar="COMMAND", help="commands that must be on PATH too")
    sample = commands.add_parser("samples", help="write sample artifacts (a text file, a PE, a JAR) to sign")
    sample.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        if args.command == "binaries":
            if args.node:
                found = binaries.ensure_node(log=log)
                for name, path in vars(found).items():
                    print(f"{name}={path}")
                print(f"pause_image={pause.ensure_image(log=log)}")
                return 0
            return binaries.main()
        if args.command == "load-image":
            from keyroom.devenv import node

            for archive in args.archives:
                for name in node.load_image(args.state_dir, archive):
                    print(name)
            return 0
        if args.command == "check":
            missing = prerequisites.problems(signer=args.signer, commands=args.commands)
            for problem in missing:
                log(f"error: {problem}")
            return 1 if missing else 0
        if args.command == "samples":
            for path in samples.write(args.out):
                print(path)
            return 0
        if args.command == "down":
            controlplane.down(args.state_dir, log=log)
            return 0
        environment = controlplane.up(args.state_dir, operator=args.operator, signer=args.signer, node=args.node,
                                      log=log)
        _print_usage(environment)
        if args.detach:
            return 0
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            exited = controlplane.wait_forever(environment.state_dir)
            log(f"{exited} exited; see {environment.state_dir / 'logs' / (exited + '.log')}. Stopping.")
            status = 1
        except KeyboardInterrupt:
            status = 0
        controlplane.down(environment.state_dir, log=log)
        return status
    except (controlplane.DevEnvError, binaries.BinariesError, pause.ImageError) as error:
        log(f"error: {error}")
        return 1


if __name__ == "__main__":
    sys.exit(main())

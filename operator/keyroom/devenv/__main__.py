"""``python -m keyroom.devenv up|down|binaries``: the local control plane for people and scripts."""
from __future__ import annotations

import argparse
import pathlib
import signal
import sys

from keyroom.devenv import binaries, controlplane, samples


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
    down = commands.add_parser("down", help="stop everything started in the state dir and remove it")
    down.add_argument("--state-dir", type=pathlib.Path, required=True)
    commands.add_parser("binaries", help="build (if needed) and print the control-plane binaries")
    sample = commands.add_parser("samples", help="write sample artifacts (a text file, a PE, a JAR) to sign")
    sample.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        if args.command == "binaries":
            return binaries.main()
        if args.command == "samples":
            for path in samples.write(args.out):
                print(path)
            return 0
        if args.command == "down":
            controlplane.down(args.state_dir, log=log)
            return 0
        environment = controlplane.up(args.state_dir, operator=args.operator, signer=args.signer, log=log)
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
    except (controlplane.DevEnvError, binaries.BinariesError) as error:
        log(f"error: {error}")
        return 1


if __name__ == "__main__":
    sys.exit(main())

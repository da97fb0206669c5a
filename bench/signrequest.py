"""SignRequests end to end: from `create` to Signed through the API server, operator and signer.

One run on the local control plane (real kube-apiserver and etcd, operator,
signer on SoftHSM2) measures:

- the baseline: raw python-pkcs11 ECDSA_P256 signatures per second on one session;
- one auto-approved SignRequest of 500 digests, from creation to Signed, as
  signatures per second and as a ratio to the baseline (goal: >= 0.5);
- single-digest SignRequests created at a steady rate (default 20/s for 30 s),
  p50 and p99 from creation to Signed (goal: p99 < 1 s);
- the API writes one request costs: its creation, every later write to the
  object (Kopf's bookkeeping included, seen as watch events) and the Events
  posted about it.

Run with ``make bench``; ``--rate`` and ``--seconds`` shorten or lengthen it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import pathlib
import shutil
import statistics
import sys
import tempfile
import threading
import time

import kubernetes

from keyroom.devenv import controlplane
from keyroom.signer import softhsm

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from signer import _percentile, raw_rate  # noqa: E402  (the signer benchmark's baseline)

NAMESPACE = "team-a"
GROUP, VERSION, PLURAL = "keyroom.dev", "v1alpha1", "signrequests"


class Watcher:
    """Sees every SignRequest of the namespace: when each was first Signed, and how many writes it took."""

    def __init__(self, api: kubernetes.client.CustomObjectsApi) -> None:
        self.api = api
        self.signed: dict[str, float] = {}
        self.writes: dict[str, int] = {}
        self.changed = threading.Condition()
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        resource_version = self.api.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["metadata"][
            "resourceVersion"]
        while not self._stop:
            try:
                for event in kubernetes.watch.Watch().stream(
                        self.api.list_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL,
                        resource_version=resource_version, timeout_seconds=30):
                    body = event["object"]
                    name, resource_version = body["metadata"]["name"], body["metadata"]["resourceVersion"]
                    with self.changed:
                        self.writes[name] = self.writes.get(name, 0) + 1
                        if (body.get("status") or {}).get("phase") == "Signed" and name not in self.signed:
                            self.signed[name] = time.perf_counter()
                        self.changed.notify_all()
            except Exception:
                if self._stop:
                    return  # the control plane stops at the end of the run
                raise

    def wait_signed(self, names: list[str], timeout: float) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: all(n in self.signed for n in names), timeout=timeout):
                missing = [n for n in names if n not in self.signed]
                raise TimeoutError(f"{len(missing)} request(s) not Signed after {timeout:.0f}s, e.g. {missing[:3]}")

    def stop(self) -> None:
        self._stop = True


def _client(kubeconfig: pathlib.Path) -> kubernetes.client.ApiClient:
    return kubernetes.config.new_client_from_config(config_file=str(kubeconfig))


def _request(name: str, key: str, digests: list[str]) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SignRequest",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"keyRef": {"name": key}, "requester": {"username": "alice",
                                                              "groups": ["team-a-devs", "system:authenticated"]},
                     "reason": "benchmark", "digests": [{"name": f"f{i}", "value": d} for i, d in enumerate(digests)]}}


def _setup(environment: controlplane.Environment) -> str:
    key = "bench-key"
    environment.run_kubectl("apply", "-f", "-", input=f"""
apiVersion: keyroom.dev/v1alpha1
kind: SigningKey
metadata: {{name: {key}, namespace: {NAMESPACE}}}
spec: {{algorithm: ECDSA_P256}}
---
apiVersion: keyroom.dev/v1alpha1
kind: SigningPolicy
metadata: {{name: bench, namespace: {NAMESPACE}}}
spec:
  keys: [{key}]
  requesters: {{users: [alice]}}
  requiredApprovals: 0
  maxSignaturesPerHour: 10000000
""")
    environment.run_kubectl("wait", "--for=condition=Ready", f"signingkey/{key}", "-n", NAMESPACE, "--timeout=60s")
    environment.run_kubectl("wait", "--for=condition=Ready", "signingpolicy/bench", "-n", NAMESPACE, "--timeout=60s")
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0, help="single-digest requests per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to keep that rate")
    parser.add_argument("--batches", type=int, default=3, help="500-digest requests to time (median reported)")
    parser.add_argument("--logs", type=pathlib.Path, help="copy the components' logs here before stopping them")
    args = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="keyroom-bench-") as directory:
        state_dir = pathlib.Path(directory) / "env"
        environment = controlplane.up(state_dir, log=log)
        try:
            hsm_dir = state_dir / "hsm"
            raw, _ = raw_rate(env={"SOFTHSM2_CONF": str(hsm_dir / "softhsm2.conf")}, module=softhsm.find_module(),
                              token_label="keyroom-dev", pin=(hsm_dir / "pin").read_text().strip(),
                              algorithm="ECDSA_P256", seconds=5)
            key = _setup(environment)
            api = kubernetes.client.CustomObjectsApi(_client(environment.kubeconfig("alice")))
            events_api = kubernetes.client.CoreV1Api(_client(state_dir / "kubeconfig"))
            watcher = Watcher(api)
            create = lambda body: api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)

            # a warm-up request: TLS sessions, TokenReview cache, first-use paths
            create(_request("warm-up", key, [hashlib.sha256(b"warm").hexdigest()]))
            watcher.wait_signed(["warm-up"], timeout=60)

            batch_rates = []
            for batch in range(args.batches):
                name = f"batch-{batch}"
                digests = [hashlib.sha256(f"{batch}-{i}".encode()).hexdigest() for i in range(500)]
                started = time.perf_counter()
                create(_request(name, key, digests))
                watcher.wait_signed([name], timeout=120)
                batch_rates.append(500 / (watcher.signed[name] - started))
            batch_rate = statistics.median(batch_rates)

            started_at: dict[str, float] = {}
            interval, count = 1.0 / args.rate, int(args.rate * args.seconds)
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                begin = time.perf_counter()
                futures = []
                for i in range(count):
                    name = f"steady-{i}"
                    time.sleep(max(0.0, begin + i * interval - time.perf_counter()))
                    started_at[name] = time.perf_counter()
                    futures.append(pool.submit(create, _request(name, key, [hashlib.sha256(name.encode()).hexdigest()])))
                for future in futures:
                    future.result()
                offered = count / (time.perf_counter() - begin)
            watcher.wait_signed(list(started_at), timeout=120)
            latencies = [watcher.signed[n] - started_at[n] for n in started_at]

            sample = list(started_at)[::max(1, count // 50)]
            object_writes = [watcher.writes[n] for n in sample]  # ADDED (the creation) + each MODIFIED
            events = events_api.list_namespaced_event(NAMESPACE).items
            posted = {n: sum(e.count or 1 for e in events if e.involved_object.name == n) for n in sample}
            watcher.stop()

            print(f"baseline: raw python-pkcs11 ECDSA_P256, one session: {raw:.0f} signatures/s")
            print(f"one SignRequest of 500 digests, create -> Signed (median of {args.batches}): "
                  f"{batch_rate:.0f} signatures/s = {batch_rate / raw:.2f} x raw (goal >= 0.5); "
                  f"runs: {', '.join(f'{r:.0f}' for r in batch_rates)}")
            print(f"{count} single-digest SignRequests at {offered:.1f}/s offered for {args.seconds:.0f}s, "
                  f"create -> Signed: p50 {statistics.median(latencies) * 1e3:.0f} ms, "
                  f"p99 {_percentile(latencies, 0.99) * 1e3:.0f} ms, max {max(latencies) * 1e3:.0f} ms (goal p99 < 1 s)")
            print(f"API writes per request: {statistics.mean(object_writes):.1f} to the SignRequest (its creation "
                  f"included) + {statistics.mean(posted.values()):.1f} Event(s) = "
                  f"{statistics.mean(object_writes) + statistics.mean(posted.values()):.1f}")
        finally:
            if args.logs:
                shutil.copytree(state_dir / "logs", args.logs, dirs_exist_ok=True)
            controlplane.down(state_dir, log=lambda m: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())

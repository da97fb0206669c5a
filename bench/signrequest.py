"""SignRequests end to end: from `create` to Signed through the API server, operator and signer.

One run on the local control plane (real kube-apiserver and etcd, operator,
signer on SoftHSM2, everything on this machine) measures:

- the baselines: raw python-pkcs11 ECDSA_P256 and RSA_3072 signatures per
  second on one session;
- one auto-approved SignRequest of 500 digests per algorithm, from creation
  to Signed, as a ratio to its raw rate (goals: 0.3 for ECDSA_P256, 0.8 for
  RSA_3072);
- throughput: single-digest requests offered at rising rates (``--rates``),
  each for ``--seconds``; the highest rate whose requests are all Signed with
  p99 from creation to Signed under 1 s, and its p50/p99 (goal: 100/s);
- the API writes one request costs: its creation, every later write to the
  object (Kopf's bookkeeping included, seen as watch events) and its Events;
- scale: ``--keys`` SigningKeys (one policy selecting them by label) applied at
  once, the time until all are Ready (goal for 1,000: under 60 s) and how many
  ever went back from Ready; then as many finished requests as keys; the
  operator's and signer's resident memory (goal at 10,000: under 256 MiB each),
  with the share of the signer's that SoftHSM2 itself holds, measured in a bare
  process on the same token; their CPU when idle; and the time a restarted
  operator takes to sign a new request (goal: under 30 s).

Figures go to ``bench/results/latest.json``. Run with ``make bench``;
``--keys 10000`` for the figures at 10,000.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import kubernetes

from keyroom.devenv import controlplane
from keyroom.signer import softhsm

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import results  # noqa: E402  (bench/results.py)
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


def _setup(environment: controlplane.Environment) -> dict[str, str]:
    """A key per algorithm and a policy signing anything alice asks with them, without approvals."""
    keys = {"ECDSA_P256": "bench-ecdsa-p256", "RSA_3072": "bench-rsa-3072"}
    documents = [f"""apiVersion: keyroom.dev/v1alpha1
kind: SigningKey
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec: {{algorithm: {algorithm}}}
""" for algorithm, name in keys.items()]
    documents.append(f"""apiVersion: keyroom.dev/v1alpha1
kind: SigningPolicy
metadata: {{name: bench, namespace: {NAMESPACE}}}
spec:
  keys: [{", ".join(keys.values())}]
  requesters: {{users: [alice]}}
  requiredApprovals: 0
  maxSignaturesPerHour: 10000000
  maxDigestsPerRequest: 500
""")
    environment.run_kubectl("apply", "-f", "-", input="---\n".join(documents))
    for name in keys.values():
        environment.run_kubectl("wait", "--for=condition=Ready", f"signingkey/{name}", "-n", NAMESPACE,
                                "--timeout=120s")
    environment.run_kubectl("wait", "--for=condition=Ready", "signingpolicy/bench", "-n", NAMESPACE, "--timeout=60s")
    return keys


def _signature_count(api: kubernetes.client.CustomObjectsApi, key: str) -> int:
    body = api.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "signingkeys", key)
    return (body.get("status") or {}).get("signatureCount") or 0


def _wait_for(check, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def _rss_mib(state_dir: pathlib.Path, name: str) -> float:
    """Resident memory of the recorded process ``name`` (operator, signer)."""
    pid = controlplane._read_state(state_dir)["processes"][name]["pid"]
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {name}")


def idle_cpu_percent(state_dir: pathlib.Path, names: tuple[str, ...], seconds: float = 30.0) -> dict[str, float]:
    """CPU the recorded processes use over ``seconds`` with nothing to do, in percent of one core."""
    pids = {name: controlplane._read_state(state_dir)["processes"][name]["pid"] for name in names}

    def ticks() -> dict[str, int]:
        found = {}
        for name, pid in pids.items():
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            found[name] = int(fields[11]) + int(fields[12])  # utime + stime
        return found
    before, started = ticks(), time.perf_counter()
    time.sleep(seconds)  # a measurement window, not a wait for a condition
    after, elapsed = ticks(), time.perf_counter() - started
    return {name: 100 * (after[name] - before[name]) / os.sysconf("SC_CLK_TCK") / elapsed for name in names}


def module_rss_mib(hsm_dir: pathlib.Path) -> float:
    """Resident memory of a bare process that loads the PKCS#11 module and lists the token's keys.

    SoftHSM2 runs inside the signer and keeps every object of the token in the
    signer's memory; a network HSM keeps them in the device. This is that share
    of the signer's figure, measured on the same token.
    """
    script = ("import pkcs11, sys\n"
              "from pkcs11 import Attribute, ObjectClass\n"
              "token = pkcs11.lib(sys.argv[1]).get_token(token_label='keyroom-dev')\n"
              "with token.open(user_pin=sys.argv[2]) as session:\n"
              "    for kind in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):\n"
              "        for key in session.get_objects({Attribute.CLASS: kind}):\n"
              "            key[Attribute.ID]\n"
              "    print([l for l in open('/proc/self/status') if l.startswith('VmRSS:')][0].split()[1])\n")
    found = subprocess.run([sys.executable, "-c", script, softhsm.find_module(), (hsm_dir / "pin").read_text().strip()],
                           env=dict(os.environ, SOFTHSM2_CONF=str(hsm_dir / "softhsm2.conf")),
                           capture_output=True, text=True, check=True)
    return int(found.stdout.split()[-1]) / 1024


def finish_requests(create, watcher: Watcher, key: str, count: int, log) -> None:
    """``count`` more single-digest requests, created as fast as the API server takes them, all waited Signed."""
    names = [f"fill-{n}" for n in range(count)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda name: create(_request(name, key, [hashlib.sha256(name.encode()).hexdigest()])), names))
    watcher.wait_signed(names, timeout=max(600.0, count / 5))
    log(f"{count} more requests Signed")


def steady(create, watcher: Watcher, key: str, *, rate: float, seconds: float, prefix: str) -> dict:
    """Single-digest requests at ``rate`` per second for ``seconds``; latencies once all are Signed (or not)."""
    started_at: dict[str, float] = {}
    interval, count = 1.0 / rate, max(1, int(rate * seconds))
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        begin = time.perf_counter()
        futures = []
        for i in range(count):
            name = f"{prefix}-{i}"
            time.sleep(max(0.0, begin + i * interval - time.perf_counter()))
            started_at[name] = time.perf_counter()
            futures.append(pool.submit(create, _request(name, key, [hashlib.sha256(name.encode()).hexdigest()])))
        for future in futures:
            future.result()
        offered = count / (time.perf_counter() - begin)
    try:
        watcher.wait_signed(list(started_at), timeout=max(30.0, seconds))
        complete = True
    except TimeoutError:
        complete = False
    latencies = [watcher.signed[n] - started_at[n] for n in started_at if n in watcher.signed]
    return {"offered": offered, "count": count, "complete": complete, "names": list(started_at),
            "p50": statistics.median(latencies) if latencies else float("inf"),
            "p99": _percentile(latencies, 0.99) if complete else float("inf")}


def scale(environment: controlplane.Environment, admin_api, key_count: int, log) -> dict:
    """``key_count`` SigningKeys applied at once: seconds until all are Ready, and how many went back."""
    ready: dict[str, float] = {}
    regressions: list[str] = []
    done = threading.Event()

    def watch() -> None:
        version = admin_api.list_namespaced_custom_object(GROUP, VERSION, "team-scale", "signingkeys")[
            "metadata"]["resourceVersion"]
        while not done.is_set():
            for event in kubernetes.watch.Watch().stream(
                    admin_api.list_namespaced_custom_object, GROUP, VERSION, "team-scale", "signingkeys",
                    resource_version=version, timeout_seconds=10):
                body = event["object"]
                version = body["metadata"]["resourceVersion"]
                name = body["metadata"]["name"]
                is_ready = any(c["type"] == "Ready" and c["status"] == "True"
                               for c in (body.get("status") or {}).get("conditions") or [])
                if is_ready and name not in ready:
                    ready[name] = time.perf_counter()
                elif not is_ready and name in ready and event["type"] == "MODIFIED":
                    regressions.append(name)
                if len(ready) >= key_count:
                    done.set()
                    return

    environment.run_kubectl("create", "namespace", "team-scale")
    environment.run_kubectl("apply", "-f", "-", input="""apiVersion: keyroom.dev/v1alpha1
kind: SigningPolicy
metadata: {name: scale, namespace: team-scale}
spec:
  keySelector: {matchLabels: {bench: scale}}
  requesters: {users: [alice]}
  requiredApprovals: 0
""")
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    manifests = "---\n".join(f"""apiVersion: keyroom.dev/v1alpha1
kind: SigningKey
metadata: {{name: key-{n:05d}, namespace: team-scale, labels: {{bench: scale}}}}
spec: {{algorithm: ECDSA_P256}}
""" for n in range(key_count))
    manifest_file = environment.state_dir / "scale-keys.yaml"
    manifest_file.write_text(manifests)
    started = time.perf_counter()
    environment.run_kubectl("apply", "--server-side", "-f", str(manifest_file))
    log(f"{key_count} SigningKeys applied in {time.perf_counter() - started:.0f}s")
    if not done.wait(timeout=max(600, key_count)):
        log(f"only {len(ready)} of {key_count} keys Ready")
    all_ready = time.perf_counter() - started if len(ready) >= key_count else float("inf")
    return {"ready_s": all_ready, "ready": len(ready), "regressions": len(set(regressions))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="20,30,40,50,60,80,100,120",
                        help="single-digest request rates to try in turn, per second (empty: no throughput figures)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to keep each rate")
    parser.add_argument("--batches", type=int, default=5,
                        help="500-digest requests to time per algorithm (0: no batch figures)")
    parser.add_argument("--keys", type=int, default=1000, help="SigningKeys for the scale figures (0: none)")
    parser.add_argument("--logs", type=pathlib.Path, help="copy the components' logs here before stopping them")
    args = parser.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)
    figures: dict = {}

    with tempfile.TemporaryDirectory(prefix="keyroom-bench-") as directory:
        state_dir = pathlib.Path(directory) / "env"
        environment = controlplane.up(state_dir, log=log)
        try:
            # the operator as deployed: info logs, the token audit every 10 minutes (not debug logs and every 5 s)
            controlplane.stop_process(state_dir, "operator", log=lambda m: None)
            controlplane.start_operator(environment, as_deployed=True)
            hsm_dir = state_dir / "hsm"
            os.environ["SOFTHSM2_CONF"] = str(hsm_dir / "softhsm2.conf")
            raw = {algorithm: raw_rate(module=softhsm.find_module(), token_label="keyroom-dev",
                                       algorithm=algorithm, seconds=5,
                                       pin=(hsm_dir / "pin").read_text().strip())[0]
                   for algorithm in ("ECDSA_P256", "RSA_3072")}
            keys = _setup(environment)
            api = kubernetes.client.CustomObjectsApi(_client(environment.kubeconfig("alice")))
            admin_api = kubernetes.client.CustomObjectsApi(_client(state_dir / "kubeconfig"))
            events_api = kubernetes.client.CoreV1Api(_client(state_dir / "kubeconfig"))
            watcher = Watcher(api)
            create = lambda body: api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)

            # a warm-up request: TLS sessions, TokenReview cache, first-use paths
            create(_request("warm-up", keys["ECDSA_P256"], [hashlib.sha256(b"warm").hexdigest()]))
            watcher.wait_signed(["warm-up"], timeout=60)

            for algorithm, key in keys.items() if args.batches else ():
                batch_rates, signed = [], _signature_count(admin_api, key)
                for batch in range(args.batches):
                    name = f"batch-{algorithm.lower().replace('_', '-')}-{batch}"
                    digests = [hashlib.sha256(f"{name}-{i}".encode()).hexdigest() for i in range(500)]
                    started = time.perf_counter()
                    create(_request(name, key, digests))
                    watcher.wait_signed([name], timeout=300)
                    batch_rates.append(500 / (watcher.signed[name] - started))
                    # each request is timed alone: its follow-ups (the key's signature count) end before the next
                    signed += 500
                    _wait_for(lambda: _signature_count(admin_api, key) >= signed, timeout=60,
                              what=f"{key}'s signature count to reach {signed}")
                rate = statistics.median(batch_rates)
                figures[f"raw_{algorithm.lower()}_sign_per_s"] = raw[algorithm]
                figures[f"batch_ratio_to_raw_{algorithm.lower()}"] = rate / raw[algorithm]
                goal = 0.3 if algorithm == "ECDSA_P256" else 0.8
                print(f"one SignRequest of 500 {algorithm} digests, create -> Signed (median of {args.batches}): "
                      f"{rate:.0f} signatures/s = {rate / raw[algorithm]:.2f} x raw {raw[algorithm]:.0f}/s "
                      f"(goal >= {goal}); runs: {', '.join(f'{r:.0f}' for r in batch_rates)}", flush=True)

            best = None
            for step, rate in enumerate(float(r) for r in args.rates.split(",") if r.strip()):
                run = steady(create, watcher, keys["ECDSA_P256"], rate=rate, seconds=args.seconds,
                             prefix=f"steady-{step}")
                sustained = run["complete"] and run["p99"] < 1.0
                print(f"{run['count']} single-digest requests at {run['offered']:.1f}/s offered for "
                      f"{args.seconds:.0f}s: p50 {run['p50'] * 1e3:.0f} ms, p99 {run['p99'] * 1e3:.0f} ms "
                      f"-> {'sustained' if sustained else 'not sustained'}", flush=True)
                if not sustained:
                    break
                best = run
            if best is not None:
                figures.update(throughput_signed_per_s=best["offered"], latency_p50_ms=best["p50"] * 1e3,
                               latency_p99_ms=best["p99"] * 1e3)
                sample = best["names"][::max(1, best["count"] // 50)]
                object_writes = [watcher.writes[n] for n in sample]  # ADDED (the creation) + each MODIFIED
                events = events_api.list_namespaced_event(NAMESPACE).items
                posted = [sum(e.count or 1 for e in events if e.involved_object.name == n) for n in sample]
                figures["api_writes_per_request"] = statistics.mean(object_writes) + statistics.mean(posted)
                print(f"highest sustained rate: {best['offered']:.1f}/s (goal 100/s); API writes per request: "
                      f"{statistics.mean(object_writes):.1f} to the SignRequest (its creation included) + "
                      f"{statistics.mean(posted):.1f} Event(s)")
            elif args.rates.strip():
                print("no rate was sustained with p99 under 1 s")
            watcher.stop()
            results.record(figures)  # each phase's figures are kept even if a later phase fails

            if args.keys:
                found = scale(environment, admin_api, args.keys, log)
                suffix = "10k" if args.keys == 10000 else str(args.keys)
                figures[f"keys_{args.keys}_ready_s"] = found["ready_s"]
                figures[f"keys_{args.keys}_went_back"] = found["regressions"]
                print(f"{args.keys} SigningKeys applied at once: all Ready after {found['ready_s']:.0f}s "
                      f"({found['ready']} Ready; {found['regressions']} went back from Ready)", flush=True)
                results.record(figures)
                finished = len(watcher.signed)
                if finished < args.keys:  # as many finished requests as keys
                    filler = Watcher(api)
                    finish_requests(create, filler, keys["ECDSA_P256"], args.keys - finished, log)
                    filler.stop()
                    finished = args.keys
                figures[f"operator_rss_mib_at_{suffix}"] = _rss_mib(state_dir, "operator")
                figures[f"signer_rss_mib_at_{suffix}"] = _rss_mib(state_dir, "signer")
                figures[f"signer_module_rss_mib_at_{suffix}"] = module_rss_mib(hsm_dir)
                print(f"resident memory with {args.keys} keys and {finished} finished requests: "
                      f"operator {figures[f'operator_rss_mib_at_{suffix}']:.0f} MiB, signer "
                      f"{figures[f'signer_rss_mib_at_{suffix}']:.0f} MiB (goal under 256 MiB each), of which "
                      f"about {figures[f'signer_module_rss_mib_at_{suffix}']:.0f} MiB is what a bare process "
                      "loading SoftHSM2 with this token holds")
                results.record(figures)
                idle = idle_cpu_percent(state_dir, ("operator", "signer"))
                figures[f"operator_idle_cpu_percent_at_{suffix}"] = idle["operator"]
                figures[f"signer_idle_cpu_percent_at_{suffix}"] = idle["signer"]
                print(f"idle with {args.keys} keys and {finished} finished requests: operator {idle['operator']:.1f}% "
                      f"and signer {idle['signer']:.1f}% of one core (30 s)")
                results.record(figures)

                controlplane.stop_process(state_dir, "operator", log=lambda m: None)
                restarted = time.perf_counter()
                controlplane.start_operator(environment, as_deployed=True)
                catch_up = Watcher(api)
                create(_request("after-restart", keys["ECDSA_P256"], [hashlib.sha256(b"restart").hexdigest()]))
                catch_up.wait_signed(["after-restart"], timeout=600)
                # the figure the goal is set for is at 10,000 keys; other sizes are named by theirs
                catch_up_figure = "operator_catchup_s" if suffix == "10k" else f"operator_catchup_s_at_{suffix}"
                figures[catch_up_figure] = catch_up.signed["after-restart"] - restarted
                catch_up.stop()
                print(f"operator restarted: a new request Signed {figures[catch_up_figure]:.1f}s after the "
                      f"restart began (goal under 30 s at 10,000 keys)")
        finally:
            if args.logs:
                shutil.copytree(state_dir / "logs", args.logs, dirs_exist_ok=True)
            controlplane.down(state_dir, log=lambda m: None)
    results.record(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Chaos: SignRequests under load while the operator and the signer are killed with SIGKILL at random moments,
and kube-apiserver and etcd are killed and restarted once each.

alice creates requests from several threads (the Kubernetes Python client, each request under a fixed name so
that a retry never creates a second one) and bob approves each soon after it was created; a few requests are
never approved. A fault thread works through a schedule drawn from ``random.Random(seed)``: the seed is printed
first, and ``KEYROOM_CHAOS_SEED=<seed>`` replays the same schedule (the threads' interleaving differs).
Afterwards every approved request must be Signed, with exactly one Signed audit entry, and nothing signed twice;
no unapproved request may have been signed or even got an Intent entry.

Sizes: ``KEYROOM_CHAOS_REQUESTS`` (120), ``KEYROOM_CHAOS_FAULTS`` (operator and signer kills, 4),
``KEYROOM_CHAOS_RATE`` (requests created per second, 4). ``make chaos`` runs the long form.
"""
from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import json
import os
import queue
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time

import kubernetes
import pytest
import urllib3

from keyroom.cli.plugin import approval_patch
from keyroom.devenv import controlplane
from tests.conftest import apply, get, identity, wait_for

pytestmark = pytest.mark.integration

REQUESTS = int(os.environ.get("KEYROOM_CHAOS_REQUESTS") or 120)
FAULTS = int(os.environ.get("KEYROOM_CHAOS_FAULTS") or 4)
RATE = float(os.environ.get("KEYROOM_CHAOS_RATE") or 4)
SEED = int(os.environ.get("KEYROOM_CHAOS_SEED") or secrets.randbelow(2**32))
UNAPPROVED = max(3, REQUESTS // 40)
RECOVERY = 60.0  # every approved request is Signed this long after the last fault at the latest
NAMESPACE = "team-a"
GROUP, VERSION, PLURAL = "keyroom.dev", "v1alpha1", "signrequests"
CREATORS, APPROVERS = 3, 2
TRANSIENT = (kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError)


@dataclasses.dataclass
class Load:
    prefix: str
    names: list[str]
    unapproved: set[str]
    digests: dict[str, dict[str, str]]
    created: dict[str, float] = dataclasses.field(default_factory=dict)
    approved: dict[str, float] = dataclasses.field(default_factory=dict)
    retries: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    errors: list[str] = dataclasses.field(default_factory=list)
    abort: threading.Event = dataclasses.field(default_factory=threading.Event)  # a fault could not be injected
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def _api(cluster, user: str) -> kubernetes.client.CustomObjectsApi:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(cluster.kubeconfig(user)), client_configuration=configuration)
    configuration.retries = False  # the load retries itself, and counts it
    return kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(configuration))


def _retrying(load: Load, what: str, call, *, deadline: float):
    """Call until it succeeds (the API server may be down for a while); give up at ``deadline``."""
    while True:
        try:
            return call()
        except TRANSIENT as error:
            with load.lock:
                load.retries[what] += 1
            if time.monotonic() > deadline or load.abort.is_set():
                raise AssertionError(f"{what} still failing at its deadline: {error}") from None
            time.sleep(0.2)  # the API server is restarting: try again shortly


def _create(load: Load, api, name: str, deadline: float) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SignRequest",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"keyroom.dev/chaos": load.prefix}},
            "spec": {"keyRef": {"name": load.prefix}, "requester": identity("alice"), "reason": "chaos",
                     "digests": [{"name": n, "value": v} for n, v in load.digests[name].items()]}}

    def call():
        try:
            api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body, _request_timeout=5)
        except kubernetes.client.ApiException as error:
            if error.status != 409:  # 409: an earlier attempt created it (its answer was lost); never twice
                raise
            with load.lock:
                load.retries["create answered 409"] += 1
    _retrying(load, "create", call, deadline=deadline)


def _approve(load: Load, api, name: str, deadline: float) -> None:
    """bob appends his approval with a JSON patch, as kubectl keyroom approve does."""
    entry = {"user": "bob", "groups": identity("bob")["groups"], "decision": "Approve"}

    def call():
        current = api.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name,
                                                   _request_timeout=5)["spec"].get("approvals")
        if any(a["user"] == "bob" for a in current or []):
            return  # an earlier attempt got through
        api.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name, approval_patch(current, entry),
                                           _content_type="application/json-patch+json", _request_timeout=5)
    _retrying(load, "approve", call, deadline=deadline)


def _run_load(cluster, load: Load, rng: random.Random, started: float) -> list[threading.Thread]:
    """Creators create request i at ``started + i / RATE``; approvers approve each a moment after its creation."""
    work: queue.Queue = queue.Queue()
    for index, name in enumerate(load.names):
        work.put((started + index / RATE, name))
    approvals: queue.Queue = queue.Queue()
    delays = {name: rng.uniform(0, 1.0) for name in load.names}

    def on_schedule(due: float, name: str, action, api) -> bool:
        """``action`` for ``name`` at ``due`` (the load's schedule) unless the load was aborted; whether it
        succeeded (a failure is recorded)."""
        if load.abort.is_set():
            return False
        time.sleep(max(0.0, due - time.monotonic()))
        try:
            action(load, api, name, deadline=time.monotonic() + 120)
        except AssertionError as error:
            load.errors.append(f"{name}: {error}")
            return False
        return True

    def creator() -> None:
        api = _api(cluster, "alice")
        while True:
            try:
                due, name = work.get_nowait()
            except queue.Empty:
                return
            if on_schedule(due, name, _create, api):
                load.created[name] = time.monotonic()
                if name not in load.unapproved:
                    approvals.put((time.monotonic() + delays[name], name))

    def approver() -> None:
        api = _api(cluster, "bob")
        while (item := approvals.get()) is not None:
            if on_schedule(*item, _approve, api):  # "soon after creation"
                load.approved[item[1]] = time.monotonic()

    creators = [threading.Thread(target=creator, daemon=True) for _ in range(CREATORS)]
    approvers = [threading.Thread(target=approver, daemon=True) for _ in range(APPROVERS)]
    for thread in creators + approvers:
        thread.start()

    def close() -> None:
        for thread in creators:
            thread.join()
        for _ in approvers:
            approvals.put(None)
    closer = threading.Thread(target=close, daemon=True)
    closer.start()
    return [closer, *approvers]


def _kill(cluster, process: str) -> None:
    state = json.loads((cluster.state_dir / "state.json").read_text())
    os.killpg(state["processes"][process]["pid"], signal.SIGKILL)


def _schedule(rng: random.Random, duration: float) -> list[tuple[float, str]]:
    """(seconds after the load started, target): FAULTS kills shared between the operator and the signer, and
    one crash each of kube-apiserver and etcd, at random moments of the load."""
    kills = (["operator", "signer"] * FAULTS)[:FAULTS]
    rng.shuffle(kills)
    targets = list(kills)
    for control_plane in ("kube-apiserver", "etcd"):
        targets.insert(rng.randint(0, len(targets)), control_plane)
    moments = sorted(rng.uniform(0.05 * duration, 0.9 * duration) for _ in targets)
    return list(zip(moments, targets))


def _inject(cluster, schedule, rng: random.Random, started: float, faults: list, errors: list,
            abort: threading.Event) -> None:
    try:
        for moment, target in schedule:
            time.sleep(max(0.0, started + moment - time.monotonic()))  # the fault schedule
            at = time.monotonic()
            if target in ("operator", "signer"):
                _kill(cluster, target)
                time.sleep(rng.uniform(0, 1.5))  # how long it stays down
                (controlplane.start_operator if target == "operator" else controlplane.start_signer)(cluster)
            else:
                controlplane.restart_process(cluster, target)
            faults.append((at, time.monotonic(), target))
            print(f"chaos: t={at - started:6.1f}s killed {target}, running again after {time.monotonic() - at:.1f}s",
                  flush=True)
    except Exception as error:  # noqa: BLE001 - reported by the test
        errors.append(f"fault injection: {type(error).__name__}: {error}")
        abort.set()


def _phases(admin, prefix: str) -> dict[str, dict]:
    listed = admin.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL,
                                                 label_selector=f"keyroom.dev/chaos={prefix}", _request_timeout=10)
    return {item["metadata"]["name"]: item for item in listed["items"]}


@pytest.mark.timeout(600 + int(REQUESTS / RATE) * 2)
def test_kill_9_of_operator_signer_api_server_and_etcd_under_load_signs_every_approved_request_once(cluster, tmp_path):
    try:
        _chaos(cluster)
    except BaseException:
        # the environment is removed at the end of the session: keep what tells what happened
        kept = tmp_path / "chaos"
        shutil.copytree(cluster.state_dir / "logs", kept / "logs")
        shutil.copy(cluster.state_dir / "signer" / "audit.jsonl", kept)
        shutil.copy(cluster.state_dir / "state.json", kept)
        print(f"chaos: failed with seed {SEED}; the components' logs and the audit log are kept in {kept}")
        raise


def _chaos(cluster) -> None:
    print(f"\nchaos: seed {SEED} (replay with KEYROOM_CHAOS_SEED={SEED}), {REQUESTS} approved and {UNAPPROVED} "
          f"unapproved requests at {RATE:g}/s, {FAULTS} operator/signer kills, one kube-apiserver and one etcd crash",
          flush=True)
    rng = random.Random(SEED)
    prefix = f"chaos-{secrets.token_hex(4)}"
    assert apply(cluster, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SigningKey",
                           "metadata": {"name": prefix, "namespace": NAMESPACE},
                           "spec": {"algorithm": "RSA_3072"}}).returncode == 0  # ~3 ms a signature
    assert apply(cluster, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SigningPolicy",
                           "metadata": {"name": prefix, "namespace": NAMESPACE},
                           "spec": {"keys": [prefix], "requesters": {"users": ["alice"]},
                                    "approvers": {"users": ["bob"]}, "requiredApprovals": 1,
                                    "maxSignaturesPerHour": 10_000_000}}).returncode == 0
    wait_for(lambda: get(cluster, "signingkey", prefix, namespace=NAMESPACE).get("status", {}).get("currentVersion"),
             what="the key's first version")
    wait_for(lambda: prefix in get(cluster, "signingpolicy", prefix, namespace=NAMESPACE).get("status", {})
             .get("matchedKeys", []), what="the policy to select the key")
    key_uid = get(cluster, "signingkey", prefix, namespace=NAMESPACE)["metadata"]["uid"]

    total = REQUESTS + UNAPPROVED
    held = set(rng.sample(range(total), UNAPPROVED))
    names = [f"{prefix}-{'held' if i in held else 'sr'}-{i:04}" for i in range(total)]
    digests = {name: {f"file-{j}.bin": hashlib.sha256(f"{name}/{j}".encode()).hexdigest()
                      for j in range(rng.randint(1, 6))} for name in names}
    load = Load(prefix=prefix, names=names, unapproved={n for i, n in enumerate(names) if i in held},
                digests=digests)
    approved_names = [n for n in names if n not in load.unapproved]
    duration = total / RATE
    schedule = _schedule(rng, duration)
    print("chaos: schedule " + ", ".join(f"{target} at {moment:.1f}s" for moment, target in schedule), flush=True)

    started = time.monotonic()
    faults: list[tuple[float, float, str]] = []
    fault_errors: list[str] = []
    injector = threading.Thread(target=_inject, args=(cluster, schedule, random.Random(rng.random()), started, faults,
                                                      fault_errors, load.abort), daemon=True)
    load_threads = _run_load(cluster, load, random.Random(rng.random()), started)
    injector.start()
    for thread in [injector, *load_threads]:
        thread.join(timeout=duration + 600)
        assert not thread.is_alive(), "the load or the fault injection did not finish"
    load_done = time.monotonic()
    print(f"chaos: load done in {load_done - started:.1f}s: {len(load.created)} created, {len(load.approved)} approved; "
          f"retries {dict(load.retries)}", flush=True)
    assert not fault_errors, fault_errors
    assert not load.errors, load.errors[:10]
    assert len(faults) == len(schedule)

    # ---------------------------------------------------------------- recovery
    last_fault = max(at for at, _, _ in faults)
    admin = _api(cluster, "admin")
    deadline = max(last_fault, max(load.approved.values())) + RECOVERY
    while True:
        try:
            objects = _phases(admin, prefix)
        except TRANSIENT:
            objects = {}
        signed = [n for n in approved_names if objects.get(n, {}).get("status", {}).get("phase") == "Signed"]
        if len(signed) == len(approved_names) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    all_signed_at = time.monotonic()
    phases = collections.Counter(objects.get(n, {}).get("status", {}).get("phase") for n in approved_names)
    held_phases = collections.Counter(objects.get(n, {}).get("status", {}).get("phase") for n in load.unapproved)
    recovery = all_signed_at - last_fault
    print(f"chaos: {len(signed)}/{len(approved_names)} approved requests Signed {recovery:.1f}s after the last fault "
          f"({all_signed_at - max(load.approved.values()):.1f}s after the last approval, "
          f"{all_signed_at - started:.1f}s after the start); approved by phase {dict(phases)}, "
          f"unapproved by phase {dict(held_phases)}", flush=True)

    # ---------------------------------------------------------------- the audit log
    entries = [json.loads(line) for line in (cluster.state_dir / "signer" / "audit.jsonl").read_text().splitlines()]
    uids = {n: o["metadata"]["uid"] for n, o in objects.items()}
    mine = [e for e in entries if "request" in e and e["request"]["namespace"] == NAMESPACE
            and e["request"]["name"] in uids and e["request"]["uid"] == uids[e["request"]["name"]]]
    intents = {e["index"]: e for e in mine if e["event"] == "Intent"}
    abandoned = {e["intent"] for e in mine if e["event"] == "Abandoned"}
    signed_entries = [e for e in mine if e["event"] == "Signed"]
    signed_per_uid = collections.Counter(e["request"]["uid"] for e in signed_entries)
    orphans = [e["index"] for e in signed_entries if e["intent"] not in intents]  # a Signed entry without its Intent
    digests_signed = collections.Counter(d["value"] for e in signed_entries
                                         for d in intents.get(e["intent"], {}).get("digests", []))
    held_intents = [e for e in intents.values() if e["request"]["name"] in load.unapproved]
    held_signed = [n for n in load.unapproved if objects.get(n, {}).get("status", {}).get("signatures")
                   or objects.get(n, {}).get("status", {}).get("phase") == "Signed"]
    open_intents = [i for i in intents if i not in abandoned and i not in {e["intent"] for e in signed_entries}]
    without_bob = [e["request"]["name"] for e in signed_entries
                   if "bob" not in intents.get(e["intent"], {}).get("approvers", [])]
    mismatched = []
    for entry in signed_entries:
        status = objects[entry["request"]["name"]].get("status", {})
        from_status = {s["name"]: "sha256:" + hashlib.sha256(base64.b64decode(s["value"])).hexdigest()
                       for s in status.get("signatures", [])}
        if (from_status != {s["name"]: s["hash"] for s in entry["signatures"]}
                or status.get("audit", {}).get("index") != entry["index"]
                or set(from_status) != set(load.digests[entry["request"]["name"]])):
            mismatched.append(entry["request"]["name"])
    wrong_key = [e["request"]["name"] for e in intents.values() if e["key"]["uid"] != key_uid]
    print(f"chaos: audit: {len(intents)} Intent, {len(abandoned)} Abandoned, {len(signed_entries)} Signed entries; "
          f"{sum(digests_signed.values())} digests signed; requests signed more than once "
          f"{sum(1 for c in signed_per_uid.values() if c > 1)}, digests signed more than once "
          f"{sum(1 for c in digests_signed.values() if c > 1)}; unapproved requests with an Intent "
          f"{len(held_intents)}, with signatures {len(held_signed)}; Intents neither Signed nor Abandoned "
          f"{len(open_intents)}; Signed without bob's approval {len(without_bob)}; status differing from the audit "
          f"{len(mismatched)}", flush=True)

    # ---------------------------------------------------------------- the audit log against its checkpoint
    last_index = entries[-1]["index"]

    def checkpoint() -> dict | None:
        data = json.loads(cluster.run_kubectl("get", "configmap", "keyroom-audit-checkpoint", "-n", "keyroom-system",
                                              "-o", "json", check=False).stdout or "{}").get("data")
        return data if data and int(data["index"]) >= last_index else None
    head = wait_for(checkpoint, timeout=30, what="the checkpoint to reach the end of the log")
    verified = subprocess.run([sys.executable, "-m", "keyroom.signer.audit", "verify",
                               str(cluster.state_dir / "signer" / "audit.jsonl"), "--index", head["index"],
                               "--hash", head["entryHash"]], capture_output=True, text=True)
    print(f"chaos: the audit log verifies against its checkpoint (entry {head['index']}): "
          f"{verified.returncode == 0}; total {time.monotonic() - started:.1f}s", flush=True)

    replay = f"(seed {SEED}: KEYROOM_CHAOS_SEED={SEED})"
    assert len(load.created) == total and len(load.approved) == REQUESTS, replay
    assert len(signed) == len(approved_names), \
        f"{len(approved_names) - len(signed)} approved requests not Signed {RECOVERY:.0f}s after the last fault " \
        f"{replay}: {[n for n in approved_names if n not in signed][:10]}, phases {dict(phases)}"
    assert recovery <= RECOVERY + 1, replay
    assert not held_signed and not held_intents, f"unapproved requests signed {replay}: {held_signed} {held_intents}"
    assert set(signed_per_uid) == {uids[n] for n in approved_names}, replay
    assert all(count == 1 for count in signed_per_uid.values()), f"requests signed twice {replay}: " \
        f"{[u for u, c in signed_per_uid.items() if c > 1]}"
    assert all(count == 1 for count in digests_signed.values()), f"digests signed twice {replay}"
    assert len([i for i in intents if i not in abandoned]) == len(signed_entries), \
        f"Intent entries not abandoned differ from Signed entries {replay}: open {open_intents}"
    assert not without_bob, replay
    assert not mismatched, f"status signatures differ from the audit log {replay}: {mismatched[:10]}"
    assert not wrong_key and not orphans, replay
    assert verified.returncode == 0, verified.stderr

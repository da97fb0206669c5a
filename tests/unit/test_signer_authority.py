"""The signer's authority, guard by guard: keyroom.signer.requests.RequestSigner on a real SoftHSM2 token.

No cluster: the signer's ClusterReader is the real class over an in-memory
API server (custom objects and the ConfigMaps of the signer's namespace), so
its own UID, 404 and checkpoint handling run too. Objects are plain dicts
shaped like the Kubernetes objects. The token is one SoftHSM2 token for the
whole session (SoftHSM reads ``SOFTHSM2_CONF`` when the process initialises
it), opened in this process; every test uses keys with fresh UIDs.

Each test removes one guard's reason to exist: a UID or digests that differ,
an unapproved request, a one-time key used twice, a retired version, key
material gone, an audit log that does not match its checkpoint, a checkpoint
too far behind, a destruction before its time. Status is never read: bodies
carry forged status fields that would change the outcome if it were.

The signer's clock (``datetime.datetime.now`` as ``keyroom.signer.requests``
reads it) is frozen where a test needs an exact instant, so destruction is
checked at ``destroyAt`` and a microsecond before it without sleeping.
"""
from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import hashlib
import json
import pathlib
import shutil
import tempfile
import types
import uuid

import kubernetes
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from keyroom import policy
from keyroom.api.common import GROUP, VERSION
from keyroom.schedule import format_time
from keyroom.signer import audit, hsm, keys, requests
from keyroom.signer.client import digests_fingerprint
from tests.unit.test_signer_authentication import surviving

NS = "team-a"
SIGNER_NS = "keyroom-system"
ALICE = {"username": "alice", "groups": ["team-a-devs", "system:authenticated"]}
APPROVERS = ("bob", "carol")
GROUPS = {"bob": ["team-a-approvers"], "carol": ["team-a-approvers"], "dave": ["team-b-devs"],
          "alice": ["team-a-devs", "team-a-approvers"]}
UTC = datetime.timezone.utc
#: a status that, if the signer read it, would make it refuse (or sign) differently
FORGED_KEY_STATUS = {"phase": "Destroyed", "consumedBy": "someone-else", "currentVersion": 7,
                     "versions": [{"version": 7, "state": "Enabled"}, {"version": 1, "state": "Destroyed",
                                                                         "missing": True}],
                     "missingVersions": [1]}
FORGED_REQUEST_STATUS = {"phase": "Approved", "keyVersion": 7, "signatures": [{"name": "app.exe", "value": "AA=="}],
                         "approvals": [{"user": "mallory", "decision": "Approve", "counted": True}],
                         "audit": {"index": 0, "entryHash": "sha256:" + "0" * 64}}


def objects_of(token: hsm.Token, uid: str) -> set[tuple[int, str]]:
    """(version, class) of the objects the token holds for a key UID."""
    return {(o.handle.version, o.object_class) for o in token.list_objects()
            if o.handle is not None and o.handle.uid == uid}


# --------------------------------------------------------------------------- the API server, in memory

class Cluster:
    """What the signer reads: custom objects by plural, and the ConfigMaps of the signer's namespace."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[tuple[str, str], dict]] = {
            "signrequests": {}, "signingkeys": {}, "signingpolicies": {}, "certificates": {}}
        self.config_maps: dict[str, dict[str, str]] = {}
        self.down = False  # every call fails, as when the API server is unreachable
        self.refuse_writes = False
        self.listed: list[str] = []  # the plural of each list call

    def put(self, plural: str, body: dict) -> dict:
        self.objects[plural][(body["metadata"]["namespace"], body["metadata"]["name"])] = copy.deepcopy(body)
        return body

    def check(self) -> None:
        if self.down:
            raise ConnectionRefusedError("the API server is unreachable")

    @property
    def checkpoint(self) -> dict[str, str] | None:
        return self.config_maps.get(audit.CHECKPOINT_NAME)


class _CustomObjects:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.cluster.check()
        assert (group, version) == (GROUP, VERSION)
        found = self.cluster.objects[plural].get((namespace, name))
        if found is None:
            raise kubernetes.client.ApiException(status=404, reason="Not Found")
        return copy.deepcopy(found)

    def list_namespaced_custom_object(self, group, version, namespace, plural):
        self.cluster.check()
        assert (group, version) == (GROUP, VERSION)
        self.cluster.listed.append(plural)
        return {"items": [copy.deepcopy(body) for (ns, _), body in self.cluster.objects[plural].items()
                          if ns == namespace]}


class _Core:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def read_namespaced_config_map(self, name, namespace):
        self.cluster.check()
        assert namespace == SIGNER_NS
        if name not in self.cluster.config_maps:
            raise kubernetes.client.ApiException(status=404, reason="Not Found")
        return types.SimpleNamespace(data=dict(self.cluster.config_maps[name]))

    def patch_namespaced_config_map(self, name, namespace, body):
        self.cluster.check()
        assert namespace == SIGNER_NS and body["metadata"]["name"] == name
        if self.cluster.refuse_writes:
            raise kubernetes.client.ApiException(status=500, reason="Internal Server Error")
        if name not in self.cluster.config_maps:
            raise kubernetes.client.ApiException(status=404, reason="Not Found")
        self.cluster.config_maps[name].update(body["data"])

    def replace_namespaced_config_map(self, name, namespace, body):
        self.cluster.check()
        assert namespace == SIGNER_NS and body["metadata"]["name"] == name
        if name not in self.cluster.config_maps:
            raise kubernetes.client.ApiException(status=404, reason="Not Found")
        self.cluster.config_maps[name] = dict(body["data"])

    def create_namespaced_config_map(self, namespace, body):
        self.cluster.check()
        assert namespace == SIGNER_NS
        if self.cluster.refuse_writes:
            raise kubernetes.client.ApiException(status=500, reason="Internal Server Error")
        self.cluster.config_maps[body["metadata"]["name"]] = dict(body["data"])


class StandInReader(requests.ClusterReader):
    """The signer's ClusterReader with the in-memory API server behind it (same methods, same checks)."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(namespace=SIGNER_NS)
        self._custom, self._core = _CustomObjects(cluster), _Core(cluster)


# --------------------------------------------------------------------------- objects as the API server serves them

def _meta(name: str, uid: str | None = None, **extra) -> dict:
    return {"name": name, "namespace": NS, "uid": uid or str(uuid.uuid4()),
            "creationTimestamp": format_time(datetime.datetime.now(UTC) - datetime.timedelta(minutes=1)), **extra}


def key_object(name: str = "release", *, uid: str | None = None, usage: str = "Reusable",
               annotations: dict | None = None, deleted: bool = False, status: dict | None = None, **spec) -> dict:
    meta = _meta(name, uid, labels={"tier": "release"}, annotations=dict(annotations or {}))
    if deleted:
        meta["deletionTimestamp"] = format_time(datetime.datetime.now(UTC))
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SigningKey", "metadata": meta,
            "spec": {"algorithm": "ECDSA_P256", "usage": usage, **spec}, **({"status": status} if status else {})}


def policy_object(name: str = "release", required: int = 2, **spec) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SigningPolicy", "metadata": _meta(name),
            "spec": {"keySelector": {"matchLabels": {"tier": "release"}}, "requesters": {"groups": ["team-a-devs"]},
                     "approvers": {"groups": ["team-a-approvers"]}, "requiredApprovals": required, **spec}}


def request_object(*approvers: str, name: str | None = None, key: str = "release", artifacts: tuple = ("app.exe",),
                   decision: str = "Approve", status: dict | None = None) -> dict:
    digests = [{"name": a, "value": hashlib.sha256(f"{a}-{uuid.uuid4()}".encode()).hexdigest()} for a in artifacts]
    spec = {"keyRef": {"name": key}, "requester": ALICE, "reason": "release 1.4.2", "format": "raw",
            "digestAlgorithm": "SHA256", "digests": digests,
            "approvals": [{"user": u, "groups": GROUPS[u], "decision": decision} for u in approvers]}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SignRequest",
            "metadata": _meta(name or f"sr-{uuid.uuid4().hex[:8]}"), "spec": spec,
            **({"status": status} if status else {})}


def uid_of(body: dict) -> str:
    return body["metadata"]["uid"]


# --------------------------------------------------------------------------- the signer under test

class World:
    """A signer's state directory, the in-memory API server and the session's token."""

    def __init__(self, token: hsm.Token, directory: pathlib.Path) -> None:
        self.token = token
        self.cluster = Cluster()
        self.reader = StandInReader(self.cluster)
        self.state_dir = directory / "signer"
        self.signers: list[requests.RequestSigner] = []
        self.operations: list[str] = []  # every token operation the signer asked for
        self.fail: dict[str, BaseException] = {}  # operation -> what the token raises (once)

    def in_token(self, operation: str, call):
        self.operations.append(operation)
        failure = self.fail.pop(operation, None)
        if failure is not None:
            raise failure
        return asyncio.to_thread(call, self.token)

    def new_signer(self, **kwargs) -> requests.RequestSigner:
        signer = requests.RequestSigner(state_dir=self.state_dir, reader=self.reader, in_token=self.in_token,
                                        mac_source=lambda: self.token.audit_mac, **kwargs)
        self.signers.append(signer)
        return signer

    async def signer(self, **kwargs) -> requests.RequestSigner:
        signer = self.new_signer(**kwargs)
        await asyncio.wait_for(signer.open(retry_seconds=0.01), 10)
        assert signer.error is None
        return signer

    def checkpoint(self, signer: requests.RequestSigner) -> None:
        """What keep_checkpoint does once the head moved."""
        self.reader.write_checkpoint(signer.log.head)

    async def restart(self, signer: requests.RequestSigner, **kwargs) -> requests.RequestSigner:
        self.checkpoint(signer)
        signer.log.close()
        signer.log = None
        return await self.signer(**kwargs)

    def entries(self) -> list[dict]:
        path = self.state_dir / audit.LOG_NAME
        return list(audit.read_entries(path, mac=self.token.audit_mac)) if path.exists() else []

    def events(self) -> list[str]:
        return [e["event"] for e in self.entries()]

    async def key(self, signer: requests.RequestSigner, **kwargs) -> tuple[dict, dict]:
        """A SigningKey (and its first version, which the signer generates from spec)."""
        body = self.cluster.put("signingkeys", key_object(**kwargs))
        return body, await self.reconcile(signer, body)

    async def reconcile(self, signer: requests.RequestSigner, body: dict) -> dict:
        return await signer.reconcile_key(namespace=NS, name=body["metadata"]["name"], uid=uid_of(body))

    async def sign(self, signer: requests.RequestSigner, request: dict, *, uid: str | None = None,
                   spec: dict | None = None) -> dict:
        return await signer.sign(namespace=NS, name=request["metadata"]["name"], uid=uid or uid_of(request),
                                 fingerprint=digests_fingerprint(spec or request["spec"]))

    async def refused(self, call) -> requests.Refused:
        with pytest.raises(requests.Refused) as refusal:
            await call
        return refusal.value

    def close(self) -> None:
        for signer in self.signers:
            if signer.log is not None:
                signer.log.close()


class Clock:
    """The signer's clock: frozen at ``at`` when set, the real time otherwise."""

    at: datetime.datetime | None = None


@pytest.fixture
def clock(monkeypatch) -> Clock:
    frozen = Clock()

    class _Datetime(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return frozen.at if frozen.at is not None else datetime.datetime.now(tz)

    monkeypatch.setattr(requests, "datetime", types.SimpleNamespace(
        datetime=_Datetime, timezone=datetime.timezone, timedelta=datetime.timedelta))
    return frozen


@pytest.fixture
def world(token):
    directory = pathlib.Path(tempfile.mkdtemp(prefix="keyroom-signer-"))
    made = World(token, directory)
    yield made
    made.close()
    shutil.rmtree(directory, ignore_errors=True)


class Crash(Exception):
    """The process stopping at that point (nothing after it runs)."""


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def public_key(answer_or_record, version: int):
    """A version's public key from the signer's own record (or the mirror of it it answered)."""
    if isinstance(answer_or_record, keys.KeyRecord):
        pem = answer_or_record.versions[version].public_key
    else:
        pem = next(v["publicKey"] for v in answer_or_record["versions"] if v["version"] == version)
    return serialization.load_pem_public_key(pem.encode())


def verify(key, request: dict, answer: dict) -> None:
    digests = request["spec"]["digests"]
    assert [s["name"] for s in answer["signatures"]] == [d["name"] for d in digests]
    for digest, signature in zip(digests, answer["signatures"]):
        key.verify(base64.b64decode(signature["value"]), bytes.fromhex(digest["value"]),
                   ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def setup_namespace(world: World, signer, *, required: int = 2, **key_spec):
    world.cluster.put("signingpolicies", policy_object(required=required))
    return world.key(signer, **key_spec)


# =========================================================================== requests: identity and digests

def test_a_request_with_another_uid_is_not_found_and_nothing_is_signed(world):
    async def scenario():
        signer = await world.signer()
        await setup_namespace(world, signer)
        request = world.cluster.put("signrequests", request_object(*APPROVERS))
        before = len(world.entries())

        refusal = await world.refused(world.sign(signer, request, uid=str(uuid.uuid4())))
        assert (refusal.reason, refusal.status) == ("RequestNotFound", 404)
        entry = world.entries()[-1]
        assert entry["event"] == "Refused" and entry["reason"] == "RequestNotFound" and refusal.entry == entry
        missing = request_object(*APPROVERS)  # never created
        refusal = await world.refused(world.sign(signer, missing))
        assert refusal.reason == "RequestNotFound"
        assert world.events()[before:] == ["Refused", "Refused"] and "sign" not in world.operations

        answer = await world.sign(signer, request)  # the request itself, by its own UID, signs
        assert answer["keyVersion"] == 1
    run(scenario())


@pytest.mark.parametrize("change", ["value", "name", "algorithm", "extra"])
def test_digests_other_than_the_requests_are_refused(world, change):
    async def scenario():
        signer = await world.signer()
        _, key = await setup_namespace(world, signer)
        request = world.cluster.put("signrequests", request_object(*APPROVERS, artifacts=("a.exe", "b.msi")))
        named = copy.deepcopy(request["spec"])
        if change == "value":
            named["digests"][1]["value"] = hashlib.sha256(b"something else").hexdigest()
        elif change == "name":
            named["digests"][0]["name"] = "evil.exe"
        elif change == "algorithm":
            named["digestAlgorithm"] = "SHA512"
        else:
            named["digests"].append({"name": "c.dll", "value": "ab" * 32})

        refusal = await world.refused(world.sign(signer, request, spec=named))
        assert (refusal.reason, refusal.status) == ("DigestsMismatch", 409)
        assert world.entries()[-1]["reason"] == "DigestsMismatch"
        assert "Intent" not in world.events() and "sign" not in world.operations

        answer = await world.sign(signer, request)
        verify(public_key(key, 1), request, answer)  # what is signed is the request's own digests
    run(scenario())


# =========================================================================== requests: the decision

def test_an_unapproved_request_waits_and_its_retries_are_audited_once(world):
    async def scenario():
        signer = await world.signer()
        await setup_namespace(world, signer)
        request = world.cluster.put("signrequests", request_object("bob"))
        before = len(world.entries())
        first = await world.refused(world.sign(signer, request))
        for _ in range(5):
            refusal = await world.refused(world.sign(signer, request))
            assert (refusal.reason, refusal.status, str(refusal)) == ("AwaitingApproval", 403, str(first))
            assert refusal.entry is None  # not audited again
        assert world.events()[before:] == ["Refused"]  # one entry for six calls
        entry = world.entries()[-1]
        assert entry["request"] == {"namespace": NS, "name": request["metadata"]["name"], "uid": uid_of(request)}
        assert entry["message"] == str(first) and "needs 1 more approval" in entry["message"]
        assert "Intent" not in world.events() and "sign" not in world.operations

        # a final refusal in between (digests that differ) is audited, and the wait is audited again after it
        refusal = await world.refused(world.sign(signer, request, spec={**request["spec"], "digests": []}))
        assert refusal.reason == "DigestsMismatch"
        assert (await world.refused(world.sign(signer, request))).reason == "AwaitingApproval"
        assert [e["reason"] for e in world.entries()[before:]] == ["AwaitingApproval", "DigestsMismatch",
                                                                   "AwaitingApproval"]
        before = len(world.entries())

        # a new reason is audited again, and so is the old reason once it comes back
        policy = world.cluster.objects["signingpolicies"].pop((NS, "release"))
        assert (await world.refused(world.sign(signer, request))).reason == "NoPolicy"
        world.cluster.put("signingpolicies", policy)
        assert (await world.refused(world.sign(signer, request))).reason == "AwaitingApproval"
        assert (await world.refused(world.sign(signer, request))).reason == "AwaitingApproval"
        refused = [e for e in world.entries()[before:]]
        assert [e["reason"] for e in refused] == ["NoPolicy", "AwaitingApproval"]

        world.cluster.put("signrequests", {**request, "spec": {**request["spec"], "approvals": request_object(
            *APPROVERS)["spec"]["approvals"]}})
        assert (await world.sign(signer, request))["keyVersion"] == 1
    run(scenario())


def test_a_final_refusal_is_audited_at_every_call(world):
    async def scenario():
        signer = await world.signer()
        await setup_namespace(world, signer)
        request = world.cluster.put("signrequests", request_object(*APPROVERS, decision="Deny"))
        before = len(world.entries())
        for _ in range(2):
            assert (await world.refused(world.sign(signer, request))).reason == "Denied"
        assert world.events()[before:] == ["Refused", "Refused"] and "sign" not in world.operations
    run(scenario())


def test_waiting_refusals_are_remembered_within_a_bound(world, monkeypatch):
    monkeypatch.setattr(requests, "_MAX_WAITING", 1)

    async def scenario():
        signer = await world.signer()
        await setup_namespace(world, signer)
        first, second = (world.cluster.put("signrequests", request_object("bob")) for _ in range(2))
        before = len(world.entries())
        for request in (first, second, first, second):
            assert (await world.refused(world.sign(signer, request))).reason == "AwaitingApproval"
        assert world.events()[before:] == ["Refused"] * 4  # each evicts the other
        assert list(signer._waiting) == [uid_of(second)]
    run(scenario())


def test_an_approved_request_is_signed_once_and_retries_get_the_same_signatures(world):
    async def scenario():
        signer = await world.signer()
        key_body, key = await setup_namespace(world, signer)
        assert key["currentVersion"] == 1 and [v["state"] for v in key["versions"]] == ["Enabled"]
        record = signer.log.keys[uid_of(key_body)]
        assert key["versions"][0]["publicKey"] == record.versions[1].public_key
        request = world.cluster.put("signrequests", request_object(*APPROVERS, "dave", artifacts=("a", "b", "c")))

        before = datetime.datetime.now(UTC).replace(microsecond=0)
        answer = await world.sign(signer, request)
        assert answer["keyVersion"] == 1 and len(answer["signatures"]) == 3
        signed_at = datetime.datetime.strptime(answer["signedAt"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert before <= signed_at <= datetime.datetime.now(UTC)
        verify(public_key(record, 1), request, answer)
        intent, signed = world.entries()[-2:]
        assert (intent["event"], signed["event"]) == ("Intent", "Signed")
        assert intent["request"] == {"namespace": NS, "name": request["metadata"]["name"], "uid": uid_of(request)}
        assert intent["key"] == {"name": "release", "uid": uid_of(key_body), "version": 1, "usage": "Reusable"}
        assert intent["approvers"] == ["bob", "carol"] and intent["requester"] == "alice"  # dave is no approver
        assert (intent["policies"], intent["reason"], intent["digestAlgorithm"]) == (["release"], "release 1.4.2",
                                                                                     "SHA256")
        assert intent["digests"] == request["spec"]["digests"]
        assert signed["intent"] == intent["index"] and answer["audit"] == {"index": signed["index"],
                                                                           "entryHash": signed["hash"]}
        assert [s["hash"] for s in signed["signatures"]] == [
            audit.digest_of(base64.b64decode(s["value"])) for s in answer["signatures"]]
        assert world.operations.count("sign") == 1

        entries = len(world.entries())
        assert await world.sign(signer, request) == answer
        outcome = signer.outcome(uid_of(request))
        assert outcome == {"state": "Signed", **answer}
        signer = await world.restart(signer, max_unchecked=1)  # the checkpoint it opened with counts as written
        assert await world.sign(signer, request) == answer
        assert len(world.entries()) == entries and world.operations.count("sign") == 1
        assert (await world.refused(world.sign(signer, request_object()))).reason == "RequestNotFound"
        assert signer.outcome(str(uuid.uuid4())) == {"state": "Unsigned"}
    run(scenario())


def test_a_batch_is_signed_in_parts_on_several_sessions_and_answered_in_order(world):
    async def scenario():
        signer = await world.signer(parallelism=4)
        _, key = await setup_namespace(world, signer)
        small = world.cluster.put("signrequests", request_object(*APPROVERS, artifacts=tuple(
            f"small-{n}" for n in range(2 * requests.MIN_DIGESTS_PER_PART - 1))))
        verify(public_key(key, 1), small, await world.sign(signer, small))
        assert world.operations.count("sign") == 1  # too few digests for two parts

        batch = world.cluster.put("signrequests", request_object(*APPROVERS, artifacts=tuple(
            f"file-{n:03}.bin" for n in range(37))))
        answer = await world.sign(signer, batch)
        assert world.operations.count("sign") == 1 + 4
        verify(public_key(key, 1), batch, answer)  # each signature beside its own digest
        assert [s["hash"] for s in world.entries()[-1]["signatures"]] == [
            audit.digest_of(base64.b64decode(s["value"])) for s in answer["signatures"]]
    run(scenario())


def test_a_part_that_fails_is_recorded_only_once_every_part_has_ended(world):
    async def scenario():
        signer = await world.signer(parallelism=2)
        await setup_namespace(world, signer)
        request = world.cluster.put("signrequests", request_object(*APPROVERS, artifacts=tuple(
            f"file-{n}" for n in range(4 * requests.MIN_DIGESTS_PER_PART))))
        second_started, release, calls = asyncio.Event(), asyncio.Event(), []

        async def in_token(operation, call):
            if operation != "sign":
                return await world.in_token(operation, call)
            calls.append(operation)
            if len(calls) == 1:
                raise hsm.HSMError("DeviceError", "the HSM hiccuped")
            second_started.set()
            await release.wait()  # the other part is still signing
            return await world.in_token(operation, call)
        signer._in_token = in_token
        signing = asyncio.create_task(world.sign(signer, request))
        await second_started.wait()  # the first part has failed by now
        for _ in range(10):  # turns of the loop in which a caller not waiting for every part would go on
            await asyncio.sleep(0)
        assert not signing.done() and world.entries()[-1]["event"] == "Intent"
        release.set()
        with pytest.raises(hsm.HSMError):
            await signing
        intent, abandoned = world.entries()[-2:]
        assert (intent["event"], abandoned["event"], abandoned["intent"]) == ("Intent", "Abandoned", intent["index"])
        signer._in_token = world.in_token
        assert len((await world.sign(signer, request))["signatures"]) == 4 * requests.MIN_DIGESTS_PER_PART
    run(scenario())


@pytest.mark.parametrize("algorithm", ["SHA384", "SHA512"])
def test_digests_are_signed_as_the_algorithm_the_request_names(world, algorithm):
    async def scenario():
        signer = await world.signer()
        _, key = await setup_namespace(world, signer)
        request = request_object(*APPROVERS, artifacts=("a", "b"))
        request["spec"]["digestAlgorithm"] = algorithm
        for digest in request["spec"]["digests"]:
            digest["value"] = hashlib.new(algorithm.lower(), digest["name"].encode()).hexdigest()
        world.cluster.put("signrequests", request)
        answer = await world.sign(signer, request)
        assert world.entries()[-2]["digestAlgorithm"] == algorithm
        for digest, signature in zip(request["spec"]["digests"], answer["signatures"]):
            public_key(key, 1).verify(base64.b64decode(signature["value"]), bytes.fromhex(digest["value"]),
                                      ec.ECDSA(utils.Prehashed(getattr(hashes, algorithm)())))
    run(scenario())


def test_what_a_request_or_key_leaves_out_takes_the_crds_defaults(world):
    async def scenario():
        signer = await world.signer()
        world.cluster.put("signingpolicies", {**policy_object(), "spec": {
            k: v for k, v in policy_object()["spec"].items() if k != "requiredApprovals"}})  # one approval
        key_body, key = await world.key(signer)
        del key_body["spec"]["usage"]
        world.cluster.put("signingkeys", key_body)
        request = request_object("bob")
        for field in ("digestAlgorithm", "reason", "format"):
            del request["spec"][field]
        world.cluster.put("signrequests", request)
        waiting = world.cluster.put("signrequests", request_object())
        assert (await world.refused(world.sign(signer, waiting))).reason == "AwaitingApproval"
        answer = await world.sign(signer, request)
        verify(public_key(key, 1), request, answer)  # SHA256
        intent = world.entries()[-2]
        assert (intent["digestAlgorithm"], intent["reason"], intent["key"]["usage"]) == ("SHA256", "", "Reusable")
    run(scenario())


def test_a_request_signed_long_ago_is_never_signed_again(world):
    async def scenario():
        signer = await world.signer()
        await setup_namespace(world, signer)
        request = world.cluster.put("signrequests", request_object(*APPROVERS))
        answer = await world.sign(signer, request)
        world.checkpoint(signer)
        signer.log.close()
        signer = await world.signer(keep_results=datetime.timedelta(seconds=-1))  # its signatures are pruned
        refusal = await world.refused(world.sign(signer, request))
        assert (refusal.reason, refusal.status) == ("AlreadySigned", 409)
        assert signer.outcome(uid_of(request)) == {"state": "Signed", "audit": answer["audit"]}
        assert world.operations.count("sign") == 1
    run(scenario())


def test_status_is_never_read(world):
    """Forged status on every body: the signer decides exactly as without it."""
    async def scenario():
        signer = await world.signer()
        world.cluster.put("signingpolicies", {**policy_object(), "status": {"matchedKeys": [], "phase": "Invalid"}})
        key_body, key = await world.key(signer, status=FORGED_KEY_STATUS)
        waiting = world.cluster.put("signrequests", request_object("bob", status=FORGED_REQUEST_STATUS))
        assert (await world.refused(world.sign(signer, waiting))).reason == "AwaitingApproval"
        request = world.cluster.put("signrequests", request_object(*APPROVERS, status=FORGED_REQUEST_STATUS))
        answer = await world.sign(signer, request)
        assert answer["keyVersion"] == 1  # not the forged version 7, and the key is neither destroyed nor consumed
        verify(public_key(signer.log.keys[uid_of(key_body)], 1), request, answer)
        assert key["currentVersion"] == 1 and key["consumedBy"] is None and key["missingVersions"] == []
        assert world.entries()[-2]["approvers"] == ["bob", "carol"]  # not the forged mallory
    run(scenario())


CI = {name: f"system:serviceaccount:{NS}:{name}" for name in ("ci-a", "ci-b")}
CI_GROUPS = ["system:serviceaccounts", f"system:serviceaccounts:{NS}", "system:authenticated"]


def attested(request: dict, *builders: str, differ_at: str | None = None) -> dict:
    """The request with each builder's attestation appended (``differ_at``: that file's digest differs)."""
    body = copy.deepcopy(request)
    for builder in builders:
        digests = [dict(d, value="0" * 64) if d["name"] == differ_at else dict(d) for d in request["spec"]["digests"]]
        body["spec"].setdefault("attestations", []).append(
            {"user": CI[builder], "groups": CI_GROUPS, "build": f"run of {builder}", "digests": digests})
    return body


def test_the_signer_counts_matching_builds_itself_and_audits_the_builders(world):
    """Status claiming the builds matched changes nothing; a differing build fails the request; the log names both."""
    async def scenario():
        signer = await world.signer()
        world.cluster.put("signingpolicies", policy_object(required=0, matchingBuilds={
            "required": 2, "builders": {"serviceAccounts": ["ci-a", "ci-b"]}}))
        key_body, _ = await world.key(signer)
        forged = {**FORGED_REQUEST_STATUS, "buildSummary": "2/2",
                  "builds": [{"user": CI["ci-a"], "counted": True}, {"user": CI["ci-b"], "counted": True}]}
        one = world.cluster.put("signrequests", attested(request_object(status=forged), "ci-a", "ci-a"))
        refusal = await world.refused(world.sign(signer, one))
        assert refusal.reason == "AwaitingBuilds" and "needs 1 more matching build from serviceaccount ci-b" in str(
            refusal)

        agreed = attested(request_object(artifacts=("app.exe", "lib.dll"), status=forged), "ci-a")
        differs = world.cluster.put("signrequests", attested(agreed, "ci-b", differ_at="lib.dll"))
        refusal = await world.refused(world.sign(signer, differs))
        assert refusal.reason == "BuildMismatch" and refusal.entry is not None
        assert str(refusal).startswith(f"{CI['ci-b']}'s build differs at lib.dll")
        assert "sign" not in world.operations

        both = world.cluster.put("signrequests", attested(request_object(), "ci-a", "ci-b"))
        answer = await world.sign(signer, both)
        verify(public_key(signer.log.keys[uid_of(key_body)], 1), both, answer)
        intent = world.entries()[-2]
        assert intent["event"] == "Intent" and intent["builders"] == [
            {"user": CI["ci-a"], "build": "run of ci-a"}, {"user": CI["ci-b"], "build": "run of ci-b"}]
    run(scenario())


def test_a_key_recreated_under_the_same_name_is_another_key(world):
    async def scenario():
        signer = await world.signer()
        old_body, old = await setup_namespace(world, signer)
        new_body = world.cluster.put("signingkeys", key_object())  # same name, new UID, no version yet
        request = world.cluster.put("signrequests", request_object(*APPROVERS))
        refusal = await world.refused(world.sign(signer, request))
        assert refusal.reason == "KeyNotReady"  # never the old key's version

        # the old UID's key is gone: nothing new is scheduled, its material stays (the token audit reports it)
        gone = await world.reconcile(signer, old_body)
        assert gone["deleted"] and [v["state"] for v in gone["versions"]] == ["Enabled"]
        assert objects_of(world.token, uid_of(old_body)) == {(1, "private_key"), (1, "public_key")}

        new = await world.reconcile(signer, new_body)
        answer = await world.sign(signer, request)
        verify(public_key(new, 1), request, answer)
        with pytest.raises(InvalidSignature):
            verify(public_key(old, 1), request, answer)
    run(scenario())


def test_the_signers_own_log_enforces_the_hourly_limit(world):
    async def scenario():
        signer = await world.signer()
        world.cluster.put("signingpolicies", policy_object(required=0, maxSignaturesPerHour=2))
        await world.key(signer)
        first = world.cluster.put("signrequests", request_object(artifacts=("a", "b")))
        await world.sign(signer, first)
        second = world.cluster.put("signrequests", request_object())
        refusal = await world.refused(world.sign(signer, second))
        assert refusal.reason == "RateLimited"
        signer = await world.restart(signer)  # the limit counts from the log, so it survives a restart
        assert (await world.refused(world.sign(signer, second))).reason == "RateLimited"
        assert world.operations.count("sign") == 1
    run(scenario())


@pytest.mark.parametrize("selected_by", ["name", "labels"])
def test_a_policy_counts_the_signatures_of_the_keys_it_selects_and_only_those(world, selected_by):
    async def scenario():
        signer = await world.signer()
        selection = ({"keySelector": None, "keys": ["release"]} if selected_by == "name"
                     else {"keySelector": {"matchLabels": {"tier": "release"}}})
        world.cluster.put("signingpolicies", {**policy_object(required=0), "spec": {
            **policy_object(required=0)["spec"], **selection, "maxSignaturesPerHour": 2}})
        nightly_policy = policy_object("nightly", required=0)
        nightly_policy["spec"]["keySelector"] = {"matchLabels": {"tier": "nightly"}}
        world.cluster.put("signingpolicies", nightly_policy)
        await world.key(signer)
        nightly = key_object("nightly")
        nightly["metadata"]["labels"] = {"tier": "nightly"}
        world.cluster.put("signingkeys", nightly)
        await world.reconcile(signer, nightly)
        world.cluster.listed.clear()
        await world.sign(signer, world.cluster.put("signrequests", request_object(key="nightly",
                                                                                  artifacts=("a", "b"))))
        # the first signature of the namespace's hour: no other key's count to weigh, so no list of the keys
        assert "signingkeys" not in world.cluster.listed
        await world.sign(signer, world.cluster.put("signrequests", request_object(key="nightly",
                                                                                  artifacts=("a", "b"))))
        world.cluster.listed.clear()
        await world.sign(signer, world.cluster.put("signrequests", request_object(artifacts=("a", "b"))))
        # nightly signed within the hour: a policy selecting by label needs the keys' labels, one naming keys not
        assert ("signingkeys" in world.cluster.listed) == (selected_by == "labels")
        refusal = await world.refused(world.sign(signer, world.cluster.put("signrequests", request_object())))
        assert refusal.reason == "RateLimited" and "policy release allows 2 signatures" in str(refusal)
    run(scenario())


def test_a_policy_selecting_by_label_counts_another_keys_signatures_by_its_labels_now(world):
    """A key relabelled into a policy's selection counts against it; the labels are read, not assumed."""
    async def scenario():
        signer = await world.signer()
        world.cluster.put("signingpolicies", policy_object(required=0, maxSignaturesPerHour=3))  # tier=release
        await world.key(signer)
        other = key_object("other")
        other["metadata"]["labels"] = {"tier": "nightly"}
        world.cluster.put("signingkeys", other)
        nightly_policy = policy_object("nightly", required=0)
        nightly_policy["spec"]["keySelector"] = {"matchLabels": {"tier": "nightly"}}
        world.cluster.put("signingpolicies", nightly_policy)
        await world.reconcile(signer, other)
        await world.sign(signer, world.cluster.put("signrequests", request_object(key="other", artifacts=("a", "b"))))
        await world.sign(signer, world.cluster.put("signrequests", request_object()))  # 1 of release's 3
        other["metadata"]["labels"] = {"tier": "release"}  # now the release policy selects it: its 2 count
        world.cluster.put("signingkeys", other)
        refusal = await world.refused(world.sign(signer, world.cluster.put("signrequests", request_object())))
        assert refusal.reason == "RateLimited" and "policy release allows 3 signatures" in str(refusal)
    run(scenario())


def test_requests_are_refused_while_the_api_server_cannot_be_read(world):
    async def scenario():
        signer = await world.signer()
        body, _ = await setup_namespace(world, signer)
        request = world.cluster.put("signrequests", request_object(*APPROVERS))
        world.cluster.down = True
        refusal = await world.refused(world.sign(signer, request))
        assert (refusal.reason, refusal.status) == ("ApiServerUnavailable", 503)
        refusal = await world.refused(world.reconcile(signer, body))
        assert (refusal.reason, refusal.status) == ("ApiServerUnavailable", 503)
        assert "sign" not in world.operations
        world.cluster.down = False
        refusal = await world.refused(signer.reconcile_key(namespace=NS, name="nope", uid=str(uuid.uuid4())))
        assert (refusal.reason, refusal.status) == ("KeyNotFound", 404)
    run(scenario())


@pytest.mark.parametrize("username,allowed", [
    ("system:serviceaccount:team-a:ci", True),
    ("system:serviceaccount:team-b:ci", False),             # another namespace's account
    ("mallory:serviceaccount:team-a:ci", False),            # four parts, but not a ServiceAccount
    ("system:serviceaccount:team-a:ci:extra", False),       # not a ServiceAccount name
    ("system:serviceaccount:team-a", False),
])
def test_only_the_policys_namespace_service_accounts_may_request(world, username, allowed):
    async def scenario():
        signer = await world.signer()
        world.cluster.put("signingpolicies", policy_object(required=0, requesters={"serviceAccounts": ["ci"]}))
        await world.key(signer)
        request = request_object()
        request["spec"]["requester"] = {"username": username, "groups": ["system:serviceaccounts"]}
        world.cluster.put("signrequests", request)
        if allowed:
            assert (await world.sign(signer, request))["keyVersion"] == 1
        else:
            refusal = await world.refused(world.sign(signer, request))
            assert refusal.reason == "NotAllowed" and "is not a requester" in str(refusal)
    run(scenario())


# =========================================================================== keys: one-time, retired, missing

def test_a_one_time_key_signs_one_request_whatever_status_claims(world):
    async def scenario():
        signer = await world.signer()
        status = {"phase": "Active", "consumedBy": None, "versions": [{"version": 1, "state": "Enabled"}]}
        key_body, key = await setup_namespace(world, signer, usage="OneTime", status=status)
        first = world.cluster.put("signrequests", request_object(*APPROVERS, status={"phase": "Pending"}))
        second = world.cluster.put("signrequests", request_object(*APPROVERS, status=FORGED_REQUEST_STATUS))

        answer = await world.sign(signer, first)
        verify(public_key(key, 1), first, answer)
        assert world.entries()[-2]["key"]["usage"] == "OneTime"
        for _ in range(2):  # the key's status still says it is unused
            refusal = await world.refused(world.sign(signer, second))
            assert (refusal.reason, refusal.status) == ("KeyConsumed", 403)
            assert f"already signed {first['metadata']['name']} " in str(refusal)
        assert await world.sign(signer, first) == answer  # its own request still gets its signatures back

        signer = await world.restart(signer)
        assert (await world.refused(world.sign(signer, second))).reason == "KeyConsumed"
        assert world.operations.count("sign") == 1
        record = signer.log.keys[uid_of(key_body)]
        assert record.consumed_by["uid"] == uid_of(first)

        # the consumed key's version is scheduled for destruction, not destroyed at once
        reconciled = await world.reconcile(signer, key_body)
        assert reconciled["consumedBy"] == first["metadata"]["name"]
        assert [(v["state"], "destroyAt" in v) for v in reconciled["versions"]] == [("PendingDestruction", True)]
        assert objects_of(world.token, uid_of(key_body)) == {(1, "private_key"), (1, "public_key")}
    run(scenario())


def test_a_one_time_key_is_not_consumed_by_a_refused_or_failed_attempt(world):
    async def scenario():
        signer = await world.signer()
        await setup_namespace(world, signer, usage="OneTime")
        waiting = world.cluster.put("signrequests", request_object("bob"))
        assert (await world.refused(world.sign(signer, waiting))).reason == "AwaitingApproval"
        world.fail["sign"] = hsm.HSMError("DeviceError", "the HSM hiccuped")
        failing = world.cluster.put("signrequests", request_object(*APPROVERS))
        with pytest.raises(hsm.HSMError):
            await world.sign(signer, failing)
        other = world.cluster.put("signrequests", request_object(*APPROVERS))
        assert (await world.sign(signer, other))["keyVersion"] == 1
        assert (await world.refused(world.sign(signer, failing))).reason == "KeyConsumed"
    run(scenario())


def test_a_retired_version_never_signs(world):
    async def scenario():
        signer = await world.signer()
        key_body, first = await setup_namespace(world, signer)
        rotated = world.cluster.put("signingkeys", {**key_body, "metadata": {
            **key_body["metadata"], "annotations": {keys.ROTATE_ANNOTATION: "2026-12-01"}},
            "status": {"currentVersion": 1, "versions": [{"version": 1, "state": "Enabled"}]}})
        key = await world.reconcile(signer, rotated)
        assert key["currentVersion"] == 2 and key["lastRotationRequest"] == "2026-12-01"
        assert [(v["version"], v["state"]) for v in key["versions"]] == [(2, "Enabled"), (1, "Disabled")]
        assert (await world.reconcile(signer, rotated))["currentVersion"] == 2  # one rotation per annotation value

        request = world.cluster.put("signrequests", request_object(*APPROVERS))
        answer = await world.sign(signer, request)
        assert answer["keyVersion"] == 2 and world.entries()[-2]["key"]["version"] == 2
        verify(public_key(signer.log.keys[uid_of(key_body)], 2), request, answer)
        with pytest.raises(InvalidSignature):
            verify(public_key(first, 1), request, answer)
    run(scenario())


def test_key_material_removed_from_the_token_is_refused_and_recorded(world):
    async def scenario():
        signer = await world.signer()
        key_body, _ = await setup_namespace(world, signer)
        request = world.cluster.put("signrequests", request_object(*APPROVERS))
        handle = hsm.KeyHandle(namespace=NS, name="release", uid=uid_of(key_body), version=1)
        assert world.token.destroy(handle)  # behind keyroom's back

        refusal = await world.refused(world.sign(signer, request))
        assert (refusal.reason, refusal.status) == ("KeyMaterialMissing", 409)
        entries = world.entries()
        assert [e["event"] for e in entries[-4:]] == ["Intent", "Abandoned", "KeyVersionMissing", "Refused"]
        assert entries[-3]["intent"] == entries[-4]["index"] and entries[-2]["version"] == 1
        assert not signer.log.requests[uid_of(request)].open_intent
        assert signer.outcome(uid_of(request)) == {"state": "Unsigned"}

        # from now on the record says so: refused without asking the token again
        signs = world.operations.count("sign")
        assert (await world.refused(world.sign(signer, request))).reason == "KeyMaterialMissing"
        assert world.operations.count("sign") == signs and world.events()[-1] == "Refused"
        key = await world.reconcile(signer, key_body)
        assert key["currentVersion"] is None and key["missingVersions"] == [1]

        # the way out: a platform admin rotates
        rotated = world.cluster.put("signingkeys", {**key_body, "metadata": {
            **key_body["metadata"], "annotations": {keys.ROTATE_ANNOTATION: "after-incident"}}})
        key = await world.reconcile(signer, rotated)
        assert key["currentVersion"] == 2
        answer = await world.sign(signer, request)
        verify(public_key(key, 2), request, answer)
    run(scenario())


def test_a_reconcile_notices_material_removed_from_the_token(world):
    async def scenario():
        signer = await world.signer()
        key_body, _ = await world.key(signer)
        world.token.destroy(hsm.KeyHandle(namespace=NS, name="release", uid=uid_of(key_body), version=1))
        key = await world.reconcile(signer, key_body)
        assert key["missingVersions"] == [1] and key["currentVersion"] is None
        assert world.events()[-1] == "KeyVersionMissing"
        assert (await world.reconcile(signer, key_body))["missingVersions"] == [1]
        assert world.events().count("KeyVersionMissing") == 1
    run(scenario())


# =========================================================================== exactly once across failures

def test_an_hsm_failure_abandons_the_attempt_at_once(world):
    async def scenario():
        signer = await world.signer()
        await setup_namespace(world, signer)
        request = world.cluster.put("signrequests", request_object(*APPROVERS))
        world.fail["sign"] = hsm.HSMError("DeviceError", "the HSM hiccuped")
        with pytest.raises(hsm.HSMError):
            await world.sign(signer, request)
        intent, abandoned = world.entries()[-2:]
        assert (intent["event"], abandoned["event"], abandoned["intent"]) == ("Intent", "Abandoned", intent["index"])
        assert "DeviceError" in abandoned["message"]
        assert not signer.log.requests[uid_of(request)].open_intent
        assert (await world.sign(signer, request))["keyVersion"] == 1
    run(scenario())


def test_an_intent_left_open_is_abandoned_before_the_request_is_signed_again(world):
    async def scenario():
        signer = await world.signer()
        await setup_namespace(world, signer)
        request = world.cluster.put("signrequests", request_object(*APPROVERS))
        world.fail["sign"] = Crash()  # the process stops between intent and result
        with pytest.raises(Crash):
            await world.sign(signer, request)
        assert signer.log.requests[uid_of(request)].open_intent
        assert signer.outcome(uid_of(request)) == {"state": "Signing"}

        signer = await world.restart(signer)  # start-up resolves it: no signature was stored
        intent, abandoned = world.entries()[-2:]
        assert abandoned["event"] == "Abandoned" and abandoned["intent"] == intent["index"]
        assert signer.outcome(uid_of(request)) == {"state": "Unsigned"}
        assert (await world.sign(signer, request))["keyVersion"] == 1

        # in one process too: an open intent is resolved before the request is tried again
        again = world.cluster.put("signrequests", request_object(*APPROVERS))
        world.fail["sign"] = Crash()
        with pytest.raises(Crash):
            await world.sign(signer, again)
        answer = await world.sign(signer, again)
        entries = world.entries()[-4:]
        assert [e["event"] for e in entries] == ["Intent", "Abandoned", "Intent", "Signed"]
        assert entries[1]["intent"] == entries[0]["index"] and entries[3]["intent"] == entries[2]["index"]
        assert answer["keyVersion"] == 1
    run(scenario())


def test_a_request_for_a_key_that_does_not_exist_waits_for_it(world):
    async def scenario():
        signer = await world.signer()
        await setup_namespace(world, signer)
        request = world.cluster.put("signrequests", request_object(*APPROVERS, key="not-yet"))
        refusal = await world.refused(world.sign(signer, request))
        assert (refusal.reason, refusal.status) == ("KeyNotFound", 403) and "not-yet" in str(refusal)
        assert "sign" not in world.operations
    run(scenario())


def test_signatures_stored_before_a_failed_log_write_are_returned_not_made_again(world, monkeypatch):
    async def scenario():
        signer = await world.signer()
        _, key = await setup_namespace(world, signer)
        request = world.cluster.put("signrequests", request_object(*APPROVERS))
        append = signer.log.append

        def failing(event, **fields):
            if event == "Signed" and not failing.done:
                failing.done = True
                raise OSError("No space left on device")
            return append(event, **fields)
        failing.done = False
        monkeypatch.setattr(signer.log, "append", failing)
        with pytest.raises(OSError):
            await world.sign(signer, request)
        assert signer.log.requests[uid_of(request)].open_intent
        stored = signer.log.load_result(uid_of(request))
        answer = await world.sign(signer, request)  # the open intent is completed from the stored signatures
        assert answer["signatures"] == stored["signatures"] and world.operations.count("sign") == 1
        signed = world.entries()[-1]
        assert signed["event"] == "Signed" and answer["audit"] == {"index": signed["index"],
                                                                   "entryHash": signed["hash"]}
        verify(public_key(key, 1), request, answer)
    run(scenario())


def test_calls_are_refused_until_start_up_has_resolved_open_intents(world, monkeypatch):
    async def scenario():
        signer = await world.signer()
        await setup_namespace(world, signer)
        request = world.cluster.put("signrequests", request_object(*APPROVERS))
        world.fail["sign"] = Crash()
        with pytest.raises(Crash):
            await world.sign(signer, request)
        world.checkpoint(signer)
        signer.log.close()
        append = audit.AuditLog.append

        def slow(self, event, **fields):
            if event == "Abandoned":
                import time
                time.sleep(0.3)
            return append(self, event, **fields)
        monkeypatch.setattr(audit.AuditLog, "append", slow)
        restarted = world.new_signer()
        opening = asyncio.create_task(restarted.open(retry_seconds=0.01))
        try:
            while restarted.log is None:
                await asyncio.sleep(0.005)
            assert restarted.error is not None  # the log is read, its open intent not resolved yet
            refusal = await world.refused(world.sign(restarted, request))
            assert (refusal.reason, refusal.status) == ("AuditLogUnavailable", 503)
            with pytest.raises(requests.Refused):
                restarted.outcome(uid_of(request))
            await asyncio.wait_for(opening, 5)
        finally:
            opening.cancel()
        assert (await world.sign(restarted, request))["keyVersion"] == 1
    run(scenario())


def test_stored_signatures_complete_an_open_intent_and_are_not_made_again(world):
    async def scenario():
        signer = await world.signer()
        _, key = await setup_namespace(world, signer)
        request = world.cluster.put("signrequests", request_object(*APPROVERS))
        answer = await world.sign(signer, request)
        signer.log.close()
        signer.log = None
        # the process stopped after storing the signatures and before the Signed entry reached the log
        path = world.state_dir / audit.LOG_NAME
        lines = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(b"".join(lines[:-1]))
        intent = json.loads(lines[-2])
        world.reader.write_checkpoint(audit.Head(intent["index"], intent["hash"]))

        signer = await world.signer()
        signed = world.entries()[-1]
        assert signed["event"] == "Signed" and signed["intent"] == intent["index"]
        again = await world.sign(signer, request)
        assert again["signatures"] == answer["signatures"] and again["audit"]["index"] == signed["index"]
        verify(public_key(key, 1), request, again)
        assert world.operations.count("sign") == 1
    run(scenario())


def test_stored_signatures_that_do_not_match_their_audit_entry_are_never_returned(world):
    async def scenario():
        signer = await world.signer()
        await setup_namespace(world, signer)
        request = world.cluster.put("signrequests", request_object(*APPROVERS))
        answer = await world.sign(signer, request)
        stored = world.state_dir / "results" / f"{uid_of(request)}.json"
        result = json.loads(stored.read_bytes())
        result["signatures"][0]["value"] = base64.b64encode(b"chosen by whoever writes the volume").decode()
        stored.write_bytes(audit.canonical(result))
        refusal = await world.refused(world.sign(signer, request))
        assert (refusal.reason, refusal.status) == ("StoredSignaturesCorrupt", 500)
        assert uid_of(request) in str(refusal)
        with pytest.raises(requests.Refused) as refused:
            signer.outcome(uid_of(request))
        assert refused.value.reason == "StoredSignaturesCorrupt"
        signer = await world.restart(signer)
        assert (await world.refused(world.sign(signer, request))).reason == "StoredSignaturesCorrupt"
        assert world.operations.count("sign") == 1  # and never signed again
        stored.write_bytes(audit.canonical({**result, "signatures": json.loads(json.dumps(answer["signatures"]))}))
        assert (await world.sign(signer, request))["signatures"] == answer["signatures"]
    run(scenario())


def test_a_key_uid_names_one_signing_key_for_good(world):
    async def scenario():
        signer = await world.signer()
        key_body, _ = await world.key(signer)
        assert not signer._locks  # the key's lock is dropped once idle
        world.cluster.put("signingkeys", key_object("other"))
        refusal = await world.refused(signer.reconcile_key(namespace=NS, name="other", uid=uid_of(key_body)))
        assert (refusal.reason, refusal.status) == ("KeyMismatch", 409)
        refusal = await world.refused(signer.reconcile_key(namespace="team-b", name="release", uid=uid_of(key_body)))
        assert refusal.reason == "KeyMismatch"
        assert world.operations.count("generate") == 1
        assert signer.log.keys[uid_of(key_body)].name == "release"
    run(scenario())


def test_after_a_new_chain_a_keys_versions_are_adopted_from_the_token_newest_enabled(world):
    async def scenario():
        signer = await world.signer()
        key_body, first = await setup_namespace(world, signer, destructionDelay="0s",
                                                rotation={"every": "720h", "keepVersions": 1})
        other_body, _ = await world.key(signer, name="other")  # another key's objects are not adopted
        rotated = key_body
        for rotation in ("r2", "r3"):
            rotated = world.cluster.put("signingkeys", {**key_body, "metadata": {
                **key_body["metadata"], "annotations": {keys.ROTATE_ANNOTATION: rotation}}})
            await world.reconcile(signer, rotated)
        key = await world.reconcile(signer, rotated)  # v1 trimmed and destroyed (no delay), v2 disabled, v3 signs
        assert [(v["version"], v["state"]) for v in key["versions"]] == [(3, "Enabled"), (2, "Disabled"),
                                                                            (1, "Destroyed")]
        world.checkpoint(signer)
        signer.log.close()
        del world.cluster.config_maps[audit.CHECKPOINT_NAME]
        world.cluster.config_maps[audit.NEW_CHAIN_NAME] = {"supersedes": "none", "reason": "INC-11"}
        signer = await world.signer()
        assert signer.log.restarted and uid_of(key_body) not in signer.log.keys

        request = world.cluster.put("signrequests", request_object(*APPROVERS))
        assert (await world.refused(world.sign(signer, request))).reason == "KeyNotReady"  # not before adoption
        # (the rotate annotation is left out: see test_a_rotation_acted_on_before_a_new_chain_is_not_repeated)
        plain = world.cluster.put("signingkeys", {**key_body, "metadata": {**key_body["metadata"], "annotations": {}}})
        adopted = await world.reconcile(signer, plain)
        assert [(v["version"], v["state"]) for v in adopted["versions"]] == [(3, "Enabled"), (2, "Disabled")]
        assert [v["publicKey"] for v in adopted["versions"]] == [v["publicKey"] for v in key["versions"][:2]]
        assert signer.log.keys[uid_of(key_body)].algorithm == "ECDSA_P256"
        generated = [e for e in world.entries() if e["event"] == "KeyVersionGenerated"]
        assert {(e["key"]["uid"], e["version"], e["reason"], e["usage"]) for e in generated} == {
            (uid_of(key_body), 2, "Adopted", "Reusable"), (uid_of(key_body), 3, "Adopted", "Reusable")}
        answer = await world.sign(signer, request)
        assert answer["keyVersion"] == 3
        verify(public_key(key, 3), request, answer)
        assert uid_of(other_body) not in signer.log.keys
    run(scenario())


def test_a_rotation_acted_on_before_a_new_chain_is_not_repeated(world):
    async def scenario():
        signer = await world.signer()
        key_body, _ = await world.key(signer)
        rotated = world.cluster.put("signingkeys", {**key_body, "metadata": {
            **key_body["metadata"], "annotations": {keys.ROTATE_ANNOTATION: "r2"}}})
        assert (await world.reconcile(signer, rotated))["currentVersion"] == 2
        world.checkpoint(signer)
        signer.log.close()
        del world.cluster.config_maps[audit.CHECKPOINT_NAME]
        world.cluster.config_maps[audit.NEW_CHAIN_NAME] = {"supersedes": "none", "reason": "INC-12"}
        signer = await world.signer()
        assert (await world.reconcile(signer, rotated))["currentVersion"] == 2
    run(scenario())


def test_concurrent_calls_for_one_request_sign_it_once(world):
    async def scenario():
        signer = await world.signer()
        await setup_namespace(world, signer)
        same = world.cluster.put("signrequests", request_object(*APPROVERS))
        answers = await asyncio.gather(*(world.sign(signer, same) for _ in range(3)))
        assert answers[0] == answers[1] == answers[2] and world.operations.count("sign") == 1
        assert world.events().count("Intent") == 1 and not signer._locks  # idle locks are dropped
    run(scenario())


def test_a_rotation_waits_for_a_signature_in_progress_with_the_same_key(world):
    """Signing and key changes are serialised per key: a version is never retired under a signature."""
    async def scenario():
        signer = await world.signer()
        key_body, _ = await setup_namespace(world, signer)
        request = world.cluster.put("signrequests", request_object(*APPROVERS))
        in_token = world.in_token

        def slow_sign(operation, call):
            if operation == "sign":
                import time

                def slowly(token):
                    time.sleep(0.3)
                    return call(token)
                return in_token(operation, slowly)
            return in_token(operation, call)
        signer._in_token = slow_sign
        signing = asyncio.create_task(world.sign(signer, request))
        while "Intent" not in world.events():
            await asyncio.sleep(0.005)
        rotated = world.cluster.put("signingkeys", {**key_body, "metadata": {
            **key_body["metadata"], "annotations": {keys.ROTATE_ANNOTATION: "during-signing"}}})
        key = await world.reconcile(signer, rotated)
        answer = await signing
        assert answer["keyVersion"] == 1 and key["currentVersion"] == 2
        events = world.events()
        assert events.index("Signed") < events.index("KeyVersionDisabled")  # the rotation waited
        assert not signer._locks
    run(scenario())


def test_concurrent_requests_on_a_fresh_one_time_key_sign_only_one(world):
    async def scenario():
        signer = await world.signer()
        await setup_namespace(world, signer, usage="OneTime")
        contenders = [world.cluster.put("signrequests", request_object(*APPROVERS)) for _ in range(4)]
        outcomes = await asyncio.gather(*(world.sign(signer, r) for r in contenders), return_exceptions=True)
        signed = [o for o in outcomes if isinstance(o, dict)]
        refused = [o for o in outcomes if isinstance(o, requests.Refused)]
        assert len(signed) == 1 and len(refused) == 3 and {r.reason for r in refused} == {"KeyConsumed"}
        assert world.operations.count("sign") == 1 and world.events().count("Intent") == 1
    run(scenario())


def test_the_log_waits_for_the_token_that_holds_its_mac_key(world):
    async def scenario():
        available = []
        signer = requests.RequestSigner(state_dir=world.state_dir, reader=world.reader, in_token=world.in_token,
                                        mac_source=lambda: world.token.audit_mac if available else None)
        world.signers.append(signer)
        opening = asyncio.create_task(signer.open(retry_seconds=0.01))
        try:
            await asyncio.sleep(0.05)
            assert not opening.done() and signer.log is None and "MAC key" in signer.error
            refusal = await world.refused(signer.reconcile_key(namespace=NS, name="release", uid=str(uuid.uuid4())))
            assert (refusal.reason, refusal.status) == ("AuditLogUnavailable", 503)
            available.append(True)
            await asyncio.wait_for(opening, 5)
        finally:
            opening.cancel()
        await world.key(signer)
        entries = world.entries()  # read with the token's MAC: every entry carries it
        assert entries and all(e["mac"] == audit.entry_mac(e, world.token.audit_mac) for e in entries)
    run(scenario())


# =========================================================================== the audit log fails closed

async def _signed_history(world: World, *, usage: str = "Reusable") -> tuple[dict, dict, dict]:
    """A log holding a signed request, checkpointed, and the signer stopped; returns (key, request, answer)."""
    signer = await world.signer()
    key_body, _ = await setup_namespace(world, signer, usage=usage)
    request = world.cluster.put("signrequests", request_object(*APPROVERS))
    answer = await world.sign(signer, request)
    world.checkpoint(signer)
    signer.log.close()
    signer.log = None
    return key_body, request, answer


DAMAGE = ["log without checkpoint", "checkpoint without log", "truncated", "rewritten", "torn", "appended"]


def _damage(world: World, how: str) -> None:
    path = world.state_dir / audit.LOG_NAME
    if how == "log without checkpoint":
        del world.cluster.config_maps[audit.CHECKPOINT_NAME]
    elif how == "checkpoint without log":
        path.unlink()
    elif how == "truncated":  # the last entry (Signed) cut off
        path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:-1]))
    elif how == "rewritten":  # a valid chain (even with the signer's MACs) as long as the old one, but another
        count = len(list(audit.read_entries(path)))
        path.unlink()
        forged = audit.AuditLog(world.state_dir, mac=world.token.audit_mac)
        for _ in range(count):
            forged.append("Refused", request={"namespace": NS, "name": "x", "uid": str(uuid.uuid4())},
                          reason="Forged", message="")
        forged.close()
    elif how == "torn":
        path.write_bytes(path.read_bytes()[:-5])
    elif how == "appended":  # by a volume writer: it chains, and the checkpointed entry is still there, but no MAC
        last = list(audit.read_entries(path))[-1]
        entry = {"index": last["index"] + 1, "time": last["time"], "event": "Abandoned", "request": last["request"],
                 "intent": last["intent"], "message": "forged", "prev": last["hash"]}
        entry["hash"] = audit.entry_hash(entry)
        with open(path, "ab") as log:
            log.write(audit.canonical(entry) + b"\n")
    else:
        raise AssertionError(how)


async def _refusing(world: World, signer: requests.RequestSigner, opening: asyncio.Task, request: dict, *,
                    why: str = "the audit log failed verification") -> None:
    await asyncio.sleep(0.1)
    assert not opening.done() and signer.log is None
    assert signer.error.startswith(why)
    for call in (world.sign(signer, request),
                 signer.reconcile_key(namespace=NS, name="release", uid=str(uuid.uuid4()))):
        refusal = await world.refused(call)
        assert (refusal.reason, refusal.status) == ("AuditLogUnavailable", 503)
    with pytest.raises(requests.Refused):
        signer.outcome(uid_of(request))


@pytest.mark.parametrize("how", DAMAGE)
def test_a_log_that_fails_verification_keeps_the_signer_refusing_until_a_matching_instruction(world, how):
    async def scenario():
        _, request, answer = await _signed_history(world)
        _damage(world, how)
        checkpoint = world.reader.read_checkpoint()
        signer = world.new_signer()
        opening = asyncio.create_task(signer.open(retry_seconds=0.01))
        try:
            await _refusing(world, signer, opening, request)
            first_failure = signer.error
            # an instruction that names another checkpoint (an older one, or none) is ignored
            for other in ("none", f"0:sha256:{'0' * 64}", f"{checkpoint.index if checkpoint else 0}:sha256:{'1' * 64}"):
                if other == audit.checkpoint_text(checkpoint):
                    continue
                world.cluster.config_maps[audit.NEW_CHAIN_NAME] = {"supersedes": other, "reason": "stale"}
                await _refusing(world, signer, opening, request)
            assert world.reader.read_checkpoint() == checkpoint

            world.cluster.config_maps[audit.NEW_CHAIN_NAME] = {"supersedes": audit.checkpoint_text(checkpoint),
                                                               "reason": "INC-7"}
            await asyncio.wait_for(opening, 5)
        finally:
            opening.cancel()
        assert signer.error is None and signer.log.restarted
        first = world.entries()[0]
        assert first["event"] == "ChainStarted" and first["reason"] == "INC-7"
        assert first["instruction"]["supersedes"] == audit.checkpoint_text(checkpoint)
        assert first["instruction"]["failure"] and first["instruction"]["failure"] in first_failure
        assert first["previous"]["checkpoint"] == (None if checkpoint is None else {"index": checkpoint.index,
                                                                                    "hash": checkpoint.hash})
        assert world.reader.read_checkpoint() == signer.log.head  # the new chain counts once checkpointed
        # what the old state proves is carried over: the signed request is not signed again
        assert await world.sign(signer, request) == {**answer, "audit": {"index": 0, "entryHash": first["hash"]}}
        assert world.operations.count("sign") == 1
    run(scenario())


@pytest.mark.parametrize("how", DAMAGE)
def test_a_new_chain_keeps_a_used_one_time_key_used(world, how):
    async def scenario():
        key_body, request, answer = await _signed_history(world, usage="OneTime")
        _damage(world, how)
        world.cluster.config_maps[audit.NEW_CHAIN_NAME] = {
            "supersedes": audit.checkpoint_text(world.reader.read_checkpoint()), "reason": "INC-10"}
        signer = await world.signer()
        assert signer.log.restarted
        key = await world.reconcile(signer, key_body)  # versions are adopted from the token
        assert key["consumedBy"] == request["metadata"]["name"]  # known from the log or the stored result
        other = world.cluster.put("signrequests", request_object(*APPROVERS))
        refusal = await world.refused(world.sign(signer, other))
        assert refusal.reason == "KeyConsumed" and world.operations.count("sign") == 1
    run(scenario())


def _administrator(world: World, monkeypatch) -> None:
    """``python -m keyroom.signer.audit new-chain`` talks to the in-memory API server."""
    from keyroom import kubeclient
    monkeypatch.setattr(kubeclient, "api_client", lambda: None)
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", lambda client: _Core(world.cluster))


@pytest.mark.parametrize("how", ["truncated", "log without checkpoint"])
def test_the_administrators_new_chain_command_names_the_checkpoint_the_signer_sees(world, monkeypatch, capsys, how):
    _administrator(world, monkeypatch)

    async def scenario():
        _, request, answer = await _signed_history(world)
        _damage(world, how)
        checkpoint = world.reader.read_checkpoint()
        world.cluster.config_maps[audit.NEW_CHAIN_NAME] = {"supersedes": "stale", "reason": "old"}
        signer = world.new_signer()
        opening = asyncio.create_task(signer.open(retry_seconds=0.01))
        try:
            await _refusing(world, signer, opening, request)
            assert await asyncio.to_thread(audit.main, ["new-chain", "--reason", "INC-13", "--namespace",
                                                        SIGNER_NS]) == 0
            await asyncio.wait_for(opening, 5)
        finally:
            opening.cancel()
        assert f"superseding checkpoint {audit.checkpoint_text(checkpoint)}" in capsys.readouterr().out
        instruction = world.cluster.config_maps[audit.NEW_CHAIN_NAME]
        assert instruction["supersedes"] == audit.checkpoint_text(checkpoint) and instruction["reason"] == "INC-13"
        assert world.entries()[0]["reason"] == "INC-13"
        assert (await world.sign(signer, request))["signatures"] == answer["signatures"]
    run(scenario())


def test_the_new_chain_command_needs_a_reason_and_reports_failures(world, monkeypatch, capsys):
    _administrator(world, monkeypatch)
    with pytest.raises(SystemExit):
        audit.main(["new-chain", "--reason", "  "])
    assert "--reason must say why" in capsys.readouterr().err
    assert audit.NEW_CHAIN_NAME not in world.cluster.config_maps
    world.cluster.down = True
    assert audit.main(["new-chain", "--reason", "INC-14", "--namespace", SIGNER_NS]) == 1
    assert capsys.readouterr().err.startswith("error: cannot write the instruction")
    world.cluster.down = False
    assert audit.main(["new-chain", "--reason", "INC-14", "--namespace", SIGNER_NS]) == 0
    assert world.cluster.config_maps[audit.NEW_CHAIN_NAME]["supersedes"] == "none"  # no checkpoint yet
    world.cluster.config_maps[audit.CHECKPOINT_NAME] = {"index": "4", "entryHash": "sha256:" + "4" * 64}
    assert audit.main(["new-chain", "--reason", "INC-15", "--namespace", SIGNER_NS]) == 0  # replaced
    assert world.cluster.config_maps[audit.NEW_CHAIN_NAME]["supersedes"] == f"4:sha256:{'4' * 64}"
    assert world.cluster.config_maps[audit.NEW_CHAIN_NAME]["reason"] == "INC-15"


def test_the_offline_verifier_checks_the_chain_and_the_checkpoint(world, capsys):
    async def scenario():
        return await _signed_history(world)
    run(scenario())
    path = world.state_dir / audit.LOG_NAME
    head = audit.verify(path)
    assert audit.main(["verify", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"audit log valid: {head.index + 1} entries, head {head.hash}"
    assert audit.main(["verify", str(path), "--index", str(head.index), "--hash", head.hash]) == 0
    assert capsys.readouterr().out.strip().endswith(f", checkpoint {head.index} matches")
    assert audit.main(["verify", str(path), "--index", str(head.index), "--hash", "sha256:" + "0" * 64]) == 1
    assert "INVALID" in capsys.readouterr().err
    assert audit.main(["verify", str(path), "--index", str(head.index + 1), "--hash", head.hash]) == 1
    assert "truncated" in capsys.readouterr().err
    empty = world.state_dir / "empty.jsonl"
    empty.write_bytes(b"")
    assert audit.main(["verify", str(empty)]) == 0 and "valid: empty" in capsys.readouterr().out
    assert audit.main(["verify", str(empty), "--index", "0", "--hash", head.hash]) == 1
    with pytest.raises(SystemExit):
        audit.main([])


def test_a_checkpoint_that_says_nothing_keeps_the_signer_refusing(world):
    async def scenario():
        _, request, _ = await _signed_history(world)
        world.cluster.config_maps[audit.CHECKPOINT_NAME] = {"entryHash": "sha256:" + "0" * 64}  # no index
        world.cluster.config_maps[audit.NEW_CHAIN_NAME] = {"supersedes": "none", "reason": "INC-8"}
        signer = world.new_signer()
        opening = asyncio.create_task(signer.open(retry_seconds=0.01))
        try:
            await _refusing(world, signer, opening, request)
            assert "no valid index" in signer.error
            # deleting the emptied ConfigMap makes it a log without checkpoint, which the instruction names
            del world.cluster.config_maps[audit.CHECKPOINT_NAME]
            await asyncio.wait_for(opening, 5)
        finally:
            opening.cancel()
        assert signer.log.restarted
    run(scenario())


def test_a_new_chain_counts_only_once_its_checkpoint_is_written(world):
    async def scenario():
        _, request, _ = await _signed_history(world)
        _damage(world, "truncated")
        checkpoint = world.reader.read_checkpoint()
        world.cluster.config_maps[audit.NEW_CHAIN_NAME] = {"supersedes": audit.checkpoint_text(checkpoint),
                                                           "reason": "INC-9"}
        world.cluster.refuse_writes = True
        signer = world.new_signer()
        opening = asyncio.create_task(signer.open(retry_seconds=0.01))
        try:
            await _refusing(world, signer, opening, request, why="cannot read the audit checkpoint")
            world.cluster.refuse_writes = False
            await asyncio.wait_for(opening, 5)
        finally:
            opening.cancel()
        assert signer.log.restarted and world.reader.read_checkpoint() == signer.log.head
        assert (await world.sign(signer, request))["signatures"]  # stored, carried over twice
        assert world.operations.count("sign") == 1
    run(scenario())


def test_an_unreadable_checkpoint_keeps_the_signer_refusing(world):
    async def scenario():
        world.cluster.down = True
        signer = world.new_signer()
        opening = asyncio.create_task(signer.open(retry_seconds=0.01))
        await asyncio.sleep(0.05)
        assert not opening.done() and signer.error == "cannot read the audit checkpoint: ConnectionRefusedError"
        refusal = await world.refused(signer.reconcile_key(namespace=NS, name="release", uid=str(uuid.uuid4())))
        assert (refusal.reason, refusal.status) == ("AuditLogUnavailable", 503)
        world.cluster.down = False
        await asyncio.wait_for(opening, 5)
        assert signer.error is None
    run(scenario())


def test_with_no_room_ahead_of_the_checkpoint_only_the_first_entry_is_written(world):
    async def scenario():
        signer = await world.signer(max_unchecked=0)
        request = request_object(*APPROVERS)  # not in the cluster
        assert (await world.refused(world.sign(signer, request))).reason == "RequestNotFound"  # empty log: 0 ahead
        assert (await world.refused(world.sign(signer, request))).reason == "CheckpointBehind"
        world.checkpoint(signer)
        signer._checkpointed = signer.log.head  # what keep_checkpoint records after writing
        assert (await world.refused(world.sign(signer, request))).reason == "RequestNotFound"
    run(scenario())


def test_signing_stops_when_the_checkpoint_falls_behind_and_resumes_once_written(world, monkeypatch):
    monkeypatch.setattr(requests, "_CHECKPOINT_INTERVAL", 0.01)

    async def scenario():
        signer = await world.signer(max_unchecked=3)
        world.cluster.refuse_writes = True
        keeper = asyncio.create_task(signer.keep_checkpoint())
        try:
            request = request_object(*APPROVERS)  # not in the cluster: each call appends one Refused entry
            for _ in range(4):  # entries 0..3: the last call is made with 3 unchecked entries, the bound
                assert (await world.refused(world.sign(signer, request))).reason == "RequestNotFound"
            assert signer.log.head.index == 3
            for call in (world.sign(signer, request), signer.reconcile_key(namespace=NS, name="release",
                                                                           uid=str(uuid.uuid4()))):
                refusal = await world.refused(call)
                assert (refusal.reason, refusal.status) == ("CheckpointBehind", 503)
            assert signer.log.head.index == 3 and world.cluster.checkpoint is None

            world.cluster.refuse_writes = False
            for _ in range(200):
                if world.cluster.checkpoint is not None:
                    break
                await asyncio.sleep(0.01)
            assert world.reader.read_checkpoint() == signer.log.head
            assert (await world.refused(world.sign(signer, request))).reason == "RequestNotFound"
        finally:
            keeper.cancel()
    run(scenario())


# =========================================================================== destruction

def test_a_version_is_destroyed_at_its_destroy_at_and_not_a_microsecond_before(world, clock):
    async def scenario():
        signer = await world.signer()
        key_body, _ = await world.key(signer, destructionDelay="30s")
        uid = uid_of(key_body)
        deleted = world.cluster.put("signingkeys", {**key_body, "metadata": {
            **key_body["metadata"], "deletionTimestamp": format_time(datetime.datetime.now(UTC))}})
        key = await world.reconcile(signer, deleted)
        assert [v["state"] for v in key["versions"]] == ["PendingDestruction"] and not key["finished"]
        version = signer.log.keys[uid].versions[1]
        destroy_at = version.scheduled_at + datetime.timedelta(seconds=30)
        assert key["versions"][0]["destroyAt"] == format_time(destroy_at)

        clock.at = destroy_at - datetime.timedelta(microseconds=1)
        key = await world.reconcile(signer, deleted)
        assert [v["state"] for v in key["versions"]] == ["PendingDestruction"] and not key["finished"]
        assert objects_of(world.token, uid) == {(1, "private_key"), (1, "public_key")}
        assert "destroy" not in world.operations

        clock.at = destroy_at
        key = await world.reconcile(signer, deleted)
        assert [v["state"] for v in key["versions"]] == ["Destroyed"] and key["finished"]
        assert objects_of(world.token, uid) == set()
        assert world.entries()[-1]["event"] == "KeyVersionDestroyed" and world.entries()[-1]["found"] is True
    run(scenario())


def test_a_trimmed_version_is_destroyed_at_its_own_time_and_the_current_one_stays(world, clock):
    async def scenario():
        signer = await world.signer()
        spec = {"destructionDelay": "1h", "rotation": {"every": "720h", "keepVersions": 0}}
        key_body, _ = await setup_namespace(world, signer, **spec)
        uid = uid_of(key_body)
        rotated = world.cluster.put("signingkeys", {**key_body, "metadata": {
            **key_body["metadata"], "annotations": {keys.ROTATE_ANNOTATION: "now"}}})
        key = await world.reconcile(signer, rotated)
        assert [(v["version"], v["state"]) for v in key["versions"]] == [(2, "Enabled"), (1, "PendingDestruction")]
        destroy_at = signer.log.keys[uid].versions[1].scheduled_at + datetime.timedelta(hours=1)

        clock.at = destroy_at - datetime.timedelta(seconds=1)
        await world.reconcile(signer, rotated)
        assert objects_of(world.token, uid) == {(1, "private_key"), (1, "public_key"), (2, "private_key"),
                                                (2, "public_key")}
        clock.at = destroy_at
        key = await world.reconcile(signer, rotated)
        assert [(v["version"], v["state"]) for v in key["versions"]] == [(2, "Enabled"), (1, "Destroyed")]
        assert objects_of(world.token, uid) == {(2, "private_key"), (2, "public_key")}
        request = world.cluster.put("signrequests", request_object(*APPROVERS))
        answer = await world.sign(signer, request)
        verify(public_key(key, 2), request, answer)
    run(scenario())


def test_a_deleted_key_with_retain_keeps_its_material(world, clock):
    async def scenario():
        signer = await world.signer()
        key_body, _ = await world.key(signer, destructionDelay="1s", deletionPolicy="Retain")
        uid = uid_of(key_body)
        deleted = world.cluster.put("signingkeys", {**key_body, "metadata": {
            **key_body["metadata"], "deletionTimestamp": format_time(datetime.datetime.now(UTC))}})
        key = await world.reconcile(signer, deleted)
        assert key["deleted"] and key["finished"] and [v["state"] for v in key["versions"]] == ["Enabled"]
        clock.at = datetime.datetime.now(UTC) + datetime.timedelta(days=365)
        key = await world.reconcile(signer, deleted)
        assert [v["state"] for v in key["versions"]] == ["Enabled"] and key["finished"]
        assert objects_of(world.token, uid) == {(1, "private_key"), (1, "public_key")}
        assert "destroy" not in world.operations
        assert not {"KeyDestructionScheduled", "KeyVersionDestroyed"} & set(world.events())
    run(scenario())


def test_a_key_whose_versions_are_all_destroyed_refuses_for_good(world, clock):
    async def scenario():
        signer = await world.signer()
        key_body, _ = await setup_namespace(world, signer, destructionDelay="1m")
        del key_body["spec"]["usage"]  # the CRD's default: Reusable
        deleted = world.cluster.put("signingkeys", {**key_body, "metadata": {
            **key_body["metadata"], "deletionTimestamp": format_time(datetime.datetime.now(UTC))}})
        await world.reconcile(signer, deleted)
        request = world.cluster.put("signrequests", request_object(*APPROVERS))
        assert (await world.refused(world.sign(signer, request))).reason == "KeyNotReady"  # pending destruction
        clock.at = datetime.datetime.now(UTC) + datetime.timedelta(minutes=2)
        assert (await world.reconcile(signer, deleted))["finished"]
        refusal = await world.refused(world.sign(signer, request))
        assert (refusal.reason, refusal.status) == ("KeyDestroyed", 403)
        assert "sign" not in world.operations
    run(scenario())


def test_a_deleted_key_with_destroy_is_finished_only_once_destroyed_even_when_gone(world, clock):
    async def scenario():
        signer = await world.signer()
        key_body, _ = await world.key(signer, destructionDelay="10m", deletionPolicy="Destroy")
        uid = uid_of(key_body)
        deleted = world.cluster.put("signingkeys", {**key_body, "metadata": {
            **key_body["metadata"], "deletionTimestamp": format_time(datetime.datetime.now(UTC))}})
        key = await world.reconcile(signer, deleted)
        assert key["deleted"] and not key["finished"]
        assert [v["state"] for v in key["versions"]] == ["PendingDestruction"]
        del world.cluster.objects["signingkeys"][(NS, "release")]  # now gone: the recorded delay still holds
        destroy_at = signer.log.keys[uid].versions[1].scheduled_at + datetime.timedelta(minutes=10)
        clock.at = destroy_at - datetime.timedelta(microseconds=1)
        key = await world.reconcile(signer, deleted)
        assert key["deleted"] and not key["finished"] and objects_of(world.token, uid)
        clock.at = destroy_at
        key = await world.reconcile(signer, deleted)
        assert key["finished"] and objects_of(world.token, uid) == set()
    run(scenario())


# =========================================================================== guards mutmut cannot mutate
# mutmut skips decorated functions; these properties decide which approvals count, which version signs and
# whether an attempt is still open. Each is checked directly, and every mutant of it must fail the check.

def check_tally() -> None:
    spec = {"approvers": {"groups": ["approvers"]}, "requiredApprovals": 2}

    def tally(*entries, required=2):
        return policy.count_approvals({**spec, "requiredApprovals": required}, requester=policy.Identity("alice"),
                                      approvals=[{"user": u, "groups": ["approvers"], "decision": d}
                                                 for u, d in entries])
    assert (tally().approved, tally().denied, tally().missing) == (False, False, 2)
    one = tally(("bob", "Approve"))
    assert (one.approved, one.denied, one.missing) == (False, False, 1)
    two = tally(("bob", "Approve"), ("carol", "Approve"))
    assert (two.approved, two.denied, two.missing) == (True, False, 0)
    three = tally(("bob", "Approve"), ("carol", "Approve"), ("dave", "Approve"))
    assert (three.approved, three.missing) == (True, 0)
    denied = tally(("bob", "Approve"), ("carol", "Approve"), ("dave", "Deny"))
    assert (denied.approved, denied.denied, denied.missing) == (False, True, 0)
    none_needed = tally(required=0)
    assert (none_needed.approved, none_needed.denied, none_needed.missing) == (True, False, 0)
    assert tally(("dave", "Deny"), required=0).approved is False


def check_current() -> None:
    def record(*states):
        found = keys.KeyRecord(NS, "release", str(uuid.uuid4()))
        found.versions = {n: keys.VersionRecord(n, state, "", "", datetime.datetime.now(UTC))
                          for n, state in enumerate(states, start=1)}
        return found
    assert record().current is None
    assert record("Disabled", "PendingDestruction", "Destroyed").current is None
    assert record("Disabled", "Enabled", "PendingDestruction").current.version == 2
    assert record("Enabled", "Enabled", "Disabled").current.version == 2  # after a crash: the newest signs
    assert record("Enabled", "Disabled").current.version == 1


def check_open_intent() -> None:
    assert not audit.RequestRecord().open_intent
    assert audit.RequestRecord(intent={"index": 3}).open_intent
    assert not audit.RequestRecord(intent={"index": 3}, signed={"index": 4}).open_intent
    assert not audit.RequestRecord(intent={"index": 3}, abandoned=[3]).open_intent
    assert audit.RequestRecord(intent={"index": 5}, abandoned=[3]).open_intent  # abandoned before, tried again


def test_approvals_count_up_to_the_required_number_and_one_denial_denies():
    check_tally()


def test_the_current_version_is_the_newest_enabled_one():
    check_current()


def test_an_intent_is_open_until_signed_or_abandoned():
    check_open_intent()


@pytest.mark.parametrize("owner,name,check", [
    (policy.Tally, "denied", check_tally), (policy.Tally, "approved", check_tally),
    (policy.Tally, "missing", check_tally), (keys.KeyRecord, "current", check_current),
    (audit.RequestRecord, "open_intent", check_open_intent)], ids=lambda v: getattr(v, "__name__", v))
def test_every_mutant_of_a_guarding_property_is_caught(owner, name, check):
    function = getattr(owner, name).fget
    assert surviving(function, lambda patch, mutant: patch.setattr(owner, name, mutant), check) == []

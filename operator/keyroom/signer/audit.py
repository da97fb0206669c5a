"""The signer's audit log: a hash-chained JSON-lines file, and what it remembers of each request.

Every decision the signer makes (a refusal, an intent to sign, the signatures
made, an attempt abandoned by a crash) is one line. Each entry carries its
index, the previous entry's hash and its own hash (SHA-256 over the entry's
canonical JSON without the hash), so changing, removing or reordering any byte
breaks the chain. The head (index and hash) is also checkpointed outside the
signer, in a ConfigMap, so that a truncated log or one rewritten from scratch
is detected as well: the checkpointed entry must still be in the log.

The same file is the signer's memory of which requests it has signed: it is
read back at start-up, so exactly-once survives restarts. Signatures themselves
are kept beside the log (``results/<uid>.json``); the log holds their hashes.

``python -m keyroom.signer.audit verify LOG [--index N --hash sha256:...]``
checks a log offline.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import fcntl
import hashlib
import hmac
import json
import os
import pathlib
import sys
import threading
import time
from typing import Any, Callable, Iterator

from keyroom import policy
from keyroom.signer import certificates, keys

GENESIS = "sha256:" + "0" * 64
#: the ConfigMap (in the signer's namespace) that holds the checkpointed head; only the signer writes it
CHECKPOINT_NAME = "keyroom-audit-checkpoint"
#: the ConfigMap in which an administrator tells the signer to start a new chain; the signer only reads it
NEW_CHAIN_NAME = "keyroom-audit-new-chain"
LOG_NAME = "audit.jsonl"


#: the events that make up the signer's memory of a request (a refusal leaves nothing to remember)
_REQUEST_EVENTS = ("Intent", "Signed", "Abandoned")


class AuditError(Exception):
    """The log is not a valid chain (or disagrees with its checkpoint)."""


def canonical(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(entry: dict) -> str:
    return "sha256:" + hashlib.sha256(canonical({k: v for k, v in entry.items()
                                                 if k not in ("hash", "mac")})).hexdigest()


#: HMAC-SHA256 with a key that stays in the HSM (``Token.audit_mac``): bytes in, 32 bytes out
Mac = Callable[[bytes], bytes]


def entry_mac(entry: dict, mac: Mac) -> str:
    """The entry's MAC: over its hash, which covers every other field and the chain before it."""
    return mac(entry["hash"].encode()).hex()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def signatures_digest(signatures: list[dict]) -> str:
    """One hash of a Signed entry's signature list ({name, hash} each), to check stored signatures against."""
    return digest_of(canonical([{"name": s["name"], "hash": s["hash"]} for s in signatures]))


def result_digest(result: dict) -> str:
    """The same hash, computed from stored signatures (base64 values)."""
    return signatures_digest([{"name": s["name"], "hash": digest_of(base64.b64decode(s["value"]))}
                              for s in result["signatures"]])


@dataclasses.dataclass(frozen=True)
class Head:
    index: int
    hash: str


def read_entries(path: pathlib.Path, *, mac: Mac | None = None) -> Iterator[dict]:
    """The entries of a log, each checked against its predecessor; raises AuditError at the first bad one.

    With ``mac`` (the signer's, backed by the HSM) every entry must also carry
    a MAC only the signer could make: the hash chain alone shows an edit, a cut
    or a reorder, but anyone with write access to the volume could append
    entries that chain correctly. Without ``mac`` (an offline check) only the
    chain is verified.
    """
    previous, expected_index = GENESIS, 0
    with open(path, "rb") as log:
        for number, line in enumerate(log, start=1):
            if not line.endswith(b"\n"):
                raise AuditError(f"line {number}: incomplete entry (the log was cut or torn)")
            try:
                entry = json.loads(line)
            except ValueError:
                raise AuditError(f"line {number}: not a JSON entry (the log was edited)") from None
            if not isinstance(entry, dict) or entry.get("index") != expected_index:
                raise AuditError(f"line {number}: expected entry index {expected_index}, found "
                                 f"{entry.get('index') if isinstance(entry, dict) else entry!r}")
            if entry.get("prev") != previous:
                raise AuditError(f"entry {expected_index}: its prev hash does not match entry {expected_index - 1}")
            if entry_hash(entry) != entry.get("hash"):
                raise AuditError(f"entry {expected_index}: its content does not match its hash (the log was edited)")
            if mac is not None and not hmac.compare_digest(str(entry.get("mac", "")), entry_mac(entry, mac)):
                raise AuditError(f"entry {expected_index}: its MAC is not the signer's (the entry was written by "
                                 "someone else)")
            yield entry
            previous, expected_index = entry["hash"], expected_index + 1


def check_checkpoint(entries_by_index: dict[int, str] | None, head: Head | None, checkpoint: Head | None) -> None:
    """The checkpointed entry must still be in the log with the same hash; a log needs its checkpoint.

    No checkpoint and no log is a new installation. A log without a
    checkpoint (the ConfigMap was deleted) or a checkpoint without a log (the
    volume was wiped or swapped) fails: either could hide a log started anew,
    which would have forgotten the requests signed and the one-time keys used.
    """
    if checkpoint is None:
        if head is not None:
            raise AuditError(f"the log holds {head.index + 1} entries but there is no checkpoint: the checkpoint "
                             "was deleted; start a new chain deliberately (python -m keyroom.signer.audit new-chain)")
        return
    if head is None:
        raise AuditError(f"entry {checkpoint.index} was checkpointed but the log is missing or empty: the log was "
                         "deleted or replaced; start a new chain deliberately (python -m keyroom.signer.audit "
                         "new-chain)")
    if head.index < checkpoint.index:
        raise AuditError(f"the log ends at entry {head.index} but entry {checkpoint.index} was "
                         "checkpointed: the log was truncated")
    found = (entries_by_index or {}).get(checkpoint.index)
    if found != checkpoint.hash:
        raise AuditError(f"entry {checkpoint.index} has hash {found}, but the checkpoint says {checkpoint.hash}: "
                         "the log was rewritten")


def verify(path: pathlib.Path, checkpoint: Head | None = None) -> Head | None:
    """Check the whole chain (and the checkpoint); return the head, None for an empty log."""
    head, hashes = None, {}
    if path.exists():
        for entry in read_entries(path):
            head = Head(entry["index"], entry["hash"])
            if checkpoint is not None and entry["index"] == checkpoint.index:
                hashes[entry["index"]] = entry["hash"]
    if checkpoint is not None:
        check_checkpoint(hashes, head, checkpoint)
    return head


@dataclasses.dataclass
class RequestRecord:
    """What the log says about one SignRequest (by UID)."""

    intent: dict | None = None
    signed: dict | None = None
    #: index of the intent a crash abandoned (the request may be tried again)
    abandoned: list[int] = dataclasses.field(default_factory=list)

    @property
    def open_intent(self) -> bool:
        return self.intent is not None and self.signed is None and self.intent["index"] not in self.abandoned


class AuditLog:
    """An open log: appends entries durably and keeps the per-request memory of the signer."""

    def __init__(self, directory: pathlib.Path, *, checkpoint: Head | None = None, mac: Mac | None = None) -> None:
        self.directory = directory
        self.mac = mac
        self.path = directory / LOG_NAME
        self.results = directory / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self.head: Head | None = None
        self._appending = threading.Lock()
        #: requests the signer intended to sign, signed or abandoned, by UID (refusals alone are not kept)
        self.requests: dict[str, RequestRecord] = {}
        #: the signer's record of each SigningKey by UID (see keyroom.signer.keys)
        self.keys: dict[str, keys.KeyRecord] = {}
        #: the signer's record of each Certificate by UID: what it issued, revoked and published (CRLs)
        self.certificates: dict[str, certificates.CertificateRecord] = {}
        #: whether this chain was started anew by an administrator (key records are then rebuilt from the token)
        self.restarted = False
        #: namespace -> its signatures of the last hour, by intent index (for the policies' rate limits).
        #: An intent counts from the moment it is written, so concurrent requests cannot overrun a rate limit.
        self.rates: dict[str, policy.RateIndex] = {}
        hashes = {}
        if self.path.exists():
            for entry in read_entries(self.path, mac=mac):
                self._remember(entry)
                if checkpoint is not None and entry["index"] == checkpoint.index:
                    hashes[entry["index"]] = entry["hash"]
        check_checkpoint(hashes, self.head, checkpoint)
        self._file = open(self.path, "ab")

    def close(self) -> None:
        self._file.close()

    def _remember(self, entry: dict) -> None:
        self.head = Head(entry["index"], entry["hash"])
        event = entry["event"]
        uid = (entry.get("request") or {}).get("uid")
        record = self.requests.setdefault(uid, RequestRecord()) if uid and event in _REQUEST_EVENTS else None
        keys.apply(self.keys, entry)
        certificates.apply(self.certificates, entry)
        if event == "ChainStarted":
            self.restarted = True
            for carried in entry.get("signedRequests") or []:
                self.requests.setdefault(carried, RequestRecord()).signed = {"index": entry["index"],
                                                                             "hash": entry["hash"]}
        elif event == "Intent":  # the memory keeps only what resolving and answering need, not the digests
            record.intent = {field: entry[field] for field in ("index", "request", "key")}
            self.rates.setdefault(entry["request"]["namespace"], policy.RateIndex()).put(
                entry["index"], (datetime.datetime.fromisoformat(entry["time"]), entry["key"]["name"],
                                 len(entry["digests"])))
        elif event == "Signed":
            record.signed = {"index": entry["index"], "hash": entry["hash"],
                             "signatures": signatures_digest(entry["signatures"])}
        elif event == "Abandoned":
            record.abandoned.append(entry["intent"])
            if entry["request"]["namespace"] in self.rates:
                self.rates[entry["request"]["namespace"]].drop(entry["intent"])

    def append(self, event: str, **fields: Any) -> dict:
        """Write one entry and fsync it before returning (thread-safe: entries are chained one at a time)."""
        with self._appending:
            return self._append(event, **fields)

    def _append(self, event: str, **fields: Any) -> dict:
        entry = {"index": self.head.index + 1 if self.head else 0,
                 "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
                 "event": event, **fields, "prev": self.head.hash if self.head else GENESIS}
        entry["hash"] = entry_hash(entry)
        if self.mac is not None:
            entry["mac"] = entry_mac(entry, self.mac)
        self._file.write(canonical(entry) + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._remember(entry)
        return entry

    def keys_consumed(self) -> set[str]:
        """UIDs of the one-time keys this log records as used."""
        return {uid for uid, record in self.keys.items() if record.consumed_by is not None}

    def rate_tally(self, namespace: str, at: datetime.datetime) -> policy.RateTally:
        """The signatures made or being made in ``namespace`` within the rate window before ``at``.

        Kept per namespace and per key as intents are written: a decision costs
        a sum per key, not a pass over every signature of the last hour.
        """
        return self.rates.setdefault(namespace, policy.RateIndex()).at(at)

    # ------------------------------------------------------------ the signatures beside the log

    def _result_path(self, uid: str) -> pathlib.Path:
        return self.results / f"{uid}.json"

    def store_result(self, uid: str, result: dict) -> None:
        """Atomically and durably: write, fsync, rename, fsync the directory."""
        target = self._result_path(uid)
        temporary = target.with_suffix(".tmp")
        with open(temporary, "wb") as out:
            out.write(canonical(result))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
        directory = os.open(self.results, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def load_result(self, uid: str) -> dict | None:
        try:
            return json.loads(self._result_path(uid).read_bytes())
        except FileNotFoundError:
            return None

    def prune_results(self, older_than: datetime.timedelta) -> int:
        """Forget stored signatures of requests signed long ago (their log entries stay); returns how many.

        A retry after that is answered AlreadySigned, never with a new signature.
        """
        cutoff = time.time() - older_than.total_seconds()
        pruned = 0
        for path in self.results.glob("*.json"):
            uid = path.stem
            record = self.requests.get(uid)
            if record is not None and record.signed is not None and path.stat().st_mtime < cutoff:
                path.unlink()
                pruned += 1
        return pruned


class StateLocked(OSError):
    """Another signer holds the state directory."""


def lock_state_dir(directory: pathlib.Path) -> int:
    """Take the state directory's exclusive lock for the life of the process; returns the open descriptor.

    Two signers on one state would each append to the log from their own
    head (forking the chain) and each sign a request once: exactly-once needs
    one writer. The lock is released by the kernel when the process ends.
    """
    directory.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(directory / "signer.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 64).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        raise StateLocked(f"another signer (pid {holder}) holds the state directory {directory}; "
                          "run one signer per state directory") from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    return descriptor


def start_new_chain(directory: pathlib.Path, *, checkpoint: Head | None, reason: str,
                    instruction: dict[str, str], mac: Mac | None = None) -> AuditLog:
    """Set a broken log aside and start a new chain whose first entry says what was lost and why.

    Only an administrator's explicit instruction (``new-chain``) leads here.
    What the old log still proves is carried over: the requests its readable
    part records as signed, the one-time keys it records as used, and every
    request whose signatures are stored beside it; so a retry of those is
    never signed twice. Key versions are rebuilt from the token.
    """
    path = directory / LOG_NAME
    signed: set[str] = set()
    consumed: dict[str, dict] = {}
    previous: dict[str, Any] = {"checkpoint": dataclasses.asdict(checkpoint) if checkpoint else None}
    if path.exists():
        head = None
        try:
            for entry in read_entries(path, mac=mac):
                head = Head(entry["index"], entry["hash"])
                if entry["event"] == "Signed":
                    signed.add(entry["request"]["uid"])
                    if entry["key"].get("usage") == "OneTime":
                        consumed.setdefault(entry["key"]["uid"], {"name": entry["request"]["name"],
                                                                  "uid": entry["request"]["uid"],
                                                                  "keyName": entry["key"]["name"],
                                                                  "namespace": entry["request"]["namespace"]})
                elif entry["event"] == "ChainStarted":
                    signed.update(entry.get("signedRequests") or [])
                    consumed.update(entry.get("consumedKeys") or {})
        except AuditError as error:
            previous["problem"] = str(error)
        aside = path.with_name(f"audit-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.jsonl.broken")
        os.replace(path, aside)
        previous.update(readableHead=dataclasses.asdict(head) if head else None, keptAs=aside.name)
    results = directory / "results"
    if results.exists():
        for stored in results.glob("*.json"):
            signed.add(stored.stem)
            try:
                result = json.loads(stored.read_bytes())
            except ValueError:
                continue  # unreadable: its UID still counts as signed
            key, request = result.get("key") or {}, result.get("request") or {}
            if key.get("usage") == "OneTime" and key.get("uid"):
                consumed.setdefault(key["uid"], {"name": request.get("name", ""), "uid": stored.stem,
                                                 "keyName": key.get("name", ""),
                                                 "namespace": request.get("namespace", "")})
    log = AuditLog(directory, mac=mac)
    log.append("ChainStarted", reason=reason, instruction=instruction, previous=previous,
               signedRequests=sorted(signed), consumedKeys=consumed)
    return log


def checkpoint_text(head: Head | None) -> str:
    """How a new-chain instruction names the checkpoint it supersedes."""
    return f"{head.index}:{head.hash}" if head else "none"


def request_new_chain(*, namespace: str, reason: str) -> str:
    """Write the administrator's instruction to start a new chain, naming the checkpoint it supersedes.

    The signer acts on it only while its log fails verification and only if
    the instruction names the checkpoint it sees, so an old instruction can
    never reset a later chain. Writing it needs the right to write ConfigMaps
    in the signer's namespace: a cluster or platform administrator's, never
    the operator's or the signer's.
    """
    import kubernetes  # only this command talks to the API server

    from keyroom import kubeclient
    core = kubernetes.client.CoreV1Api(kubeclient.api_client())
    try:
        data = core.read_namespaced_config_map(CHECKPOINT_NAME, namespace).data or {}
        head = Head(int(data["index"]), data["entryHash"]) if "index" in data and "entryHash" in data else None
    except kubernetes.client.ApiException as error:
        if error.status != 404:
            raise
        head = None
    body = {"metadata": {"name": NEW_CHAIN_NAME, "labels": {"app.kubernetes.io/part-of": "keyroom"}},
            "data": {"supersedes": checkpoint_text(head), "reason": reason,
                     "requestedAt": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}
    try:
        core.replace_namespaced_config_map(NEW_CHAIN_NAME, namespace, body)
    except kubernetes.client.ApiException as error:
        if error.status != 404:
            raise
        core.create_namespaced_config_map(namespace, body)
    return checkpoint_text(head)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyroom.signer.audit",
                                     description="Verify a keyroom signer audit log, or start a new chain.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="check the hash chain, and the checkpoint when given")
    check.add_argument("log", type=pathlib.Path)
    check.add_argument("--index", type=int, help="the checkpointed entry index")
    check.add_argument("--hash", help="the checkpointed entry hash (sha256:...)")
    chain = sub.add_parser("new-chain", help="tell a signer whose log failed verification to start a new chain "
                                             "(the old log is kept aside; the reason is the new chain's first entry)")
    chain.add_argument("--reason", required=True, help="why, for the record (e.g. the incident number)")
    chain.add_argument("--namespace", default="keyroom-system", help="the signer's namespace")
    args = parser.parse_args(argv)
    if args.command == "new-chain":
        if not args.reason.strip():
            parser.error("--reason must say why")
        try:
            supersedes = request_new_chain(namespace=args.namespace, reason=args.reason)
        except Exception as error:  # one line for a person, never a traceback
            print(f"error: cannot write the instruction: {error}", file=sys.stderr)
            return 1
        print(f"instruction written: the signer starts a new chain superseding checkpoint {supersedes} "
              "once its log fails verification (its health endpoint says when)")
        return 0
    checkpoint = Head(args.index, args.hash) if args.index is not None and args.hash else None
    try:
        head = verify(args.log, checkpoint)
    except (AuditError, OSError) as error:
        print(f"audit log INVALID: {error}", file=sys.stderr)
        return 1
    if head is None:
        print("audit log valid: empty")
    else:
        print(f"audit log valid: {head.index + 1} entries, head {head.hash}"
              + (f", checkpoint {checkpoint.index} matches" if checkpoint else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import sys
import time
from typing import Any, Iterator

GENESIS = "sha256:" + "0" * 64
#: the ConfigMap (in the signer's namespace) that holds the checkpointed head
CHECKPOINT_NAME = "keyroom-audit-checkpoint"


class AuditError(Exception):
    """The log is not a valid chain (or disagrees with its checkpoint)."""


def canonical(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(entry: dict) -> str:
    return "sha256:" + hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class Head:
    index: int
    hash: str


def read_entries(path: pathlib.Path) -> Iterator[dict]:
    """The entries of a log, each checked against its predecessor; raises AuditError at the first bad one."""
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
            yield entry
            previous, expected_index = entry["hash"], expected_index + 1


def check_checkpoint(entries_by_index: dict[int, str] | None, head: Head | None, checkpoint: Head | None) -> None:
    """The checkpointed entry must still be in the log with the same hash."""
    if checkpoint is None:
        return
    if head is None or head.index < checkpoint.index:
        raise AuditError(f"the log ends at entry {head.index if head else -1} but entry {checkpoint.index} was "
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

    def __init__(self, directory: pathlib.Path, *, checkpoint: Head | None = None) -> None:
        self.directory = directory
        self.path = directory / "audit.jsonl"
        self.results = directory / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self.head: Head | None = None
        self.requests: dict[str, RequestRecord] = {}
        #: one-time keys by key UID -> the request UID that consumed them
        self.consumed: dict[str, str] = {}
        #: signatures of the last hour by intent index: (time, namespace, key name, count), oldest first.
        #: An intent counts from the moment it is written, so concurrent requests cannot overrun a rate limit.
        self.recent: dict[int, tuple[datetime.datetime, str, str, int]] = {}
        hashes = {}
        if self.path.exists():
            for entry in read_entries(self.path):
                self._remember(entry)
                if checkpoint is not None and entry["index"] == checkpoint.index:
                    hashes[entry["index"]] = entry["hash"]
        check_checkpoint(hashes, self.head, checkpoint)
        self._file = open(self.path, "ab")

    def close(self) -> None:
        self._file.close()

    def _remember(self, entry: dict) -> None:
        self.head = Head(entry["index"], entry["hash"])
        uid = (entry.get("request") or {}).get("uid")
        record = self.requests.setdefault(uid, RequestRecord()) if uid else None
        event = entry["event"]
        if event == "Intent":  # the memory keeps only what resolving and answering need, not the digests
            record.intent = {field: entry[field] for field in ("index", "request", "key")}
            self.recent[entry["index"]] = (datetime.datetime.fromisoformat(entry["time"]),
                                           entry["request"]["namespace"], entry["key"]["name"], len(entry["digests"]))
        elif event == "Signed":
            record.signed = {"index": entry["index"], "hash": entry["hash"]}
            key = entry["key"]
            if key.get("usage") == "OneTime":
                self.consumed.setdefault(key["uid"], uid)
        elif event == "Abandoned":
            record.abandoned.append(entry["intent"])
            self.recent.pop(entry["intent"], None)

    def append(self, event: str, **fields: Any) -> dict:
        """Write one entry and fsync it before returning."""
        entry = {"index": self.head.index + 1 if self.head else 0,
                 "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
                 "event": event, **fields, "prev": self.head.hash if self.head else GENESIS}
        entry["hash"] = entry_hash(entry)
        self._file.write(canonical(entry) + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._remember(entry)
        return entry

    def recent_signatures(self, namespace: str, *, since: datetime.datetime) -> list[tuple[datetime.datetime, str, int]]:
        """Signatures made or being made in ``namespace`` since ``since`` (at most an hour back)."""
        for index in [i for i, (at, *_) in self.recent.items() if at < since - datetime.timedelta(hours=1)]:
            del self.recent[index]
        return [(at, key, count) for at, ns, key, count in self.recent.values() if ns == namespace and at >= since]

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyroom.signer.audit",
                                     description="Verify a keyroom signer audit log.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="check the hash chain, and the checkpoint when given")
    check.add_argument("log", type=pathlib.Path)
    check.add_argument("--index", type=int, help="the checkpointed entry index")
    check.add_argument("--hash", help="the checkpointed entry hash (sha256:...)")
    args = parser.parse_args(argv)
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

"""What the signer's audit log says, for people: one line per entry, and signatures counted over a period.

The audit log (:mod:`keyroom.signer.audit`) is the record of every signature:
an ``Intent`` entry names the request, its requester, approvers, key version,
format and digests before the key is used; a ``Signed`` entry follows once the
signatures exist. A signing is therefore an Intent joined with its Signed
entry; an Intent without one was abandoned and signed nothing. Reports are
built from verified entries only (the caller verifies the chain first), so a
count in a report is a count the log's hash chain vouches for.
"""
from __future__ import annotations

import collections
import datetime
from typing import Iterable, Mapping

from keyroom import schedule


def parse_moment(text: str, now: datetime.datetime) -> datetime.datetime:
    """``30d``/``12h`` (that long before ``now``) or an RFC 3339 time."""
    try:
        return now - schedule.parse_duration(text)
    except ValueError:
        pass
    try:
        return schedule.parse_time(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (30d, 12h) nor a time (2026-11-01T00:00:00Z)") from None


def signings(entries: Iterable[Mapping]) -> list[dict]:
    """Every completed signing in the log: the Intent's facts with the Signed entry's time and count."""
    intents: dict[int, Mapping] = {}
    found = []
    for entry in entries:
        if entry.get("event") == "Intent":
            intents[entry["index"]] = entry
        elif entry.get("event") == "Signed":
            intent = intents.get(entry.get("intent"))
            request = entry.get("request") or {}
            key = (intent or {}).get("key") or entry.get("key") or {}
            found.append({
                "time": entry["time"], "index": entry["index"],
                "namespace": request.get("namespace", ""), "request": request.get("name", ""),
                "key": key.get("name", ""), "keyVersion": key.get("version"),
                "requester": (intent or {}).get("requester", ""),
                "approvers": list((intent or {}).get("approvers") or []),
                "format": (intent or {}).get("format", ""), "reason": (intent or {}).get("reason", ""),
                "signatures": len(entry.get("signatures") or []),
            })
    return found


def aggregate(found: list[dict], *, since: datetime.datetime, until: datetime.datetime) -> dict:
    """Requests and signatures per team (namespace), key and requester in [since, until)."""
    chosen = [s for s in found if since <= datetime.datetime.fromisoformat(s["time"]) < until]

    def grouped(*fields: str) -> list[dict]:
        counts: dict[tuple, list[int]] = collections.defaultdict(lambda: [0, 0])
        for signing in chosen:
            counted = counts[tuple(signing[f] for f in fields)]
            counted[0] += 1
            counted[1] += signing["signatures"]
        return [{**dict(zip(fields, group)), "requests": requests, "signatures": signatures}
                for group, (requests, signatures) in sorted(counts.items(), key=lambda item: (-item[1][1], item[0]))]

    return {
        "period": {"since": schedule.format_time(since), "until": schedule.format_time(until)},
        "total": {"requests": len(chosen), "signatures": sum(s["signatures"] for s in chosen)},
        "byTeam": grouped("namespace"),
        "byKey": grouped("namespace", "key"),
        "byRequester": grouped("namespace", "requester"),
    }


def _ref(value: Mapping | None) -> str:
    if not value:
        return ""
    return f"{value.get('namespace', '')}/{value.get('name', '')}".strip("/")


def summary(entry: Mapping) -> str:
    """One line that says what an entry records."""
    event = entry.get("event", "")
    if event == "Intent":
        key = entry.get("key") or {}
        return (f"{_ref(entry.get('request'))} by {entry.get('requester')}, key {key.get('name')} "
                f"v{key.get('version')}, {entry.get('format')}, {len(entry.get('digests') or [])} digest(s), "
                f"approved by {', '.join(entry.get('approvers') or []) or 'nobody (none required)'}"
                + (f": {entry['reason']}" if entry.get("reason") else ""))
    if event == "Signed":
        return f"{_ref(entry.get('request'))}: {len(entry.get('signatures') or [])} signature(s) (intent {entry.get('intent')})"
    if event == "Refused":
        return f"{_ref(entry.get('request'))}: {entry.get('reason')}: {entry.get('message', '')}"
    if event == "Abandoned":
        return f"{_ref(entry.get('request'))}: intent {entry.get('intent')} abandoned: {entry.get('message', '')}"
    if event.startswith("Key"):
        extra = entry.get("reason") or ""
        return f"{_ref(entry.get('key'))}" + (f" v{entry['version']}" if entry.get("version") else "") + \
            (f": {extra}" if extra else "")
    if event.startswith("Certificate") or event == "CrlIssued":
        return _ref(entry.get("certificate")) + (f" CRL {entry['crlNumber']}" if entry.get("crlNumber") else "")
    if event == "ChainStarted":
        return f"new chain: {entry.get('reason', '')}"
    return ""


def matches(entry: Mapping, *, namespace: str | None = None, key: str | None = None, request: str | None = None,
            events: Iterable[str] = (), since: datetime.datetime | None = None) -> bool:
    """Whether ``entry`` passes the filters of ``kubectl keyroom audit show``."""
    events = list(events)
    if events and entry.get("event") not in events:
        return False
    if since is not None and datetime.datetime.fromisoformat(entry["time"]) < since:
        return False
    refs = [entry.get(field) or {} for field in ("request", "key", "certificate")]
    if namespace and not any(r.get("namespace") == namespace for r in refs):
        return False
    if key and (entry.get("key") or {}).get("name") != key:
        return False
    if request and (entry.get("request") or {}).get("name") != request:
        return False
    return True

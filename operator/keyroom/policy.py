"""Pure decisions about signing: which policies govern a key, who may request, what approvals and builds count.

No I/O here: the operator and the signer both call these functions with the
objects they read, so both decide the same way, and the tests need no cluster.
"""
from __future__ import annotations

import bisect
import dataclasses
import datetime
from typing import Any, Hashable, Iterable, Mapping

from keyroom import schedule

#: How long a request waits when no policy says (the SigningPolicy default).
DEFAULT_REQUEST_TTL = "24h"
RATE_WINDOW = datetime.timedelta(hours=1)
#: the signature formats the signer produces (cms, authenticode, jar and apk embed the key version's certificate)
SUPPORTED_FORMATS = ("raw", "cms", "authenticode", "jar", "sigstore", "apk", "cosign")


def _requirement_holds(labels: Mapping[str, str], requirement: Mapping) -> bool:
    key, operator = requirement["key"], requirement["operator"]
    values = requirement.get("values") or []
    if operator == "In":
        return key in labels and labels[key] in values
    if operator == "NotIn":
        return key not in labels or labels[key] not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    raise ValueError(f"unknown label selector operator {operator!r}")


def selector_matches(selector: Mapping, labels: Mapping[str, str] | None) -> bool:
    """Kubernetes label-selector semantics; an empty selector matches every key."""
    labels = labels or {}
    match_labels = selector.get("matchLabels") or {}
    if any(labels.get(key) != value for key, value in match_labels.items()):
        return False
    return all(_requirement_holds(labels, r) for r in selector.get("matchExpressions") or [])


def policy_selects(policy_spec: Mapping, *, key_name: str, key_labels: Mapping[str, str] | None) -> bool:
    """Whether a SigningPolicy (of the key's namespace) governs the key."""
    if "keys" in policy_spec and policy_spec["keys"] is not None:
        return key_name in policy_spec["keys"]
    if "keySelector" in policy_spec and policy_spec["keySelector"] is not None:
        return selector_matches(policy_spec["keySelector"], key_labels)
    return False


def matched_keys(policy_spec: Mapping, keys: Iterable[tuple[str, Mapping[str, str] | None]]) -> list[str]:
    """The sorted names of the keys (name, labels) that the policy selects."""
    return sorted(name for name, labels in keys if policy_selects(policy_spec, key_name=name, key_labels=labels))


# ---------------------------------------------------------------- who may request and approve

@dataclasses.dataclass(frozen=True)
class Identity:
    """A user as the API server authenticated them (a SignRequest's requester or an approval)."""

    username: str
    groups: tuple[str, ...] = ()

    @classmethod
    def of_requester(cls, requester: Mapping) -> "Identity":
        return cls(requester["username"], tuple(requester.get("groups") or ()))


def _service_account(username: str) -> tuple[str, str] | None:
    parts = username.split(":")
    if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
        return parts[2], parts[3]
    return None


def _named(subjects: Mapping, identity: Identity, *, namespace: str) -> bool:
    """Whether ``subjects`` (users, groups, serviceAccounts of ``namespace``) name this identity."""
    if identity.username in (subjects.get("users") or []):
        return True
    if set(identity.groups) & set(subjects.get("groups") or []):
        return True
    account = _service_account(identity.username)
    return account is not None and account[0] == namespace and account[1] in (subjects.get("serviceAccounts") or [])


def requester_allowed(policy_spec: Mapping, requester: Identity, *, namespace: str) -> bool:
    """Whether the policy lets this identity request signatures (ServiceAccounts of the policy's namespace)."""
    return _named(policy_spec.get("requesters") or {}, requester, namespace=namespace)


def builder_eligible(policy_spec: Mapping, builder: Identity, *, namespace: str) -> bool:
    """Whether the policy counts this identity's build attestations (ServiceAccounts of the policy's namespace)."""
    return _named((policy_spec.get("matchingBuilds") or {}).get("builders") or {}, builder, namespace=namespace)


def approver_eligible(policy_spec: Mapping, approver: Identity) -> bool:
    approvers = policy_spec.get("approvers") or {}
    return approver.username in (approvers.get("users") or []) or bool(
        set(approver.groups) & set(approvers.get("groups") or []))


@dataclasses.dataclass(frozen=True)
class Tally:
    """The approvals of one request as one policy counts them."""

    approved_by: tuple[str, ...]
    denied_by: tuple[str, ...]
    #: (user, why the entry did not count)
    ignored: tuple[tuple[str, str], ...]
    required: int

    @property
    def denied(self) -> bool:
        return bool(self.denied_by)

    @property
    def approved(self) -> bool:
        return not self.denied and len(self.approved_by) >= self.required

    @property
    def missing(self) -> int:
        return max(0, self.required - len(self.approved_by))


def count_approvals(policy_spec: Mapping, *, requester: Identity, approvals: Iterable[Mapping]) -> Tally:
    """Distinct eligible approvers against ``requiredApprovals``; one eligible Deny denies.

    With ``separationOfDuties`` (the default) the requester never counts, even
    when they are also an approver; an ineligible person's entry is ignored and
    reported. A user's repeated Approve counts once.
    """
    separation = policy_spec.get("separationOfDuties", True)
    approved: list[str] = []
    denied: list[str] = []
    ignored: list[tuple[str, str]] = []
    for entry in approvals:
        approver = Identity(entry["user"], tuple(entry.get("groups") or ()))
        if separation and approver.username == requester.username:
            ignored.append((approver.username, "a requester cannot approve or deny their own request"))
        elif not approver_eligible(policy_spec, approver):
            ignored.append((approver.username, "not an approver in the policy"))
        elif entry["decision"] == "Deny":
            if approver.username not in denied:
                denied.append(approver.username)
        elif approver.username not in approved:
            approved.append(approver.username)
    return Tally(approved_by=tuple(approved), denied_by=tuple(denied), ignored=tuple(ignored),
                 required=int(policy_spec.get("requiredApprovals", 1)))


# ---------------------------------------------------------------- matching builds

@dataclasses.dataclass(frozen=True)
class Mismatch:
    """An eligible builder whose digests differ from the request's, at the first file that differs."""

    builder: str
    file: str
    #: what differs there, for people: "its digest 1f2e... is not the request's 9f86..."
    detail: str

    @property
    def message(self) -> str:
        return f"{self.builder}'s build differs at {self.file}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class BuildTally:
    """The build attestations of one request as one policy's ``matchingBuilds`` counts them."""

    #: distinct eligible builders whose digests equal the request's
    matched_by: tuple[str, ...]
    mismatched: tuple[Mismatch, ...]
    #: (builder, why the attestation did not count)
    ignored: tuple[tuple[str, str], ...]
    required: int

    @property
    def blocked(self) -> bool:
        return bool(self.mismatched)

    @property
    def matched(self) -> bool:
        return not self.blocked and len(self.matched_by) >= self.required

    @property
    def missing(self) -> int:
        return max(0, self.required - len(self.matched_by))


def _short(value: str) -> str:
    return value[:12] + "..." if len(value) > 12 else value


def first_difference(expected: Iterable[Mapping], attested: Iterable[Mapping]) -> tuple[str, str] | None:
    """(file, what differs) at the first file, in the request's order, where two digest lists differ; None if equal.

    A file the builder did not attest, or attested with another digest, differs;
    so does a file the builder attested that the request does not carry.
    """
    expected = list(expected)
    theirs = {d["name"]: d["value"].lower() for d in attested}
    for digest in expected:
        value = digest["value"].lower()
        if digest["name"] not in theirs:
            return digest["name"], "the builder attested no digest for it"
        if theirs[digest["name"]] != value:
            return digest["name"], f"its digest {_short(theirs[digest['name']])} is not the request's {_short(value)}"
    extra = sorted(set(theirs) - {d["name"] for d in expected})
    if extra:
        return extra[0], "the builder attested it, but the request does not carry it"
    return None


def count_builds(policy_spec: Mapping, *, digests: Iterable[Mapping], attestations: Iterable[Mapping],
                 namespace: str) -> BuildTally | None:
    """Distinct eligible builders whose digests equal the request's; None when the policy asks for no builds.

    Only attestations count, never the request itself: the requester's own
    build counts once, when the requester is a builder and attests it like
    anyone else. A builder who attests twice counts once. One eligible
    builder whose digests differ blocks the request, whatever the others
    attest; an attestation by someone the policy does not name a builder is
    ignored and reported, and blocks nothing.
    """
    wanted = policy_spec.get("matchingBuilds")
    if not wanted:
        return None
    digests = list(digests)
    matched: list[str] = []
    mismatched: list[Mismatch] = []
    ignored: list[tuple[str, str]] = []
    for entry in attestations:
        builder = Identity(entry["user"], tuple(entry.get("groups") or ()))
        if not builder_eligible(policy_spec, builder, namespace=namespace):
            ignored.append((builder.username, "not a builder in the policy"))
            continue
        difference = first_difference(digests, entry.get("digests") or [])
        if difference is not None:
            mismatched.append(Mismatch(builder.username, *difference))
        elif builder.username not in matched:
            matched.append(builder.username)
    return BuildTally(matched_by=tuple(matched), mismatched=tuple(mismatched), ignored=tuple(ignored),
                      required=int(wanted.get("required", 2)))


def request_problems(policy_spec: Mapping, request_spec: Mapping, *, namespace: str) -> list[str]:
    """Why a request can never satisfy this policy (empty when it can)."""
    problems = []
    requester = Identity.of_requester(request_spec["requester"])
    if not requester_allowed(policy_spec, requester, namespace=namespace):
        problems.append(f"{requester.username} is not a requester in the policy")
    algorithm = request_spec.get("digestAlgorithm", "SHA256")
    if algorithm not in (policy_spec.get("allowedDigestAlgorithms") or ["SHA256", "SHA384", "SHA512"]):
        problems.append(f"digest algorithm {algorithm} is not allowed")
    fmt = request_spec.get("format", "raw")
    if fmt not in (policy_spec.get("allowedFormats") or SUPPORTED_FORMATS):
        problems.append(f"format {fmt} is not allowed")
    limit = policy_spec.get("maxDigestsPerRequest", 500)
    if len(request_spec.get("digests") or []) > limit:
        problems.append(f"{len(request_spec['digests'])} digests exceed the policy's maxDigestsPerRequest of {limit}")
    hourly = policy_spec.get("maxSignaturesPerHour", 1000)
    if len(request_spec.get("digests") or []) > hourly:
        problems.append(f"{len(request_spec['digests'])} digests exceed the policy's maxSignaturesPerHour of {hourly}")
    return problems


# ---------------------------------------------------------------- is the key online

def key_availability(spec: Mapping, at: datetime.datetime) -> schedule.Availability:
    """The key's windows at ``at``; a key whose windows cannot be read stays offline (fail closed)."""
    if schedule.validate_windows(spec.get("offline")):
        return schedule.Availability(online=False, until=None, next_open=None)
    return schedule.availability(spec.get("offline"), at)


def current_version(versions: list[dict]) -> dict | None:
    """The newest Enabled version of a key, which is the one that signs."""
    return max((v for v in versions if v["state"] == "Enabled"), key=lambda v: v["version"], default=None)


@dataclasses.dataclass(frozen=True)
class KeyState:
    """What a decision needs to know of a key's material: the signer's record, or the operator's mirror of it.

    The signer builds it from its own durable record; the operator from the
    key's status, which mirrors that record. A decision never reads status
    itself, so the signer cannot be led by a status someone wrote.
    """

    #: the version that signs now (None: no enabled version)
    current_version: int | None
    #: a one-time key's consumer: the request's name and/or UID
    consumed_by: tuple[str, ...] = ()
    #: every version was destroyed
    destroyed: bool = False
    #: versions whose private key is missing from the token (destroyed outside keyroom)
    missing_versions: tuple[int, ...] = ()

    @classmethod
    def from_status(cls, status: Mapping) -> "KeyState":
        """The operator's view: from a SigningKey's status (a mirror of the signer's record)."""
        versions = status.get("versions") or []
        current = current_version(versions)
        return cls(current_version=current["version"] if current else None,
                   consumed_by=(status["consumedBy"],) if status.get("consumedBy") else (),
                   destroyed=status.get("phase") == "Destroyed",
                   missing_versions=tuple(v["version"] for v in versions if v.get("missing")))


# ---------------------------------------------------------------- one request, all its policies

@dataclasses.dataclass(frozen=True)
class Signature:
    """Signatures made at one moment with one key (for rate limits)."""

    at: datetime.datetime
    key: str
    count: int


@dataclasses.dataclass(frozen=True)
class Decision:
    """What a SignRequest's state should be now, by its key, its policies and the clock.

    ``phase`` is Pending, Approved (everything holds: sign now), Denied,
    Expired or Failed. ``approved`` says whether the approvals and the
    matching builds satisfy every policy, also while the request waits for its
    key (Pending, KeyOffline).
    """

    phase: str
    reason: str
    message: str
    approved: bool = False
    summary: str = ""
    #: the approvals as counted: user, decision, counted, reason
    approvals: tuple[dict, ...] = ()
    #: matching builds counted over required ones ("" when no policy asks for builds)
    build_summary: str = ""
    #: the build attestations as counted: user, counted, reason, build
    builds: tuple[dict, ...] = ()
    #: eligible builders whose digests differ from the request's (any one fails the request)
    mismatches: tuple[Mismatch, ...] = ()
    expires_at: datetime.datetime | None = None
    #: when the clock alone may change the decision (a window opens, the request expires)
    wake_at: datetime.datetime | None = None
    key_version: int | None = None
    policies: tuple[str, ...] = ()


def request_ttl(policies: list[Mapping]) -> datetime.timedelta:
    """The shortest requestTTL of the policies (they must all hold)."""
    return min((schedule.parse_duration((p.get("spec") or {}).get("requestTTL", DEFAULT_REQUEST_TTL))
                for p in policies), default=schedule.parse_duration(DEFAULT_REQUEST_TTL))


def _who(policy_spec: Mapping, requester: Identity) -> str:
    """Who can still approve: the policy's approvers, without the requester under separation of duties."""
    approvers = policy_spec.get("approvers") or {}
    users = [u for u in approvers.get("users") or []
             if not (policy_spec.get("separationOfDuties", True) and u == requester.username)]
    names = list(approvers.get("groups") or []) + users
    return " or ".join(names) if names else "nobody (the policy names no other approvers)"


def _builders_who(policy_spec: Mapping, tally: BuildTally) -> str:
    """Who can still attest a matching build: the policy's builders, without those already counted."""
    builders = (policy_spec.get("matchingBuilds") or {}).get("builders") or {}
    accounts = _service_account_names(tally.matched_by)
    names = ([f"group {g}" for g in builders.get("groups") or []]
             + [u for u in builders.get("users") or [] if u not in tally.matched_by]
             + [f"serviceaccount {a}" for a in builders.get("serviceAccounts") or [] if a not in accounts])
    return " or ".join(names) if names else "nobody (the policy names no other builders)"


def _service_account_names(usernames: Iterable[str]) -> set[str]:
    return {account[1] for account in map(_service_account, usernames) if account is not None}


class RateTally:
    """Signatures within the rate window before a moment, by key: each key's total and its signatures.

    :meth:`of` tallies a list; the operator keeps one up to date as requests
    sign, so a decision costs one sum per key, not a pass over every signature
    of the last hour.
    """

    def __init__(self, by_key: Mapping[str, list[Signature]]) -> None:
        self._by_key = by_key

    @classmethod
    def of(cls, signatures: Iterable[Signature], at: datetime.datetime) -> "RateTally":
        by_key: dict[str, list[Signature]] = {}
        for signature in signatures:
            if signature.at > at - RATE_WINDOW:
                by_key.setdefault(signature.key, []).append(signature)
        return cls(by_key)

    def keys(self) -> Iterable[str]:
        return self._by_key.keys()

    def total(self, key: str) -> int:
        return sum(s.count for s in self._by_key.get(key, ()))

    def signatures(self, key: str) -> list[Signature]:
        return list(self._by_key.get(key, ()))


class RateIndex(RateTally):
    """A namespace's signatures of the last hour, kept current as they are made.

    Each entry (a request in the operator, an audited intent in the signer) is
    kept oldest first per key with its key's running total; :meth:`at` drops
    those that aged out of the window, so a decision costs a sum per key
    instead of a pass over every signature of the hour (at 50 requests a
    second, 180,000 of them). An entry without a time (a request signing now)
    counts at the moment of the decision.
    """

    def __init__(self) -> None:
        super().__init__({})
        self._times: dict[str, list[tuple[datetime.datetime, Any]]] = {}  # key -> [(signed at, entry)], sorted
        self._entries: dict[Any, tuple[str, datetime.datetime | None, int]] = {}  # entry -> (key, at, count)
        self._totals: dict[str, int] = {}
        self._edge: datetime.datetime | None = None  # signatures at or before it have aged out
        self._at: datetime.datetime | None = None

    def put(self, name: Hashable, signature: tuple[datetime.datetime | None, str, int] | None) -> None:
        self.drop(name)
        if signature is None:
            return
        signed_at, key, count = signature
        if signed_at is not None:
            if self._edge is not None and signed_at <= self._edge:
                return
            bisect.insort(self._times.setdefault(key, []), (signed_at, name))
        self._entries[name] = (key, signed_at, count)
        self._totals[key] = self._totals.get(key, 0) + count

    def drop(self, name: Hashable) -> None:
        entry = self._entries.pop(name, None)
        if entry is None:
            return
        key, signed_at, count = entry
        if signed_at is not None:
            times = self._times[key]
            index = bisect.bisect_left(times, (signed_at, name))
            if index < len(times) and times[index] == (signed_at, name):
                del times[index]
        self._totals[key] -= count
        if not self._totals[key]:
            del self._totals[key]

    def at(self, moment: datetime.datetime) -> "RateIndex":
        """This tally as of ``moment``: what signed at or before an hour earlier no longer counts."""
        self._at, self._edge = moment, moment - RATE_WINDOW
        for key, times in self._times.items():
            aged = 0
            while aged < len(times) and times[aged][0] <= self._edge:
                _, name = times[aged]
                self._totals[key] -= self._entries.pop(name)[2]
                aged += 1
            if aged:
                del times[:aged]
                if not self._totals[key]:
                    del self._totals[key]
        return self

    def keys(self) -> Iterable[str]:
        return list(self._totals)

    def total(self, key: str) -> int:
        return self._totals.get(key, 0)

    def signatures(self, key: str) -> list[Signature]:
        found = [Signature(signed_at, key, self._entries[name][2])
                 for signed_at, name in self._times.get(key, ())]
        return found + [Signature(self._at, key, count) for k, signed_at, count in self._entries.values()
                        if k == key and signed_at is None]


def _rate_wait(limit: int, wanted: int, recent: list[Signature], at: datetime.datetime) -> datetime.datetime | None:
    """When enough signatures have aged out of the hour for ``wanted`` more, or None if they fit now."""
    window = sorted((s for s in recent if s.at > at - RATE_WINDOW), key=lambda s: s.at)
    used = sum(s.count for s in window)
    if used + wanted <= limit:
        return None
    for signature in window:  # oldest first: each one that ages out frees its count
        used -= signature.count
        if used + wanted <= limit:
            return signature.at + RATE_WINDOW
    return at + RATE_WINDOW


def decide(request: Mapping, *, key: Mapping | None, key_state: KeyState | None, policies: list[Mapping],
           at: datetime.datetime, recent: "list[Signature] | RateTally" = (),
           key_labels: Mapping[str, Mapping[str, str]] | None = None) -> Decision:
    """The state a non-final SignRequest should be in (pure; the operator and the signer both call it).

    ``key`` is the SigningKey the request names (None when it does not exist;
    only its metadata and spec are read), ``key_state`` what is known of its
    material (None: nothing, as for a key that has no version yet);
    ``policies`` are all SigningPolicies of the request's namespace; ``recent``
    the signatures made in the namespace (for ``maxSignaturesPerHour``), and
    ``key_labels`` the labels of the namespace's keys, to know which of those
    signatures a policy counts.
    """
    meta, spec = request["metadata"], request["spec"]
    namespace, key_name = meta["namespace"], spec["keyRef"]["name"]
    created = schedule.parse_time(meta["creationTimestamp"])
    labels = ((key or {}).get("metadata") or {}).get("labels") or {}
    governing = [p for p in policies
                 if policy_selects(p.get("spec") or {}, key_name=key_name, key_labels=labels)]
    governing.sort(key=lambda p: p["metadata"]["name"])
    names = tuple(p["metadata"]["name"] for p in governing)
    expires_at = created + request_ttl(governing)
    requester = Identity.of_requester(spec["requester"])

    tallies = [(p, count_approvals(p["spec"], requester=requester, approvals=spec.get("approvals") or []))
               for p in governing]
    counted: dict[str, dict] = {}
    for entry in spec.get("approvals") or []:
        reasons = [why for _, tally in tallies for user, why in tally.ignored if user == entry["user"]]
        counted[entry["user"]] = {"user": entry["user"], "decision": entry["decision"], "counted": not reasons,
                                  **({"reason": reasons[0]} if reasons else {})}
    # the policy that still needs the most approvals speaks for the request
    strictest = max(tallies, key=lambda pt: (pt[1].missing, pt[1].required), default=None)
    summary = (f"{len(strictest[1].approved_by)}/{strictest[1].required}" if strictest else "")

    attestations = spec.get("attestations") or []
    build_tallies = [(p, tally) for p in governing
                     if (tally := count_builds(p["spec"], digests=spec["digests"], attestations=attestations,
                                               namespace=namespace)) is not None]
    builds: dict[str, dict] = {}
    for entry in attestations:
        reasons = ([why for _, tally in build_tallies for user, why in tally.ignored if user == entry["user"]]
                   + [m.message for _, tally in build_tallies for m in tally.mismatched if m.builder == entry["user"]])
        counted_by_any = any(entry["user"] in tally.matched_by for _, tally in build_tallies)
        if not reasons and not counted_by_any:
            reasons = ["no policy of the key asks for matching builds"]
        builds[entry["user"]] = {"user": entry["user"], "counted": not reasons,
                                 **({"reason": reasons[0]} if reasons else {}),
                                 **({"build": entry["build"]} if entry.get("build") else {})}
    strictest_builds = max(build_tallies, key=lambda pt: (pt[1].missing, pt[1].required), default=None)
    build_summary = (f"{len(strictest_builds[1].matched_by)}/{strictest_builds[1].required}"
                     if strictest_builds else "")
    approvals_hold = bool(tallies) and all(t.approved for _, t in tallies)
    builds_hold = all(t.matched for _, t in build_tallies)
    approved = approvals_hold and builds_hold
    base = dict(approved=approved, summary=summary, approvals=tuple(counted.values()), expires_at=expires_at,
                policies=names, build_summary=build_summary, builds=tuple(builds.values()),
                mismatches=tuple(m for _, tally in build_tallies for m in tally.mismatched))

    def pending(reason: str, message: str, wake: datetime.datetime | None = None) -> Decision:
        return Decision("Pending", reason, message, wake_at=min(filter(None, [wake, expires_at])), **base)

    denials = sorted({user for _, tally in tallies for user in tally.denied_by})
    if denials:
        return Decision("Denied", "Denied", f"denied by {', '.join(denials)}", **base)
    if base["mismatches"]:
        first = base["mismatches"][0]
        return Decision("Failed", "BuildMismatch", f"{first.message}; the builds do not agree, so nothing is signed: "
                                                   "find out why, then request again", **base)
    if at >= expires_at:
        return Decision("Expired", "Expired", f"not signed within the request TTL; it expired at "
                                              f"{schedule.format_time(expires_at)}", **base)
    if key is None:
        return pending("KeyNotFound", f"SigningKey {key_name} does not exist in namespace {namespace}; "
                                      f"the request waits for it until {schedule.format_time(expires_at)}")
    if not governing:
        return pending("NoPolicy", f"no SigningPolicy selects key {key_name}, so it cannot sign (fail closed); "
                                   "ask a platform admin for a policy")
    problems = [f"{p['metadata']['name']}: {problem}" for p in governing
                for problem in request_problems(p["spec"], spec, namespace=namespace)]
    if problems:
        return Decision("Failed", "NotAllowed", "; ".join(problems), **base)
    if spec.get("format", "raw") not in SUPPORTED_FORMATS:
        return Decision("Failed", "FormatNotSupported", f"format {spec['format']} is not produced yet; "
                                                        f"ask for {' or '.join(SUPPORTED_FORMATS)}", **base)
    key_spec = key.get("spec") or {}
    state = key_state or KeyState(current_version=None)
    if state.consumed_by and not {meta["name"], meta.get("uid")} & set(state.consumed_by):
        return Decision("Failed", "KeyConsumed", f"one-time key {key_name} already signed {state.consumed_by[0]} "
                                                 "and is retired", **base)
    if state.destroyed:
        return Decision("Failed", "KeyDestroyed", f"every version of key {key_name} was destroyed", **base)
    if not approved:
        waiting = []
        if not approvals_hold:
            need, policy_ = max(((t.missing, p) for p, t in tallies if not t.approved), key=lambda mp: mp[0])
            waiting.append(f"needs {need} more approval{'s' if need != 1 else ''} from "
                           f"{_who(policy_['spec'], requester)} (policy {policy_['metadata']['name']})")
        if not builds_hold:
            need, policy_, tally = max(((t.missing, p, t) for p, t in build_tallies if not t.matched),
                                       key=lambda mpt: mpt[0])
            waiting.append(f"needs {need} more matching build{'s' if need != 1 else ''} from "
                           f"{_builders_who(policy_['spec'], tally)} (policy {policy_['metadata']['name']})")
        return pending("AwaitingApproval" if not approvals_hold else "AwaitingBuilds", "; ".join(waiting))
    if state.current_version is None and state.missing_versions:
        return Decision("Failed", "KeyMaterialMissing",
                        f"key {key_name} version {state.missing_versions[-1]} is missing from the HSM (destroyed "
                        "outside keyroom?); a platform admin rotates the key to generate a new version", **base)
    if state.current_version is None:
        return pending("KeyNotReady", f"key {key_name} has no enabled version yet")
    availability = key_availability(key_spec, at)
    if not availability.online:
        if availability.next_open is None:
            return pending("KeyOffline", f"approved; key {key_name} is offline with no signing window ahead")
        return pending("KeyOffline", f"approved; key {key_name} is offline until "
                                     f"{schedule.format_time(availability.next_open)}, the request waits for "
                                     "the window", availability.next_open)
    wanted = len(spec["digests"])
    tally = recent if isinstance(recent, RateTally) else RateTally.of(recent, at)
    for policy_ in governing:
        limit = policy_["spec"].get("maxSignaturesPerHour", 1000)
        counted = [name for name in tally.keys()
                   if policy_selects(policy_["spec"], key_name=name, key_labels=(key_labels or {}).get(name, labels))]
        if sum(tally.total(name) for name in counted) + wanted <= limit:
            continue
        wait = _rate_wait(limit, wanted, [s for name in counted for s in tally.signatures(name)], at)
        if wait is not None:
            return pending("RateLimited", f"policy {policy_['metadata']['name']} allows {limit} signatures per "
                                          f"hour; this request fits again at {schedule.format_time(wait)}", wait)
    return Decision("Approved", "Approved", f"approved; signing with {key_name} version {state.current_version}",
                    key_version=state.current_version, **base)

"""Who may call the signer: keyroom.signer.service.Authenticator and the HTTP middleware, without a cluster.

The TokenReview API is a stand-in that answers what each test says (or
fails); the HTTP tests run the signer's own application (routes, middleware)
on a local test server without TLS. The PKCS#11 token stays unopened (its
module path does not exist), which is enough to see whether a call got past
the middleware; the signer's ClusterReader is an in-memory stand-in, so its
audit log opens in a temporary state directory.

mutmut (``make mutation``) never mutates a decorated function, and the
middleware is one (``@web.middleware``), as are a few properties that hold
guards (``Tally.approved``, ``KeyRecord.current``, ``RequestRecord.open_intent``).
:func:`guard_mutants` mutates those here, from their current source, with the
same kind of operators, and the tests below check that every mutant is caught.
"""
from __future__ import annotations

import __future__
import ast
import asyncio
import contextlib
import copy
import hashlib
import inspect
import textwrap
import os
import pathlib
import shutil
import tempfile
import time
import types
import uuid

import pytest
from aiohttp.test_utils import TestClient, TestServer

from keyroom.signer import hsm, requests, service

AUDIENCE = "keyroom-signer"
OPERATOR = "system:serviceaccount:keyroom-system:keyroom-operator"
GOOD = "operator-token-0123"  # reviewed as the operator, for the signer's audience


class Reviews:
    """A stand-in for AuthenticationV1Api: ``answers`` maps a token to (authenticated, audiences, username)."""

    def __init__(self, **answers) -> None:
        self.answers: dict[str, tuple[bool, list[str] | None, str]] = {GOOD: (True, [AUDIENCE], OPERATOR)}
        self.answers.update(answers)
        self.reviewed: list[str] = []
        self.failure: Exception | None = None

    def create_token_review(self, body):
        spec = body.spec
        assert spec.audiences == [AUDIENCE]  # the signer asks for its own audience, never any
        self.reviewed.append(spec.token)
        if self.failure is not None:
            raise self.failure
        authenticated, audiences, username = self.answers.get(spec.token, (False, None, ""))
        user = types.SimpleNamespace(username=username) if authenticated else None
        return types.SimpleNamespace(status=types.SimpleNamespace(authenticated=authenticated, audiences=audiences,
                                                                  user=user, error=None))


# =========================================================================== mutants of decorated functions

_SWAPPED = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
            ast.GtE: ast.Gt, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}


class _Mutator(ast.NodeTransformer):
    """Walks a function body in a fixed order, numbering every mutation site; applies the one numbered ``target``."""

    def __init__(self, target: int | None, skip) -> None:
        self.target, self.skip, self.sites = target, skip, []

    def _candidates(self, node: ast.AST):
        if isinstance(node, ast.If):
            yield "if ... -> if False", lambda: ast.If(test=ast.Constant(False), body=node.body, orelse=node.orelse)
            yield "if ... -> if True", lambda: ast.If(test=ast.Constant(True), body=node.body, orelse=node.orelse)
        elif isinstance(node, ast.BoolOp):
            other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            yield f"{type(node.op).__name__} -> {type(other).__name__}", lambda: ast.BoolOp(op=other, values=node.values)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            yield "not x -> x", lambda: node.operand
        elif isinstance(node, ast.Compare):
            for position, op in enumerate(node.ops):
                if type(op) in _SWAPPED:
                    swapped = _SWAPPED[type(op)]()
                    yield (f"{type(op).__name__} -> {type(swapped).__name__}",
                           lambda p=position, s=swapped: ast.Compare(left=node.left, comparators=node.comparators,
                                                                     ops=[s if i == p else o for i, o in
                                                                          enumerate(node.ops)]))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            other = ast.Sub() if isinstance(node.op, ast.Add) else ast.Add()
            yield "+/- swapped", lambda: ast.BinOp(left=node.left, op=other, right=node.right)
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            yield f"{node.value} -> {not node.value}", lambda: ast.Constant(not node.value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, int):
            yield f"{node.value} -> {node.value + 1}", lambda: ast.Constant(node.value + 1)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield f"{node.value!r} -> 'XX...XX'", lambda: ast.Constant(f"XX{node.value}XX")
        elif isinstance(node, ast.Name) and node.id in ("max", "min"):
            yield f"{node.id} -> {'min' if node.id == 'max' else 'max'}", lambda: ast.Name(
                id="min" if node.id == "max" else "max", ctx=node.ctx)
        elif isinstance(node, ast.Return) and node.value is not None:
            yield "return x -> return not x", lambda: ast.Return(value=ast.UnaryOp(op=ast.Not(), operand=node.value))

    def visit(self, node: ast.AST) -> ast.AST:
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if docstring or self.skip(node):
            return node
        for description, mutated in self._candidates(node):
            self.sites.append(f"line {getattr(node, 'lineno', '?')}: {description}")
            if len(self.sites) - 1 == self.target:
                return ast.copy_location(mutated(), node)
        return self.generic_visit(node)


def guard_mutants(function, *, skip=lambda node: False):
    """(description, mutated function) for each mutation of ``function``'s body (its decorators are kept).

    ``skip(node)`` leaves a subtree alone (log lines, human-readable messages).
    """
    lines, first = inspect.getsourcelines(function)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    ast.increment_lineno(tree, first - 1)
    counting = _Mutator(None, skip)
    for statement in copy.deepcopy(tree).body[0].body:
        counting.visit(statement)
    source = pathlib.Path(inspect.getsourcefile(function)).read_text().splitlines()
    for index, site in enumerate(counting.sites):
        line, _, change = site.partition(": ")
        number = int(line.split()[1])
        description = f"{pathlib.Path(inspect.getsourcefile(function)).name}:{number} {change} in `{source[number - 1].strip()}`"
        mutated = copy.deepcopy(tree)
        mutator = _Mutator(index, skip)
        mutated.body[0].body = [mutator.visit(statement) for statement in mutated.body[0].body]
        ast.fix_missing_locations(mutated)
        namespace = dict(function.__globals__)
        exec(compile(mutated, inspect.getsourcefile(function), "exec", dont_inherit=True,
                     flags=__future__.annotations.compiler_flag), namespace)
        yield description, namespace[tree.body[0].name]


def surviving(function, install, probe, *, skip=lambda node: False) -> list[str]:
    """The mutants of ``function`` that ``probe()`` does not catch; ``install(mutant)`` puts one in place."""
    survivors = []
    for description, mutant in guard_mutants(function, skip=skip):
        with pytest.MonkeyPatch.context() as patch:
            install(patch, mutant)
            try:
                probe()
            except (Exception, pytest.fail.Exception):  # an assertion, or the mutant breaking outright: caught
                continue
        survivors.append(description)
    return survivors


def authenticator(reviews: Reviews, **kwargs) -> service.Authenticator:
    return service.Authenticator(audience=AUDIENCE, allowed_callers=(OPERATOR,), api=reviews, **kwargs)


class FakeTime:
    """``service.time`` with a monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.perf_counter = time.perf_counter

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(service, "time", fake)
    return fake


# =========================================================================== the Authenticator

def test_a_valid_token_for_the_signers_audience_names_its_user():
    reviews = Reviews()
    assert asyncio.run(authenticator(reviews).caller(GOOD)) == OPERATOR
    assert reviews.reviewed == [GOOD]


@pytest.mark.parametrize("answer", [
    (False, [AUDIENCE], OPERATOR),           # not authenticated (expired, revoked, forged)
    (True, ["https://kubernetes.default.svc"], OPERATOR),  # valid, but for the API server, not the signer
    (True, [], OPERATOR),
    (True, None, OPERATOR),
], ids=["unauthenticated", "other-audience", "no-audience", "audiences-unset"])
def test_a_token_not_valid_for_the_signer_names_nobody(answer):
    reviews = Reviews(token=answer)
    assert asyncio.run(authenticator(reviews).caller("token")) is None


def test_refusals_are_not_cached_and_a_token_that_becomes_valid_works_at_once(clock):
    reviews = Reviews(late=(False, [AUDIENCE], OPERATOR))
    auth = authenticator(reviews)

    async def scenario():
        assert await auth.caller("late") is None
        assert await auth.caller("late") is None
        reviews.answers["late"] = (True, [AUDIENCE], OPERATOR)
        assert await auth.caller("late") == OPERATOR
        reviews.failure = RuntimeError("the API server is unreachable")
        with pytest.raises(RuntimeError):
            await auth.caller("never-seen")
        with pytest.raises(RuntimeError):
            await auth.caller("never-seen")
    asyncio.run(scenario())
    assert reviews.reviewed == ["late", "late", "late", "never-seen", "never-seen"]
    assert len(auth._cache) == 1


def test_successes_are_cached_for_a_minute_by_the_tokens_hash(clock):
    reviews = Reviews()
    auth = authenticator(reviews)

    async def scenario():
        assert await auth.caller(GOOD) == OPERATOR
        clock.now += service._AUTH_CACHE_SECONDS - 0.001
        assert await auth.caller(GOOD) == OPERATOR
        assert reviews.reviewed == [GOOD]
        clock.now += 0.001  # expired exactly now
        reviews.answers[GOOD] = (False, [AUDIENCE], OPERATOR)  # revoked meanwhile
        assert await auth.caller(GOOD) is None
        assert reviews.reviewed == [GOOD, GOOD]
    asyncio.run(scenario())
    assert GOOD not in auth._cache and all(GOOD not in str(value) for value in auth._cache.values())
    assert list(auth._cache) == [hashlib.sha256(GOOD.encode()).hexdigest()]


def test_the_cache_is_bounded_dropping_expired_then_oldest_entries(clock, monkeypatch):
    monkeypatch.setattr(service, "_AUTH_CACHE_SIZE", 3)
    tokens = [f"token-{i}" for i in range(6)]
    reviews = Reviews(**{t: (True, [AUDIENCE], OPERATOR) for t in tokens})
    auth = authenticator(reviews)
    hashed = {hashlib.sha256(t.encode()).hexdigest(): t for t in tokens}

    async def scenario():
        for token in tokens[:3]:
            await auth.caller(token)
            clock.now += 20
        assert sorted(hashed[k] for k in auth._cache) == tokens[:3]
        # token-0 expired (cached at 1000, now 1060): it goes first, the fresh ones stay
        await auth.caller(tokens[3])
        assert sorted(hashed[k] for k in auth._cache) == tokens[1:4]
        # nothing expired: the oldest goes
        await auth.caller(tokens[4])
        await auth.caller(tokens[5])
        assert sorted(hashed[k] for k in auth._cache) == tokens[3:6]
        reviewed = len(reviews.reviewed)
        await auth.caller(tokens[1])  # dropped: reviewed again
        assert len(reviews.reviewed) == reviewed + 1 and len(auth._cache) == 3
    asyncio.run(scenario())


# =========================================================================== the HTTP service

class Reader:
    """An in-memory stand-in for ClusterReader: no checkpoint yet, no objects."""

    def __init__(self) -> None:
        self.checkpoint = None

    async def request_key_policies(self, namespace, name):
        return None, None, []

    async def key(self, namespace, name):
        return None

    def read_checkpoint(self):
        return self.checkpoint

    def read_new_chain(self):
        return None

    def write_checkpoint(self, head):
        self.checkpoint = head


@contextlib.asynccontextmanager
async def running(reviews: Reviews, *, allowed: tuple[str, ...] = (OPERATOR,)):
    """The signer's application on a local test server; yields (client, signer)."""
    directory = pathlib.Path(tempfile.mkdtemp(prefix="keyroom-service-"))
    config = service.SignerConfig(module_path=str(directory / "no-such-module.so"), token_label="unit",
                                  pin="unit-pin", state_dir=str(directory / "state"), audience=AUDIENCE,
                                  allowed_callers=allowed)
    signer = service.Signer(config, authenticator=service.Authenticator(audience=AUDIENCE, allowed_callers=allowed,
                                                                       api=reviews))
    # the log's MAC comes from the token, which stays unopened here: a RequestSigner without one
    signer.requests = requests.RequestSigner(state_dir=pathlib.Path(config.state_dir), reader=Reader(),
                                             in_token=signer._in_token)
    try:
        async with TestClient(TestServer(signer.application())) as client:
            for _ in range(500):  # the audit log opens in the background
                if signer.requests.error is None:
                    break
                await asyncio.sleep(0.01)
            assert signer.requests.error is None
            yield client, signer
    finally:
        os.close(signer.state_lock)
        shutil.rmtree(directory, ignore_errors=True)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


NAMED = f"team-a/release/{uuid.uuid4()}"
#: every route the signer serves behind the middleware, and routes it must not have
ROUTES = [("GET", "/v1/keys"), ("POST", f"/v1/keys/{NAMED}/reconcile"), ("POST", f"/v1/requests/{NAMED}/sign"),
          ("GET", f"/v1/requests/{NAMED}")]
REMOVED = [("POST", f"/v1/keys/{NAMED}/1/sign"), ("POST", f"/v1/keys/{NAMED}/sign"),
           ("POST", f"/v1/keys/{NAMED}/1/destroy"), ("POST", f"/v1/keys/{NAMED}/destroy"),
           ("POST", f"/v1/keys/{NAMED}/generate"), ("POST", "/v1/sign"), ("DELETE", f"/v1/keys/{NAMED}"),
           ("GET", "/nothing-here")]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": ""}, {"Authorization": "Basic b3BlcmF0b3I6cGFzcw=="}, {"Authorization": "Bearer"},
    {"Authorization": "Bearer "}, {"Authorization": "Bearer    "}, {"Authorization": f"Token {GOOD}"}, {"Authorization": f"XBearer {GOOD}"},
], ids=["none", "empty", "basic", "bare", "bearer-empty", "bearer-blank", "other-scheme", "prefixed"])
def test_a_call_without_a_bearer_token_is_refused_before_anything_else(headers):
    async def scenario():
        reviews = Reviews()
        async with running(reviews) as (client, signer):
            for method, path in ROUTES + REMOVED:
                response = await client.request(method, path, headers=headers, json={"digests": "sha256:00"})
                assert response.status == 401, (method, path)
                assert (await response.json())["reason"] == "Unauthenticated"
            assert reviews.reviewed == [] and signer.requests.log.head is None  # nothing read, nothing audited
    run(scenario())


@pytest.mark.parametrize("answer,status,reason", [
    ((False, [AUDIENCE], OPERATOR), 401, "Unauthenticated"),
    ((True, ["https://kubernetes.default.svc"], OPERATOR), 401, "Unauthenticated"),
    ((True, None, OPERATOR), 401, "Unauthenticated"),
    ((True, [AUDIENCE], "system:serviceaccount:team-a:builder"), 403, "Forbidden"),
    ((True, [AUDIENCE], "system:serviceaccount:keyroom-system:keyroom-signer"), 403, "Forbidden"),
    ((True, [AUDIENCE], OPERATOR + "x"), 403, "Forbidden"),
], ids=["unauthenticated", "other-audience", "no-audience", "other-user", "the-signer-itself", "lookalike"])
def test_a_token_that_is_not_the_operators_for_the_signer_gets_nowhere(answer, status, reason):
    async def scenario():
        reviews = Reviews(other=answer)
        async with running(reviews) as (client, signer):
            for method, path in ROUTES + REMOVED:
                response = await client.request(method, path, headers=bearer("other"), json={"digests": "x"})
                assert (response.status, (await response.json())["reason"]) == (status, reason), (method, path)
            assert set(reviews.reviewed) == {"other"} and signer.requests.log.head is None
    run(scenario())


def test_an_unreachable_token_review_answers_503_and_is_not_remembered():
    async def scenario():
        reviews = Reviews()
        reviews.failure = ConnectionRefusedError("the API server is unreachable")
        async with running(reviews) as (client, signer):
            for method, path in ROUTES:
                response = await client.request(method, path, headers=bearer(GOOD), json={"digests": "x"})
                assert response.status == 503
                assert (await response.json())["reason"] == "AuthenticationUnavailable"
            reviews.failure = None
            response = await client.get(f"/v1/requests/{NAMED}", headers=bearer(GOOD))
            assert response.status == 200
            assert len(reviews.reviewed) == len(ROUTES) + 1
    run(scenario())


def test_the_operator_reaches_the_routes_and_only_them():
    async def scenario():
        reviews = Reviews()
        async with running(reviews) as (client, signer):
            response = await client.get(f"/v1/requests/{NAMED}", headers=bearer(GOOD))
            assert response.status == 200 and await response.json() == {"state": "Unsigned"}
            # the sign route reaches the signer's own checks: the request does not exist
            response = await client.post(f"/v1/requests/{NAMED}/sign", headers=bearer(GOOD),
                                         json={"digests": "sha256:" + "0" * 64})
            assert response.status == 404 and (await response.json())["reason"] == "RequestNotFound"
            response = await client.post(f"/v1/requests/{NAMED}/sign", headers=bearer(GOOD), json={"digests": 1})
            assert response.status == 400 and (await response.json())["reason"] == "InvalidRequest"
            response = await client.post(f"/v1/keys/{NAMED}/reconcile", headers=bearer(GOOD))
            assert response.status == 404 and (await response.json())["reason"] == "KeyNotFound"
            response = await client.get("/v1/keys", headers=bearer(f"  {GOOD}  "))  # surrounding blanks ignored
            assert response.status == 503 and (await response.json())["reason"] == "ModuleNotFound"  # token unopened
            for method, path in REMOVED:
                response = await client.request(method, path, headers=bearer(GOOD), json={"digest": "00" * 32})
                assert response.status in (404, 405), (method, path)
            assert set(reviews.reviewed) == {GOOD} and len(reviews.reviewed) == 1  # cached after the first
    run(scenario())


def test_health_and_metrics_need_no_token():
    async def scenario():
        reviews = Reviews()
        async with running(reviews) as (client, signer):
            response = await client.get("/healthz")
            assert response.status == 503 and (await response.json())["reason"] == "ModuleNotFound"
            response = await client.get("/metrics")
            assert response.status == 200 and "keyroom_signer_requests" in await response.text()
            for path in ("/healthz/", "/metrics/x", "/healthzx"):
                assert (await client.get(path)).status == 401
            assert reviews.reviewed == []
    run(scenario())


# =========================================================================== the middleware, mutated

def _not_behaviour(node: ast.AST) -> bool:
    """Log lines, metrics and the human-readable message of an error answer: not what a guard decides."""
    if getattr(node, "_not_behaviour", False):
        return True
    if isinstance(node, ast.Call):
        called = ast.unparse(node.func)
        if called.startswith(("logger.", "self.metrics.")):
            return True
        if called == "_error" and len(node.args) == 3:
            node.args[2]._not_behaviour = True
    return False


MALFORMED = [{}, {"Authorization": "Basic b3A6cGFzcw=="}, {"Authorization": "Bearer "},
             {"Authorization": "Bearer    "}, {"Authorization": f"Token {GOOD}"}, {"Authorization": f"XBearer {GOOD}"}]


async def middleware_checks() -> None:
    """Everything the middleware decides, end to end through the signer's application."""
    reviews = Reviews(unauthenticated=(False, [AUDIENCE], OPERATOR), other_audience=(True, ["api"], OPERATOR),
                      no_audience=(True, None, OPERATOR), other_user=(True, [AUDIENCE], OPERATOR + "x"))
    async with running(reviews) as (client, signer):
        routes = ROUTES + REMOVED[:1]
        for headers in MALFORMED:
            for method, path in routes:
                response = await client.request(method, path, headers=headers, json={"digests": "x"})
                assert (response.status, (await response.json())["reason"]) == (401, "Unauthenticated")
        assert reviews.reviewed == []
        for token, status, reason in (("unauthenticated", 401, "Unauthenticated"),
                                      ("other_audience", 401, "Unauthenticated"),
                                      ("no_audience", 401, "Unauthenticated"), ("other_user", 403, "Forbidden")):
            for method, path in routes:
                response = await client.request(method, path, headers=bearer(token), json={"digests": "x"})
                assert (response.status, (await response.json())["reason"]) == (status, reason), token
        response = await client.get(f"/v1/requests/{NAMED}", headers=bearer("x"))  # short, but a token: reviewed
        assert response.status == 401 and reviews.reviewed[-1] == "x"
        reviews.failure = ConnectionRefusedError()
        response = await client.get(f"/v1/requests/{NAMED}", headers=bearer(GOOD))
        assert (response.status, (await response.json())["reason"]) == (503, "AuthenticationUnavailable")
        reviews.failure = None
        reviews.reviewed.clear()
        response = await client.get(f"/v1/requests/{NAMED}", headers=bearer(f" {GOOD} "))
        assert response.status == 200 and await response.json() == {"state": "Unsigned"}
        assert reviews.reviewed == [GOOD]
        response = await client.post(f"/v1/keys/{NAMED}/1/sign", headers=bearer(GOOD), json={"digest": "00"})
        assert response.status in (404, 405)
        response = await client.get("/healthz")  # no token needed; the PKCS#11 module is missing here
        assert (response.status, (await response.json())["reason"]) == (503, "ModuleNotFound")
        response = await client.get("/metrics")
        assert response.status == 200 and "keyroom_signer_requests" in await response.text()
        for path in ("/healthz/", "/metricsx", "/v1/healthz"):
            assert (await client.get(path)).status == 401
        assert reviews.reviewed == [GOOD]


def test_the_middleware_checks():
    run(middleware_checks())


def test_every_mutant_of_the_middleware_is_caught():
    """mutmut skips ``Signer._authenticate`` (decorated): remove or invert each of its checks here."""
    function = service.Signer._authenticate
    mutants = list(guard_mutants(function, skip=_not_behaviour))
    assert len(mutants) >= 25  # the checks are there to be mutated
    survivors = surviving(function, lambda patch, mutant: patch.setattr(service.Signer, "_authenticate", mutant),
                          lambda: run(middleware_checks()), skip=_not_behaviour)
    # equivalent: the default of a missing Authorization header fails "startswith('Bearer ')" whatever it is
    assert [s.split(" ", 1)[1] for s in survivors] == [
        """'' -> 'XX...XX' in `header = request.headers.get("Authorization", "")`"""]


# =========================================================================== the routes behind the middleware

class FakeToken:
    """What the routes need of an open token: its objects (or a failure), what it lacks, and close."""

    lacking = {"RSA_4096": ["4096-bit keys (CKM_RSA_PKCS_KEY_PAIR_GEN makes 1024 to 3072)"]}

    def __init__(self, objects=(), failure: Exception | None = None) -> None:
        self.objects, self.failure = list(objects), failure

    def list_objects(self):
        if self.failure is not None:
            raise self.failure
        return self.objects

    def close(self) -> None:
        pass


def test_the_token_listing_shows_every_object_but_the_audit_key():
    handle = hsm.KeyHandle(namespace="team-a", name="release", uid=str(uuid.uuid4()), version=2)
    objects = [hsm.TokenObject(label=handle.label, object_id=handle.object_id.hex(), object_class="private_key",
                               handle=handle),
               hsm.TokenObject(label="planted", object_id="00", object_class="private_key", handle=None),
               hsm.TokenObject(label=hsm.AUDIT_KEY_LABEL, object_id=hsm.AUDIT_KEY_ID.hex(),
                               object_class="secret_key", handle=None)]

    async def scenario():
        async with running(Reviews()) as (client, signer):
            signer.token = FakeToken(objects)
            response = await client.get("/v1/keys", headers=bearer(GOOD))
            assert response.status == 200
            assert await response.json() == {"objects": [
                {"label": handle.label, "id": handle.object_id.hex(), "class": "private_key",
                 "key": {"namespace": "team-a", "name": "release", "uid": handle.uid, "version": 2}},
                {"label": "planted", "id": "00", "class": "private_key", "key": None}]}
    run(scenario())


@pytest.mark.parametrize("reason,status", [("KeyNotFound", 404), ("TokenFull", 507), ("DeviceError", 503),
                                           ("PinLocked", 503), ("SomethingNew", 500)])
def test_hsm_failures_are_answered_with_their_reason(reason, status):
    async def scenario():
        async with running(Reviews()) as (client, signer):
            signer.token = FakeToken(failure=hsm.HSMError(reason, "it failed"))
            response = await client.get("/v1/keys", headers=bearer(GOOD))
            assert (response.status, await response.json()) == (status, {"reason": reason, "message": "it failed"})
    run(scenario())


def test_health_says_what_is_missing():
    async def scenario():
        async with running(Reviews()) as (client, signer):
            signer.token_error = None
            response = await client.get("/healthz")
            assert (response.status, (await response.json())["reason"]) == (503, "HSMUnavailable")
            signer.token_error = hsm.HSMError("PinIncorrect", "the PIN is wrong")
            response = await client.get("/healthz")
            assert (response.status, await response.json()) == (503, {"reason": "PinIncorrect",
                                                                      "message": "the PIN is wrong"})
            signer.token = FakeToken()
            response = await client.get("/healthz")
            assert (response.status, await response.json()) == (200, {
                "status": "ok", "token": "unit", "algorithms": ["ECDSA_P256", "ECDSA_P384", "RSA_3072"],
                "lacking": {"RSA_4096": ["4096-bit keys (CKM_RSA_PKCS_KEY_PAIR_GEN makes 1024 to 3072)"]}})
            signer.requests.error = "the audit log failed verification: truncated"
            response = await client.get("/healthz")
            assert (response.status, await response.json()) == (503, {
                "reason": "AuditLogUnavailable", "message": "the audit log failed verification: truncated"})
    run(scenario())


@pytest.mark.parametrize("path,body", [
    (f"/v1/requests/{NAMED}/sign", ["sha256:00"]),
    (f"/v1/requests/{NAMED}/sign", {"digests": ["sha256:00"]}),
    (f"/v1/requests/{NAMED}/sign", {}),
    (f"/v1/requests/{NAMED}/sign", "not json"),
    (f"/v1/requests/Team_A/release/{uuid.uuid4()}/sign", {"digests": "sha256:00"}),
    (f"/v1/requests/team-a/Release!/{uuid.uuid4()}/sign", {"digests": "sha256:00"}),
    ("/v1/requests/team-a/release/not-a-uid/sign", {"digests": "sha256:00"}),
    (f"/v1/keys/team-a/{'a' * 254}/{uuid.uuid4()}/reconcile", None),
    ("/v1/requests/team-a/release/not-a-uid", None),
], ids=["list", "digests-list", "empty", "not-json", "namespace", "name", "uid", "long-name", "outcome-uid"])
def test_malformed_calls_are_refused_before_anything_is_read(path, body):
    async def scenario():
        async with running(Reviews()) as (client, signer):
            called = []
            signer.requests.reader = types.SimpleNamespace(**{name: lambda *a, **k: called.append(a) for name in (
                "request_key_policies", "keys", "key", "read_checkpoint", "read_new_chain", "write_checkpoint")})
            if body is None:
                method = "POST" if path.endswith("/reconcile") else "GET"
                response = await client.request(method, path, headers=bearer(GOOD))
            elif isinstance(body, str):
                response = await client.post(path, headers=bearer(GOOD), data=body)
            else:
                response = await client.post(path, headers=bearer(GOOD), json=body)
            assert (response.status, (await response.json())["reason"]) == (400, "InvalidRequest")
            assert called == [] and signer.requests.log.head is None
    run(scenario())


def test_a_refusal_names_its_audit_entry_and_an_answer_passes_through():
    async def scenario():
        async with running(Reviews()) as (client, signer):
            uid = str(uuid.uuid4())
            response = await client.post(f"/v1/requests/team-a/sr-1/{uid}/sign", headers=bearer(GOOD),
                                         json={"digests": "sha256:" + "ab" * 32})
            head = signer.requests.log.head
            assert response.status == 404 and await response.json() == {
                "reason": "RequestNotFound", "message": f"no SignRequest team-a/sr-1 with UID {uid}",
                "audit": {"index": head.index, "entryHash": head.hash}}
            response = await client.post(f"/v1/keys/team-a/release/{uid}/reconcile", headers=bearer(GOOD))
            assert response.status == 404 and "audit" not in await response.json()  # nothing audited

            calls = []

            async def sign(**named):
                calls.append(named)
                return {"keyVersion": 3, "signatures": [{"name": "a", "value": "AAAA"}]}
            signer.requests.sign = sign
            response = await client.post(f"/v1/requests/team-a/sr-1/{uid}/sign", headers=bearer(GOOD),
                                         json={"digests": "sha256:" + "cd" * 32})
            assert (response.status, await response.json()) == (
                200, {"keyVersion": 3, "signatures": [{"name": "a", "value": "AAAA"}]})
            assert calls == [{"namespace": "team-a", "name": "sr-1", "uid": uid, "fingerprint": "sha256:" + "cd" * 32}]
    run(scenario())


def test_the_signer_reviews_tokens_for_its_configured_audience_and_callers(monkeypatch):
    """Without an injected Authenticator the signer builds its own from the configuration."""
    async def scenario():
        directory = pathlib.Path(tempfile.mkdtemp(prefix="keyroom-service-"))
        config = service.SignerConfig(module_path=str(directory / "none.so"), token_label="unit", pin="unit-pin",
                                      state_dir=str(directory / "state"), audience=AUDIENCE,
                                      allowed_callers=("system:serviceaccount:ops:robot",))
        signer = service.Signer(config)
        try:
            assert signer.authenticator.audience == AUDIENCE
            reviews = Reviews(robot=(True, [AUDIENCE], "system:serviceaccount:ops:robot"))
            signer.authenticator._api = reviews
            signer.requests = requests.RequestSigner(state_dir=directory / "state", reader=Reader(),
                                                     in_token=signer._in_token)
            async with TestClient(TestServer(signer.application())) as client:
                while signer.requests.error is not None:
                    await asyncio.sleep(0.01)
                assert (await client.get(f"/v1/requests/{NAMED}", headers=bearer("robot"))).status == 200
                assert (await client.get(f"/v1/requests/{NAMED}", headers=bearer(GOOD))).status == 403
        finally:
            os.close(signer.state_lock)
            shutil.rmtree(directory, ignore_errors=True)
    run(scenario())


def test_a_body_over_four_mebibytes_is_refused():
    async def scenario():
        async with running(Reviews()) as (client, signer):
            body = b'{"digests": "' + b"a" * (4 * 1024 * 1024) + b'"}'
            response = await client.post(f"/v1/requests/{NAMED}/sign", headers=bearer(GOOD), data=body)
            assert response.status == 413
            assert signer.requests.log.head is None
    run(scenario())


def test_without_an_injected_api_the_authenticator_uses_the_signers_own_client(monkeypatch):
    from keyroom import kubeclient
    client, reviews, made = object(), Reviews(), []
    monkeypatch.setattr(kubeclient, "api_client", lambda: client)
    monkeypatch.setattr(service.kubernetes.client, "AuthenticationV1Api",
                        lambda api_client: made.append(api_client) or reviews)
    auth = service.Authenticator(audience=AUDIENCE, allowed_callers=(OPERATOR,))
    assert asyncio.run(auth.caller(GOOD)) == OPERATOR
    assert asyncio.run(auth.caller("other")) is None
    assert made == [client] and reviews.reviewed == [GOOD, "other"]  # built once, with the signer's client

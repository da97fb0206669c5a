"""The signer service: the only process that holds an HSM session.

It serves a small JSON API over TLS to exactly one caller, the keyroom
operator. Every route names an object (a SigningKey or a SignRequest by
namespace, name and UID); the signer reads that object itself and decides
(:mod:`keyroom.signer.requests`). No route signs bytes or digests a caller
chose, generates or destroys on a caller's say-so, or names a key version. Every call but the health and metrics endpoints carries the caller's
Kubernetes ServiceAccount token; the signer asks the API server (TokenReview,
with the signer's own audience) who that is and accepts only the configured
operator identity. No unauthenticated path reaches a key.

PKCS#11 calls block, so they run in a thread pool as large as the session
pool: the event loop stays free to accept and authenticate while the token
works. A token that cannot be opened (module missing, token not found, wrong
PIN) does not crash the process: health and every call report the reason, so
the operator can show it in SigningKey conditions instead of a crash loop. A
wrong PIN is never retried on its own, because real HSMs lock a PIN after a
few failures.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import pathlib
import re
import ssl
import time
from typing import Any, Awaitable, Callable

import kubernetes
import prometheus_client
from aiohttp import web

from keyroom import kubeclient
from keyroom.signer import audit, hsm, issuing, requests
from keyroom.signer.client import SIGNER_AUDIENCE

logger = logging.getLogger("keyroom.signer")

DEFAULT_AUDIENCE = SIGNER_AUDIENCE
DEFAULT_CALLER = "system:serviceaccount:keyroom-system:keyroom-operator"
_RETRY_OPEN_SECONDS = 10.0
#: how often a signer refused by its token's PIN looks for another PIN in its file
_PIN_FILE_POLL_SECONDS = 2.0
_AUTH_CACHE_SECONDS = 60.0
_AUTH_CACHE_SIZE = 1024
#: Kubernetes names: a namespace is a DNS-1123 label, an object name a DNS-1123 subdomain
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_OBJECT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

_STATUS_BY_REASON = {
    "KeyNotFound": 404, "KeyExists": 409, "InvalidRequest": 400, "TokenFull": 507,
    "ModuleNotFound": 503, "TokenNotFound": 503, "PinIncorrect": 503, "PinLocked": 503, "DeviceError": 503,
    "HSMUnavailable": 503,
}


@dataclasses.dataclass(frozen=True)
class SignerConfig:
    module_path: str
    token_label: str
    pin: str = dataclasses.field(repr=False)
    sessions: int = 4
    host: str = "127.0.0.1"
    port: int = 8443
    tls_cert: str | None = None
    tls_key: str | None = None
    audience: str = DEFAULT_AUDIENCE
    allowed_callers: tuple[str, ...] = (DEFAULT_CALLER,)
    #: where the audit log and the stored signatures live (a persistent volume in a cluster)
    state_dir: str = "/var/lib/keyroom"
    #: the namespace of the audit checkpoint ConfigMap
    namespace: str = "keyroom-system"
    #: where the PIN was read (a mounted Secret, updated in place when the Secret changes); None: KEYROOM_PIN
    pin_file: str | None = None

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> "SignerConfig":
        """Read the configuration; the PIN from KEYROOM_PIN_FILE (a mounted Secret) or KEYROOM_PIN."""
        env = os.environ if environ is None else environ
        if env.get("KEYROOM_PIN_FILE"):
            with open(env["KEYROOM_PIN_FILE"]) as pin_file:
                pin = pin_file.read().strip()
        elif env.get("KEYROOM_PIN"):
            pin = env["KEYROOM_PIN"]
        else:
            raise ValueError("set KEYROOM_PIN_FILE (a file holding the token's user PIN) or KEYROOM_PIN")
        if not env.get("KEYROOM_TOKEN_LABEL"):
            raise ValueError("set KEYROOM_TOKEN_LABEL to the label of the PKCS#11 token to use")
        host, _, port = env.get("KEYROOM_SIGNER_LISTEN", "127.0.0.1:8443").rpartition(":")
        return cls(
            module_path=env.get("KEYROOM_PKCS11_MODULE") or "/usr/lib/softhsm/libsofthsm2.so",
            token_label=env["KEYROOM_TOKEN_LABEL"],
            pin=pin,
            sessions=int(env.get("KEYROOM_SIGNER_SESSIONS", "4")),
            host=host or "127.0.0.1",
            port=int(port),
            tls_cert=env.get("KEYROOM_SIGNER_TLS_CERT"),
            tls_key=env.get("KEYROOM_SIGNER_TLS_KEY"),
            audience=env.get("KEYROOM_SIGNER_AUDIENCE", DEFAULT_AUDIENCE),
            allowed_callers=tuple(env.get("KEYROOM_SIGNER_ALLOWED_CALLERS", DEFAULT_CALLER).split(",")),
            state_dir=env.get("KEYROOM_SIGNER_STATE_DIR", "/var/lib/keyroom"),
            namespace=env.get("KEYROOM_SIGNER_NAMESPACE", "keyroom-system"),
            pin_file=env.get("KEYROOM_PIN_FILE") or None,
        )

    def with_new_pin(self) -> "SignerConfig | None":
        """This configuration with the PIN file's current PIN, or None when it holds the same PIN (or no file)."""
        if self.pin_file is None:
            return None
        try:
            with open(self.pin_file) as pin_file:
                pin = pin_file.read().strip()
        except OSError:
            return None
        return dataclasses.replace(self, pin=pin) if pin and pin != self.pin else None


class Metrics:
    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter(
            "keyroom_signer_requests", "Calls to the signer by operation and outcome",
            ["operation", "outcome"], registry=self.registry)
        self.signatures = prometheus_client.Counter(
            "keyroom_signer_signatures", "Signatures made", registry=self.registry)
        self.latency = prometheus_client.Histogram(
            "keyroom_signer_hsm_seconds", "Time spent in the HSM by operation", ["operation"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5), registry=self.registry)
        self.token_up = prometheus_client.Gauge(
            "keyroom_signer_token_up", "1 when the PKCS#11 token is open", registry=self.registry)


class Authenticator:
    """Validates callers' ServiceAccount tokens with the TokenReview API, caching answers briefly."""

    def __init__(self, *, audience: str, allowed_callers: tuple[str, ...],
                 api: kubernetes.client.AuthenticationV1Api | None = None) -> None:
        self.audience = audience
        self.allowed_callers = allowed_callers
        self._api = api
        self._cache: dict[str, tuple[float, str]] = {}

    def _review(self, token: str) -> str | None:
        if self._api is None:
            self._api = kubernetes.client.AuthenticationV1Api(kubeclient.api_client())
        review = self._api.create_token_review(kubernetes.client.V1TokenReview(
            spec=kubernetes.client.V1TokenReviewSpec(token=token, audiences=[self.audience])))
        status = review.status
        if not status.authenticated or self.audience not in (status.audiences or []):
            return None
        return status.user.username

    async def caller(self, token: str) -> str | None:
        """The authenticated username behind the token, or None.

        Only successful reviews are cached, briefly and in a bounded map: a
        refused token is reviewed again each time (so a token that becomes
        valid works at once, and junk tokens cannot fill the memory).
        """
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached and cached[0] > now:
            return cached[1]
        username = await asyncio.to_thread(self._review, token)
        if username is not None:
            if len(self._cache) >= _AUTH_CACHE_SIZE:
                for stale in [k for k, (expires, _) in self._cache.items() if expires <= now]:
                    del self._cache[stale]
                while len(self._cache) >= _AUTH_CACHE_SIZE:
                    del self._cache[next(iter(self._cache))]
            self._cache[key] = (now + _AUTH_CACHE_SECONDS, username)
        return username


def _error(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"reason": reason, "message": message}, status=status)


class Signer:
    """The service: a token, a bounded pool of threads to use it, and the HTTP routes."""

    def __init__(self, config: SignerConfig, *, authenticator: Authenticator | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.authenticator = authenticator or Authenticator(audience=config.audience,
                                                            allowed_callers=config.allowed_callers)
        self.token: hsm.Token | None = None
        self.token_error: hsm.HSMError | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=config.sessions,
                                                               thread_name_prefix="pkcs11")
        self._opener: asyncio.Task | None = None
        self._background: list[asyncio.Task] = []
        self.state_lock = audit.lock_state_dir(pathlib.Path(config.state_dir))  # StateLocked: one signer per state
        self.requests = requests.RequestSigner(state_dir=pathlib.Path(config.state_dir),
                                               reader=requests.ClusterReader(namespace=config.namespace),
                                               in_token=self._in_token,
                                               mac_source=lambda: self.token.audit_mac if self.token else None,
                                               parallelism=min(config.sessions, len(os.sched_getaffinity(0))))
        self.authority = issuing.CertificateAuthority(self.requests)

    # -------------------------------------------------------------- the token

    def _open_token(self) -> None:
        token = hsm.Token(module_path=self.config.module_path, token_label=self.config.token_label,
                          pin=self.config.pin, sessions=self.config.sessions)
        token.open()
        try:
            token.ensure_audit_key()
        except hsm.HSMError:
            token.close()
            raise
        self.token = token

    async def _keep_token_open(self) -> None:
        while self.token is None:
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self._open_token)
                self.token_error = None
                self.metrics.token_up.set(1)
                logger.info("PKCS#11 token %r is open with %d sessions", self.config.token_label,
                            self.config.sessions)
                for algorithm, missing in self.token.lacking.items():
                    logger.warning("the token cannot make %s keys: it lacks %s; SigningKeys of that algorithm "
                                   "fail", algorithm, ", ".join(missing))
            except hsm.HSMError as error:
                self.token_error = error
                self.metrics.token_up.set(0)
                logger.error("cannot open the PKCS#11 token: %s (%s)", error, error.reason)
                if error.reason in ("PinIncorrect", "PinLocked"):
                    # retrying a wrong PIN would lock the token: try again only with another PIN
                    if not await self._new_pin():
                        return
                    continue
                await asyncio.sleep(_RETRY_OPEN_SECONDS)

    async def _new_pin(self) -> bool:
        """Wait until the PIN file holds another PIN (its Secret was corrected) and use it; False without a file."""
        if self.config.pin_file is None:
            logger.error("the PIN comes from KEYROOM_PIN: correct it and restart the signer")
            return False
        logger.error("waiting for another PIN in %s (the Secret's update reaches a mounted file in about a minute)",
                     self.config.pin_file)
        while (changed := self.config.with_new_pin()) is None:
            await asyncio.sleep(_PIN_FILE_POLL_SECONDS)
        self.config = changed
        logger.info("the PIN file changed; opening the token again")
        return True

    async def _in_token(self, operation: str, call: Callable[[hsm.Token], Any]) -> Any:
        token = self.token
        if token is None:
            error = self.token_error or hsm.HSMError("HSMUnavailable", "the PKCS#11 token is not open yet")
            raise error
        started = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call, token)
        finally:
            self.metrics.latency.labels(operation).observe(time.perf_counter() - started)

    # -------------------------------------------------------------- HTTP

    @web.middleware
    async def _authenticate(self, request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.path in ("/healthz", "/metrics"):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[7:].strip():
            self.metrics.requests.labels("authenticate", "Unauthenticated").inc()
            return _error(401, "Unauthenticated", "present a ServiceAccount token as 'Authorization: Bearer ...'")
        try:
            caller = await self.authenticator.caller(header[7:].strip())
        except Exception as error:  # the API server is unreachable: refuse, never fail open
            logger.error("TokenReview failed: %s", type(error).__name__)
            return _error(503, "AuthenticationUnavailable", "cannot validate the token with the API server")
        if caller is None:
            return _error(401, "Unauthenticated", f"the token is not valid for audience {self.config.audience}")
        if caller not in self.config.allowed_callers:
            logger.warning("refused a call by %s", caller)
            return _error(403, "Forbidden", f"{caller} may not call the signer")
        return await handler(request)

    async def _run(self, operation: str, call: Callable[[], Awaitable[web.Response]]) -> web.Response:
        try:
            response = await call()
            self.metrics.requests.labels(operation, "ok").inc()
            return response
        except hsm.HSMError as error:
            self.metrics.requests.labels(operation, error.reason).inc()
            return _error(_STATUS_BY_REASON.get(error.reason, 500), error.reason, str(error))
        except (KeyError, ValueError, TypeError, RecursionError) as error:  # RecursionError: absurdly nested JSON
            self.metrics.requests.labels(operation, "InvalidRequest").inc()
            return _error(400, "InvalidRequest", f"malformed request: {error}")

    async def health(self, request: web.Request) -> web.Response:
        if self.token is not None and self.requests.error is not None:
            return _error(503, "AuditLogUnavailable", self.requests.error)
        if self.token is not None:
            return web.json_response({"status": "ok", "token": self.config.token_label,
                                      "algorithms": [a for a in hsm.ALGORITHMS if a not in self.token.lacking],
                                      "lacking": self.token.lacking})
        error = self.token_error
        return _error(503, error.reason if error else "HSMUnavailable",
                      str(error) if error else "the PKCS#11 token is not open yet")

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=prometheus_client.generate_latest(self.metrics.registry),
                            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def list_objects(self, request: web.Request) -> web.Response:
        async def call():
            objects = await self._in_token("list", lambda t: t.list_objects())
            return web.json_response({"objects": [
                {"label": o.label, "id": o.object_id, "class": o.object_class,
                 "key": dataclasses.asdict(o.handle) if o.handle else None} for o in objects
                if o.label != hsm.AUDIT_KEY_LABEL]})  # the signer's own audit key is no stray object
        return await self._run("list", call)

    @staticmethod
    def _named(request: web.Request) -> dict[str, str]:
        """The object a call names: namespace, name and UID, checked for shape before anything is read."""
        info = request.match_info
        if not _NAMESPACE.fullmatch(info["namespace"]):
            raise ValueError(f"{info['namespace']!r} is not a Kubernetes namespace name")
        if len(info["name"]) > 253 or not _OBJECT_NAME.fullmatch(info["name"]):
            raise ValueError(f"{info['name']!r} is not a Kubernetes object name")
        hsm.KeyHandle(namespace=info["namespace"], name=info["name"], uid=info["uid"], version=0)  # ValueError
        return {"namespace": info["namespace"], "name": info["name"], "uid": info["uid"]}

    async def _refusable(self, operation: str, call: Callable[[], Awaitable[dict]]) -> web.Response:
        try:
            return web.json_response(await call())
        except requests.Refused as refusal:
            self.metrics.requests.labels(operation, refusal.reason).inc()
            entry = refusal.entry
            return web.json_response({"reason": refusal.reason, "message": str(refusal), **(
                {"audit": {"index": entry["index"], "entryHash": entry["hash"]}} if entry else {})},
                status=refusal.status)

    async def reconcile_key(self, request: web.Request) -> web.Response:
        """Apply a SigningKey's spec (read by the signer) and the clock to the signer's record; answer the record."""
        async def call():
            named = self._named(request)
            return await self._refusable("reconcile_key", lambda: self.requests.reconcile_key(**named))
        return await self._run("reconcile_key", call)

    async def reconcile_certificate(self, request: web.Request) -> web.Response:
        """Apply a Certificate's spec (read by the signer) and the clock: issue, renew, revoke, publish its CRL."""
        async def call():
            named = self._named(request)
            return await self._refusable("reconcile_certificate", lambda: self.authority.reconcile(**named))
        return await self._run("reconcile_certificate", call)

    async def sign_request(self, request: web.Request) -> web.Response:
        """Sign a SignRequest after checking it against the API server: {"digests": "sha256:..."}."""
        async def call():
            named = self._named(request)
            body = await request.json()
            if not isinstance(body, dict) or not isinstance(body.get("digests"), str):
                raise ValueError('the body is {"digests": "sha256:..."}')

            async def sign() -> dict:
                result = await self.requests.sign(**named, fingerprint=body["digests"])
                self.metrics.signatures.inc(len(result["signatures"]))
                return result
            return await self._refusable("sign_request", sign)
        return await self._run("sign_request", call)

    async def request_outcome(self, request: web.Request) -> web.Response:
        """What the signer's record says of a request (Signed with its signatures, Signing or Unsigned)."""
        async def call():
            uid = self._named(request)["uid"]

            async def outcome() -> dict:
                return self.requests.outcome(uid)
            return await self._refusable("request_outcome", outcome)
        return await self._run("request_outcome", call)

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._authenticate], client_max_size=4 * 1024 * 1024)
        # Every route names an object; none takes bytes to sign, a key version, or an order to destroy.
        app.add_routes([
            web.get("/healthz", self.health),
            web.get("/metrics", self.metrics_endpoint),
            web.get("/v1/keys", self.list_objects),
            web.post("/v1/keys/{namespace}/{name}/{uid}/reconcile", self.reconcile_key),
            web.post("/v1/certificates/{namespace}/{name}/{uid}/reconcile", self.reconcile_certificate),
            web.post("/v1/requests/{namespace}/{name}/{uid}/sign", self.sign_request),
            web.get("/v1/requests/{namespace}/{name}/{uid}", self.request_outcome),
        ])
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self._opener = asyncio.create_task(self._keep_token_open())
        self._background = [asyncio.create_task(self.requests.open()),
                            asyncio.create_task(self.requests.keep_checkpoint())]

    async def _on_cleanup(self, app: web.Application) -> None:
        for task in [self._opener, *self._background]:
            if task:
                task.cancel()
        if self.requests.log is not None:
            self.requests.log.close()
        if self.token is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.token.close)
        self._executor.shutdown(wait=False)

    def ssl_context(self) -> ssl.SSLContext:
        if not self.config.tls_cert or not self.config.tls_key:
            raise ValueError("the signer serves TLS only: set KEYROOM_SIGNER_TLS_CERT and KEYROOM_SIGNER_TLS_KEY")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return context

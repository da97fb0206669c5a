"""The operator's side of the signer API.

It authenticates with a ServiceAccount token whose audience is the signer's
(a projected token file in a cluster, re-read as the kubelet rotates it) and
trusts the signer's CA. It never imports pkcs11 and never sees key material:
only public keys and signatures come back.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
from typing import Any

import aiohttp

#: The audience of the ServiceAccount tokens the signer accepts.
SIGNER_AUDIENCE = "keyroom-signer"


def digests_fingerprint(spec: dict) -> str:
    """What the operator and the signer compare: a request's algorithm and every (name, value) of its digests."""
    document = {"digestAlgorithm": spec.get("digestAlgorithm", "SHA256"),
                "digests": [[d["name"], d["value"].lower()] for d in spec["digests"]]}
    return "sha256:" + hashlib.sha256(json.dumps(document, separators=(",", ":")).encode()).hexdigest()


class SignerError(Exception):
    """A refused or failed signer call; ``reason`` is the signer's CamelCase code."""

    def __init__(self, reason: str, message: str, *, status: int = 0, audit: dict | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        #: the signer's audit entry for a refusal
        self.audit = audit

    @property
    def transient(self) -> bool:
        """Worth retrying without a change of configuration."""
        return self.reason in ("SignerUnreachable", "AuthenticationUnavailable", "HSMUnavailable", "DeviceError",
                               "ApiServerUnavailable", "AuditLogUnavailable", "CheckpointBehind")


class SignerClient:
    """The operator's calls to the signer, at most ``connections`` at once.

    Calls beyond that wait for a free slot before their timeout starts: a flood
    of requests queues here (backpressure) instead of timing out while waiting
    for a connection, which aiohttp counts against the timeout.
    """

    def __init__(self, *, url: str, token_file: str, ca_file: str | None = None, timeout: float = 30.0,
                 connections: int = 32) -> None:
        self.url = url.rstrip("/")
        self.token_file = token_file
        self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._connections = connections
        self._slots = asyncio.Semaphore(connections)
        self._session: aiohttp.ClientSession | None = None
        self._token: tuple[float, str] | None = None

    @classmethod
    def from_environment(cls) -> "SignerClient | None":
        if not os.environ.get("KEYROOM_SIGNER_URL"):
            return None
        return cls(url=os.environ["KEYROOM_SIGNER_URL"],
                   token_file=os.environ.get("KEYROOM_SIGNER_TOKEN_FILE",
                                             "/var/run/secrets/keyroom.dev/signer/token"),
                   ca_file=os.environ.get("KEYROOM_SIGNER_CA_FILE"))

    def _bearer(self) -> str:
        mtime = os.stat(self.token_file).st_mtime
        if self._token is None or self._token[0] != mtime:
            with open(self.token_file) as token_file:
                self._token = (mtime, token_file.read().strip())
        return self._token[1]

    async def _call(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        async with self._slots:
            return await self._call_now(method, path, body)

    async def _call_now(self, method: str, path: str, body: dict | None) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, connector=aiohttp.TCPConnector(
                ssl=self._ssl, limit=self._connections))
        try:
            headers = {"Authorization": f"Bearer {self._bearer()}"}
        except OSError as error:
            raise SignerError("SignerUnauthenticated", f"cannot read the signer token file: {error.strerror}")
        try:
            async with self._session.request(method, self.url + path, json=body, headers=headers) as response:
                payload = await response.json(content_type=None)
                if response.status >= 400:
                    payload = payload or {}
                    reason = payload.get("reason", f"HTTP{response.status}")
                    if reason in ("Unauthenticated", "Forbidden") or response.status == 401:
                        reason = "SignerUnauthenticated" if response.status == 401 else "SignerForbidden"
                    raise SignerError(reason, payload.get("message", response.reason or ""), status=response.status,
                                      audit=payload.get("audit"))
                return payload
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            raise SignerError("SignerUnreachable", f"cannot reach the signer at {self.url}: {error}") from None

    async def reconcile_key(self, *, namespace: str, name: str, uid: str) -> dict[str, Any]:
        """Have the signer apply the SigningKey's spec and the clock to its record; returns the record.

        The answer has versions (newest first), currentVersion, consumedBy,
        lastRotationRequest, nextChangeAt, missingVersions, deleted and finished.
        """
        return await self._call("POST", f"/v1/keys/{namespace}/{name}/{uid}/reconcile")

    async def reconcile_certificate(self, *, namespace: str, name: str, uid: str) -> dict[str, Any]:
        """Have the signer apply the Certificate's spec and the clock (issue, renew, revoke, publish its CRL).

        The answer has revision, current (serialNumber, notBefore, notAfter,
        renewalTime, fingerprint, keyVersion, certificate, chain, root, issuer),
        pool, csr, revoked, crl, waiting {reason, message}, nextChangeAt, deleted.
        """
        return await self._call("POST", f"/v1/certificates/{namespace}/{name}/{uid}/reconcile")

    async def list_objects(self) -> list[dict]:
        return (await self._call("GET", "/v1/keys"))["objects"]

    async def sign_request(self, *, namespace: str, name: str, uid: str, digests: str) -> dict[str, Any]:
        """Have the signer check and sign a SignRequest; ``digests`` is the fingerprint of what the caller saw.

        The answer has keyVersion, signedAt, signatures [{name, value}] and
        audit {index, entryHash}; calling again returns the same answer.
        """
        return await self._call("POST", f"/v1/requests/{namespace}/{name}/{uid}/sign", {"digests": digests})

    async def request_outcome(self, *, namespace: str, name: str, uid: str) -> dict[str, Any]:
        """The signer's record of a request: {"state": "Signed", ...the signatures} or Signing or Unsigned."""
        return await self._call("GET", f"/v1/requests/{namespace}/{name}/{uid}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

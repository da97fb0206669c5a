"""Webhook notifications for approvers: a request starts waiting for approval, a request finished.

Events on the request are there for those who watch the cluster; a webhook
reaches approvers where they already are (a chat room, a paging tool). It is
optional: ``KEYROOM_NOTIFY_WEBHOOK_SECRET=NAMESPACE/NAME`` names a Secret with
the key ``url`` and, optionally, ``token`` (sent as ``Authorization: Bearer``).
The operator may read exactly one Secret, ``keyroom-notify-webhook`` in its
own namespace (:func:`keyroom.api.rbac.operator_role`), and reads it only when
it has something to send, keeping it for a minute, so a rotated URL or token
is picked up without a restart.

Sending never holds up a reconciler. The reconciler only puts a payload on a
bounded queue (when it is full, the oldest waiting notification is dropped
with a log line); one worker task posts them in order with a timeout and
retries a failed delivery (a connection error, a timeout, 429 or 5xx) with
exponential backoff, then gives up with a log line. A request that needs no
approval finishes without a notification. Each (request UID, event)
is sent once per operator process: after a restart, a request that was
already announced may be announced again.

A payload names the request, its requester, key, reason, number of digests,
format, phase and what it waits for, and the command that approves it. It
carries no digest, signature, Secret or PIN, and logs name the webhook's host
only, never its URL or token.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import random
import time
import urllib.parse
from typing import Any, Callable, Mapping

import aiohttp
import kopf
import kubernetes

from keyroom import conditions, kubeclient
from keyroom.api.rbac import NOTIFY_SECRET
from keyroom.api.signrequest import TERMINAL_PHASES

logger = logging.getLogger("keyroom.notify")

SECRET_ENV = "KEYROOM_NOTIFY_WEBHOOK_SECRET"
#: the one Secret name the operator's Role lets it read (in its own namespace)
DEFAULT_SECRET_NAME = NOTIFY_SECRET
AWAITING_APPROVAL = "AwaitingApproval"
FINISHED = "Finished"
QUEUE_SIZE = 256
ATTEMPTS = 6
FIRST_RETRY = 1.0
MAX_RETRY = 60.0
TIMEOUT = 10.0
#: how long a Secret read is trusted before it is read again
SECRET_TTL = 60.0
_RETRIED_STATUSES = {408, 429}


class DeliveryError(Exception):
    """A delivery that failed; ``retry`` says whether trying again may help."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


# ---------------------------------------------------------------- pure: what to send and when

def transition(before: Mapping, after: Mapping) -> str | None:
    """The notification a status change calls for: AwaitingApproval, Finished or None.

    Approvers hear of the requests a policy asks them about: a request that needs
    no approval finishes without a notification.
    """
    if after.get("phase") in TERMINAL_PHASES and before.get("phase") not in TERMINAL_PHASES:
        return FINISHED if _needs_approval(after) else None
    if after.get("phase") == "Pending" and _ready_reason(after) == AWAITING_APPROVAL != _ready_reason(before):
        return AWAITING_APPROVAL
    return None


def _needs_approval(status: Mapping) -> bool:
    """Does the request's strictest policy require a human approval ("0/2" yes, "0/0" no)?"""
    _, _, required = (status.get("approvalSummary") or "").partition("/")
    return required.isdigit() and int(required) > 0


def _ready_reason(status: Mapping) -> str | None:
    ready = conditions.find(status.get("conditions") or [], "Ready")
    return (ready or {}).get("reason")


def payload(body: Mapping, *, event: str) -> dict:
    """What a webhook receives about a request: nothing secret, no digest values, no signatures."""
    meta, spec, status = body["metadata"], body["spec"], body.get("status") or {}
    return {
        "event": event,
        "request": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]},
        "requester": spec["requester"]["username"],
        "key": spec["keyRef"]["name"],
        "reason": spec.get("reason"),
        "digests": len(spec.get("digests") or []),
        "format": spec.get("format", "raw"),
        "phase": status.get("phase"),
        "waitingFor": status.get("message") if event == AWAITING_APPROVAL else None,
        "approvalSummary": status.get("approvalSummary"),
        "message": status.get("message"),
        "approveCommand": f"kubectl keyroom approve {meta['name']} -n {meta['namespace']}",
    }


def retry_delay(attempt: int) -> float:
    """Exponential backoff with jitter before retry ``attempt`` (1, 2, ...)."""
    return min(FIRST_RETRY * 2 ** (attempt - 1), MAX_RETRY) * random.uniform(0.8, 1.2)


def parse_secret_setting(value: str) -> tuple[str, str]:
    namespace, _, name = value.partition("/")
    if not namespace or not name or "/" in name:
        raise ValueError(f"{SECRET_ENV} wants NAMESPACE/NAME (e.g. keyroom-system/{DEFAULT_SECRET_NAME}), "
                         f"not {value!r}")
    return namespace, name


# ---------------------------------------------------------------- the webhook

@dataclasses.dataclass(frozen=True)
class Webhook:
    url: str
    token: str | None

    @property
    def host(self) -> str:
        return urllib.parse.urlparse(self.url).hostname or "?"


def _read_secret(namespace: str, name: str) -> Webhook:
    try:
        secret = kubernetes.client.CoreV1Api(kubeclient.api_client()).read_namespaced_secret(name, namespace)
    except kubernetes.client.ApiException as error:
        hint = {403: f"the operator may read only the Secret {DEFAULT_SECRET_NAME} in its own namespace",
                404: "create it with the key url (and optionally token)"}.get(error.status, "")
        raise DeliveryError(f"cannot read the webhook Secret {namespace}/{name} ({error.status}): {hint}",
                            retry=error.status >= 500) from None
    data = secret.data or {}
    if not data.get("url"):
        raise DeliveryError(f"the webhook Secret {namespace}/{name} has no key url", retry=False)
    decode = lambda key: base64.b64decode(data[key]).decode().strip() if data.get(key) else None  # noqa: E731
    return Webhook(url=decode("url"), token=decode("token"))


class Notifier:
    """A bounded queue of payloads and the one worker that posts them."""

    def __init__(self, *, secret: tuple[str, str], read_secret: Callable[[str, str], Webhook] = _read_secret,
                 queue_size: int = QUEUE_SIZE) -> None:
        self.secret, self.read_secret = secret, read_secret
        self.queue: asyncio.Queue[dict] = asyncio.Queue(maxsize=queue_size)
        self.sent: set[tuple[str, str]] = set()
        self._webhook: tuple[Webhook, float] | None = None

    @classmethod
    def from_environment(cls) -> Notifier | None:
        setting = os.environ.get(SECRET_ENV, "").strip()
        return cls(secret=parse_secret_setting(setting)) if setting else None

    def notify(self, body: Mapping, *, event: str) -> None:
        """Queue ``event`` for the request, once per (UID, event) in this process; never waits."""
        once = (body["metadata"]["uid"], event)
        if once in self.sent:
            return
        self.sent.add(once)
        if self.queue.full():
            dropped = self.queue.get_nowait()
            logger.warning("notification queue full (%d): dropped %s of %s/%s", self.queue.maxsize,
                           dropped["event"], dropped["request"]["namespace"], dropped["request"]["name"])
        self.queue.put_nowait(payload(body, event=event))

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                message = await self.queue.get()
                try:
                    await self._deliver(session, message)
                except Exception as error:  # noqa: BLE001  the worker outlives any one notification
                    # the type only: an exception's text may quote the URL, which can hold a credential
                    logger.error("notification %s of %s/%s dropped: %s", message["event"],
                                 message["request"]["namespace"], message["request"]["name"], type(error).__name__)

    async def _webhook_now(self) -> Webhook:
        if self._webhook is None or self._webhook[1] < time.monotonic():
            webhook = await asyncio.to_thread(self.read_secret, *self.secret)
            self._webhook = webhook, time.monotonic() + SECRET_TTL
        return self._webhook[0]

    async def _deliver(self, session: aiohttp.ClientSession, message: dict) -> None:
        """Post one payload; retry what may pass later with exponential backoff, then give up."""
        what = f"{message['event']} of {message['request']['namespace']}/{message['request']['name']}"
        host = "?"
        for attempt in range(1, ATTEMPTS + 1):
            try:
                webhook = await self._webhook_now()
                host = webhook.host
                await self._post(session, webhook, message)
                logger.info("notified %s of %s", host, what)
                return
            except DeliveryError as error:
                problem, retry = str(error), error.retry
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                problem, retry = f"{type(error).__name__}", True
            if not retry or attempt == ATTEMPTS:
                logger.warning("notification %s to %s not delivered: %s; dropped", what, host, problem)
                return
            delay = retry_delay(attempt)
            logger.info("notification %s to %s failed (%s); retry %d in %.1fs", what, host, problem, attempt,
                        delay)
            await asyncio.sleep(delay)

    @staticmethod
    async def _post(session: aiohttp.ClientSession, webhook: Webhook, message: dict) -> None:
        headers = {"Authorization": f"Bearer {webhook.token}"} if webhook.token else {}
        async with session.post(webhook.url, json=message, headers=headers) as response:
            if response.status >= 300:
                raise DeliveryError(f"HTTP {response.status}",
                                    retry=response.status >= 500 or response.status in _RETRIED_STATUSES)


@kopf.on.startup()
async def start_notifications(memo: kopf.Memo, **_: Any) -> None:
    memo.notifier = Notifier.from_environment()  # a malformed setting stops the start, with the fix in the message
    if memo.notifier is not None:
        memo.notify_worker = asyncio.create_task(memo.notifier.run())
        logger.info("webhook notifications for approvers: Secret %s/%s", *memo.notifier.secret)


@kopf.on.cleanup()
async def stop_notifications(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("notify_worker") is not None:
        memo.notify_worker.cancel()

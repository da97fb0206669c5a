"""The keyroom operator process: Kopf, configured for keyroom.

It holds no key material. Kopf's own bookkeeping (finalizer, progress,
diff-base) lives under the ``keyroom.dev/`` prefix, watches use explicit
timeouts so that a silently dropped connection is noticed, and the process is
standalone (one replica; leader election comes with the Helm chart).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from typing import Any

import aiohttp
import kopf

from keyroom import metrics
from keyroom.controllers import certificate as _certificate  # noqa: F401  (registers the handlers)
from keyroom.controllers import essence
from keyroom.controllers import notify as _notify  # noqa: F401
from keyroom.controllers import policy as _policy  # noqa: F401
from keyroom.controllers import readiness
from keyroom.controllers import signingkey as _signingkey
from keyroom.controllers import signrequest as _signrequest  # noqa: F401
from keyroom.controllers import tokenaudit as _tokenaudit  # noqa: F401
from keyroom.signer.client import SignerClient

PREFIX = "keyroom.dev"
READY_MESSAGE = "keyroom operator ready"
#: the cyclic garbage collector's thresholds (Python's are 700, 10, 10): see :func:`tune_collector`
COLLECTOR_THRESHOLDS = (50_000, 20, 10)
logger = logging.getLogger("keyroom.operator")


def quiet_watch_successes(record: logging.LogRecord) -> bool:
    """Leave out Kopf's "Handler '...' succeeded." of the event-watching handlers (a logging filter).

    Kopf logs one at INFO for every handler on every watch event, and keeps it
    out of the Kubernetes Events itself; with four handlers per SigningKey they
    were most of the log, and of a restarted operator's time, with 10,000 keys.
    Failures, warnings and every other message stay; ``--verbose`` keeps all.
    """
    return not (getattr(record, "k8s_skip", False) and record.levelno == logging.INFO
                and isinstance(record.msg, str) and record.msg.startswith("Handler ")
                and record.msg.endswith(" succeeded."))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = _signingkey.KOPF_FINALIZER  # only keys of earlier versions hold it
    settings.persistence.progress_storage = essence.ProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = essence.DiffBaseStorage(prefix=PREFIX, key="last-handled-configuration")
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.watching.connect_timeout = 30
    settings.posting.level = logging.INFO
    memo.signer = SignerClient.from_environment()
    if memo.signer is None:
        logger.warning("KEYROOM_SIGNER_URL is not set: SigningKeys will report SignerNotConfigured")
    logger.info(READY_MESSAGE)


#: connections to the API server the operator keeps at most: its watches (one per kind), patches and Events.
#: Kopf's own session has no limit, and a flood of objects left about 160 idle TLS connections open, each with
#: a 256 KiB read buffer; beyond the limit, calls wait for a free connection.
API_CONNECTIONS = 24


@kopf.on.login()
async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
    """Kopf's usual login (the kubernetes client's configuration), with a bounded connection pool."""
    info = kopf.login_via_client(**kwargs)
    if info is None:
        return None
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=API_CONNECTIONS, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(), proxy=info.proxy_url, trust_env=info.trust_env)
    return kopf.AiohttpSession(aiohttp_session=session, server=info.server, priority=info.priority,
                               default_namespace=info.default_namespace, expiration=info.expiration)


@kopf.on.cleanup()
async def close_signer(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("signer") is not None:
        await memo.signer.close()


def tune_collector() -> None:
    """Have the cyclic garbage collector run less often, and never over what the imports made.

    The operator keeps what it watches, a few million objects with 10,000 keys
    and 10,000 requests, and almost all of it is freed by reference counting.
    With Python's thresholds a collection ran every 700 new objects and
    scanned everything kept each time the heap had grown by a quarter: a
    restarted operator spent 15 of its 40 s catching up with 10,000 keys and
    10,000 requests in the collector, up to 1.8 s at a time with the event
    loop stopped. With these it spends about 2.5 s. The objects of the imports
    (code, classes, the API client's models) are frozen: they live as long as
    the process, and no collection scans them again.
    """
    gc.freeze()
    gc.set_threshold(*COLLECTOR_THRESHOLDS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keyroom-operator", description="Run the keyroom operator.")
    parser.add_argument("-n", "--namespace", action="append", default=[],
                        help="watch only this namespace (repeatable); default: all namespaces")
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--liveness", metavar="URL", default=None,
                        help="serve a liveness probe, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--metrics", metavar="URL", default=None,
                        help="serve Prometheus metrics, e.g. http://0.0.0.0:9090/metrics")
    args = parser.parse_args(argv)
    tune_collector()
    kopf.configure(verbose=args.verbose)
    if not args.verbose:
        logging.getLogger("kopf.objects").addFilter(quiet_watch_successes)
    if args.metrics:
        metrics.serve(args.metrics)
    readiness.install()  # before Kopf creates its readiness gate
    asyncio.run(kopf.operator(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The operator's Prometheus metrics, served when ``keyroom-operator --metrics URL`` asks for it.

The operator holds its own registry (not the process-wide default), so what
it serves is exactly what is declared here.
"""
from __future__ import annotations

import urllib.parse

import prometheus_client

REGISTRY = prometheus_client.CollectorRegistry()
TOKEN_UNDECLARED_OBJECTS = prometheus_client.Gauge(
    "keyroom_token_undeclared_objects", "HSM key objects that no SigningKey declares, at the last token audit",
    registry=REGISTRY)
TOKEN_AUDITS = prometheus_client.Counter(
    "keyroom_token_audits", "Token audits run, by outcome (ok, skipped)", ["outcome"], registry=REGISTRY)


def serve(url: str) -> None:
    """Serve /metrics at ``url`` (e.g. http://0.0.0.0:9090/metrics) in a background thread."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "http" or parsed.port is None:
        raise ValueError(f"--metrics wants http://HOST:PORT/metrics, not {url!r}")
    prometheus_client.start_http_server(parsed.port, addr=parsed.hostname or "0.0.0.0", registry=REGISTRY)

"""What the signer service costs over signing with python-pkcs11 directly.

One run measures, on the same SoftHSM token and machine, for ECDSA_P256 and
RSA_3072:

- the raw rate: python-pkcs11 ``sign`` in a loop on one session (the baseline);
- the signer's rate: one digest per HTTPS call through the real service
  (TLS, TokenReview-authenticated operator token, thread pool), sequentially
  and with several calls in flight;
- latency p50/p99 of one call, and what the signer adds to a raw sign.

Figures are printed as ratios to the baseline of the same run, because these
machines are shared and noisy. Run with ``make bench``.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import tempfile
import time
import pathlib

from keyroom.devenv import controlplane
from keyroom.signer.client import SIGNER_AUDIENCE, KeyRef, SignerClient


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def raw_rate(*, env: dict, module: str, token_label: str, pin: str, algorithm: str, seconds: float) -> tuple[float, list[float]]:
    """Signatures per second and per-call latencies with python-pkcs11 on one session."""
    import pkcs11
    from pkcs11 import KeyType, Mechanism
    from pkcs11.util.ec import encode_named_curve_parameters

    os.environ.update(env)
    token = pkcs11.lib(module).get_token(token_label=token_label)
    with token.open(user_pin=pin, rw=True) as session:
        if algorithm.startswith("ECDSA"):
            parameters = session.create_domain_parameters(
                KeyType.EC, {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
            _, private = parameters.generate_keypair(store=False)
            mechanism = Mechanism.ECDSA
        else:
            _, private = session.generate_keypair(KeyType.RSA, 3072, store=False)
            mechanism = Mechanism.RSA_PKCS
        digest = hashlib.sha256(b"benchmark").digest()
        payload = digest if algorithm.startswith("ECDSA") else bytes.fromhex(
            "3031300d060960864801650304020105000420") + digest
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            private.sign(payload, mechanism=mechanism)
            latencies.append(time.perf_counter() - started)
    return len(latencies) / sum(latencies), latencies


async def signer_rate(client: SignerClient, key: KeyRef, *, seconds: float, in_flight: int) -> tuple[float, list[float]]:
    digest = hashlib.sha256(b"benchmark").hexdigest()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker():
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await client.sign(key, digest_algorithm="SHA256", digests=[digest])
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return len(latencies) / (time.perf_counter() - started), latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per figure")
    parser.add_argument("--in-flight", type=int, default=4, help="concurrent calls for the parallel figure")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="keyroom-bench-") as directory:
        state_dir = pathlib.Path(directory) / "env"
        environment = controlplane.up(state_dir, operator=False, log=lambda m: print(m, file=sys.stderr))
        try:
            hsm_dir = state_dir / "hsm"
            env = {"SOFTHSM2_CONF": str(hsm_dir / "softhsm2.conf")}
            pin = (hsm_dir / "pin").read_text().strip()
            from keyroom.signer import softhsm
            module = softhsm.find_module()
            client = SignerClient(url=environment.signer_url, token_file=str(_operator_token(environment)),
                                  ca_file=str(state_dir / "pki" / "ca.crt"))
            print(f"{'algorithm':<11} {'raw/s':>8} {'signer/s':>9} {'ratio':>6} {'signer x' + str(args.in_flight) + '/s':>12} "
                  f"{'ratio':>6} {'raw p99':>8} {'call p50':>9} {'call p99':>9} {'added p99':>10}")
            for algorithm in ("ECDSA_P256", "RSA_3072"):
                raw, raw_latencies = raw_rate(env=env, module=module, token_label="keyroom-dev", pin=pin,
                                              algorithm=algorithm, seconds=args.seconds)

                async def measure():
                    key = KeyRef(namespace="bench", name=algorithm.lower().replace("_", "-"),
                                 uid="00000000-0000-4000-8000-000000000001", version=1)
                    await client.generate(key, algorithm=algorithm)
                    await signer_rate(client, key, seconds=0.5, in_flight=1)  # warm: TLS, TokenReview cache
                    sequential = await signer_rate(client, key, seconds=args.seconds, in_flight=1)
                    parallel = await signer_rate(client, key, seconds=args.seconds, in_flight=args.in_flight)
                    await client.destroy(key)
                    await client.close()
                    return sequential, parallel
                (rate, latencies), (parallel_rate, _) = asyncio.run(measure())
                raw_p99, call_p99 = _percentile(raw_latencies, 0.99), _percentile(latencies, 0.99)
                print(f"{algorithm:<11} {raw:8.0f} {rate:9.0f} {rate / raw:6.2f} {parallel_rate:12.0f} "
                      f"{parallel_rate / raw:6.2f} {raw_p99 * 1e3:7.2f}ms {statistics.median(latencies) * 1e3:8.2f}ms "
                      f"{call_p99 * 1e3:8.2f}ms {(call_p99 - raw_p99) * 1e3:9.2f}ms")
        finally:
            controlplane.down(state_dir, log=lambda m: None)
    return 0


def _operator_token(environment: controlplane.Environment) -> pathlib.Path:
    path = environment.state_dir / "bench-operator-token"
    path.write_text(controlplane.request_token(environment, namespace="keyroom-system",
                                               service_account="keyroom-operator", audience=SIGNER_AUDIENCE))
    return path


if __name__ == "__main__":
    sys.exit(main())

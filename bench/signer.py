"""What keyroom's HSM backend costs over signing with python-pkcs11 directly.

The signer offers no route that signs a caller's digest, so the service path
(TLS, authentication, the signer's own reads and decision, the audit log) is
measured end to end by ``bench/signrequest.py``. This benchmark isolates the
layer below it: ``keyroom.signer.hsm.Token``, the only code that calls
``C_Sign``, in process, against python-pkcs11 on the same SoftHSM token. One
run measures, for ECDSA_P256 and RSA_3072:

- the raw rate: python-pkcs11 ``sign`` in a loop on one session (the baseline);
- the backend's rate with one thread, and with several threads sharing its
  session pool (as the signer's thread pool does);
- latency p50/p99 of one backend call, and what it adds to a raw sign;
- the backend's signing time (p50 over keys signed with in turn) with 10 keys
  in the token and with ``--keys`` (default 10,000), as a ratio (goal: within
  1.5x): a token searches by scanning its objects, so a search per signature
  would grow with the token.

Figures are printed as ratios to the baseline of the same run, because these
machines are shared and noisy, and written to ``bench/results/latest.json``.
Run with ``make bench``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import pathlib
import secrets
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import results  # noqa: E402  (bench/results.py)
from keyroom.signer import hsm, softhsm  # noqa: E402


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def raw_rate(*, module: str, token_label: str, algorithm: str, seconds: float,
             pin: str | None = None) -> tuple[float, list[float]]:
    """Signatures per second and per-call latencies with python-pkcs11 on one session.

    PKCS#11 login belongs to the process: where keyroom's Token logged in already this session shares it;
    elsewhere ``pin`` logs in.
    """
    import pkcs11
    from pkcs11 import KeyType, Mechanism
    from pkcs11.util.ec import encode_named_curve_parameters

    token = pkcs11.lib(module).get_token(token_label=token_label)
    with token.open(rw=True, user_pin=pin) as session:
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


def backend_rate(token, handle, *, seconds: float, threads: int) -> tuple[float, list[float]]:
    digest = hashlib.sha256(b"benchmark").digest()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            token.sign(handle, digest=digest, digest_algorithm="SHA256")
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(worker) for _ in range(threads)]:
            future.result()
    return len(latencies) / (time.perf_counter() - started), latencies


def sign_time_with_keys(token, count: int, *, rounds: int = 3, sample: int = 200) -> float:
    """Median seconds per backend signature, over ``sample`` of ``count`` ECDSA_P256 keys generated in the token."""
    handles = []
    started = time.perf_counter()
    for number in range(count):
        handle = hsm.KeyHandle(namespace="bench", name=f"k{number}", uid=str(uuid.uuid4()), version=1)
        token.generate(handle, algorithm="ECDSA_P256")
        handles.append(handle)
        if number and number % 1000 == 0:
            print(f"  {number} keys generated ({number / (time.perf_counter() - started):.0f}/s)", file=sys.stderr)
    digest = hashlib.sha256(b"benchmark").digest()
    chosen = [handles[i * count // sample] for i in range(min(sample, count))]
    latencies = []
    for _ in range(rounds):
        for handle in chosen:
            begin = time.perf_counter()
            token.sign(handle, digest=digest, digest_algorithm="SHA256")
            latencies.append(time.perf_counter() - begin)
    return statistics.median(latencies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per figure")
    parser.add_argument("--threads", type=int, default=4, help="threads (and sessions) for the parallel figure")
    parser.add_argument("--keys", type=int, default=10000, help="keys in the token for the key-count figure")
    args = parser.parse_args(argv)
    figures = {}

    with tempfile.TemporaryDirectory(prefix="keyroom-bench-") as directory:
        pin = secrets.token_hex(8)
        found = softhsm.init_token(pathlib.Path(directory), label="keyroom-bench", pin=pin,
                                   so_pin=secrets.token_hex(8))
        os.environ.update(found.env())  # before the module is first loaded in this process
        token = hsm.Token(module_path=found.module_path, token_label=found.token_label, pin=pin,
                          sessions=args.threads)
        token.open()
        try:
            print(f"{'algorithm':<11} {'raw/s':>8} {'keyroom/s':>10} {'ratio':>6} "
                  f"{'keyroom x' + str(args.threads) + '/s':>13} {'ratio':>6} {'raw p99':>8} {'call p50':>9} "
                  f"{'call p99':>9} {'added p99':>10}")
            for algorithm in ("ECDSA_P256", "RSA_3072"):
                raw, raw_latencies = raw_rate(module=found.module_path, token_label=found.token_label,
                                              algorithm=algorithm, seconds=args.seconds)
                handle = hsm.KeyHandle(namespace="bench", name=algorithm.lower().replace("_", "-"),
                                       uid=str(uuid.uuid4()), version=1)
                token.generate(handle, algorithm=algorithm)
                backend_rate(token, handle, seconds=0.5, threads=1)  # warm the session caches
                rate, latencies = backend_rate(token, handle, seconds=args.seconds, threads=1)
                parallel, _ = backend_rate(token, handle, seconds=args.seconds, threads=args.threads)
                token.destroy(handle)
                raw_p99, call_p99 = _percentile(raw_latencies, 0.99), _percentile(latencies, 0.99)
                figures[f"raw_{algorithm.lower()}_sign_per_s"] = raw
                figures[f"backend_ratio_to_raw_{algorithm.lower()}"] = rate / raw
                print(f"{algorithm:<11} {raw:8.0f} {rate:10.0f} {rate / raw:6.2f} {parallel:13.0f} "
                      f"{parallel / raw:6.2f} {raw_p99 * 1e3:7.2f}ms {statistics.median(latencies) * 1e3:8.2f}ms "
                      f"{call_p99 * 1e3:8.2f}ms {(call_p99 - raw_p99) * 1e3:9.2f}ms")
        finally:
            token.close()
    figures.update(key_count_figures(args.keys))
    results.record(figures)
    return 0


def key_count_figures(keys: int) -> dict:
    """The backend's signing time with 10 keys and with ``keys`` in a token, each in a token of its own."""
    times = {}
    for count in (10, keys):
        with tempfile.TemporaryDirectory(prefix="keyroom-bench-") as directory:
            pin = secrets.token_hex(8)
            found = softhsm.init_token(pathlib.Path(directory), label=f"keyroom-bench-{count}", pin=pin,
                                       so_pin=secrets.token_hex(8))
            os.environ.update(found.env())
            import pkcs11
            pkcs11.unload(found.module_path)  # SoftHSM reads its configuration (the new token) when loaded
            token = hsm.Token(module_path=found.module_path, token_label=found.token_label, pin=pin, sessions=4)
            token.open()
            try:
                started = time.perf_counter()
                times[count] = sign_time_with_keys(token, count)
                print(f"{count} keys in the token: {times[count] * 1e3:.2f} ms per signature (p50 over "
                      f"{min(200, count)} keys in turn; {time.perf_counter() - started:.0f}s with generation)")
            finally:
                token.close()
    ratio = times[keys] / times[10]
    print(f"signing time with {keys} keys / with 10 keys: {ratio:.2f} (goal <= 1.5)")
    name = "sign_time_ratio_10k_to_10_keys" if keys == 10000 else f"sign_time_ratio_{keys}_to_10_keys"
    return {name: ratio, f"sign_ms_with_{keys}_keys": times[keys] * 1e3, "sign_ms_with_10_keys": times[10] * 1e3}


if __name__ == "__main__":
    sys.exit(main())

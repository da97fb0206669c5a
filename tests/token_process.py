"""A SoftHSM2 token opened by keyroom.signer.hsm.Token in a child process, for tests of pure builders.

SoftHSM reads ``SOFTHSM2_CONF`` once, when a process initialises it, and some
test modules keep their own session-long token loaded in the pytest process;
switching SoftHSM to another configuration under them would break their token.
So :class:`TokenProcess` runs the real backend in a child with its own
``SOFTHSM2_CONF`` and answers "generate" and "sign this digest" over a pipe:
the signing callback it hands out is exactly ``Token.sign`` with a key handle
bound, only one process away.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import sys
from typing import Callable

import keyroom
from keyroom.signer import softhsm, x509


# --------------------------------------------------------------------------- the token, in a child process

# Reads {"module", "label", "pin"} as the first JSON line on stdin (the PIN never reaches a command line),
# then one request per line: {"op": "generate", "name", "algorithm"} or {"op": "sign", "name", "digest" (base64),
# "digest_algorithm"}; answers one JSON line each, {"ok": base64} or {"error": "HSMError reason: message"}.
_TOKEN_PROCESS_SCRIPT = r'''
import base64, json, sys, uuid
from keyroom.signer import hsm

config = json.loads(sys.stdin.readline())
token = hsm.Token(module_path=config["module"], token_label=config["label"], pin=config["pin"], sessions=1)
token.open()
handles = {}
print(json.dumps({"ok": ""}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    try:
        if request["op"] == "generate":
            handle = hsm.KeyHandle(namespace="x509-test", name=request["name"], uid=str(uuid.uuid4()), version=1)
            result = token.generate(handle, algorithm=request["algorithm"])
            handles[request["name"]] = handle
        else:
            result = token.sign(handles[request["name"]], digest=base64.b64decode(request["digest"]),
                                digest_algorithm=request["digest_algorithm"])
        answer = {"ok": base64.b64encode(result).decode()}
    except hsm.HSMError as error:
        answer = {"error": f"HSMError {error.reason}: {error.message}"}
    print(json.dumps(answer), flush=True)
token.close()
'''


class TokenProcess:
    """A SoftHSM2 token opened by hsm.Token in a child process: generate keys, sign digests."""

    def __init__(self, token: softhsm.SoftHSMToken, *, pin: str) -> None:
        package_root = str(pathlib.Path(keyroom.__file__).resolve().parent.parent)
        env = dict(os.environ, **token.env())
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self._child = subprocess.Popen([sys.executable, "-c", _TOKEN_PROCESS_SCRIPT], env=env, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._call({"module": token.module_path, "label": token.token_label, "pin": pin})
        self.calls: list[tuple[str, bytes, str]] = []
        self._keys: dict[str, tuple[str, bytes]] = {}

    def _call(self, request: dict) -> bytes:
        self._child.stdin.write(json.dumps(request) + "\n")
        self._child.stdin.flush()
        line = self._child.stdout.readline()
        if not line:
            raise RuntimeError(f"the token process exited ({self._child.poll()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return base64.b64decode(answer["ok"])

    def generate(self, name: str, algorithm: str) -> bytes:
        return self._call({"op": "generate", "name": name, "algorithm": algorithm})

    def key(self, name: str, algorithm: str) -> bytes:
        """The public key DER of the key ``name``, generated on first use (RSA-3072 is slow in SoftHSM)."""
        if name not in self._keys:
            self._keys[name] = (algorithm, self.generate(name, algorithm))
        known, public_key = self._keys[name]
        assert known == algorithm, f"key {name} is {known}, not {algorithm}"
        return public_key

    def signer(self, name: str):
        """The callback x509 gets: Token.sign(handle, digest=..., digest_algorithm=...) for the key ``name``."""
        def sign(digest: bytes, digest_algorithm: str) -> bytes:
            self.calls.append((name, digest, digest_algorithm))
            return self._call({"op": "sign", "name": name, "digest": base64.b64encode(digest).decode(),
                               "digest_algorithm": digest_algorithm})
        return sign

    def close(self) -> None:
        self._child.stdin.close()
        try:
            self._child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()


@dataclasses.dataclass(frozen=True)
class CodeSigningChain:
    """A CA and a code-signing leaf under it, both keys in the token, and two CRLs of the CA."""

    ca: bytes
    leaf: bytes
    #: the leaf key's signing callback
    sign: Callable[[bytes, str], bytes]
    #: a CRL that revokes nothing, and one that revokes the leaf (keyCompromise)
    empty_crl: bytes
    revoking_crl: bytes


def code_signing_chain(token: TokenProcess, algorithm: str, *, now: datetime.datetime, ca_name: str, leaf_name: str,
                       crl_distribution_point: str | None = None) -> CodeSigningChain:
    """The CA (30 days) and leaf (7 days) of ``algorithm``, keys ``ca-<algorithm>`` and ``leaf-<algorithm>``."""
    ca_key = token.key(f"ca-{algorithm.lower()}", algorithm)
    leaf_key = token.key(f"leaf-{algorithm.lower()}", algorithm)
    ca_sign = token.signer(f"ca-{algorithm.lower()}")
    ca = x509.build_certificate(
        subject={"commonName": ca_name}, subject_public_key_der=ca_key, issuer_certificate_der=None,
        issuer_public_key_der=ca_key, not_before=now - datetime.timedelta(hours=1),
        not_after=now + datetime.timedelta(days=30), serial=x509.new_serial(), is_ca=True, sign=ca_sign,
        key_algorithm=algorithm)
    serial = x509.new_serial()
    leaf = x509.build_certificate(
        subject={"commonName": leaf_name}, subject_public_key_der=leaf_key, issuer_certificate_der=ca,
        issuer_public_key_der=ca_key, not_before=now - datetime.timedelta(minutes=5),
        not_after=now + datetime.timedelta(days=7), serial=serial, crl_distribution_point=crl_distribution_point,
        sign=ca_sign, key_algorithm=algorithm)
    times = {"this_update": now - datetime.timedelta(minutes=1), "next_update": now + datetime.timedelta(days=1)}
    empty_crl = x509.build_crl(issuer_certificate_der=ca, revoked=[], crl_number=1, sign=ca_sign,
                               key_algorithm=algorithm, **times)
    revoking_crl = x509.build_crl(issuer_certificate_der=ca, crl_number=2, sign=ca_sign, key_algorithm=algorithm,
                                  revoked=[(serial, now - datetime.timedelta(minutes=2), "keyCompromise")], **times)
    return CodeSigningChain(ca=ca, leaf=leaf, sign=token.signer(f"leaf-{algorithm.lower()}"), empty_crl=empty_crl,
                            revoking_crl=revoking_crl)

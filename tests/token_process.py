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
import json
import os
import pathlib
import subprocess
import sys

import keyroom
from keyroom.signer import softhsm


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

"""keyroom's HSM backend on a second PKCS#11 implementation: openCryptoki's software token.

The same Token class that drives SoftHSM2 generates RSA keys there (inside the
token, sensitive and not extractable), signs PKCS#1 v1.5 and PSS, lists and
destroys objects, signs from 8 threads over a pool of 4 sessions, replaces
sessions closed behind its back (openCryptoki hands freed handles out again,
so a session must be closed before its replacement is opened), and says
plainly that this token cannot make EC keys.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import uuid

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, utils

from keyroom.signer import hsm
from tests import opencryptoki
from tests.integration.test_hsm import close_two_sessions_then_sign

pytestmark = pytest.mark.integration


def _handle(name: str) -> hsm.KeyHandle:
    return hsm.KeyHandle(namespace="ock-test", name=name, uid=str(uuid.uuid4()), version=1)


@pytest.fixture(scope="module")
def token():
    found = opencryptoki.ensure()
    opened = hsm.Token(module_path=found.module_path, token_label=found.token_label, pin=found.pin, sessions=4)
    opened.open()
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def rsa_key(token):
    handle = _handle("rsa")
    der = token.generate(handle, algorithm="RSA_3072")
    yield handle, serialization.load_der_public_key(der)
    token.destroy(handle)


def test_the_token_says_it_cannot_make_ec_keys(token):
    assert set(token.lacking) == {"ECDSA_P256", "ECDSA_P384"}
    assert "CKM_EC_KEY_PAIR_GEN" in token.lacking["ECDSA_P256"]
    with pytest.raises(hsm.HSMError) as error:
        token.generate(_handle("ec"), algorithm="ECDSA_P256")
    assert error.value.reason == "InvalidRequest"
    assert "cannot make ECDSA_P256 keys: it lacks CKM_EC_KEY_PAIR_GEN, CKM_ECDSA" in str(error.value)


@pytest.mark.parametrize("algorithm", ["RSA_3072", "RSA_4096"])
def test_rsa_keys_are_made_inside_and_sign_pkcs1_and_pss(token, algorithm):
    handle = _handle(algorithm.lower().replace("_", "-"))
    public = serialization.load_der_public_key(token.generate(handle, algorithm=algorithm))
    try:
        assert public.key_size == int(algorithm.split("_")[1])
        assert token.key_attributes(handle) == {"SENSITIVE": True, "ALWAYS_SENSITIVE": True, "EXTRACTABLE": False,
                                                "NEVER_EXTRACTABLE": True, "TOKEN": True, "PRIVATE": True}
        for digest_algorithm, hashed in (("SHA256", hashes.SHA256()), ("SHA512", hashes.SHA512())):
            digest = hashlib.new(digest_algorithm.lower(), b"release").digest()
            public.verify(token.sign(handle, digest=digest, digest_algorithm=digest_algorithm), digest,
                          padding.PKCS1v15(), utils.Prehashed(hashed))
            public.verify(token.sign(handle, digest=digest, digest_algorithm=digest_algorithm, rsa_padding="pss"),
                          digest, padding.PSS(padding.MGF1(hashed), len(digest)), utils.Prehashed(hashed))
        assert sorted(o.object_class for o in token.list_objects() if o.handle == handle) == ["private_key",
                                                                                               "public_key"]
    finally:
        assert token.destroy(handle) is True
    assert not [o for o in token.list_objects() if o.handle == handle]
    with pytest.raises(hsm.HSMError) as error:
        token.sign(handle, digest=hashlib.sha256(b"x").digest(), digest_algorithm="SHA256")
    assert error.value.reason == "KeyNotFound"


def _sign_from_threads(token, handle, public, tag: str) -> int:
    """Signatures from 8 threads, 40 each, every one verified; how many verified."""
    def worker(index: int) -> int:
        for n in range(40):
            digest = hashlib.sha256(f"{tag}-{index}-{n}".encode()).digest()
            public.verify(token.sign(handle, digest=digest, digest_algorithm="SHA256"), digest,
                          padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        return 40

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        return sum(pool.map(worker, range(8)))


def test_eight_threads_sign_over_four_sessions(token, rsa_key):
    assert _sign_from_threads(token, *rsa_key, "threads") == 320


def test_sessions_closed_behind_the_pool_are_replaced_without_closing_their_successors(token, rsa_key):
    handle, public = rsa_key
    outcomes = close_two_sessions_then_sign(token, handle, 6)
    # each closed session fails one call at most (a retryable DeviceError), and is replaced; a replacement may get
    # the other closed session's handle back, which must then retire that entry rather than share the session
    assert outcomes in (["DeviceError", "DeviceError", "ok", "ok", "ok", "ok"],
                        ["DeviceError", "ok", "ok", "ok", "ok", "ok"]), outcomes
    pooled = [token._pool.get() for _ in range(4)]
    for item in pooled:
        token._pool.put(item)
    live = [item for item in pooled if not item.broken]
    assert len({item.session.handle for item in live}) == len(live)  # no session shared by two entries
    assert _sign_from_threads(token, handle, public, "after") == 320  # every replacement session works

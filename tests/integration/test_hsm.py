"""The HSM backend against a real PKCS#11 module: a fresh SoftHSM2 token (no cluster needed).

Signatures are checked with the ``openssl`` command line, the way a consumer
of keyroom's signatures would check them.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import pathlib
import subprocess
import uuid

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

from keyroom.signer import hsm, softhsm

pytestmark = pytest.mark.integration

TOKEN_LABEL = "keyroom-test"
PIN_TOKEN_LABEL = "keyroom-pins"  # a second token: login state is per process, so a wrong PIN needs its own token
PIN = "test-user-pin-7f3a"
SO_PIN = "test-so-pin-91c2"
WRONG_PIN = "not-the-pin-5e8d"


def _handle(name: str, version: int = 1) -> hsm.KeyHandle:
    return hsm.KeyHandle(namespace="hsm-test", name=name, uid=str(uuid.uuid4()), version=version)


@pytest.fixture(scope="module")
def softhsm_token(tmp_path_factory):
    """Fresh SoftHSM tokens, with SOFTHSM2_CONF set in this process before the module is loaded."""
    module = softhsm.find_module()  # SoftHSM2 is a requirement: fail with its install hint, never skip
    import pkcs11  # only to make sure no earlier test left the module initialised with another configuration

    directory = tmp_path_factory.mktemp("softhsm")
    token = softhsm.init_token(directory, label=TOKEN_LABEL, pin=PIN, so_pin=SO_PIN)
    softhsm.init_token(directory, label=PIN_TOKEN_LABEL, pin=PIN, so_pin=SO_PIN)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in token.env().items():
            patch.setenv(name, value)
        pkcs11.unload(module)
        yield token
        pkcs11.unload(module)  # SoftHSM reads SOFTHSM2_CONF when initialised: leave it unloaded for others


@pytest.fixture(scope="module")
def token(softhsm_token):
    opened = hsm.Token(module_path=softhsm_token.module_path, token_label=TOKEN_LABEL, pin=PIN, sessions=4)
    opened.open()
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def raw_session(softhsm_token, token):
    """A python-pkcs11 session of our own, to look at objects behind the backend's back.

    Opened without a PIN: the process is already logged in through ``token``.
    """
    import pkcs11

    session = pkcs11.lib(softhsm_token.module_path).get_token(token_label=TOKEN_LABEL).open(rw=True)
    yield session
    session.close()


@pytest.fixture(scope="module")
def keys(token) -> dict[str, tuple[hsm.KeyHandle, bytes]]:
    """One key per algorithm for the whole module (RSA-4096 generation takes a while)."""
    generated = {}
    for algorithm in hsm.ALGORITHMS:
        handle = _handle(algorithm.lower().replace("_", "-"))
        generated[algorithm] = (handle, token.generate(handle, algorithm=algorithm))
    return generated


def _private_key(raw_session, handle: hsm.KeyHandle):
    import pkcs11

    found = list(raw_session.get_objects({pkcs11.Attribute.ID: handle.object_id,
                                          pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}))
    assert len(found) == 1
    return found[0]


# --------------------------------------------------------------------------- key hygiene


@pytest.mark.parametrize("algorithm", hsm.ALGORITHMS)
def test_private_key_cannot_be_read(algorithm, keys, token, raw_session):
    import pkcs11

    handle, der = keys[algorithm]
    key = serialization.load_der_public_key(der)
    if algorithm.startswith("ECDSA"):
        assert key.curve.name == {"ECDSA_P256": "secp256r1", "ECDSA_P384": "secp384r1"}[algorithm]
    else:
        assert key.key_size == int(algorithm.split("_")[1])
        assert key.public_numbers().e == 65537
    assert token.public_key(handle) == der

    private = _private_key(raw_session, handle)
    assert private[pkcs11.Attribute.LABEL] == handle.label
    secret = pkcs11.Attribute.VALUE if algorithm.startswith("ECDSA") else pkcs11.Attribute.PRIVATE_EXPONENT
    with pytest.raises(pkcs11.AttributeSensitive):
        private[secret]
    with pytest.raises((pkcs11.AttributeSensitive, pkcs11.AttributeTypeInvalid)):
        private[pkcs11.Attribute.VALUE]

    attributes = token.key_attributes(handle)
    assert attributes == {"SENSITIVE": True, "ALWAYS_SENSITIVE": True, "EXTRACTABLE": False,
                          "NEVER_EXTRACTABLE": True, "TOKEN": True, "PRIVATE": True}


# --------------------------------------------------------------------------- signatures checked by openssl


def _openssl_verify(directory: pathlib.Path, public_der: bytes, signature: bytes, data_file: pathlib.Path,
                    digest_algorithm: str, rsa_padding: str | None) -> subprocess.CompletedProcess:
    pem = serialization.load_der_public_key(public_der).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (directory / "pub.pem").write_bytes(pem)
    (directory / "sig.bin").write_bytes(signature)
    command = ["openssl", "dgst", f"-{digest_algorithm.lower()}", "-verify", str(directory / "pub.pem"),
               "-signature", str(directory / "sig.bin")]
    if rsa_padding == "pss":
        command += ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest"]
    return subprocess.run(command + [str(data_file)], capture_output=True, text=True)


SIGNING_CASES = [(algorithm, digest, padding_mode)
                 for algorithm in hsm.ALGORITHMS
                 for digest in hsm.DIGEST_ALGORITHMS
                 for padding_mode in (("pkcs1v15", "pss") if algorithm.startswith("RSA") else (None,))]


@pytest.mark.parametrize("algorithm,digest_algorithm,rsa_padding", SIGNING_CASES)
def test_signature_verifies_with_openssl(algorithm, digest_algorithm, rsa_padding, keys, token, tmp_path):
    handle, der = keys[algorithm]
    data = os.urandom(4096)
    data_file = tmp_path / "artifact.bin"
    data_file.write_bytes(data)
    digest = hashlib.new(digest_algorithm.lower(), data).digest()
    kwargs = {"rsa_padding": rsa_padding} if rsa_padding else {}
    signature = token.sign(handle, digest=digest, digest_algorithm=digest_algorithm, **kwargs)

    verified = _openssl_verify(tmp_path, der, signature, data_file, digest_algorithm, rsa_padding)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "Verified OK" in verified.stdout

    tampered = bytearray(data)
    tampered[100] ^= 0x01
    data_file.write_bytes(bytes(tampered))
    refused = _openssl_verify(tmp_path, der, signature, data_file, digest_algorithm, rsa_padding)
    assert refused.returncode != 0
    assert "Verified OK" not in refused.stdout


# --------------------------------------------------------------------------- refusals


def test_wrong_digest_length_is_invalid(keys, token):
    handle, _ = keys["ECDSA_P256"]
    with pytest.raises(hsm.HSMError) as error:
        token.sign(handle, digest=b"\0" * 31, digest_algorithm="SHA256")
    assert error.value.reason == "InvalidRequest"
    with pytest.raises(hsm.HSMError) as error:
        token.sign(handle, digest=b"\0" * 32, digest_algorithm="SHA384")
    assert error.value.reason == "InvalidRequest"
    with pytest.raises(hsm.HSMError) as error:
        token.sign(handle, digest=b"\0" * 20, digest_algorithm="SHA1")
    assert error.value.reason == "InvalidRequest"
    with pytest.raises(hsm.HSMError) as error:
        token.sign(keys["RSA_3072"][0], digest=b"\0" * 32, digest_algorithm="SHA256", rsa_padding="raw")
    assert error.value.reason == "InvalidRequest"


def test_unknown_algorithm_is_invalid(token):
    with pytest.raises(hsm.HSMError) as error:
        token.generate(_handle("dsa"), algorithm="DSA_1024")
    assert error.value.reason == "InvalidRequest"


def test_unknown_key_is_not_found(token):
    handle = _handle("never-generated")
    for call in (lambda: token.sign(handle, digest=b"\0" * 32, digest_algorithm="SHA256"),
                 lambda: token.public_key(handle),
                 lambda: token.key_attributes(handle)):
        with pytest.raises(hsm.HSMError) as error:
            call()
        assert error.value.reason == "KeyNotFound"
    assert token.destroy(handle) is False


def test_generating_twice_is_refused(keys, token):
    handle, der = keys["ECDSA_P384"]
    with pytest.raises(hsm.HSMError) as error:
        token.generate(handle, algorithm="ECDSA_P384")
    assert error.value.reason == "KeyExists"
    assert token.public_key(handle) == der  # the first key is untouched


def test_destroy(token):
    handle = _handle("short-lived")
    digest = hashlib.sha256(b"before").digest()
    first = serialization.load_der_public_key(token.generate(handle, algorithm="ECDSA_P256"))
    for _ in range(8):  # let several sessions of the pool cache the key object
        first.verify(token.sign(handle, digest=digest, digest_algorithm="SHA256"), digest,
                     ec.ECDSA(utils.Prehashed(hashes.SHA256())))

    assert token.destroy(handle) is True
    assert token.destroy(handle) is False
    for call in (lambda: token.public_key(handle),
                 lambda: token.sign(handle, digest=digest, digest_algorithm="SHA256")):
        with pytest.raises(hsm.HSMError) as error:
            call()
        assert error.value.reason == "KeyNotFound"
    assert not [o for o in token.list_objects() if o.handle == handle]

    # The same version generated again is a new key, and no session signs with a cached old one.
    second = serialization.load_der_public_key(token.generate(handle, algorithm="ECDSA_P256"))
    assert second.public_numbers() != first.public_numbers()
    for _ in range(8):
        second.verify(token.sign(handle, digest=digest, digest_algorithm="SHA256"), digest,
                      ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    assert token.destroy(handle) is True


def _verifies(public_der: bytes, signature: bytes, digest: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    try:
        serialization.load_der_public_key(public_der).verify(signature, digest,
                                                             ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        return True
    except InvalidSignature:
        return False


def test_an_indexed_handle_naming_another_key_is_never_signed_with(token):
    """A handle freed by a deletion elsewhere and reused for another key must not sign for the first one."""
    mine, theirs = _handle("index-mine"), _handle("index-theirs")
    mine_der = token.generate(mine, algorithm="ECDSA_P256")
    theirs_der = token.generate(theirs, algorithm="ECDSA_P256")
    digest = hashlib.sha256(b"index").digest()
    try:
        with token._index_lock:  # the index now says mine's private key has theirs' handle
            token._index[mine.object_id] = token._index[theirs.object_id]
        signature = token.sign(mine, digest=digest, digest_algorithm="SHA256")
        assert _verifies(mine_der, signature, digest) and not _verifies(theirs_der, signature, digest)
        assert token._index[mine.object_id] != token._index[theirs.object_id]  # searched again, and mended
        with token._index_lock:  # a handle no object has any more: searched again too
            token._index[mine.object_id] = (0x7FFFFFF0, True)
        assert _verifies(mine_der, token.sign(mine, digest=digest, digest_algorithm="SHA256"), digest)
    finally:
        token.destroy(mine)
        token.destroy(theirs)


def test_a_batch_is_thrown_away_when_its_handle_names_another_key_by_the_end(token, monkeypatch):
    """Many signatures share one lookup of the key; a handle found to name another object after the last of them
    (a deletion midway freed it, and another key took it) returns none of them: the batch is made again."""
    mine = _handle("batch-mine")
    mine_der = token.generate(mine, algorithm="ECDSA_P256")
    digests = [hashlib.sha256(f"batch-{n}".encode()).digest() for n in range(20)]
    read_back = token._module.private_key_id
    runs: list[list[bytes]] = []
    foreign = {"after": 0, "signed": False}

    def private_key_id(session, key):  # what the key's CKA_ID reads as right after a batch has signed
        if foreign["after"] and foreign["signed"]:
            foreign["after"] -= 1
            foreign["signed"] = False
            return b"another team's key"
        return read_back(session, key)

    def batch(sign):
        runs.append([sign(digest, "SHA256") for digest in digests])
        foreign["signed"] = True
        return list(runs[-1])

    monkeypatch.setattr(token._module, "private_key_id", private_key_id)
    try:
        foreign["after"] = 1  # once: the second run's key reads back as its own
        signatures = token.signing(mine, batch)
        assert len(runs) == 2 and signatures == runs[1] and signatures != runs[0]
        assert all(_verifies(mine_der, s, d) for s, d in zip(signatures, digests))

        runs.clear()
        foreign.update(after=2, signed=False)  # and again: nothing is returned at all
        with pytest.raises(hsm.HSMError) as error:
            token.signing(mine, batch)
        assert len(runs) == 2 and error.value.reason == "KeyNotFound"
    finally:
        monkeypatch.undo()
        token.destroy(mine)


def test_a_token_opened_again_signs_without_searching_per_key(softhsm_token, token, monkeypatch):
    handles = [_handle(f"indexed-{n}") for n in range(3)]
    publics = [token.generate(handle, algorithm="ECDSA_P256") for handle in handles]
    digest = hashlib.sha256(b"indexed").digest()
    try:
        again = hsm.Token(module_path=softhsm_token.module_path, token_label=TOKEN_LABEL, pin=PIN, sessions=2)
        again.open()  # one listing of the private keys at open ...
        searched = []
        monkeypatch.setattr(hsm.Token, "_find", staticmethod(lambda *args: searched.append(args) or []))
        try:
            for handle, public in zip(handles, publics):  # ... and no search per key afterwards
                assert _verifies(public, again.sign(handle, digest=digest, digest_algorithm="SHA256"), digest)
            assert searched == []
        finally:
            again.close()  # the process was logged in already: closing it does not log out
    finally:
        monkeypatch.undo()
        for handle in handles:
            token.destroy(handle)


def test_a_token_opened_again_refuses_to_generate_over_a_leftover_public_key(softhsm_token, token, raw_session):
    """A pair half destroyed (the private key first) before a crash: the version's ID stays taken."""
    handle = _handle("half-destroyed")
    token.generate(handle, algorithm="ECDSA_P256")
    _private_key(raw_session, handle).destroy()
    again = hsm.Token(module_path=softhsm_token.module_path, token_label=TOKEN_LABEL, pin=PIN, sessions=1)
    again.open()
    try:
        with pytest.raises(hsm.HSMError) as error:
            again.generate(handle, algorithm="ECDSA_P256")
        assert error.value.reason == "KeyExists"
        assert again.destroy(handle) is True  # the leftover public key
        again.generate(handle, algorithm="ECDSA_P256")
        with pytest.raises(hsm.HSMError) as error:  # and a pair it generated itself
            again.generate(handle, algorithm="ECDSA_P256")
        assert error.value.reason == "KeyExists"
    finally:
        again.destroy(handle)
        again.close()


def test_a_key_destroyed_by_another_token_object_is_not_found(softhsm_token, token):
    handle = _handle("destroyed-elsewhere")
    token.generate(handle, algorithm="ECDSA_P256")
    digest = hashlib.sha256(b"elsewhere").digest()
    token.sign(handle, digest=digest, digest_algorithm="SHA256")  # indexed in ``token``
    other = hsm.Token(module_path=softhsm_token.module_path, token_label=TOKEN_LABEL, pin=PIN, sessions=1)
    other.open()
    try:
        assert other.destroy(handle) is True
    finally:
        other.close()
    with pytest.raises(hsm.HSMError) as error:
        token.sign(handle, digest=digest, digest_algorithm="SHA256")
    assert error.value.reason == "KeyNotFound"


# --------------------------------------------------------------------------- opening


def test_wrong_pin(softhsm_token):
    wrong = hsm.Token(module_path=softhsm_token.module_path, token_label=PIN_TOKEN_LABEL, pin=WRONG_PIN)
    with pytest.raises(hsm.HSMError) as error:
        wrong.open()
    assert error.value.reason == "PinIncorrect"
    for text in (str(error.value), repr(error.value), repr(wrong)):
        assert WRONG_PIN not in text
    assert PIN not in repr(hsm.Token(module_path=softhsm_token.module_path, token_label=TOKEN_LABEL, pin=PIN))
    assert not wrong.is_open

    right = hsm.Token(module_path=softhsm_token.module_path, token_label=PIN_TOKEN_LABEL, pin=PIN, sessions=2)
    right.open()
    try:
        assert right.list_objects() == []
    finally:
        right.close()


def test_unknown_token(softhsm_token):
    with pytest.raises(hsm.HSMError) as error:
        hsm.Token(module_path=softhsm_token.module_path, token_label="no-such-token", pin=PIN).open()
    assert error.value.reason == "TokenNotFound"
    assert PIN not in str(error.value)


def test_missing_module(tmp_path):
    with pytest.raises(hsm.HSMError) as error:
        hsm.Token(module_path=str(tmp_path / "libnothing.so"), token_label=TOKEN_LABEL, pin=PIN).open()
    assert error.value.reason == "ModuleNotFound"
    not_a_module = tmp_path / "libgarbage.so"
    not_a_module.write_bytes(b"this is not a shared object")
    with pytest.raises(hsm.HSMError) as error:
        hsm.Token(module_path=str(not_a_module), token_label=TOKEN_LABEL, pin=PIN).open()
    assert error.value.reason == "ModuleNotFound"


def test_closed_token_refuses_calls(softhsm_token):
    closed = hsm.Token(module_path=softhsm_token.module_path, token_label=TOKEN_LABEL, pin=PIN)
    with pytest.raises(hsm.HSMError) as error:
        closed.sign(_handle("x"), digest=b"\0" * 32, digest_algorithm="SHA256")
    assert error.value.reason == "DeviceError"


# --------------------------------------------------------------------------- recovery


def close_two_sessions_then_sign(token: hsm.Token, handle: hsm.KeyHandle, signatures: int) -> list[str]:
    """Close two of the pool's four sessions behind its back, then sign: "ok" or the HSMError's reason, each."""
    pooled = [token._pool.get() for _ in range(4)]
    pooled[0].session.close()
    pooled[1].session.close()
    for item in pooled:
        token._pool.put(item)
    outcomes = []
    for n in range(signatures):
        try:
            token.sign(handle, digest=hashlib.sha256(f"lost-{n}".encode()).digest(), digest_algorithm="SHA256")
            outcomes.append("ok")
        except hsm.HSMError as error:
            outcomes.append(error.reason)
    return outcomes


def test_lost_sessions_and_login_are_recovered(softhsm_token):
    """A closed session or a lost login is reported as a retryable DeviceError (never KeyNotFound) and repaired."""
    recovering = hsm.Token(module_path=softhsm_token.module_path, token_label=PIN_TOKEN_LABEL, pin=PIN, sessions=4)
    recovering.open()
    handle = _handle("recovering")
    digest = hashlib.sha256(b"recover").digest()
    try:
        recovering.generate(handle, algorithm="ECDSA_P256")
        for _ in range(4):
            recovering.sign(handle, digest=digest, digest_algorithm="SHA256")

        # Two sessions closed behind the pool's back (the next two borrowers get them).
        assert close_two_sessions_then_sign(recovering, handle, 6) == ["DeviceError", "DeviceError", "ok", "ok",
                                                                       "ok", "ok"]

        # The login lost (as when an HSM restarts): private keys become invisible, which must not read as gone.
        pooled = [recovering._pool.get() for _ in range(4)]
        assert recovering._module.logout(pooled[0].session.handle) == 0
        for item in pooled:
            recovering._pool.put(item)
        with pytest.raises(hsm.HSMError) as error:
            recovering.sign(handle, digest=digest, digest_algorithm="SHA256")
        assert error.value.reason == "DeviceError"
        recovering.sign(handle, digest=digest, digest_algorithm="SHA256")  # logged in again
        assert recovering.key_attributes(handle)["SENSITIVE"] is True
    finally:
        recovering.destroy(handle)
        recovering.close()


# --------------------------------------------------------------------------- listing


def test_list_objects_reports_ours_and_foreign(keys, token, raw_session):
    import pkcs11

    foreign = raw_session.generate_key(pkcs11.KeyType.AES, 128, store=True, label="team-b legacy key",
                                       id=b"\x01\x02\x03")
    # A keyroom-looking label on an object whose ID does not match it is not ours either.
    impostor_label = _handle("impostor").label
    impostor = raw_session.generate_key(pkcs11.KeyType.AES, 128, store=True, label=impostor_label,
                                        id=b"\x09" * 20)
    try:
        objects = token.list_objects()
    finally:
        foreign.destroy()
        impostor.destroy()

    for handle, _ in keys.values():
        ours = sorted(o.object_class for o in objects if o.handle == handle)
        assert ours == ["private_key", "public_key"]
        for o in objects:
            if o.handle == handle:
                assert o.label == handle.label
                assert o.object_id == handle.object_id.hex()
    by_label = {o.label: o for o in objects}
    assert by_label["team-b legacy key"].handle is None
    assert by_label["team-b legacy key"].object_class == "secret_key"
    assert by_label["team-b legacy key"].object_id == "010203"
    assert by_label[impostor_label].handle is None


# --------------------------------------------------------------------------- concurrency


def test_concurrent_signing(keys, token):
    assert repr(token).endswith("open, 4 sessions>")  # the module accepted multi-threaded use
    ec_handle, ec_der = keys["ECDSA_P256"]
    rsa_handle, rsa_der = keys["RSA_3072"]
    ec_key, rsa_key = serialization.load_der_public_key(ec_der), serialization.load_der_public_key(rsa_der)

    def worker(index: int) -> int:
        use_rsa = index % 4 == 3
        for n in range(50):
            digest = hashlib.sha256(f"{index}-{n}".encode()).digest()
            if use_rsa:
                signature = token.sign(rsa_handle, digest=digest, digest_algorithm="SHA256")
                rsa_key.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
            else:
                signature = token.sign(ec_handle, digest=digest, digest_algorithm="SHA256")
                ec_key.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        return 50

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        assert sum(pool.map(worker, range(8))) == 400

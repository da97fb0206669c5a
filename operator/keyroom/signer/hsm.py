"""The HSM backend: signing keys that live in a PKCS#11 token and never leave it.

This is the only code in keyroom that imports ``pkcs11`` (python-pkcs11). It
works with any PKCS#11 module; SoftHSM2 is only the default module path (see
:mod:`keyroom.signer.softhsm` for the dev/test token), and nothing here
depends on it.

Keys
    :meth:`Token.generate` creates a key pair inside the token. The private key
    is a token object (``CKA_TOKEN``), private (readable only after login),
    sensitive and not extractable (``CKA_SENSITIVE=True``,
    ``CKA_EXTRACTABLE=False``), so its value can never be read or wrapped out
    of the token, and it may only sign. Callers get the public key (DER
    SubjectPublicKeyInfo) and signatures, nothing else.

Naming
    A key version is named by a :class:`KeyHandle`: the SigningKey's
    namespace, name, Kubernetes UID and version. Both objects of the pair carry
    ``CKA_LABEL = "keyroom:<namespace>/<name>:v<version>:<uid>"``, readable by
    people and by :meth:`KeyHandle.from_label`, and ``CKA_ID = UID (16 bytes)
    + version (4 bytes, big-endian)``, which is how keyroom finds them. Since
    the ID carries the UID, a SigningKey deleted and re-created under the same
    name (new UID), or another team's key, can never be mistaken for it; a
    label that does not parse, or whose ID does not match, marks an object
    keyroom did not create (:meth:`Token.list_objects` reports those too).

Sessions
    :meth:`Token.open` logs in once and keeps a bounded pool of read/write
    sessions; each call borrows one and gives it back, so as many threads as
    there are sessions sign at the same time. PKCS#11 login state belongs to
    the application, not to a session: all sessions of the process share the
    one login (a second ``C_Login`` fails with ``CKR_USER_ALREADY_LOGGED_IN``,
    with the right PIN or a wrong one). python-pkcs11 only logs in while
    opening a session (leaking that session when the login fails) and
    initialises modules with ``C_Initialize(NULL)``, which tells a module it
    will not be called from several threads at once: SoftHSM then turns its
    locking off and crashes under concurrent calls. So the few calls
    python-pkcs11 lacks are made through the module's own function list with
    ctypes: the module is re-initialised with ``CKF_OS_LOCKING_OK`` when this
    process first loads it, and login, logout and the session state are
    handled here, on sessions python-pkcs11 opened without a PIN. A module
    that cannot lock, or that other code in the process initialised first,
    gets a pool of one session. Open one Token per token per process.

    A token finds objects by scanning them (SoftHSM2 reads every object file
    per search), so searching per signature would cost more with every key
    it holds. Object handles of token objects belong to the application and
    are valid in every session, so :meth:`Token.open` lists the private keys
    once and indexes their handles by ``CKA_ID``; :meth:`Token.generate` and
    :meth:`Token.destroy` keep the index current, and a key it misses is
    searched for once. python-pkcs11 binds an object to the session it was
    found in, so signing calls ``C_SignInit``/``C_Sign`` through the
    function list with the indexed handle, after reading the handle's
    ``CKA_ID`` back: a handle that names another object now (freed and
    reused after a deletion elsewhere) is never signed with. A session that broke, or a
    login that was lost (an HSM restart), is reported as a retryable
    DeviceError, never as a missing key, and the session is replaced (logging
    in again) when it is given back.

Blocking
    Every method blocks in the module (RSA-4096 generation takes seconds on
    SoftHSM, a network HSM adds round trips). Callers in an event loop run them
    in threads (``asyncio.to_thread`` or an executor no larger than the pool).

Errors
    Everything raises :class:`HSMError` with a CamelCase ``reason``. The PIN
    never appears in a message, a log line or a repr.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import queue
import re
import threading
import uuid
from typing import Any, Callable, TypeVar

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import MGF
from pkcs11.util.ec import encode_named_curve_parameters

T = TypeVar("T")

logger = logging.getLogger("keyroom.signer.hsm")

ALGORITHMS = ("ECDSA_P256", "ECDSA_P384", "RSA_3072", "RSA_4096")
DIGEST_ALGORITHMS = {"SHA256": 32, "SHA384": 48, "SHA512": 64}
RSA_PADDINGS = ("pkcs1v15", "pss")

REASONS = ("ModuleNotFound", "TokenNotFound", "PinIncorrect", "PinLocked", "TokenFull", "KeyNotFound",
           "KeyExists", "InvalidRequest", "DeviceError")


class HSMError(Exception):
    """A failed HSM operation.

    ``reason`` is a CamelCase code: ModuleNotFound, TokenNotFound, PinIncorrect,
    PinLocked, TokenFull, KeyNotFound, KeyExists, InvalidRequest, DeviceError.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"HSMError(reason={self.reason!r}, message={self.message!r})"

    def __reduce__(self):
        return type(self), (self.reason, self.message)


# --------------------------------------------------------------------------- naming

_LABEL_PREFIX = "keyroom:"
#: the secret key that authenticates the signer's audit log entries (HMAC-SHA256)
AUDIT_KEY_LABEL = "keyroom:audit-mac"
AUDIT_KEY_ID = b"keyroom-audit-mac"
_LABEL = re.compile(r"keyroom:(?P<namespace>[^/:\s]+)/(?P<name>[^/:\s]+):v(?P<version>[0-9]{1,10}):(?P<uid>[0-9a-fA-F-]{36})")
_NAME_PART = re.compile(r"[^/:\s]+")


@dataclasses.dataclass(frozen=True)
class KeyHandle:
    """One version of one SigningKey: how its objects are found on the token.

    ``uid`` is the SigningKey's Kubernetes UID (a UUID; stored in canonical
    lower-case form), ``version`` an unsigned 32-bit number.
    """

    namespace: str
    name: str
    uid: str
    version: int

    def __post_init__(self) -> None:
        for field in ("namespace", "name"):
            value = getattr(self, field)
            if not isinstance(value, str) or not _NAME_PART.fullmatch(value):
                raise ValueError(f"invalid {field} {value!r} for a key handle")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or not 0 <= self.version < 2 ** 32:
            raise ValueError(f"invalid key version {self.version!r}: an integer from 0 to 2^32-1")
        try:
            canonical = str(uuid.UUID(self.uid))
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"invalid uid {self.uid!r}: a Kubernetes object UID is a UUID") from None
        object.__setattr__(self, "uid", canonical)

    @property
    def label(self) -> str:
        """``CKA_LABEL`` of both objects of the pair."""
        return f"{_LABEL_PREFIX}{self.namespace}/{self.name}:v{self.version}:{self.uid}"

    @property
    def object_id(self) -> bytes:
        """``CKA_ID`` of both objects of the pair: the UID's 16 bytes and the version's 4 (big-endian)."""
        return uuid.UUID(self.uid).bytes + self.version.to_bytes(4, "big")

    @classmethod
    def from_label(cls, label: str) -> "KeyHandle | None":
        """The handle a keyroom label names, or None for a label keyroom does not write."""
        if not isinstance(label, str):
            return None
        match = _LABEL.fullmatch(label)
        if not match:
            return None
        try:
            return cls(namespace=match["namespace"], name=match["name"], uid=match["uid"],
                       version=int(match["version"]))
        except ValueError:
            return None


@dataclasses.dataclass(frozen=True)
class TokenObject:
    """An object found on the token.

    ``object_class`` is ``private_key``, ``public_key`` or another class name
    in the same style (``secret_key``, ``certificate``, ``data``...).
    ``handle`` is None for objects keyroom did not create: a label keyroom does
    not write, or a keyroom label on an object whose ``CKA_ID`` does not match it.
    """

    label: str
    object_id: str
    object_class: str
    handle: KeyHandle | None


# --------------------------------------------------------------------------- algorithms

_CURVES: dict[str, ec.EllipticCurve] = {"ECDSA_P256": ec.SECP256R1(), "ECDSA_P384": ec.SECP384R1()}
_EC_PARAMS = {"ECDSA_P256": encode_named_curve_parameters("secp256r1"),
              "ECDSA_P384": encode_named_curve_parameters("secp384r1")}
_CURVE_BY_PARAMS = {_EC_PARAMS[name]: curve for name, curve in _CURVES.items()}
_RSA_BITS = {"RSA_3072": 3072, "RSA_4096": 4096}

# DER DigestInfo prefixes (RFC 8017, section 9.2, note 1) for CKM_RSA_PKCS.
_DIGEST_INFO = {
    "SHA256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "SHA384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "SHA512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
# CK_RSA_PKCS_PSS_PARAMS: hash, MGF1 with the same hash, salt as long as the digest.
_PSS_PARAMS = {
    "SHA256": (Mechanism.SHA256, MGF.SHA256, 32),
    "SHA384": (Mechanism.SHA384, MGF.SHA384, 48),
    "SHA512": (Mechanism.SHA512, MGF.SHA512, 64),
}

_KEY_ATTRIBUTES = {
    "SENSITIVE": Attribute.SENSITIVE, "ALWAYS_SENSITIVE": Attribute.ALWAYS_SENSITIVE,
    "EXTRACTABLE": Attribute.EXTRACTABLE, "NEVER_EXTRACTABLE": Attribute.NEVER_EXTRACTABLE,
    "TOKEN": Attribute.TOKEN, "PRIVATE": Attribute.PRIVATE,
}
_KEY_CLASSES = (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)

# What each algorithm needs of a token: its key-pair generation and signing mechanisms (and, for RSA, the
# modulus length, within the generation mechanism's range).
_NEEDS: dict[str, tuple[tuple[Mechanism, ...], int | None]] = {
    "ECDSA_P256": ((Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA), None),
    "ECDSA_P384": ((Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA), None),
    "RSA_3072": ((Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.RSA_PKCS), 3072),
    "RSA_4096": ((Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.RSA_PKCS), 4096),
}


def _mechanism_name(mechanism: Any) -> str:
    try:
        return "CKM_" + Mechanism(mechanism).name
    except ValueError:
        return f"mechanism 0x{int(mechanism):x}"


def lacking(slot: Any) -> tuple[dict[str, list[str]], frozenset[int] | None]:
    """({algorithm: what the token lacks for it}, the token's mechanisms) from the slot's mechanism list.

    A module that cannot list its mechanisms lacks nothing as far as keyroom can tell (None): generation
    and signing then report what the token refuses.
    """
    try:
        mechanisms = frozenset(int(m) for m in slot.get_mechanisms())
    except (p11.PKCS11Error, TypeError, ValueError):
        return {}, None
    found: dict[str, list[str]] = {}
    for algorithm, (needed, bits) in _NEEDS.items():
        missing = [_mechanism_name(m) for m in needed if int(m) not in mechanisms]
        if bits is not None and not missing:
            try:
                info = slot.get_mechanism_info(needed[0])
                low, high = int(info.min_key_length), int(info.max_key_length)
            except (p11.PKCS11Error, AttributeError, TypeError, ValueError):
                low = high = 0
            if high and not low <= bits <= high:
                missing.append(f"{bits}-bit keys ({_mechanism_name(needed[0])} makes {low} to {high})")
        if missing:
            found[algorithm] = missing
    return found, mechanisms


# --------------------------------------------------------------------------- the module's function list

# The few PKCS#11 calls python-pkcs11 0.10 does not offer, made through the
# module's CK_FUNCTION_LIST (C_GetFunctionList), which every module exports.
# Structures are not packed on the platforms keyroom runs on (Linux).
_CK_ULONG = ctypes.c_ulong
_CK_RV = ctypes.c_ulong
_CKF_OS_LOCKING_OK = 0x2
_CKU_USER = 1
_CKS_RW_USER_FUNCTIONS = 3
_CKS_RO_USER_FUNCTIONS = 1
_CKR_OK = 0x0
_CKR_CANT_LOCK = 0x0A
_CKR_USER_ALREADY_LOGGED_IN = 0x100
_CKR_USER_NOT_LOGGED_IN = 0x101
_CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
_LOGIN_FAILURES = {
    0xA0: ("PinIncorrect", "the token refused the PIN (CKR_PIN_INCORRECT)"),
    0xA1: ("PinIncorrect", "the PIN has characters the token does not accept (CKR_PIN_INVALID)"),
    0xA2: ("PinIncorrect", "the PIN's length is out of the token's range (CKR_PIN_LEN_RANGE)"),
    0xA3: ("PinIncorrect", "the user PIN has expired and must be changed (CKR_PIN_EXPIRED)"),
    0xA4: ("PinLocked", "the user PIN is locked after too many failed logins (CKR_PIN_LOCKED)"),
    0x102: ("PinIncorrect", "the token's user PIN is not initialised (CKR_USER_PIN_NOT_INITIALIZED)"),
    0x104: ("DeviceError", "another user (the SO?) is logged in to the token (CKR_USER_ANOTHER_ALREADY_LOGGED_IN)"),
}


class _InitializeArgs(ctypes.Structure):
    _fields_ = [("CreateMutex", ctypes.c_void_p), ("DestroyMutex", ctypes.c_void_p),
                ("LockMutex", ctypes.c_void_p), ("UnlockMutex", ctypes.c_void_p),
                ("flags", _CK_ULONG), ("pReserved", ctypes.c_void_p)]


class _SessionInfo(ctypes.Structure):
    _fields_ = [("slotID", _CK_ULONG), ("state", _CK_ULONG), ("flags", _CK_ULONG), ("ulDeviceError", _CK_ULONG)]


_FUNCTIONS = ("C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList", "C_GetSlotInfo",
              "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo", "C_InitToken", "C_InitPIN", "C_SetPIN",
              "C_OpenSession", "C_CloseSession", "C_CloseAllSessions", "C_GetSessionInfo", "C_GetOperationState",
              "C_SetOperationState", "C_Login", "C_Logout", "C_CreateObject", "C_CopyObject", "C_DestroyObject",
              "C_GetObjectSize", "C_GetAttributeValue", "C_SetAttributeValue", "C_FindObjectsInit", "C_FindObjects",
              "C_FindObjectsFinal", "C_EncryptInit", "C_Encrypt", "C_EncryptUpdate", "C_EncryptFinal",
              "C_DecryptInit", "C_Decrypt", "C_DecryptUpdate", "C_DecryptFinal", "C_DigestInit", "C_Digest",
              "C_DigestUpdate", "C_DigestKey", "C_DigestFinal", "C_SignInit", "C_Sign")


class _Attribute(ctypes.Structure):
    _fields_ = [("type", _CK_ULONG), ("pValue", ctypes.c_void_p), ("ulValueLen", _CK_ULONG)]


class _Mechanism(ctypes.Structure):
    _fields_ = [("mechanism", _CK_ULONG), ("pParameter", ctypes.c_void_p), ("ulParameterLen", _CK_ULONG)]


class _PssParams(ctypes.Structure):
    _fields_ = [("hashAlg", _CK_ULONG), ("mgf", _CK_ULONG), ("sLen", _CK_ULONG)]


_CKR_BUFFER_TOO_SMALL = 0x150
_CKR_ATTRIBUTE_SENSITIVE, _CKR_ATTRIBUTE_TYPE_INVALID = 0x11, 0x12
_CKA_CLASS, _CKA_ID = 0x0, 0x102
_CKO_PRIVATE_KEY = 0x3
# The python-pkcs11 exception for the return values of C_GetAttributeValue, C_SignInit and C_Sign that
# Token._failure tells apart; any other value becomes a plain PKCS11Error (a DeviceError).
_CKR_ERRORS: dict[int, type[p11.PKCS11Error]] = {
    0x02: p11.HostMemory, 0x05: p11.GeneralError, 0x06: p11.FunctionFailed, 0x07: p11.ArgumentsBad,
    0x11: p11.AttributeSensitive, 0x12: p11.AttributeTypeInvalid, 0x20: p11.DataInvalid, 0x21: p11.DataLenRange,
    0x30: p11.DeviceError, 0x31: p11.DeviceMemory, 0x32: p11.DeviceRemoved, 0x54: p11.FunctionNotSupported,
    0x60: p11.KeyHandleInvalid, 0x62: p11.KeySizeRange, 0x63: p11.KeyTypeInconsistent, 0x70: p11.MechanismInvalid,
    0x71: p11.MechanismParamInvalid, 0x82: p11.ObjectHandleInvalid, 0x90: p11.OperationActive,
    0x91: p11.OperationNotInitialized, 0xB0: p11.SessionClosed, 0xB3: p11.SessionHandleInvalid,
    0xE0: p11.TokenNotPresent, 0x101: p11.UserNotLoggedIn,
}


def _error(rv: int, function: str) -> p11.PKCS11Error:
    known = _CKR_ERRORS.get(rv)
    return known() if known is not None else p11.PKCS11Error(f"{function} returned CKR 0x{rv:x}")


class _FunctionList(ctypes.Structure):
    """The start of CK_FUNCTION_LIST (the order is fixed by the standard)."""
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)] + [(name, ctypes.c_void_p) for name in _FUNCTIONS]


class _Module:
    """C_Initialize with arguments, C_Finalize, C_Login, C_Logout and C_GetSessionInfo of one loaded module."""

    def __init__(self, path: str) -> None:
        self._library = ctypes.CDLL(path)  # the same loaded object as python-pkcs11's (dlopen counts references)
        get_function_list = self._library.C_GetFunctionList
        get_function_list.restype = _CK_RV
        get_function_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
        pointer = ctypes.POINTER(_FunctionList)()
        rv = get_function_list(ctypes.byref(pointer))
        if rv != _CKR_OK or not pointer:
            raise OSError(f"C_GetFunctionList returned 0x{rv:x}")
        functions = pointer.contents
        self.initialize = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_void_p)(functions.C_Initialize)
        self.finalize = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_void_p)(functions.C_Finalize)
        self.login = ctypes.CFUNCTYPE(_CK_RV, _CK_ULONG, _CK_ULONG, ctypes.c_char_p, _CK_ULONG)(functions.C_Login)
        self.logout = ctypes.CFUNCTYPE(_CK_RV, _CK_ULONG)(functions.C_Logout)
        self.get_session_info = ctypes.CFUNCTYPE(_CK_RV, _CK_ULONG, ctypes.POINTER(_SessionInfo))(
            functions.C_GetSessionInfo)
        self.get_attribute_value = ctypes.CFUNCTYPE(_CK_RV, _CK_ULONG, _CK_ULONG, ctypes.POINTER(_Attribute),
                                                    _CK_ULONG)(functions.C_GetAttributeValue)
        self.sign_init = ctypes.CFUNCTYPE(_CK_RV, _CK_ULONG, ctypes.POINTER(_Mechanism), _CK_ULONG)(
            functions.C_SignInit)
        self.sign_call = ctypes.CFUNCTYPE(_CK_RV, _CK_ULONG, ctypes.c_char_p, _CK_ULONG, ctypes.c_void_p,
                                          ctypes.POINTER(_CK_ULONG))(functions.C_Sign)

    def private_key_id(self, session_handle: int, object_handle: int) -> bytes | None:
        """The CKA_ID of ``object_handle`` if it is a private key; None for another class. Raises PKCS11Error."""
        object_class = _CK_ULONG()
        identifier = ctypes.create_string_buffer(64)
        template = (_Attribute * 2)(_Attribute(_CKA_CLASS, ctypes.cast(ctypes.byref(object_class), ctypes.c_void_p),
                                               ctypes.sizeof(object_class)),
                                    _Attribute(_CKA_ID, ctypes.cast(identifier, ctypes.c_void_p), len(identifier)))
        rv = self.get_attribute_value(session_handle, object_handle, template, 2)
        if rv != _CKR_OK:
            raise _error(rv, "C_GetAttributeValue")
        if object_class.value != _CKO_PRIVATE_KEY:
            return None
        return identifier.raw[:template[1].ulValueLen]

    def booleans(self, session_handle: int, object_handle: int, types: list[int]) -> dict[int, bool]:
        """The CK_BBOOL attributes ``types`` of an object (False for one it does not have); raises PKCS11Error."""
        values = (ctypes.c_ubyte * len(types))()
        template = (_Attribute * len(types))(*(
            _Attribute(kind, ctypes.cast(ctypes.byref(values, n), ctypes.c_void_p), 1) for n, kind in enumerate(types)))
        rv = self.get_attribute_value(session_handle, object_handle, template, len(types))
        if rv not in (_CKR_OK, _CKR_ATTRIBUTE_SENSITIVE, _CKR_ATTRIBUTE_TYPE_INVALID):
            raise _error(rv, "C_GetAttributeValue")
        return {kind: template[n].ulValueLen == 1 and bool(values[n]) for n, kind in enumerate(types)}

    def sign(self, session_handle: int, key_handle: int, mechanism: int, data: bytes,
             parameter: ctypes.Structure | None = None) -> bytes:
        """C_SignInit and C_Sign with the object ``key_handle`` in the session; raises PKCS11Error."""
        described = _Mechanism(mechanism, ctypes.cast(ctypes.byref(parameter), ctypes.c_void_p) if parameter else None,
                               ctypes.sizeof(parameter) if parameter else 0)
        rv = self.sign_init(session_handle, ctypes.byref(described), key_handle)
        if rv != _CKR_OK:
            raise _error(rv, "C_SignInit")
        length = _CK_ULONG(1024)  # RSA-4096 makes 512 bytes, ECDSA P-384 96
        output = ctypes.create_string_buffer(length.value)
        rv = self.sign_call(session_handle, data, len(data), output, ctypes.byref(length))
        if rv == _CKR_BUFFER_TOO_SMALL:  # the operation stays active: call again with room for it
            output = ctypes.create_string_buffer(length.value)
            rv = self.sign_call(session_handle, data, len(data), output, ctypes.byref(length))
        if rv != _CKR_OK:
            raise _error(rv, "C_Sign")
        return output.raw[:length.value]

    def reinitialize_for_threads(self) -> bool:
        """Re-initialise with CKF_OS_LOCKING_OK; False if the module cannot lock (then it is single-threaded again).

        Only right after python-pkcs11 initialised the module and before anyone
        opened a session: finalising ends every session of the process.
        """
        rv = self.finalize(None)
        if rv != _CKR_OK:
            raise OSError(f"C_Finalize returned 0x{rv:x}")
        args = _InitializeArgs(flags=_CKF_OS_LOCKING_OK)
        rv = self.initialize(ctypes.byref(args))
        if rv == _CKR_OK:
            return True
        restored = self.initialize(None)
        if restored not in (_CKR_OK, _CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise OSError(f"C_Initialize returned 0x{restored:x}")
        if rv != _CKR_CANT_LOCK:
            logger.warning("the PKCS#11 module refused C_Initialize with CKF_OS_LOCKING_OK (0x%x)", rv)
        return False

    def logged_in(self, session_handle: int) -> bool:
        info = _SessionInfo()
        rv = self.get_session_info(session_handle, ctypes.byref(info))
        if rv != _CKR_OK:
            raise OSError(f"C_GetSessionInfo returned 0x{rv:x}")
        return info.state in (_CKS_RW_USER_FUNCTIONS, _CKS_RO_USER_FUNCTIONS)


_modules_lock = threading.Lock()
_modules: dict[str, tuple[Any, _Module, bool]] = {}  # path -> (python-pkcs11 lib, function list, multi-threaded)
_open_tokens: dict[str, int] = {}  # path -> Tokens of this process open on the module


def _forget_module(path: str) -> None:
    """Finalise and unload the module ``path`` if no Token of this process has it open (else nothing)."""
    with _modules_lock:
        if _open_tokens.get(path, 0) or path not in _modules:
            return
        _modules.pop(path)
        try:
            pkcs11.unload(path)
        except (p11.PKCS11Error, KeyError, AttributeError) as error:
            logger.warning("could not unload the PKCS#11 module %s (%s)", path, type(error).__name__)


def _load_module(path: str) -> tuple[Any, _Module, bool]:
    """python-pkcs11's lib for ``path``, our function list for it, and whether it may be called from many threads."""
    with _modules_lock:
        loaded = getattr(pkcs11, "_loaded", None)  # python-pkcs11's cache of loaded modules, one per path
        before = loaded.get(path) if isinstance(loaded, dict) else _modules.get(path, (None,))[0]
        fresh = before is None or not before.initialized
        try:
            lib = pkcs11.lib(path)
        except p11.PKCS11Error as error:
            if type(error) is p11.PKCS11Error and "loading" in str(error):
                raise HSMError("ModuleNotFound", f"cannot load the PKCS#11 module: {error}") from None
            raise HSMError("DeviceError", f"the PKCS#11 module {path} failed to initialise "
                                          f"({type(error).__name__} {error})".rstrip()) from None
        known = _modules.get(path)
        if known is not None and known[0] is lib and not fresh:
            return known
        try:
            module = _Module(path)
        except (OSError, AttributeError) as error:
            raise HSMError("ModuleNotFound", f"{path} is not a PKCS#11 module: {error}") from None
        threaded = False
        if fresh:
            try:
                threaded = module.reinitialize_for_threads()
            except OSError as error:
                raise HSMError("DeviceError", f"re-initialising the PKCS#11 module {path} failed: {error}") from None
        else:
            logger.warning("the PKCS#11 module %s was initialised by other code in this process; "
                           "using one session", path)
        _modules[path] = (lib, module, threaded)
        return lib, module, threaded


# --------------------------------------------------------------------------- the token


class _Pooled:
    """A session of the pool, and whether it broke (then it is replaced when given back)."""

    __slots__ = ("session", "broken", "audit_key")

    def __init__(self, session: Any) -> None:
        self.session = session
        self.broken = False
        self.audit_key: Any = None  # the audit MAC key's object, found through this session


# Errors after which a session is not worth keeping: it is replaced when given back.
_SESSION_LOST = (p11.SessionHandleInvalid, p11.SessionClosed, p11.UserNotLoggedIn, p11.DeviceRemoved,
                 p11.TokenNotPresent)
_HANDLE_STALE = (p11.ObjectHandleInvalid, p11.KeyHandleInvalid)


def _object_class_name(value: Any) -> str:
    try:
        return ObjectClass(value).name.lower()
    except ValueError:
        return f"0x{int(value):x}"


class Token:
    """A PKCS#11 token, logged in as its user, with a bounded pool of sessions.

    Methods block; they are safe to call from as many threads as you like
    (callers beyond the pool size wait for a session).
    """

    def __init__(self, *, module_path: str, token_label: str, pin: str, sessions: int = 4) -> None:
        if sessions < 1:
            raise ValueError("a token needs at least one session")
        self.module_path = module_path
        self.token_label = token_label
        self.sessions = sessions
        self.__pin = pin
        self._lock = threading.Lock()        # open/close
        self._admin_lock = threading.Lock()  # generate/destroy: check-then-act on the token
        self._pool: queue.Queue[_Pooled] | None = None
        self._size = 0
        self._token: Any = None
        self._module: _Module | None = None
        self._logged_in_here = False
        # CKA_ID -> (private key object handle, is EC); None where several private keys carry the ID.
        # Object handles are the application's, valid in every session; an entry is checked before use.
        self._index: dict[bytes, tuple[int, bool] | None] = {}
        self._public_ids: set[bytes] | None = None  # CKA_IDs of the public keys; None: not listed
        #: algorithm -> what the token lacks for it (see :func:`lacking`), read at open
        self.lacking: dict[str, list[str]] = {}
        self._mechanisms: frozenset[int] | None = None
        self._index_lock = threading.Lock()
        self._owners: dict[int, _Pooled] = {}  # session handle -> the pooled session that opened it
        self._owners_lock = threading.Lock()

    def __repr__(self) -> str:
        state = f"open, {self._size} sessions" if self._pool is not None else "closed"
        return f"<Token {self.token_label!r} module={self.module_path!r} {state}>"

    # ------------------------------------------------------------------ open / close

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    def open(self) -> None:
        """Load the module, find the token by label, log in and open the session pool."""
        with self._lock:
            if self._pool is not None:
                return
            if os.sep in self.module_path and not os.path.exists(self.module_path):
                raise HSMError("ModuleNotFound", f"the PKCS#11 module {self.module_path} does not exist")
            lib, module, threaded = _load_module(self.module_path)
            try:
                token = lib.get_token(token_label=self.token_label)
            except p11.NoSuchToken:
                # A module lists its slots when initialised (SoftHSM2 reads its token directory then): one
                # re-initialised next time sees a token inserted or created since, unless this process holds
                # sessions of the module open (finalising would end them).
                _forget_module(self.module_path)
                raise HSMError("TokenNotFound", f"no token labelled {self.token_label!r} in "
                                                f"{self.module_path}") from None
            except p11.MultipleTokensReturned:
                raise HSMError("TokenNotFound", f"several tokens are labelled {self.token_label!r}; "
                                                "token labels must be unique") from None
            except p11.PKCS11Error as error:
                raise HSMError("DeviceError", f"listing the tokens failed ({type(error).__name__})") from None
            size = self.sessions if threaded else 1
            if size < self.sessions:
                logger.warning("the PKCS#11 module cannot be called from several threads: using one session, not %d",
                               self.sessions)
            opened: list[Any] = []
            try:
                for _ in range(size):
                    opened.append(token.open(rw=True))
                self._logged_in_here = self._login(module, opened[0].handle)
            except HSMError:
                self._close_sessions(opened)
                raise
            except p11.PKCS11Error as error:
                self._close_sessions(opened)
                if isinstance(error, p11.SessionCount):
                    raise HSMError("DeviceError", f"the token would not open {size} sessions (CKR_SESSION_COUNT); "
                                                  "lower the pool size") from None
                if isinstance(error, p11.TokenNotPresent | p11.TokenNotRecognised):
                    raise HSMError("TokenNotFound", f"the token {self.token_label!r} is gone") from None
                raise HSMError("DeviceError", f"opening sessions failed ({type(error).__name__})") from None
            pool: queue.Queue[_Pooled] = queue.Queue()
            self._owners = {}
            for session in opened:
                pooled = _Pooled(session)
                self._own(pooled)
                pool.put(pooled)
            self._token, self._module, self._size = token, module, size
            self._index, self._public_ids = self._read_index(opened[0])
            self.lacking, self._mechanisms = lacking(token.slot)
            self._pool = pool
            with _modules_lock:
                _open_tokens[self.module_path] = _open_tokens.get(self.module_path, 0) + 1

    def _login(self, module: _Module, session_handle: int) -> bool:
        """Log the application in as the token's user; True if this call did (False: it already was)."""
        try:
            if module.logged_in(session_handle):
                # Login state is per process: another Token for this token is open here.
                return False
        except OSError as error:
            raise HSMError("DeviceError", f"reading the session state failed: {error}") from None
        pin = self.__pin.encode()
        rv = module.login(session_handle, _CKU_USER, pin, len(pin))
        if rv == _CKR_OK:
            return True
        if rv == _CKR_USER_ALREADY_LOGGED_IN:
            return False
        reason, message = _LOGIN_FAILURES.get(rv, ("DeviceError", f"C_Login failed (CKR 0x{rv:x})"))
        raise HSMError(reason, f"cannot log in to the token {self.token_label!r}: {message}")

    @staticmethod
    def _close_sessions(sessions: list[Any]) -> None:
        for session in sessions:
            try:
                session.close()  # opened without a PIN, so python-pkcs11 does not log out here
            except p11.PKCS11Error:
                pass

    def close(self, *, timeout: float = 30.0) -> None:
        """Log out and close the sessions (waiting up to ``timeout`` seconds for borrowed ones). Idempotent."""
        with self._lock:
            pool, self._pool = self._pool, None
            if pool is None:
                return
            with _modules_lock:
                _open_tokens[self.module_path] -= 1
            collected: list[_Pooled] = []
            for _ in range(self._size):
                try:
                    collected.append(pool.get(timeout=timeout))
                except queue.Empty:
                    logger.warning("closing the token with sessions still in use")
                    break
            if self._logged_in_here and collected and self._module is not None:
                rv = self._module.logout(collected[0].session.handle)
                if rv not in (_CKR_OK, _CKR_USER_NOT_LOGGED_IN):
                    logger.warning("C_Logout returned 0x%x", rv)
            self._logged_in_here = False
            with self._owners_lock:
                owners, self._owners = self._owners, {}
            self._close_sessions([pooled.session for pooled in collected
                                  if owners.get(pooled.session.handle) is pooled])
            self._token = None

    # ------------------------------------------------------------------ the pool

    def _borrow(self) -> tuple[queue.Queue[_Pooled], _Pooled]:
        pool = self._pool
        if pool is None:
            raise HSMError("DeviceError", f"the token {self.token_label!r} is not open")
        return pool, self._take(pool)

    def _take(self, pool: queue.Queue[_Pooled]) -> _Pooled:
        """A session from the pool, replaced first if it is known to be broken."""
        pooled = pool.get()
        if pooled.broken and self._pool is pool:
            pooled = self._replace(pooled)
        return pooled

    def _give_back(self, pool: queue.Queue[_Pooled], pooled: _Pooled) -> None:
        if pooled.broken and self._pool is pool:
            pooled = self._replace(pooled)
        pool.put(pooled)

    def _replace(self, pooled: _Pooled) -> _Pooled:
        """A fresh session (logged in again if the login was lost) for a broken one; still broken if that fails.

        The broken session is closed before the new one is opened: a token may
        hand a freed handle out again (openCryptoki does), and closing the old
        handle after opening would then close the new session.
        """
        token, module = self._token, self._module
        with self._owners_lock:
            owned = self._owners.get(pooled.session.handle) is pooled
            if owned:
                del self._owners[pooled.session.handle]
        if owned:  # a handle another session has since been given is not this one's to close
            self._close_sessions([pooled.session])
        try:
            session = token.open(rw=True)
        except (p11.PKCS11Error, AttributeError) as error:
            logger.warning("cannot replace a broken session (%s)", type(error).__name__)
            return pooled
        try:
            if self._login(module, session.handle):
                self._logged_in_here = True
        except HSMError as error:
            logger.error("cannot log in again: %s (%s)", error, error.reason)
            self._close_sessions([session])
            return pooled
        logger.info("replaced a broken PKCS#11 session")
        fresh = _Pooled(session)
        self._own(fresh)
        return fresh

    def _own(self, pooled: _Pooled) -> None:
        """Record ``pooled`` as its handle's session; a pooled session holding the same handle is stale.

        A session closed behind the pool's back frees its handle, and a token
        may give that handle to the next session it opens (openCryptoki does):
        the stale entry must then be replaced, and must never close the handle.
        """
        with self._owners_lock:
            previous = self._owners.get(pooled.session.handle)
            if previous is not None and previous is not pooled:
                previous.broken = True
            self._owners[pooled.session.handle] = pooled

    def _failure(self, pooled: _Pooled, error: p11.PKCS11Error, operation: str,
                 handle: KeyHandle | None = None) -> HSMError:
        """The HSMError for a python-pkcs11 error, marking the session broken when it is."""
        name = type(error).__name__
        what = f"{operation} {handle.label}" if handle else operation
        if isinstance(error, _SESSION_LOST):
            pooled.broken = True
            return HSMError("DeviceError", f"{what}: the session or login was lost ({name}); retry")
        if isinstance(error, p11.DeviceMemory | p11.HostMemory):
            return HSMError("TokenFull", f"{what}: the token is out of memory ({name})")
        if isinstance(error, (*_HANDLE_STALE, p11.NoSuchKey)):
            return HSMError("KeyNotFound", f"{what}: the key is gone ({name})")
        if isinstance(error, p11.MechanismInvalid | p11.MechanismParamInvalid | p11.KeySizeRange
                      | p11.DomainParamsInvalid | p11.KeyTypeInconsistent | p11.DataLenRange | p11.DataInvalid
                      | p11.FunctionNotSupported | p11.TemplateInconsistent | p11.AttributeValueInvalid):
            return HSMError("InvalidRequest", f"{what}: the token does not support this ({name})")
        return HSMError("DeviceError", f"{what} failed ({name}{': ' + str(error) if str(error) else ''})")

    def _check_login(self, pooled: _Pooled, what: str) -> None:
        """DeviceError (and a session to replace) if the login was lost.

        Without a login the token hides private objects, so "not found" could
        otherwise mean "logged out" (an HSM restarted, a session closed).
        """
        module = self._module
        try:
            logged_in = module is not None and module.logged_in(pooled.session.handle)
        except OSError:
            logged_in = False
        if not logged_in:
            pooled.broken = True
            raise HSMError("DeviceError", f"{what}: the token session is not logged in any more; retry")

    # ------------------------------------------------------------------ lookups

    @staticmethod
    def _find(session: Any, object_id: bytes, object_class: Any = None) -> list[Any]:
        template: dict[Any, Any] = {Attribute.ID: object_id}
        if object_class is not None:
            template[Attribute.CLASS] = object_class
        return list(session.get_objects(template))  # consume fully: ends the search operation

    @staticmethod
    def _read_index(session: Any) -> tuple[dict[bytes, tuple[int, bool] | None], set[bytes] | None]:
        """(CKA_ID -> (handle, is EC) of every EC and RSA private key, the CKA_IDs of the public keys).

        A token searches by scanning its objects (SoftHSM2 reads each one), so a
        search per key costs more with every key the token holds; these two, at
        open, are the only full scans. Keys generated later are added by
        :meth:`generate`, keys destroyed removed by :meth:`destroy`; a key the
        index misses (made by another process) is searched for once.
        """
        index: dict[bytes, tuple[int, bool] | None] = {}
        try:
            for key in list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})):
                key_type = key.key_type
                if key_type not in (KeyType.EC, KeyType.RSA):
                    continue
                object_id = bytes(key[Attribute.ID])
                index[object_id] = None if object_id in index else (key.handle, key_type == KeyType.EC)
            public = {bytes(key[Attribute.ID])
                      for key in list(session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY}))}
        except p11.PKCS11Error as error:
            logger.warning("cannot list the token's keys (%s); each key is searched for on first use",
                           type(error).__name__)
            return index, None
        return index, public

    def _signing_key(self, pooled: _Pooled, handle: KeyHandle) -> tuple[int, bool]:
        """(object handle, is EC) of ``handle``'s private key, from the index or one search."""
        object_id = handle.object_id
        with self._index_lock:
            known = self._index.get(object_id, False)
        if known is None:
            raise HSMError("DeviceError", f"several private keys carry the ID of {handle.label}")
        if known:
            return known
        found = self._find(pooled.session, object_id, ObjectClass.PRIVATE_KEY)
        if not found:
            self._check_login(pooled, f"sign with {handle.label}")
            raise HSMError("KeyNotFound", f"no private key {handle.label} on the token")
        if len(found) > 1:
            raise HSMError("DeviceError", f"{len(found)} private keys carry the ID of {handle.label}")
        key = found[0]
        key_type = key.key_type
        if key_type not in (KeyType.EC, KeyType.RSA):
            raise HSMError("InvalidRequest", f"{handle.label} is a {key_type!r} key, not EC or RSA")
        entry = (key.handle, key_type == KeyType.EC)
        with self._index_lock:
            self._index[object_id] = entry
        return entry

    def _with_private_key(self, pooled: _Pooled, handle: KeyHandle, use: Callable[[int, int, bool], Any]) -> Any:
        """``use(session handle, key object handle, is EC)`` with ``handle``'s private key; raises PKCS11Error.

        The handle must still name this key: a handle freed by a deletion
        elsewhere may since name another object, and signing with another
        team's key is the one thing never to do. So its CKA_ID is read back
        before ``use`` and again after it (``use`` may make many signatures);
        a stale or foreign handle is dropped, whatever ``use`` made is thrown
        away, and the key is searched for and used once more.
        """
        module = self._module
        for attempt in (1, 2):
            entry = self._signing_key(pooled, handle)
            session = pooled.session.handle
            try:
                if module.private_key_id(session, entry[0]) != handle.object_id:
                    raise p11.ObjectHandleInvalid()
                result = use(session, *entry)
                if module.private_key_id(session, entry[0]) != handle.object_id:
                    raise p11.ObjectHandleInvalid()
                return result
            except _HANDLE_STALE:
                self._forget(handle.object_id, entry)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _forget(self, object_id: bytes, entry: tuple[int, bool] | None) -> None:
        with self._index_lock:
            if self._index.get(object_id, False) == entry:
                del self._index[object_id]

    # ------------------------------------------------------------------ operations

    def generate(self, handle: KeyHandle, *, algorithm: str) -> bytes:
        """Generate ``handle``'s key pair in the token; return its public key (DER SubjectPublicKeyInfo).

        KeyExists if objects with the handle's ID are already there.
        """
        if algorithm not in ALGORITHMS:
            raise HSMError("InvalidRequest", f"unknown algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
        if algorithm in self.lacking:
            raise HSMError("InvalidRequest", f"the token {self.token_label!r} cannot make {algorithm} keys: it lacks "
                                             f"{', '.join(self.lacking[algorithm])}")
        public_template = {Attribute.TOKEN: True, Attribute.VERIFY: True, Attribute.ENCRYPT: False,
                           Attribute.WRAP: False}
        private_template = {Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                            Attribute.EXTRACTABLE: False, Attribute.SIGN: True, Attribute.DECRYPT: False,
                            Attribute.UNWRAP: False, Attribute.DERIVE: False}
        if algorithm in _CURVES:
            key_type, key_length = KeyType.EC, None
            public_template[Attribute.EC_PARAMS] = _EC_PARAMS[algorithm]
        else:
            key_type, key_length = KeyType.RSA, _RSA_BITS[algorithm]
            public_template[Attribute.PUBLIC_EXPONENT] = b"\x01\x00\x01"
        with self._admin_lock:
            pool, pooled = self._borrow()
            try:
                self._check_login(pooled, f"generate {handle.label}")
                with self._index_lock:
                    listed = self._public_ids is not None
                    known = handle.object_id in self._index or listed and handle.object_id in self._public_ids
                if known or not listed and self._find(pooled.session, handle.object_id):
                    raise HSMError("KeyExists", f"the token already holds objects for {handle.label}")
                public, private = pooled.session.generate_keypair(
                    key_type, key_length, id=handle.object_id, label=handle.label, store=True,
                    capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                    public_template=public_template, private_template=private_template)
                with self._index_lock:
                    self._index[handle.object_id] = (private.handle, key_type == KeyType.EC)
                    if self._public_ids is not None:
                        self._public_ids.add(handle.object_id)
                return _public_key_der(public, handle)
            except p11.PKCS11Error as error:
                failure = self._failure(pooled, error, "generate", handle)
                if isinstance(error, p11.FunctionFailed | p11.GeneralError):
                    # what SoftHSM2 answers when it cannot write the new objects (its storage is full, say)
                    failure = HSMError(failure.reason, f"{failure.message}; the token could not store the key pair: "
                                                       "is its storage full?")
                raise failure from None
            finally:
                self._give_back(pool, pooled)

    def public_key(self, handle: KeyHandle) -> bytes:
        """The public key of ``handle`` as DER SubjectPublicKeyInfo; KeyNotFound if absent."""
        pool, pooled = self._borrow()
        try:
            found = self._find(pooled.session, handle.object_id, ObjectClass.PUBLIC_KEY)
            if not found:
                raise HSMError("KeyNotFound", f"no public key {handle.label} on the token")
            return _public_key_der(found[0], handle)
        except p11.PKCS11Error as error:
            raise self._failure(pooled, error, "public key of", handle) from None
        finally:
            self._give_back(pool, pooled)

    def sign(self, handle: KeyHandle, *, digest: bytes, digest_algorithm: str, rsa_padding: str = "pkcs1v15") -> bytes:
        """Sign a precomputed ``digest`` with ``handle``'s private key.

        ECDSA keys return a DER ECDSA-Sig-Value (as openssl and cosign expect)
        and ignore ``rsa_padding``. RSA keys use PKCS#1 v1.5 over the DER
        DigestInfo (``pkcs1v15``) or PSS with MGF1 of the same hash and a salt
        as long as the digest (``pss``).
        """
        return self.signing(handle, lambda sign: sign(digest, digest_algorithm), rsa_padding=rsa_padding)

    def signing(self, handle: KeyHandle, use: Callable[[Callable[[bytes, str], bytes]], T], *,
                rsa_padding: str = "pkcs1v15") -> T:
        """``use(sign)``, where ``sign(digest, digest_algorithm)`` signs as :meth:`sign` does with ``handle``'s key.

        All of ``use``'s signatures are made on one session after one lookup of
        the key: a batch of 500 digests reads the key's CKA_ID twice, not 500
        times. If the handle turns out stale afterwards, ``use`` runs once more
        (so it must not have side effects beyond what it returns).
        """
        if rsa_padding not in RSA_PADDINGS:
            raise HSMError("InvalidRequest", f"unknown RSA padding {rsa_padding!r}; use pkcs1v15 or pss")
        if rsa_padding == "pss" and self._mechanisms is not None and Mechanism.RSA_PKCS_PSS not in self._mechanisms:
            raise HSMError("InvalidRequest", f"the token {self.token_label!r} lacks CKM_RSA_PKCS_PSS: RSA-PSS "
                                             "signatures cannot be made with it")
        pool = self._pool
        if pool is None:
            raise HSMError("DeviceError", f"the token {self.token_label!r} is not open")
        module = self._module

        def with_key(session: int, key: int, is_ec: bool) -> T:
            def sign(digest: bytes, digest_algorithm: str) -> bytes:
                length = DIGEST_ALGORITHMS.get(digest_algorithm)
                if length is None:
                    raise HSMError("InvalidRequest", f"unknown digest algorithm {digest_algorithm!r}; "
                                                     f"use one of {', '.join(DIGEST_ALGORITHMS)}")
                if not isinstance(digest, bytes | bytearray) or len(digest) != length:
                    size = len(digest) if isinstance(digest, bytes | bytearray) else type(digest).__name__
                    raise HSMError("InvalidRequest", f"a {digest_algorithm} digest is {length} bytes, not {size}")
                digest = bytes(digest)
                if is_ec:
                    raw = module.sign(session, key, Mechanism.ECDSA, digest)
                    half = len(raw) // 2
                    return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
                if rsa_padding == "pkcs1v15":
                    return module.sign(session, key, Mechanism.RSA_PKCS, _DIGEST_INFO[digest_algorithm] + digest)
                return module.sign(session, key, Mechanism.RSA_PKCS_PSS, digest,
                                   _PssParams(*_PSS_PARAMS[digest_algorithm]))
            return use(sign)

        pooled = self._take(pool)
        try:
            return self._with_private_key(pooled, handle, with_key)
        except p11.PKCS11Error as error:
            raise self._failure(pooled, error, "sign with", handle) from None
        finally:
            if pooled.broken:
                self._give_back(pool, pooled)
            else:
                pool.put(pooled)

    def destroy(self, handle: KeyHandle) -> bool:
        """Destroy the private and public key objects with ``handle``'s ID; whether there were any."""
        with self._admin_lock:
            pool, pooled = self._borrow()
            try:
                self._check_login(pooled, f"destroy {handle.label}")  # else only the public key would be seen
                found = [obj for obj in self._find(pooled.session, handle.object_id)
                         if obj[Attribute.CLASS] in _KEY_CLASSES]
                # Private key first: a half-destroyed pair should not be able to sign.
                found.sort(key=lambda obj: obj[Attribute.CLASS] != ObjectClass.PRIVATE_KEY)
                for obj in found:
                    obj.destroy()
                return bool(found)
            except p11.PKCS11Error as error:
                raise self._failure(pooled, error, "destroy", handle) from None
            finally:
                with self._index_lock:
                    self._index.pop(handle.object_id, None)
                    if self._public_ids is not None:
                        self._public_ids.discard(handle.object_id)
                self._give_back(pool, pooled)

    def ensure_audit_key(self) -> None:
        """Create the audit log's MAC key in the token unless it is there (a secret that never leaves it)."""
        with self._admin_lock:
            pool, pooled = self._borrow()
            try:
                self._check_login(pooled, "find the audit key")
                if self._find(pooled.session, AUDIT_KEY_ID, ObjectClass.SECRET_KEY):
                    return
                pooled.session.generate_key(
                    KeyType.GENERIC_SECRET, 256, id=AUDIT_KEY_ID, label=AUDIT_KEY_LABEL, store=True,
                    capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                    template={Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                              Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: False, Attribute.DECRYPT: False,
                              Attribute.WRAP: False, Attribute.UNWRAP: False, Attribute.DERIVE: False})
                logger.info("created the audit MAC key in the token")
            except p11.PKCS11Error as error:
                raise self._failure(pooled, error, "create the audit key") from None
            finally:
                self._give_back(pool, pooled)

    def audit_mac(self, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` with the audit key: only a holder of the token's PIN can make one."""
        pool = self._pool
        if pool is None:
            raise HSMError("DeviceError", f"the token {self.token_label!r} is not open")
        pooled = self._take(pool)
        try:
            if pooled.audit_key is None:
                found = self._find(pooled.session, AUDIT_KEY_ID, ObjectClass.SECRET_KEY)
                if not found:
                    self._check_login(pooled, "MAC with the audit key")
                    raise HSMError("KeyNotFound", "the audit MAC key is not in the token")
                pooled.audit_key = found[0]
            return pooled.audit_key.sign(data, mechanism=Mechanism.SHA256_HMAC)
        except p11.PKCS11Error as error:
            pooled.audit_key = None
            raise self._failure(pooled, error, "MAC with the audit key") from None
        finally:
            if pooled.broken:
                self._give_back(pool, pooled)
            else:
                pool.put(pooled)

    def list_objects(self) -> list[TokenObject]:
        """Every object on the token visible to its user, keyroom's or not."""
        pool, pooled = self._borrow()
        try:
            self._check_login(pooled, "list objects")
            result = []
            for obj in list(pooled.session.get_objects()):
                label, object_id, object_class = "", b"", None
                for attribute in (Attribute.CLASS, Attribute.LABEL, Attribute.ID):
                    try:
                        value = obj[attribute]
                    except (p11.AttributeTypeInvalid, p11.AttributeSensitive):
                        continue
                    if attribute == Attribute.CLASS:
                        object_class = value
                    elif attribute == Attribute.LABEL:
                        label = value or ""
                    else:
                        object_id = bytes(value or b"")
                handle = KeyHandle.from_label(label)
                if handle is not None and handle.object_id != object_id:
                    handle = None
                result.append(TokenObject(label=label, object_id=object_id.hex(),
                                          object_class=_object_class_name(object_class)
                                          if object_class is not None else "unknown",
                                          handle=handle))
            return result
        except p11.PKCS11Error as error:
            raise self._failure(pooled, error, "list objects") from None
        finally:
            self._give_back(pool, pooled)

    def key_attributes(self, handle: KeyHandle) -> dict[str, bool]:
        """The private key's SENSITIVE, ALWAYS_SENSITIVE, EXTRACTABLE, NEVER_EXTRACTABLE, TOKEN and PRIVATE."""
        pool, pooled = self._borrow()
        kinds = [int(attribute) for attribute in _KEY_ATTRIBUTES.values()]
        try:
            values = self._with_private_key(
                pooled, handle, lambda session, key, _: self._module.booleans(session, key, kinds))
            return {name: values[int(attribute)] for name, attribute in _KEY_ATTRIBUTES.items()}
        except p11.PKCS11Error as error:
            raise self._failure(pooled, error, "read attributes of", handle) from None
        finally:
            self._give_back(pool, pooled)


def _public_key_der(public: Any, handle: KeyHandle) -> bytes:
    """DER SubjectPublicKeyInfo of a public key object (EC on P-256/P-384, or RSA)."""
    key_type = public[Attribute.KEY_TYPE]
    if key_type == KeyType.EC:
        params = bytes(public[Attribute.EC_PARAMS])
        curve = _CURVE_BY_PARAMS.get(params)
        if curve is None:
            raise HSMError("InvalidRequest", f"{handle.label} is on a curve keyroom does not use")
        point = bytes(public[Attribute.EC_POINT])
        size = (curve.key_size + 7) // 8
        if len(point) not in (1 + 2 * size, 1 + size) and len(point) > 2:
            # The standard wraps the point in a DER OCTET STRING; some modules return it bare.
            header = 2 if point[1] < 0x80 else 2 + (point[1] & 0x7F)
            point = point[header:]
        try:
            key: Any = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        except ValueError:
            raise HSMError("DeviceError", f"the token returned an invalid EC point for {handle.label}") from None
    elif key_type == KeyType.RSA:
        key = rsa.RSAPublicNumbers(int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
                                   int.from_bytes(public[Attribute.MODULUS], "big")).public_key()
    else:
        raise HSMError("InvalidRequest", f"{handle.label} is a {key_type!r} key, not EC or RSA")
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

"""How the signer's token layer names python-pkcs11's errors: every PKCS#11 error becomes an HSMError with a
reason the service maps to a status, never a Python error of its own (TypeError, AttributeError)."""
from __future__ import annotations

import pkcs11.exceptions as p11
import pytest

from keyroom.signer import hsm


@pytest.mark.parametrize(("error", "reason", "broken"), [
    (p11.SessionHandleInvalid(), "DeviceError", True),
    (p11.UserNotLoggedIn(), "DeviceError", True),
    (p11.DeviceMemory(), "TokenFull", False),
    (p11.ObjectHandleInvalid(), "KeyNotFound", False),
    (p11.KeyHandleInvalid(), "KeyNotFound", False),
    (p11.NoSuchKey(), "KeyNotFound", False),
    (p11.MechanismInvalid(), "InvalidRequest", False),
    (p11.FunctionNotSupported(), "InvalidRequest", False),
    (p11.DeviceError(), "DeviceError", False),
    (p11.GeneralError(), "DeviceError", False),
])
def test_each_pkcs11_error_is_an_hsm_error_with_its_reason(error, reason, broken):
    token = hsm.Token(module_path="/nonexistent/libpkcs11.so", token_label="t", pin="1234")
    pooled = hsm._Pooled(session=None)
    handle = hsm.KeyHandle(namespace="team-a", name="key", uid="0f4c3d2e-1b2a-4c5d-8e9f-0a1b2c3d4e5f", version=1)
    failure = token._failure(pooled, error, "sign with", handle)
    assert isinstance(failure, hsm.HSMError)
    assert failure.reason == reason
    assert handle.label in str(failure)
    assert pooled.broken is broken  # only a lost session or login is replaced

"""The signer: the only part of keyroom that talks to the HSM (``hsm.py`` imports pkcs11)."""

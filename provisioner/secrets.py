"""The service's secret key: encrypting secrets at rest with it, and keys derived from it.

The key is a Fernet key from ``PROVISIONER_SECRET_KEY`` or a key file (``secret_key_file``,
by default ``<data_dir>/secret.key``, made 0600 on first start). It is never written to the
state database, so a copy of the database alone reveals no cluster's credentials. Any other
key the service needs (say, to sign short-lived dashboard links) is derived from it with
HKDF under a label of its own (:meth:`Keyring.derive`), so one secret is all there is to keep.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import TYPE_CHECKING, Any

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from provisioner.files import keep_secret

if TYPE_CHECKING:
    from provisioner.settings import Settings

MAKE_ONE = "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"


class SecretKeyError(ValueError):
    """The secret key is missing, malformed or not the one the data was sealed with."""


class WrongKey(SecretKeyError):
    """A value cannot be decrypted with this key (another key sealed it, or it was altered)."""


def key_source(settings: Settings) -> str:
    """Where the key comes from, in the words an operator sets it with (for error messages)."""
    if settings.secret_key is not None:
        return "PROVISIONER_SECRET_KEY"
    return f"secret_key_file {settings.key_file} (PROVISIONER_SECRET_KEY_FILE, --secret-key-file)"


def load_or_create_key(settings: Settings) -> bytes:
    """The Fernet key from ``PROVISIONER_SECRET_KEY``, else from the key file (made on first
    start). SecretKeyError, naming the setting, if it is not a Fernet key."""
    if settings.secret_key is not None:
        value = settings.secret_key.get_secret_value()
    else:
        value = keep_secret(settings.key_file, lambda: Fernet.generate_key().decode())
    try:
        Fernet(value)
    except (ValueError, binascii.Error):
        raise SecretKeyError(
            f"{key_source(settings)}: not a Fernet key (32 bytes, URL-safe base64); "
            f"make one with: {MAKE_ONE}") from None
    return value.encode()


class Keyring:
    """Seals JSON values with the service's key and derives purpose-bound keys from it.

    Encryption and decryption are CPU work: call them off the event loop (the store does,
    in its own threads).
    """

    def __init__(self, key: bytes, source: str = "the secret key") -> None:
        self._fernet = Fernet(key)
        self._master = base64.urlsafe_b64decode(key)
        #: How the operator sets this key, for messages about it.
        self.source = source

    def encrypt_json(self, obj: Any) -> str:
        """``obj`` as JSON, encrypted and authenticated (a Fernet token, ASCII)."""
        return self._fernet.encrypt(json.dumps(obj, separators=(",", ":")).encode()).decode()

    def decrypt_json(self, token: str) -> Any:
        """The value :meth:`encrypt_json` sealed; WrongKey if this key did not seal it."""
        try:
            return json.loads(self._fernet.decrypt(token.encode()))
        except (InvalidToken, ValueError):
            raise WrongKey(f"cannot be decrypted with the key from {self.source}") from None

    def derive(self, label: str) -> bytes:
        """A 32-byte key for one purpose (e.g. ``derive("dashboard-links")`` to sign links):
        independent of every other label's and of the encryption key."""
        if not label:
            raise ValueError("derive needs a label naming the key's purpose")
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"dask-provisioner/" + label.encode()).derive(self._master)

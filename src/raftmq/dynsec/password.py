"""Password hashes as Mosquitto's dynamic-security plugin stores them (spec/dynsec.md §8).

Two on-disk forms exist:

- Mosquitto 2.0: three keys on the client object, ``password`` (base64 of a
  64-byte PBKDF2-HMAC-SHA512 key), ``salt`` (base64 of 12 random bytes) and
  ``iterations`` (101).  This is what raftmq writes for new passwords, so an
  exported file keeps working with Mosquitto 2.0 and 2.1.
- Mosquitto 2.1: one key, ``encoded_password``: ``$7$<iterations>$<salt>$<hash>``
  (PBKDF2-HMAC-SHA512) or ``$6$<salt>$<hash>`` (one SHA-512 over password ‖ salt).
  raftmq reads both and writes a loaded ``encoded_password`` back unchanged.

A hash is computed by whoever *proposes* a change (random salt), never by the
state machine, which must stay deterministic: only the resulting
:class:`PasswordHash` travels in the replicated change.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any

SALT_LEN = 12  # Mosquitto 2.0 (spec §8.1); 2.1 uses 64
ITERATIONS = 101  # Mosquitto 2.0 default for everything it creates
KEY_LEN = 64


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """A stored password.  ``encoded`` is set when it was loaded from the 2.1 form."""

    scheme: str  # "pbkdf2-sha512" or "sha512"
    salt: bytes
    key: bytes
    iterations: int = ITERATIONS
    encoded: str | None = None

    def verify(self, password: bytes) -> bool:
        """Whether ``password`` (raw CONNECT bytes) is this password, in constant time."""
        password = password.split(b"\0", 1)[0]  # Mosquitto reads it as a C string
        if self.scheme == "sha512":
            digest = hashlib.sha512(password + self.salt).digest()
        else:
            digest = hashlib.pbkdf2_hmac(
                "sha512", password, self.salt, self.iterations, dklen=len(self.key)
            )
        return hmac.compare_digest(digest, self.key)

    def to_json(self) -> dict[str, Any]:
        """The keys to put on the client object of the document."""
        if self.encoded is not None:
            return {"encoded_password": self.encoded}
        return {
            "password": base64.b64encode(self.key).decode(),
            "salt": base64.b64encode(self.salt).decode(),
            "iterations": self.iterations,
        }


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> PasswordHash:
    """Hash a new password the way Mosquitto 2.0 does: PBKDF2-HMAC-SHA512, 12-byte salt, 101 rounds."""
    if salt is None:
        salt = os.urandom(SALT_LEN)
    raw = password.encode("utf-8").split(b"\0", 1)[0]
    key = hashlib.pbkdf2_hmac("sha512", raw, salt, iterations, dklen=KEY_LEN)
    return PasswordHash("pbkdf2-sha512", salt, key, iterations)


def _b64(text: Any) -> bytes | None:
    if not isinstance(text, str):
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def from_client_json(client: dict[str, Any]) -> PasswordHash | None:
    """The password of a client object (keys already lower-cased), or None if it has none.

    A broken value leaves the client without a usable password (Mosquitto 2.1's
    behaviour; 2.0 drops the whole client, which loses more than it protects).
    """
    encoded = client.get("encoded_password")
    if isinstance(encoded, str):
        return parse_encoded(encoded)
    stored, salt, iterations = client.get("password"), client.get("salt"), client.get("iterations")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations <= 0:
        return None
    key, salt_bytes = _b64(stored), _b64(salt)
    if not key or not salt_bytes:
        return None
    return PasswordHash("pbkdf2-sha512", salt_bytes, key, iterations)


def parse_encoded(encoded: str) -> PasswordHash | None:
    """Parse Mosquitto 2.1's ``encoded_password`` (``$7$`` and ``$6$`` forms)."""
    parts = encoded.split("$")
    if len(parts) == 5 and parts[0] == "" and parts[1] == "7":
        try:
            iterations = int(parts[2])
        except ValueError:
            return None
        salt, key = _b64(parts[3]), _b64(parts[4])
        if iterations <= 0 or not salt or not key:
            return None
        return PasswordHash("pbkdf2-sha512", salt, key, iterations, encoded)
    if len(parts) == 4 and parts[0] == "" and parts[1] == "6":
        salt, key = _b64(parts[2]), _b64(parts[3])
        if not salt or not key:
            return None
        return PasswordHash("sha512", salt, key, 1, encoded)
    return None  # $argon2id$ and anything else: not supported, the client cannot log in

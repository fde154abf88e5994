"""Per-identity broker passwords and Mosquitto's password-file hash (``$7$``, PBKDF2-SHA512).

Mosquitto 2.x reads ``user:$7$<iterations>$<base64 salt>$<base64 hash>`` lines, where the hash is
PBKDF2-HMAC-SHA512 of the password with that salt, 64 bytes long; ``mosquitto_passwd`` writes
12-byte salts and 101 iterations. The passwords we generate are 256-bit random tokens, so the
iteration count guards little; we use more than the default anyway, as it costs only a few
milliseconds per CONNECT.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

__all__ = ["HASH_ITERATIONS", "mosquitto_hash", "new_password", "verify_mosquitto_hash"]

HASH_ITERATIONS = 1000
_SALT_BYTES = 12
_HASH_BYTES = 64


def new_password() -> str:
    """A random password of 43 URL-safe characters (256 bits): no escaping in a broker URL."""
    return secrets.token_urlsafe(32)


def mosquitto_hash(
    password: str, *, salt: bytes | None = None, iterations: int = HASH_ITERATIONS
) -> str:
    """The ``$7$`` hash of ``password`` as ``mosquitto_passwd`` writes it."""
    if iterations < 1:
        raise ValueError(f"iterations must be positive, got {iterations}")
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, _HASH_BYTES)
    return f"$7${iterations}${_b64(salt)}${_b64(digest)}"


def verify_mosquitto_hash(password: str, encoded: str) -> bool:
    """Whether ``encoded`` (a ``$7$`` hash) was made from ``password``."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[:2] != ["", "7"] or not parts[2].isdigit():
        raise ValueError("not a Mosquitto $7$ password hash")
    salt = base64.b64decode(parts[3], validate=True)
    expected = mosquitto_hash(password, salt=salt, iterations=int(parts[2]))
    return secrets.compare_digest(expected, encoded)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")

"""The page's admin password: PBKDF2-SHA256 (hashlib), stored in UCI as one string.

Format: ``pbkdf2_sha256$ITERATIONS$SALT_B64$HASH_B64`` (what ``igdpcp hash-password``
prints). An empty or malformed setting means no admin login: admin functions are off.
"""

from __future__ import annotations

import base64
import os

SCHEME = "pbkdf2_sha256"
ITERATIONS = 200_000  # about 0.3 s on a small router's CPU per login attempt
MIN_ITERATIONS = 10_000
MAX_ITERATIONS = 5_000_000  # a typo in UCI must not make each login take minutes
SALT_BYTES = 16
MIN_PASSWORD = 8  # characters; what igdpcp hash-password and LuCI accept


def make_hash(password: str, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """The UCI value for ``password``."""
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    import hashlib  # here only: hashlib loads OpenSSL, which controld needs for nothing else

    dk = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"{SCHEME}${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def parse_hash(stored: str) -> tuple[int, bytes, bytes] | None:
    """(iterations, salt, hash) of a stored value, or None if it is not one."""
    parts = stored.strip().split("$")
    if len(parts) != 4 or parts[0] != SCHEME or not parts[1].isascii() or not parts[1].isdigit():
        return None
    try:
        salt, dk = base64.b64decode(parts[2], validate=True), base64.b64decode(parts[3], validate=True)
    except ValueError:
        return None
    iterations = int(parts[1])
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS or not salt or len(dk) != 32:
        return None
    return iterations, salt, dk


def verify(password: str, stored: str) -> bool:
    """True if ``password`` matches the stored value (constant-time compare)."""
    parsed = parse_hash(stored)
    if parsed is None:
        return False
    iterations, salt, dk = parsed
    import hashlib  # at the first login, not at every start (OpenSSL)
    import hmac

    return hmac.compare_digest(hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations), dk)

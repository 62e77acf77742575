"""Passwords, session cookies and API tokens: maintained libraries only, no crypto of ours.

- passwords: argon2id (argon2-cffi), rehashed on login when its parameters change;
- sessions: a cookie signed with the settings' secret key (itsdangerous), holding the
  user id and a fragment of the password hash, so that changing a password ends every
  session made with the old one;
- API tokens: random, shown once; only their SHA-256 is stored (a token has 256 bits of
  entropy, so a fast hash is enough, and lookups stay one indexed query).
"""

from __future__ import annotations

import hashlib
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, URLSafeTimedSerializer

SESSION_COOKIE = "infini_session"
SESSION_MAX_AGE_S = 14 * 24 * 3600
TOKEN_PREFIX = "idq_"  # recognisable in logs and secret scanners

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    return _hasher.check_needs_rehash(stored_hash)


# a real hash to verify against when the email is unknown: both paths take as long
DUMMY_HASH = _hasher.hash("not a password of anyone")


class SessionSigner:
    def __init__(self, secret_key: str):
        self._s = URLSafeTimedSerializer(secret_key, salt="infini-session")

    def dumps(self, user_id: int, password_hash: str) -> str:
        return self._s.dumps({"uid": user_id, "pw": _pw_tag(password_hash)})

    def loads(self, cookie: str | None) -> tuple[int, str] | None:
        """(user id, password tag) of a valid, unexpired cookie; else None."""
        if not cookie:
            return None
        try:
            data = self._s.loads(cookie, max_age=SESSION_MAX_AGE_S)
        except BadSignature:  # also covers SignatureExpired
            return None
        if not isinstance(data, dict) or not isinstance(data.get("uid"), int):
            return None
        return data["uid"], str(data.get("pw", ""))


def _pw_tag(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


def session_matches(password_hash: str, tag: str) -> bool:
    return secrets.compare_digest(_pw_tag(password_hash), tag)


def new_api_token() -> tuple[str, str]:
    """(the token to show once, the hash to store)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()

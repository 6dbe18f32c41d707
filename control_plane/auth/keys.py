"""API key material: generation, hashing, display prefixes."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "tml-"  # the tinker SDK refuses keys without it
DISPLAY_PREFIX_LEN = 12


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    # Keys carry 256 bits of entropy, so a fast hash is sufficient and keeps lookups O(1).
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    return key[:DISPLAY_PREFIX_LEN]


def looks_like_key(key: str) -> bool:
    return key.startswith(KEY_PREFIX) and 8 <= len(key) <= 256

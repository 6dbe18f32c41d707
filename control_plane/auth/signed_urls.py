"""Signed, expiring download URLs for objects in the local-directory store.

S3 stores presign their own URLs; a local directory cannot, so the API serves those downloads
itself at ``/v1/downloads/{token}`` where the token is the object key and expiry, HMAC-signed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time


class InvalidSignature(ValueError):
    pass


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class UrlSigner:
    def __init__(self, secret: bytes, base_url: str) -> None:
        self._secret = secret
        self._base = base_url.rstrip("/")

    def sign(self, key: str, expires_in_s: int, now: float | None = None) -> str:
        exp = int((now or time.time()) + expires_in_s)
        payload = _b64(json.dumps({"k": key, "e": exp}, separators=(",", ":")).encode())
        sig = _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())
        return f"{self._base}/v1/downloads/{payload}.{sig}"

    def verify(self, token: str, now: float | None = None) -> str:
        payload, _, sig = token.partition(".")
        # compared as bytes: compare_digest refuses non-ASCII str, and any text encodes
        raw_payload = payload.encode("utf-8", "surrogatepass")
        expected = _b64(hmac.new(self._secret, raw_payload, hashlib.sha256).digest()).encode()
        if not sig or not hmac.compare_digest(sig.encode("utf-8", "surrogatepass"), expected):
            raise InvalidSignature("invalid download signature")
        data = json.loads(_unb64(payload))
        if (now or time.time()) > data["e"]:
            raise InvalidSignature("download URL expired")
        return str(data["k"])

"""API keys and the client ids the server derives from them (shared by the server, the monitor's
CLI, the lab and the tests; the client never needs it).

A key is never stored or logged in clear. With a keys file the client id is the key's name; in
open mode (any key is a client) it is a keyed hash of the key under the server's secret:
``client_id_for_key(key, secret)`` = "k-" + the first 16 hex digits of
HMAC-SHA256(secret, "modelguard/client-id:" + key). Without the secret nobody can map a logged
id back to a key, or a key to its id; with it, an operator can find a client by its key
(``python -m monitor show --key KEY`` or ``client_id_for_key``).
"""
from __future__ import annotations

import hashlib
import hmac

MAX_KEY_CHARS = 256        # longer keys are rejected (UNAUTHENTICATED) before any hashing
MIN_SECRET_BYTES = 32      # the server refuses a shorter secret unless started with --dev-secret
OPEN_ID_PREFIX = "k-"
OPEN_ID_HEX = 16
_ID_CONTEXT = b"modelguard/client-id:"
_LOOKUP_CONTEXT = b"modelguard/key-lookup:"


def _secret_bytes(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def key_problem(key: str) -> str | None:
    """Why ``key`` is not an acceptable API key (None when it is): 1 to MAX_KEY_CHARS printable
    ASCII characters, no spaces or control characters. The message never quotes the key."""
    if not key or not key.strip():
        return "the API key is blank"
    if len(key) > MAX_KEY_CHARS:
        return f"the API key is longer than {MAX_KEY_CHARS} characters"
    if not all("\x21" <= ch <= "\x7e" for ch in key):
        return ("the API key has characters outside printable ASCII (spaces, control "
                "characters and non-ASCII are not allowed)")
    return None


def client_id_for_key(key: str, secret: str | bytes) -> str:
    """The client id an open-mode server (``--open-keys``) with ``secret`` gives ``key``: what
    the monitor's log, transitions, metrics and server log show instead of the key."""
    mac = hmac.new(_secret_bytes(secret), _ID_CONTEXT + key.encode("utf-8", "surrogatepass"),
                   hashlib.sha256)
    return OPEN_ID_PREFIX + mac.hexdigest()[:OPEN_ID_HEX]


def key_digest(key: str, secret: str | bytes) -> bytes:
    """The full keyed digest a keys-file server looks keys up by (so that the lookup's timing
    depends on the digest, which an attacker cannot steer, and not on the key)."""
    return hmac.new(_secret_bytes(secret), _LOOKUP_CONTEXT + key.encode("utf-8",
                                                                        "surrogatepass"),
                    hashlib.sha256).digest()

"""Client identity from call metadata (``x-api-key: KEY`` or ``authorization: Bearer KEY``).

Two modes, and the server must be told which (service/config.py):
- a keys file (``--api-keys``; TOML, ``name = "key"`` lines): only listed keys pass and the
  client id is the key's name. The ring holds only keyed digests of the keys and looks a
  presented key up by its digest, so the lookup's timing does not depend on how much of a real
  key an attacker guessed. Two names with the same key are an error naming both.
- open mode (``--open-keys``): any well-formed key is a client; its id is a keyed hash of the
  key (``common.keys.client_id_for_key``: "k-" + 16 hex digits), so the key itself is never
  stored or logged.

Keys are validated first (common.keys.key_problem: 1-256 printable ASCII characters, no spaces
or control characters); error messages never quote a key.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from common.keys import MAX_KEY_CHARS, client_id_for_key, key_digest, key_problem
from service.errors import Unauthenticated

__all__ = ["HEADERS", "KeyRing", "client_id_for_key", "key_from_metadata"]

HEADERS = ("x-api-key", "authorization")
MAX_NAME_CHARS = 128


def key_from_metadata(metadata) -> str | None:
    """The key in the call's metadata (surrounding whitespace removed), "" for a blank one, None
    when there is none."""
    for k, v in metadata or ():
        k = k.lower()
        if isinstance(v, bytes):   # a binary header (-bin) is never a key
            continue
        if k == "x-api-key" and v:
            return v.strip()
        if k == "authorization" and v:
            scheme, _, token = v.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return None


class KeyRing:
    """Maps call metadata to a client id (or raises Unauthenticated).

    ``KeyRing.open(secret)``: open mode; ``KeyRing.from_file(path, secret)`` or
    ``KeyRing({name: key}, secret)``: only the listed keys."""

    def __init__(self, keys: dict[str, str] | None, secret: str | bytes):
        self._secret = secret.encode() if isinstance(secret, str) else bytes(secret)
        self.open_mode = keys is None
        self._by_digest: dict[bytes, str] | None = None
        if keys is not None:
            self._by_digest = {}
            for name, key in keys.items():
                self._by_digest[key_digest(key, self._secret)] = name

    @classmethod
    def open(cls, secret: str | bytes) -> "KeyRing":
        return cls(None, secret)

    @classmethod
    def from_file(cls, path: Path, secret: str | bytes) -> "KeyRing":
        """The keys of a TOML file of ``name = "key"`` lines. ValueError (naming the file and
        the names, never the keys) for a non-string or malformed key, a bad name, or a key
        listed under two names."""
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not a valid keys file ({exc})") from None
        if not table:
            raise ValueError(f"{path}: no keys (expected name = \"key\" lines)")
        bad = [n for n, v in table.items() if not isinstance(v, str) or not v]
        if bad:
            raise ValueError(f"{path}: keys must be non-empty strings (bad entries: {bad})")
        bad = {n: key_problem(v) for n, v in table.items() if key_problem(v)}
        if bad:
            raise ValueError(f"{path}: malformed keys for {sorted(bad)}: keys must be 1-"
                             f"{MAX_KEY_CHARS} printable ASCII characters without spaces")
        bad_names = [n for n in table if not (0 < len(n) <= MAX_NAME_CHARS and n.isprintable()
                                              and n.strip() == n)]
        if bad_names:
            raise ValueError(f"{path}: names must be 1-{MAX_NAME_CHARS} printable characters "
                             f"without surrounding spaces (bad: {[n[:64] for n in bad_names]})")
        names_of: dict[str, list[str]] = {}
        for name, key in table.items():
            names_of.setdefault(key, []).append(name)
        dups = [names for names in names_of.values() if len(names) > 1]
        if dups:
            raise ValueError(f"{path}: the same key is listed under several names: "
                             + "; ".join(" = ".join(n) for n in dups)
                             + " (give each client its own key)")
        return cls(table, secret)

    def client_id_of_key(self, key: str) -> str:
        """The client id for ``key`` (Unauthenticated when the key is malformed or, with a keys
        file, not listed)."""
        problem = key_problem(key)
        if problem is not None:
            raise Unauthenticated(f"malformed API key: {problem}")
        if self._by_digest is None:
            return client_id_for_key(key, self._secret)
        name = self._by_digest.get(key_digest(key, self._secret))
        if name is None:
            raise Unauthenticated("unknown API key")
        return name

    def client_id(self, metadata) -> str:
        key = key_from_metadata(metadata)
        if key is None:
            raise Unauthenticated("missing API key: send metadata 'x-api-key: KEY' or "
                                  "'authorization: Bearer KEY'")
        return self.client_id_of_key(key)

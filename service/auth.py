"""Client identity from call metadata. Open mode accepts any non-empty key and uses it as the
client id; with a keys file (TOML: `name = "key"` lines) only listed keys pass and the client id
is the name."""
from __future__ import annotations

import tomllib
from pathlib import Path

from service.errors import Unauthenticated

HEADERS = ("x-api-key", "authorization")


def key_from_metadata(metadata) -> str | None:
    for k, v in metadata or ():
        k = k.lower()
        if k == "x-api-key" and v:
            return v.strip()
        if k == "authorization" and v:
            scheme, _, token = v.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class KeyRing:
    def __init__(self, keys: dict[str, str] | None = None):
        self._by_key = None if keys is None else {v: k for k, v in keys.items()}

    @classmethod
    def from_file(cls, path: Path | None) -> "KeyRing":
        if path is None:
            return cls(None)
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
        bad = [k for k, v in table.items() if not isinstance(v, str) or not v]
        if bad:
            raise ValueError(f"{path}: keys must be non-empty strings (bad entries: {bad})")
        return cls(table)

    def client_id(self, metadata) -> str:
        key = key_from_metadata(metadata)
        if key is None:
            raise Unauthenticated("missing API key: send metadata 'x-api-key: KEY' or "
                                  "'authorization: Bearer KEY'")
        if self._by_key is None:
            return key
        try:
            return self._by_key[key]
        except KeyError:
            raise Unauthenticated("unknown API key") from None

import pytest

from service.auth import KeyRing, key_from_metadata
from service.errors import Unauthenticated


def test_key_from_headers():
    assert key_from_metadata([("x-api-key", "k1")]) == "k1"
    assert key_from_metadata([("Authorization", "Bearer k2")]) == "k2"
    assert key_from_metadata([("authorization", "Basic abc")]) is None
    assert key_from_metadata([("x-api-key", "")]) is None
    assert key_from_metadata(None) is None


def test_open_mode_uses_key_as_client_id():
    assert KeyRing(None).client_id([("x-api-key", "alice")]) == "alice"
    with pytest.raises(Unauthenticated, match="missing API key"):
        KeyRing(None).client_id([])


def test_keys_file(tmp_path):
    f = tmp_path / "keys.toml"
    f.write_text('alice = "s3cret"\nbob = "hunter2"\n')
    ring = KeyRing.from_file(f)
    assert ring.client_id([("authorization", "Bearer hunter2")]) == "bob"
    with pytest.raises(Unauthenticated, match="unknown API key"):
        ring.client_id([("x-api-key", "alice")])
    bad = tmp_path / "bad.toml"
    bad.write_text('alice = 3\n')
    with pytest.raises(ValueError, match="non-empty strings"):
        KeyRing.from_file(bad)

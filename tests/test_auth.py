"""Keys and secrets (service/auth.py, common/keys.py, ServerConfig.startup_problems): key
validation, open mode's keyed client ids, the keys file's checks, constant-time lookup, the
refusal to start with a weak secret or without a key mode."""
import logging

import pytest

from common.keys import MAX_KEY_CHARS, client_id_for_key, key_problem
from service.auth import KeyRing, key_from_metadata
from service.config import DEFAULT_SECRET, ServerConfig
from service.errors import Unauthenticated

SECRET = "s" * 40


def test_key_from_headers():
    assert key_from_metadata([("x-api-key", "k1")]) == "k1"
    assert key_from_metadata([("Authorization", "Bearer k2")]) == "k2"
    assert key_from_metadata([("x-api-key", "  k3 ")]) == "k3"
    assert key_from_metadata([("authorization", "Basic abc")]) is None
    assert key_from_metadata([("x-api-key", "")]) is None
    assert key_from_metadata([("x-api-key", "   ")]) == ""          # blank: present, rejected
    assert key_from_metadata(None) is None


def test_open_mode_client_id_is_a_keyed_hash_never_the_key():
    ring = KeyRing.open(SECRET)
    cid = ring.client_id([("x-api-key", "alice")])
    assert cid == client_id_for_key("alice", SECRET)
    assert cid.startswith("k-") and len(cid) == 18 and "alice" not in cid
    int(cid[2:], 16)                                                  # 16 hex digits
    assert ring.client_id([("authorization", "Bearer alice")]) == cid  # same key, same client
    assert ring.client_id([("x-api-key", "bob")]) != cid
    assert KeyRing.open("t" * 40).client_id([("x-api-key", "alice")]) != cid  # keyed
    with pytest.raises(Unauthenticated, match="missing API key"):
        ring.client_id([])


@pytest.mark.parametrize("key, why", [
    ("   ", "blank"), ("", "blank"), ("a b", "printable ASCII"), ("a\x00b", "printable ASCII"),
    ("a\nb", "printable ASCII"), ("a\x7fb", "printable ASCII"), ("ключ", "printable ASCII"),
    ("k" * (MAX_KEY_CHARS + 1), "longer than"),
])
def test_malformed_keys_are_unauthenticated_and_not_quoted(key, why):
    assert why in key_problem(key)
    for ring in (KeyRing.open(SECRET), KeyRing({"alice": "s3cret-alice"}, SECRET)):
        with pytest.raises(Unauthenticated, match=why) as err:
            ring.client_id_of_key(key)
        if key.strip():
            assert key not in str(err.value)


def test_longest_and_odd_but_printable_keys_are_accepted():
    ring = KeyRing.open(SECRET)
    for key in ("k" * MAX_KEY_CHARS, "a-b_c.d~e+f/g=", "!#$%&'()*"):
        assert key_problem(key) is None
        assert ring.client_id_of_key(key).startswith("k-")


def test_keys_file(tmp_path):
    f = tmp_path / "keys.toml"
    f.write_text('alice = "s3cret-alice"\nbob = "hunter2-bob"\n')
    ring = KeyRing.from_file(f, SECRET)
    assert ring.client_id([("authorization", "Bearer hunter2-bob")]) == "bob"
    assert ring.client_id([("x-api-key", "s3cret-alice")]) == "alice"
    for wrong in ("alice", "s3cret-alic", "s3cret-alice2", "S3cret-alice"):
        with pytest.raises(Unauthenticated, match="unknown API key"):
            ring.client_id([("x-api-key", wrong)])
    # the ring keeps no key in clear
    assert "s3cret-alice" not in repr(vars(ring))


@pytest.mark.parametrize("text, match", [
    ('alice = 3\n', "non-empty strings"),
    ('alice = ""\n', "non-empty strings"),
    ('alice = "has space"\n', r"malformed keys for \['alice'\]"),
    ('alice = "k1"\nbob = "k2"\ncarol = "k1"\n', "alice = carol"),
    ('', "no keys"),
    ('alice = "k1"\nalice = "k2"\n', "not a valid keys file"),
])
def test_bad_keys_files_are_errors_naming_names_not_keys(tmp_path, text, match):
    f = tmp_path / "keys.toml"
    f.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        KeyRing.from_file(f, SECRET)
    assert "has space" not in str(err.value)
    if "carol" in text:
        assert "'k1'" not in str(err.value) and "k1" not in str(err.value).split(":", 1)[1]


def test_lookup_goes_through_a_keyed_digest(monkeypatch, tmp_path):
    """Constant time: the presented key is never compared with the stored ones character by
    character; the ring only looks its keyed digest up (a dict of digests)."""
    import service.auth as auth

    seen = []
    real = auth.key_digest
    monkeypatch.setattr(auth, "key_digest", lambda k, s: seen.append(k) or real(k, s))
    ring = KeyRing({"alice": "s3cret-alice"}, SECRET)
    assert seen == ["s3cret-alice"]                    # digests computed once, at load
    seen.clear()
    assert ring.client_id_of_key("s3cret-alice") == "alice"
    with pytest.raises(Unauthenticated):
        ring.client_id_of_key("s3cret-alicf")
    assert seen == ["s3cret-alice", "s3cret-alicf"]     # one digest per lookup
    assert all(len(k) == 32 for k in ring._by_digest)  # SHA-256 digests, not keys


def _cfg(**kw):
    kw.setdefault("secret", SECRET)
    return ServerConfig(**kw)


def test_startup_problems(tmp_path, monkeypatch):
    monkeypatch.delenv("MODELGUARD_SECRET", raising=False)
    monkeypatch.delenv("MODELGUARD_SECRET_FILE", raising=False)
    assert _cfg(open_keys=True).startup_problems() == []
    assert _cfg(api_keys=tmp_path / "k.toml").startup_problems() == []
    [p] = _cfg().startup_problems()
    assert "no client keys configured" in p and "--open-keys" in p
    [p] = _cfg(open_keys=True, api_keys=tmp_path / "k.toml").startup_problems()
    assert "choose one" in p
    assert ServerConfig().secret == DEFAULT_SECRET
    [p] = ServerConfig(open_keys=True).startup_problems()
    assert "no secret configured" in p and "--dev-secret" in p
    [p] = _cfg(secret="x" * 31, open_keys=True).startup_problems()
    assert "31 bytes; at least 32" in p
    assert _cfg(secret="x" * 32, open_keys=True).startup_problems() == []
    assert ServerConfig(open_keys=True, dev_secret=True).startup_problems() == []
    assert _cfg(secret="x", open_keys=True, dev_secret=True).startup_problems() == []
    [p] = _cfg(open_keys=True, tls_cert=tmp_path / "c.pem").startup_problems()
    assert "go together" in p
    [p] = _cfg(open_keys=True, tls_client_ca=tmp_path / "ca.pem").startup_problems()
    assert "needs --tls-cert" in p


def test_secret_from_the_environment(tmp_path, monkeypatch):
    f = tmp_path / "secret"
    f.write_text("f" * 40 + "\n")
    monkeypatch.delenv("MODELGUARD_SECRET", raising=False)
    monkeypatch.setenv("MODELGUARD_SECRET_FILE", str(f))
    assert ServerConfig().secret == "f" * 40            # the file, newline stripped
    monkeypatch.setenv("MODELGUARD_SECRET", "e" * 40)
    assert ServerConfig().secret == "e" * 40            # the variable wins over the file


def test_server_refuses_to_start_and_closes_the_plane():
    from service.errors import ConfigError
    from service.server import Server

    class Plane:
        closed = False

        def close(self):
            self.closed = True

    for cfg, match in [(_cfg(), "no client keys"),
                       (_cfg(secret="short", open_keys=True), "5 bytes")]:
        plane = Plane()
        with pytest.raises(ConfigError, match=match):
            Server(cfg, plane)
        assert plane.closed


def test_cli_refuses_before_loading_anything(tmp_path, monkeypatch, caplog):
    import service.__main__ as cli

    monkeypatch.delenv("MODELGUARD_SECRET", raising=False)
    monkeypatch.delenv("MODELGUARD_SECRET_FILE", raising=False)
    missing = str(tmp_path / "no-such-target.pt")   # loading it would fail differently
    caplog.set_level(logging.ERROR)
    assert cli.main(["serve", "--target", missing, "--open-keys"]) == 2
    assert "no secret configured" in caplog.text
    caplog.clear()
    short = tmp_path / "short"
    short.write_text("too-short\n")
    assert cli.main(["serve", "--target", missing, "--open-keys",
                     "--secret-file", str(short)]) == 2
    assert "9 bytes; at least 32" in caplog.text
    caplog.clear()
    good = tmp_path / "secret"
    good.write_text("g" * 64)
    assert cli.main(["serve", "--target", missing, "--secret-file", str(good)]) == 2
    assert "no client keys configured" in caplog.text
    caplog.clear()
    # with the key mode and a good secret it gets past the checks (to the missing target)
    assert cli.main(["serve", "--target", missing, "--open-keys",
                     "--secret-file", str(good)]) == 2
    assert "no target checkpoint" in caplog.text and "refusing" not in caplog.text
    caplog.clear()
    assert cli.main(["serve", "--target", missing, "--open-keys", "--dev-secret"]) == 2
    assert "no target checkpoint" in caplog.text and "refusing" not in caplog.text

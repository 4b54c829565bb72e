"""Passwords and CONNECT authentication (spec/dynsec.md §2, §8, §10)."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
from captures import example_document
from helpers import example_state, ok

from raftmq.dynsec.acl import RC_NOT_AUTHORIZED, RC_SUCCESS, Authorizer
from raftmq.dynsec.model import DynsecState
from raftmq.dynsec.password import from_client_json, hash_password, parse_encoded

# spec §10: the clear-text passwords of dynsec-example.json
CREDENTIALS = {
    "admin": "adminpass123",
    "alice": "alicepass1",
    "bob": "bobpass22",
    "carol": "carolpass333",
    "dave": "davepass4444",
    "eve": "evepass55555",
}


@pytest.mark.parametrize("username", sorted(CREDENTIALS))
def test_every_example_hash_verifies_after_import(username: str) -> None:
    state = example_state()
    stored = state.clients[username].password
    assert stored is not None and stored.iterations == 101 and len(stored.salt) == 12
    assert stored.verify(CREDENTIALS[username].encode())
    assert not stored.verify(CREDENTIALS[username].upper().encode())
    assert not stored.verify(b"")


def test_export_keeps_the_mosquitto_hashes_byte_for_byte() -> None:
    exported = {c["username"]: c for c in example_state().to_document()["clients"]}
    for original in example_document()["clients"]:
        for key in ("password", "salt", "iterations"):
            assert exported[original["username"]].get(key) == original.get(key)


@pytest.mark.parametrize(
    ("client_id", "username", "password", "rc"),
    [
        ("c1", "admin", b"adminpass123", RC_SUCCESS),
        ("c1", "alice", b"alicepass1", RC_SUCCESS),
        ("c1", "alice", b"ALICEPASS1", RC_NOT_AUTHORIZED),  # case sensitive
        ("c1", "Alice", b"alicepass1", RC_NOT_AUTHORIZED),  # usernames too
        ("c1", "carol", b"carolpass333", RC_SUCCESS),
        ("bob-device", "bob", b"bobpass22", RC_SUCCESS),
        ("other", "bob", b"bobpass22", RC_NOT_AUTHORIZED),  # bound client id
        ("dave-01", "dave", b"davepass4444", RC_SUCCESS),
        ("dave-02", "dave", b"davepass4444", RC_NOT_AUTHORIZED),
        ("c1", "eve", b"evepass55555", RC_NOT_AUTHORIZED),  # disabled
        ("c1", "nopw", b"anything", RC_NOT_AUTHORIZED),  # no password stored
        ("c1", "nobody", b"x", RC_NOT_AUTHORIZED),  # unknown
        ("c1", "alice", None, RC_NOT_AUTHORIZED),  # username without password
        ("c1", "alice", b"", RC_NOT_AUTHORIZED),  # zero-length = no password
        ("c1", None, None, RC_NOT_AUTHORIZED),  # anonymous, allow_anonymous false
    ],
)
def test_connect_authentication(client_id, username, password, rc) -> None:
    assert Authorizer(example_state()).authenticate(client_id, username, password) == rc


def test_anonymous_accepted_only_with_allow_anonymous() -> None:
    auth = Authorizer(example_state(), allow_anonymous=True)
    assert auth.authenticate("c1", None, None) == RC_SUCCESS
    assert auth.authenticate("c1", "alice", None) == RC_NOT_AUTHORIZED


def test_new_password_is_mosquitto_20_format_and_verifies() -> None:
    h = hash_password("s3cret")
    doc = h.to_json()
    assert set(doc) == {"password", "salt", "iterations"} and doc["iterations"] == 101
    assert len(doc["salt"]) == 16 and len(doc["password"]) == 88
    # Independent recipe of spec §8.1.
    salt = base64.b64decode(doc["salt"])
    assert hashlib.pbkdf2_hmac("sha512", b"s3cret", salt, 101, 64) == base64.b64decode(doc["password"])
    assert hash_password("s3cret").salt != h.salt  # a new salt every time


def test_set_client_password_changes_the_login() -> None:
    state = example_state()
    auth = Authorizer(state)
    ok(state, {"command": "setClientPassword", "username": "carol", "password": "newpass"})
    assert auth.authenticate("c", "carol", b"newpass") == RC_SUCCESS
    assert auth.authenticate("c", "carol", b"carolpass333") == RC_NOT_AUTHORIZED


def test_empty_password_from_create_client_can_never_log_in() -> None:
    state = DynsecState()
    ok(state, {"command": "createClient", "username": "u", "password": ""})
    assert state.clients["u"].password is not None
    assert Authorizer(state).authenticate("c", "u", b"") == RC_NOT_AUTHORIZED


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def test_mosquitto_21_pbkdf2_encoded_password_is_read() -> None:
    salt = os.urandom(64)
    key = hashlib.pbkdf2_hmac("sha512", b"pw21", salt, 1000, 64)
    encoded = f"$7$1000${_b64(salt)}${_b64(key)}"
    doc = {"clients": [{"username": "u", "encoded_password": encoded}]}
    state = DynsecState.from_document(doc)
    auth = Authorizer(state)
    assert auth.authenticate("c", "u", b"pw21") == RC_SUCCESS
    assert auth.authenticate("c", "u", b"pw22") == RC_NOT_AUTHORIZED
    # written back unchanged, so Mosquitto 2.1 still reads it
    assert state.to_document()["clients"][0]["encoded_password"] == encoded


def test_mosquitto_21_sha512_encoded_password_is_read() -> None:
    salt = os.urandom(64)
    encoded = f"$6${_b64(salt)}${_b64(hashlib.sha512(b'pw6' + salt).digest())}"
    h = parse_encoded(encoded)
    assert h is not None and h.verify(b"pw6") and not h.verify(b"pw7")


def test_broken_password_leaves_client_without_login() -> None:
    assert from_client_json({"encoded_password": "$7$x$y$z"}) is None
    assert from_client_json({"password": "!!", "salt": "u+Ehms+x/eDNSg7s", "iterations": 101}) is None
    assert from_client_json({"password": "FA8k", "salt": "u+Ehms+x/eDNSg7s"}) is None  # no iterations
    state = DynsecState.from_document({"clients": [{"username": "u", "encoded_password": "junk"}]})
    assert "u" in state.clients and Authorizer(state).authenticate("c", "u", b"junk") == RC_NOT_AUTHORIZED


def test_clear_password_never_enters_the_replicated_change() -> None:
    from raftmq.dynsec.commands import prepare_request

    req = prepare_request(b'{"commands":[{"command":"createClient","username":"u","password":"clear-text-pw"}]}')
    assert b"clear-text-pw" not in __import__("orjson").dumps(req.change)

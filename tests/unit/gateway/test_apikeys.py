"""The gateway's API key file: its errors, `add_key`, lookups, and rereading it when it changes
(the check interval is driven by a hand-moved clock, the file's change by its mtime)."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from swarmx.clock import ManualClock
from swarmx.gateway import apikeys
from swarmx.gateway.apikeys import (
    CHECK_INTERVAL_S,
    KEY_PREFIX,
    ApiKeys,
    KeyFileError,
    add_key,
    digest,
    parse_keys,
)

SHA = "ab" * 32


def entry(client: str, key: str) -> str:
    return f'[[keys]]\nclient = "{client}"\nsha256 = "{digest(key)}"\n'


def rewrite(path: Path, text: str, mtime_ns: int) -> None:
    """Replace the file's text and give it a modification time of its own."""
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    """The key file's clock: only its check interval reads it."""
    clock = ManualClock()
    monkeypatch.setattr(apikeys, "time", clock)
    return clock


# --- the file's format ------------------------------------------------------------------------


def test_a_file_maps_digests_to_clients() -> None:
    text = f'[[keys]]\nclient = "alice"\nsha256 = "{SHA}"\n\n[[keys]]\nclient = "b.o_b-2"\n'
    text += f'sha256 = "{"cd" * 32}"\n'
    assert parse_keys(text, "k.toml") == {SHA: "alice", "cd" * 32: "b.o_b-2"}
    assert parse_keys("", "k.toml") == {}  # no keys: no one gets in


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f'[[keys]]\nclient = "a"\nsha256 = "{SHA}"\n[[keys]]\nclient = "b"\nsha256 = "AB"\n',
            "k.toml: keys[1].sha256: expected 64 lower-case hex digits",
        ),
        (
            f'[[keys]]\nclient = "a"\nsha256 = "{SHA.upper()}"\n',
            "k.toml: keys[0].sha256: expected 64 lower-case hex digits",
        ),
        (
            '[[keys]]\nclient = "a"\n',
            "k.toml: keys[0].sha256: expected 64 lower-case hex digits",
        ),
        (
            f'[[keys]]\nclient = "no spaces"\nsha256 = "{SHA}"\n',
            "k.toml: keys[0].client: expected a name of letters, digits, . _ -",
        ),
        (
            f'[[keys]]\nclient = 7\nsha256 = "{SHA}"\n',
            "k.toml: keys[0].client: expected a name of letters, digits, . _ -",
        ),
        ("keys = 3\n", "k.toml: keys: expected [[keys]] tables"),
        ("keys = [1]\n", "k.toml: keys[0]: expected a table"),
    ],
)
def test_a_bad_entry_is_named_with_the_file(text: str, message: str) -> None:
    with pytest.raises(KeyFileError) as exc:
        parse_keys(text, "k.toml")
    assert str(exc.value) == message


def test_a_file_that_is_not_toml_is_named() -> None:
    with pytest.raises(KeyFileError, match=r"^k\.toml: invalid TOML: "):
        parse_keys("[[keys]\n", "k.toml")


def test_a_missing_or_broken_file_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    with pytest.raises(KeyFileError, match=rf"^{re.escape(str(path))}: cannot read: "):
        ApiKeys(path)
    path.write_text('[[keys]]\nclient = "a"\nsha256 = "x"\n')
    with pytest.raises(KeyFileError, match=r"keys\[0\]\.sha256"):
        ApiKeys(path)


# --- making keys ------------------------------------------------------------------------------


def test_add_key_creates_a_private_file_and_appends_each_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    alice = add_key(path, "alice")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    bob = add_key(path, "bob")
    alice2 = add_key(path, "alice")  # a client may hold several keys
    assert all(k.startswith(KEY_PREFIX) for k in (alice, bob, alice2))
    assert len({alice, bob, alice2}) == 3
    text = path.read_text()
    assert alice not in text and digest(alice) in text  # only digests are kept
    keys = ApiKeys(path)
    assert len(keys) == 3
    assert (keys.client(alice), keys.client(bob), keys.client(alice2)) == ("alice", "bob", "alice")


def test_add_key_keeps_what_the_file_had(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(entry("old", "sk-old").rstrip("\n"))  # no newline at its end
    new = add_key(path, "new")
    keys = ApiKeys(path)
    assert (keys.client("sk-old"), keys.client(new)) == ("old", "new")


@pytest.mark.parametrize("name", ["", "no spaces", "-dash-first", "x" * 64, 'quo"te', "é"])
def test_add_key_refuses_a_bad_client_name(tmp_path: Path, name: str) -> None:
    path = tmp_path / "keys.toml"
    with pytest.raises(KeyFileError, match="client name"):
        add_key(path, name)
    assert not path.exists()


def test_add_key_refuses_to_append_to_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    broken = '[[keys]]\nclient = "a"\nsha256 = "short"\n'
    path.write_text(broken)
    with pytest.raises(KeyFileError, match=r"keys\[0\]\.sha256"):
        add_key(path, "b")
    assert path.read_text() == broken


# --- lookups and rereading --------------------------------------------------------------------


def test_a_key_names_its_client_and_any_other_key_none(tmp_path: Path, clock: ManualClock) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(entry("alice", "sk-alice"))
    keys = ApiKeys(path)
    assert keys.client("sk-alice") == "alice"
    assert keys.client("sk-alice ") is None
    assert keys.client("") is None
    assert keys.client(digest("sk-alice")) is None  # the digest is not the key


def test_a_changed_file_is_read_again_at_the_next_check(tmp_path: Path, clock: ManualClock) -> None:
    path = tmp_path / "keys.toml"
    rewrite(path, entry("alice", "sk-alice"), 1_000_000_000)
    keys = ApiKeys(path)
    assert keys.client("sk-alice") == "alice"  # checked now
    rewrite(path, entry("bob", "sk-bob"), 2_000_000_000)  # alice's key removed, bob's added
    clock.now += CHECK_INTERVAL_S / 2
    assert keys.client("sk-bob") is None  # not checked again yet
    assert keys.client("sk-alice") == "alice"
    clock.now += CHECK_INTERVAL_S / 2
    assert keys.client("sk-bob") == "bob"
    assert keys.client("sk-alice") is None
    assert len(keys) == 1


def test_a_half_written_file_keeps_the_keys_read_before(tmp_path: Path, clock: ManualClock) -> None:
    path = tmp_path / "keys.toml"
    full = entry("alice", "sk-alice") + entry("bob", "sk-bob")
    rewrite(path, entry("alice", "sk-alice"), 1_000_000_000)
    keys = ApiKeys(path)
    rewrite(path, full[: len(full) - 20], 2_000_000_000)  # bob's entry cut short
    clock.now += CHECK_INTERVAL_S
    assert keys.client("sk-alice") == "alice"
    assert keys.client("sk-bob") is None
    path.unlink()  # an editor's rename under way: gone for a moment
    clock.now += CHECK_INTERVAL_S
    assert keys.client("sk-alice") == "alice"
    rewrite(path, full, 3_000_000_000)  # the write done
    clock.now += CHECK_INTERVAL_S
    assert (keys.client("sk-alice"), keys.client("sk-bob")) == ("alice", "bob")


def test_a_broken_file_is_read_again_even_if_its_time_does_not_change(
    tmp_path: Path, clock: ManualClock
) -> None:
    path = tmp_path / "keys.toml"
    rewrite(path, entry("alice", "sk-alice"), 1_000_000_000)
    keys = ApiKeys(path)
    rewrite(path, "[[keys]]\nclient =", 2_000_000_000)
    clock.now += CHECK_INTERVAL_S
    assert keys.client("sk-alice") == "alice"
    rewrite(path, entry("bob", "sk-bob"), 2_000_000_000)  # finished within the same tick
    clock.now += CHECK_INTERVAL_S
    assert keys.client("sk-bob") == "bob"


def test_a_key_appended_within_one_timestamp_granule_is_seen(
    tmp_path: Path, clock: ManualClock
) -> None:
    path = tmp_path / "keys.toml"
    rewrite(path, entry("alice", "sk-alice"), 1_000_000_000)
    keys = ApiKeys(path)
    with path.open("a", encoding="utf-8") as f:
        f.write(entry("bob", "sk-bob"))
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # the same coarse stamp as before
    clock.now += CHECK_INTERVAL_S
    assert keys.client("sk-bob") == "bob"

"""The gateway's API keys: ``Authorization: Bearer KEY`` -> the client it belongs to.

The file holds only SHA-256 digests of the keys, so a copy of it lets no one in::

    [[keys]]
    client = "alice"
    sha256 = "9f86d081884c7d65..."

`swarmx keys api --name alice --file FILE` makes a key, prints it once and appends its digest.
The file is reread when it changes (checked at most once a second), so adding or removing a
key needs no restart.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from pathlib import Path

import tomli

KEY_PREFIX = "sk-swarmx-"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
"""Client names become log fields and metric labels."""
CHECK_INTERVAL_S = 1.0


class KeyFileError(ValueError):
    """An API key file that cannot be used; one line naming the file and entry."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(text: str, source: str) -> dict[str, str]:
    """sha256 digest -> client name; raises `KeyFileError` naming the bad entry."""
    try:
        data = tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        raise KeyFileError(f"{source}: invalid TOML: {exc}") from None
    entries = data.get("keys", [])
    if not isinstance(entries, list):
        raise KeyFileError(f"{source}: keys: expected [[keys]] tables")
    keys: dict[str, str] = {}
    for i, entry in enumerate(entries):
        where = f"{source}: keys[{i}]"
        if not isinstance(entry, dict):
            raise KeyFileError(f"{where}: expected a table")
        client, sha = entry.get("client"), entry.get("sha256")
        if not isinstance(client, str) or not CLIENT_NAME.match(client):
            raise KeyFileError(f"{where}.client: expected a name of letters, digits, . _ -")
        if not isinstance(sha, str) or not _HEX64.match(sha):
            raise KeyFileError(f"{where}.sha256: expected 64 lower-case hex digits")
        keys[sha] = client
    return keys


class ApiKeys:
    """The key file, reread when its modification time changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._keys: dict[str, str] = {}
        self._stamp: tuple[int, int, int] | None = None
        """(mtime, size, inode) when read: a key appended within one mtime tick still shows."""
        self._checked = 0.0
        self.reload()

    def __len__(self) -> int:
        return len(self._keys)

    def reload(self) -> None:
        """Read the file now; a bad file raises and keeps the keys read before."""
        try:
            stat = self.path.stat()
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyFileError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        self._keys = parse_keys(text, str(self.path))
        self._stamp = _stamp(stat)

    def client(self, key: str) -> str | None:
        """The client holding ``key``, or None for a key not in the file."""
        self._maybe_reload()
        # looked up by digest: how long the lookup takes tells nothing of the keys themselves
        return self._keys.get(digest(key))

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < CHECK_INTERVAL_S:
            return
        self._checked = now
        try:
            stamp = _stamp(self.path.stat())
        except OSError:
            return  # gone for a moment (an editor's rename): keep the keys we have
        if stamp != self._stamp:
            try:
                self.reload()
            except KeyFileError:
                return  # half-written: the next check reads it again


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_mtime_ns, st.st_size, st.st_ino


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def add_key(path: str | Path, client: str) -> str:
    """Make a key for ``client``, append its digest to the file (created 0600), return it."""
    if not CLIENT_NAME.match(client):
        raise KeyFileError(f"client name {client!r}: use letters, digits, . _ - (up to 63)")
    p = Path(path)
    if p.exists():
        parse_keys(p.read_text(encoding="utf-8"), str(p))  # refuse to append to a broken file
    key = new_key()
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(f'\n[[keys]]\nclient = "{client}"\nsha256 = "{digest(key)}"\n')
    return key

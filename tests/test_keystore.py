"""The client's end-to-end state file: one holder at a time, 0600, atomic,
and an unreadable file is a clear error, never a silent fresh start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay.client.keystore import E2EE_STATE_FILE, KeyStore, Received


def test_one_process_at_a_time(tmp_path: Path) -> None:
    first = KeyStore.open(tmp_path)
    with pytest.raises(ValueError, match=f"in use by another client.*pid {os.getpid()}"):
        KeyStore.open(tmp_path)
    first.close()
    KeyStore.open(tmp_path).close()


def test_round_trip_and_mode(tmp_path: Path) -> None:
    store = KeyStore.open(tmp_path)
    store.see_identity("bob", 1, b"\x01" * 32)
    assert store.see_identity("bob", 1, b"\x02" * 32)  # changed: flagged
    store.remember(("bob", 1, b"m" * 16), Received(b"plain"))
    store.sent_control(b"c" * 16)
    store.save()
    store.close()
    assert os.stat(tmp_path / E2EE_STATE_FILE).st_mode & 0o777 == 0o600
    again = KeyStore.open(tmp_path)
    assert again.contacts[("bob", 1)] == b"\x02" * 32 and again.changed == {("bob", 1)}
    assert again.received[("bob", 1, b"m" * 16)] == Received(b"plain")
    assert b"c" * 16 in again.control_sent
    again.mark_taken(("bob", 1, b"m" * 16))
    assert again.received[("bob", 1, b"m" * 16)] == Received(None, None, True)
    again.close()


def test_unreadable_state_is_an_error_and_releases_the_lock(tmp_path: Path) -> None:
    (tmp_path / E2EE_STATE_FILE).write_bytes(b"\xc1 not msgpack")
    with pytest.raises(ValueError, match="unreadable end-to-end state"):
        KeyStore.open(tmp_path)
    KeyStore.open(tmp_path, fresh=True).close()  # the lock was released; fresh ignores the file

"""A device's end-to-end state, and where it is kept.

:class:`KeyStore` holds everything ``relay-v1`` needs beyond the identity key
(which stays in ``state.json``):

- the device's own prekeys (:class:`relay.e2ee.prekeys.PrekeyStore`) and what
  of them the relay has been sent;
- one :class:`relay.e2ee.pairwise.PeerSessions` per remote device;
- the identity keys seen per remote device (trust on first use) and the
  devices whose key changed since;
- per group: this device's own sender-key chain and who has been given it,
  and the chains received from every other member device;
- the messages decrypted but not yet handed to the application, and the keys
  of those handed out (so a redelivered entry is shown once);
- the msg_ids of the control messages it sent (their receipts are swallowed);
- group messages that arrived before their sender key (opened once it comes).

It is saved as one msgpack file, ``<state_dir>/e2ee.state``, written like
``state.json``: temp file, fsync, rename, mode 0600. Decrypting a message and
saving the new state happen before the ACK, so a crash between them loses
nothing: the relay redelivers, and the stored plaintext is handed out.

No trio here: :meth:`KeyStore.snapshot` serializes on the caller's thread,
:meth:`KeyStore.write` is the blocking write the client runs in a worker
thread.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgpack

from relay.e2ee.errors import DecodeError
from relay.e2ee.pairwise import PeerSessions
from relay.e2ee.prekeys import PrekeyStore
from relay.e2ee.sender_keys import OwnChain, SenderChains
from relay.pidlock import LockHeld, hold_pid_lock

from .identity import write_private_file

__all__ = ["E2EE_STATE_FILE", "KeyStore", "OwnGroup", "Received"]

E2EE_STATE_FILE = "e2ee.state"
LOCK_FILE = "e2ee.lock"
_VERSION = 1
#: Keys of handed-out messages remembered for de-duplication across restarts.
RECEIVED_KEPT = 10_000

Device = tuple[str, int]
MessageKey = tuple[str, int, bytes]


@dataclass
class Received:
    """A message decrypted (or refused) and saved before its ACK.

    ``plaintext`` is kept until the message is handed out (``taken``), then
    dropped: only the key stays, to swallow a redelivery."""

    plaintext: bytes | None
    error: str | None = None
    taken: bool = False


@dataclass
class OwnGroup:
    """This device's sender-key chain in one group, and who holds it.

    ``members`` and ``devices`` are the group as it was at the last send: a
    member or device missing from the group now means a removal, and a
    removal starts a new chain (the removed one must not read what follows).
    ``distributed`` are the devices the current chain was sent to."""

    chain: OwnChain
    members: list[str] = field(default_factory=list)
    devices: set[Device] = field(default_factory=set)
    distributed: set[Device] = field(default_factory=set)


class KeyStore:
    """The end-to-end state of one device; ``path`` None keeps it in memory only."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock: IO[str] | None = None
        self.prekeys = PrekeyStore()
        #: id of the signed prekey the relay has, and the highest one-time
        #: prekey id it was sent (0: none).
        self.published_spk = 0
        self.published_opk = 0
        #: The first publish from this state (``replace: true``) was answered.
        self.replace_confirmed = False
        self.peers: dict[Device, PeerSessions] = {}
        self.contacts: dict[Device, bytes] = {}
        self.changed: set[Device] = set()
        self.own_groups: dict[str, OwnGroup] = {}
        self.sender_chains: dict[tuple[str, str, int], SenderChains] = {}
        self.received: OrderedDict[MessageKey, Received] = OrderedDict()
        #: msg_ids of control messages this device sent (skdm): their
        #: receipts concern no message the user wrote, so they are swallowed.
        self.control_sent: OrderedDict[bytes, None] = OrderedDict()
        #: Group messages that came before their sender key, per (group,
        #: sender, device): [msg_id, ts, payload], opened when the skdm comes.
        self.waiting: dict[tuple[str, str, int], list[list[Any]]] = {}
        self.dirty = False

    # --- persistence ----------------------------------------------------------

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str] | None, *, fresh: bool = False) -> KeyStore:
        """The store of ``state_dir`` (a fresh one if it has none yet, or with
        ``fresh``); None: in memory only. Holds the directory's lock until
        :meth:`close`: two processes saving the same sessions would each
        lose the other's ratchet steps. Raises :class:`ValueError` for an
        unreadable file or a directory in use."""
        if state_dir is None:
            return cls(None)
        directory = Path(state_dir)
        store = cls(directory / E2EE_STATE_FILE)
        store._lock = _lock(directory)
        try:
            if not fresh:
                store._read()
        except BaseException:
            store.close()
            raise
        return store

    def _read(self) -> None:
        assert self.path is not None
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        try:
            self._load(msgpack.unpackb(raw, raw=False, strict_map_key=False))
        except (DecodeError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise ValueError(f"{self.path}: unreadable end-to-end state: {exc}") from None
        except Exception as exc:  # msgpack raises several unrelated types
            raise ValueError(f"{self.path}: unreadable end-to-end state: {exc!r}") from None

    def close(self) -> None:
        """Release the directory's lock (the store stays usable in memory)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def save(self) -> None:
        """Write the state if it changed (blocking: temp file, fsync, rename)."""
        self.write(self.snapshot())

    def snapshot(self) -> bytes | None:
        """The state as bytes if it changed since the last snapshot (marked
        clean), else None. Cheap enough for the event loop; :meth:`write`
        does the blocking part, so a worker thread never reads live state."""
        if not self.dirty:
            return None
        self.dirty = False
        data: bytes = msgpack.packb(self._dump(), use_bin_type=True)
        return data

    def write(self, data: bytes | None) -> None:
        """Write a :meth:`snapshot` durably (nothing for None or in memory).
        On failure the store is marked dirty again and the error raised."""
        if data is None or self.path is None:
            return
        try:
            write_private_file(self.path, data)
        except BaseException:
            self.dirty = True
            raise

    def _dump(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "prekeys": self.prekeys.to_dict(),
            "published": [self.published_spk, self.published_opk, self.replace_confirmed],
            "peers": [[u, d, p.to_dict()] for (u, d), p in self.peers.items()],
            "contacts": [[u, d, k, (u, d) in self.changed] for (u, d), k in self.contacts.items()],
            "own_groups": [
                [g, o.chain.to_dict(), o.members, sorted(o.devices), sorted(o.distributed)]
                for g, o in self.own_groups.items()
            ],
            "sender_chains": [[g, u, d, c.to_dict()] for (g, u, d), c in self.sender_chains.items()],
            "received": [[u, d, m, r.plaintext, r.error, r.taken] for (u, d, m), r in self.received.items()],
            "control_sent": list(self.control_sent),
            "waiting": [[g, u, d, items] for (g, u, d), items in self.waiting.items()],
        }

    def _load(self, data: dict[str, Any]) -> None:
        if data.get("version") != _VERSION:
            raise ValueError(f"unsupported version {data.get('version')!r}")
        self.prekeys = PrekeyStore.from_dict(data["prekeys"])
        spk, opk, confirmed = data["published"]
        self.published_spk, self.published_opk, self.replace_confirmed = int(spk), int(opk), bool(confirmed)
        self.peers = {(u, int(d)): PeerSessions.from_dict(p) for u, d, p in data["peers"]}
        for u, d, key, changed in data["contacts"]:
            self.contacts[(u, int(d))] = bytes(key)
            if changed:
                self.changed.add((u, int(d)))
        for g, chain, members, devices, distributed in data["own_groups"]:
            self.own_groups[g] = OwnGroup(
                OwnChain.from_dict(chain),
                list(members),
                {(u, int(d)) for u, d in devices},
                {(u, int(d)) for u, d in distributed},
            )
        self.sender_chains = {(g, u, int(d)): SenderChains.from_dict(c) for g, u, d, c in data["sender_chains"]}
        for u, d, m, plaintext, error, taken in data["received"]:
            self.received[(u, int(d), bytes(m))] = Received(plaintext, error, bool(taken))
        self.control_sent = OrderedDict((bytes(m), None) for m in data["control_sent"])
        self.waiting = {(g, u, int(d)): [list(i) for i in items] for g, u, d, items in data["waiting"]}

    # --- contacts -------------------------------------------------------------

    def see_identity(self, user: str, device: int, identity_key: bytes) -> bool:
        """Record the identity key the relay lists for a device; True when it
        differs from the one seen before (the contact is then flagged and its
        sessions dropped: a new key needs a new X3DH)."""
        key = (user, device)
        known = self.contacts.get(key)
        if known == identity_key:
            return False
        self.contacts[key] = identity_key
        self.dirty = True
        if known is None:
            return False
        self.changed.add(key)
        self.peers.pop(key, None)
        return True

    # --- received messages ----------------------------------------------------

    def remember(self, key: MessageKey, received: Received) -> None:
        self.received[key] = received
        self.received.move_to_end(key)
        self.dirty = True
        while len(self.received) > RECEIVED_KEPT:
            self.received.popitem(last=False)

    def sent_control(self, msg_id: bytes) -> None:
        self.control_sent[msg_id] = None
        self.dirty = True
        while len(self.control_sent) > RECEIVED_KEPT:
            self.control_sent.popitem(last=False)

    def mark_taken(self, key: MessageKey) -> None:
        received = self.received.get(key)
        if received is not None and not received.taken:
            received.taken = True
            received.plaintext = None
            received.error = None
            self.dirty = True


def _lock(directory: Path) -> IO[str]:
    """An exclusive lock on ``directory`` (created 0700), or ValueError naming its holder."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        return hold_pid_lock(directory / LOCK_FILE)
    except LockHeld as held:
        raise ValueError(
            f"{directory} is in use by another client of the same device (pid {held.owner}); "
            "let it finish first"
        ) from None

"""The embedded store: N LMDB environments ("shards"), one per directory.

Layout of one shard (named databases):

``users``  user -> msgpack ``{"devices": {device: identity_key}, "created": ms}``
``inbox``  user NUL device(1) seq(8, big-endian) -> type(1) count(1) created(8) tail
``meta``   user NUL device(1) -> next_seq(8) pending(8)
``idem``   to_user NUL sender NUL sender_device(1) msg_id(16) -> ts(8)
           NUL body_key -> ts(8)   (group's shard: a group message whose body is gone)
``groups`` group -> msgpack ``[name, version, members, admins, created]``
``bodies`` body_key -> refs(8, signed) created(8) complete(1) tail   (group's shard)
``fanout`` body_key -> refs(8) created(8)   (member shards: this shard's fan-out is done)
``prekeys`` user NUL device(1) 0x00 -> spk_id(4) count(4) spk_key(32) spk_sig(64)
            user NUL device(1) 0x01 opk_id(4, big-endian) -> opk_key(32)

The first ``prekeys`` key of a device holds its signed prekey and how many
one-time prekeys it has (keys.count is one read); the one-time prekeys follow
in id order, so the lowest id, the one keys.fetch hands out next, is the
first key after ``user NUL device 0x01``. Prekeys live in the owner's shard
and never expire: they are deleted only by being handed out.

A group message is stored once, as a body in the group's shard; member
inboxes hold ENTRY_MSG_REF entries whose tail is the body key (see
``relay.store.base.body_key``). :meth:`LmdbStore.read_inbox` resolves them.

User names never contain NUL, so ``user NUL`` is a safe key prefix and the
inbox of one device is one contiguous, seq-ordered key range. ``pending`` is
kept next to ``next_seq`` so READY's count costs one read, not a scan.

Writes happen only in :meth:`LmdbStore.apply_batch`, one write transaction
per call; the caller (the server's group-commit writer) runs it in a worker
thread. With ``sync=True`` (the default, "durable") LMDB fsyncs on commit, so
whatever a batch reported is on disk before the server answers SENT.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import lmdb
import msgpack

import relay.fastpath
from relay.errors import (
    CONFLICT,
    FORBIDDEN,
    NOT_FOUND,
    TOO_LARGE,
    ConfigError,
    FrameError,
    StoreError,
    StoreFullError,
)
from relay.pidlock import LockHeld, hold_pid_lock
from relay.protocol.frames import EVENT_FIELDS, MSG_FIELDS, event_tail
from relay.protocol.groups import GroupInfo, apply_change
from relay.store import inbox_writer
from relay.store.base import (
    ENTRY_EVENT,
    ENTRY_MSG,
    ENTRY_MSG_REF,
    Appended,
    AppendEntries,
    Bundle,
    Bundles,
    ChangeGroup,
    CompleteGroupMessage,
    CreateGroup,
    DeleteUpTo,
    DropFanOutMarker,
    ExpireEntries,
    FannedOut,
    FanOut,
    FetchBundles,
    GroupPrepared,
    InboxEntry,
    PrepareGroupMessage,
    PublishKeys,
    RegisterUser,
    ReleaseBodies,
    SignedPrekey,
    Stored,
    StoreMessage,
    UserRecord,
    WriteOp,
    body_key,
    group_of_body,
    shard_of,
)

log = logging.getLogger(__name__)

_U64 = struct.Struct(">Q")
_META = struct.Struct(">QQ")
_ENTRY_HEAD = struct.Struct(">BBQ")
_BODY_HEAD = struct.Struct(">qQB")
_FANOUT = struct.Struct(">QQ")
_U32 = struct.Struct(">I")
# prekeys: the signed prekey's id and the one-time prekey count, then its key and signature.
_PREKEY_HEAD = struct.Struct(">II")
_SPK_HEAD = b"\x00"
_OPK = b"\x01"
LAYOUT_VERSION = 1


def _lock_data_dir(path: Path) -> IO[str]:
    """Hold an exclusive lock on the data directory for this store's lifetime.

    LMDB would let two relays share the files, but each keeps state in memory
    (caches, acks in flight, fan-outs) that the other cannot see.
    """
    try:
        return hold_pid_lock(path / "relay.lock")
    except LockHeld as held:
        raise ConfigError(f"{path} is in use by another relay (pid {held.owner})") from None


def _shard_index(user: str, shards: int) -> int:
    return shard_of(user, shards)


@functools.lru_cache(maxsize=1 << 16)
def device_prefix(user: str, device: int) -> bytes:
    """The key prefix of one device's inbox (cached: every append builds it)."""
    return user.encode() + b"\x00" + bytes((device,))


def inbox_key(user: str, device: int, seq: int) -> bytes:
    return device_prefix(user, device) + _U64.pack(seq)


def _prekey_head_key(user: str, device: int) -> bytes:
    return device_prefix(user, device) + _SPK_HEAD


def _decode_prekey_head(raw: bytes | memoryview) -> tuple[SignedPrekey, int]:
    """(signed prekey, one-time prekey count) from a device's first ``prekeys`` value."""
    spk_id, count = _PREKEY_HEAD.unpack_from(raw)
    head = _PREKEY_HEAD.size
    return SignedPrekey(spk_id, bytes(raw[head : head + 32]), bytes(raw[head + 32 : head + 96])), count


def _encode_prekey_head(spk: SignedPrekey, count: int) -> bytes:
    return _PREKEY_HEAD.pack(spk.id, count) + spk.key + spk.sig


def _sent_group_key(body_key: bytes) -> bytes:
    """``idem`` key of a group message: user names never start with NUL, so it
    never meets a SEND's ``to_user NUL ...`` key."""
    return b"\x00" + body_key


def _decode_user(user: str, raw: bytes | memoryview) -> UserRecord:
    rec = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    return UserRecord(user, dict(rec["devices"]), rec["created"])


def _decode_group(group: str, raw: bytes | memoryview) -> GroupInfo:
    name, version, members, admins, _created = msgpack.unpackb(raw, raw=False)
    return GroupInfo(group, name, version, tuple(members), tuple(admins))


def _encode_group(info: GroupInfo, created: int) -> bytes:
    return msgpack.packb([info.name, info.version, list(info.members), list(info.admins), created], use_bin_type=True)


class _Shard:
    def __init__(self, path: Path, map_size: int, sync: bool) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(path),
            map_size=map_size,
            max_dbs=16,
            sync=sync,
            metasync=sync,
            # Readers live on the event-loop thread; writers in worker threads.
            lock=True,
            readahead=False,
        )
        self.users = self.env.open_db(b"users")
        self.inbox = self.env.open_db(b"inbox")
        self.meta = self.env.open_db(b"meta")
        self.idem = self.env.open_db(b"idem")
        self.groups = self.env.open_db(b"groups")
        self.bodies = self.env.open_db(b"bodies")
        self.fanout = self.env.open_db(b"fanout")
        self.prekeys = self.env.open_db(b"prekeys")
        # user -> devices, filled from committed transactions only. Device sets
        # never change after registration yet; device.link must update it.
        self.devices: dict[str, dict[int, bytes]] = {}


class LmdbStore:
    """Implements :class:`relay.store.base.Store` on LMDB.

    ``shards`` is fixed when the data directory is created and recorded in
    ``relay-store.json``; reopening with another number uses the recorded one
    (moving users between shards would need a migration).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        shards: int = 4,
        map_size: int = 8 << 30,
        sync: bool = True,
        fastpath: str | None = None,
    ) -> None:
        # The inbox writer follows the fast path choice ("cython" or "pure";
        # None: compiled unless RELAY_PURE=1), like the connections' parser.
        try:
            self._inbox_writer = inbox_writer.load(fastpath).InboxWriter
            self._msg_tail = relay.fastpath.load(fastpath).msg_tail
        except ImportError as exc:
            raise ConfigError(
                "the compiled inbox writer is not built (installed with RELAY_NO_EXT=1?); use --fastpath pure"
            ) from exc
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path} is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_data_dir(self.path)
        manifest = self.path / "relay-store.json"
        if manifest.exists():
            try:
                info = json.loads(manifest.read_text())
                if int(info["shards"]) != shards:
                    log.warning("%s has %s shards (fixed at creation); --shards %d ignored", self.path, info["shards"], shards)
                shards = int(info["shards"])
                if info.get("layout") != LAYOUT_VERSION:
                    raise ConfigError(f"{manifest}: unsupported layout {info.get('layout')!r}")
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{manifest} is unreadable: {exc}") from exc
        else:
            if not 1 <= shards <= 256:
                raise ConfigError("shards must be between 1 and 256")
            tmp = manifest.with_suffix(".tmp")
            tmp.write_text(json.dumps({"layout": LAYOUT_VERSION, "shards": shards}))
            os.replace(tmp, manifest)
        self.shards = shards
        self.sync = sync
        # Hot: every write looks its shard up. Bounded so a stream of new
        # names cannot grow it.
        self._shard_index = functools.lru_cache(maxsize=1 << 16)(functools.partial(_shard_index, shards=shards))
        self._shards = [_Shard(self.path / f"shard-{i:03d}", map_size, sync) for i in range(shards)]

    def close(self) -> None:
        for shard in self._shards:
            shard.env.close()
        self._lock.close()

    def shard_of(self, user: str) -> int:
        return self._shard_index(user)

    def _shard(self, user: str) -> _Shard:
        return self._shards[shard_of(user, self.shards)]

    # --- reads (event-loop thread; short read transactions) -------------------

    def get_user(self, user: str) -> UserRecord | None:
        shard = self._shard(user)
        with shard.env.begin(db=shard.users) as txn:
            raw = txn.get(user.encode())
        return None if raw is None else _decode_user(user, raw)

    def read_inbox(self, user: str, device: int, after: int, limit: int) -> list[InboxEntry]:
        """Up to ``limit`` entries of (user, device) with seq > ``after``, in seq order."""
        if limit <= 0:
            return []
        shard = self._shard(user)
        prefix = device_prefix(user, device)
        plen = len(prefix)
        out: list[InboxEntry] = []
        unpack_head = _ENTRY_HEAD.unpack_from
        refs = False
        with shard.env.begin(db=shard.inbox) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(prefix + _U64.pack(after + 1)):
                return out
            for key, value in cursor:
                if key[:plen] != prefix:
                    break
                type_, count, created = unpack_head(value)
                refs = refs or type_ == ENTRY_MSG_REF
                out.append(InboxEntry(_U64.unpack_from(key, plen)[0], type_, count, created, value[10:]))
                if len(out) >= limit:
                    break
        return self._resolve(out) if refs else out

    def _resolve(self, entries: list[InboxEntry]) -> list[InboxEntry]:
        """Replace group references by the MSG they point to (body_key set).

        A reference whose body is gone (expired) stays ENTRY_MSG_REF with an
        empty tail: the pump skips it, a later cumulative ACK deletes it.
        """
        out: list[InboxEntry] = []
        for entry in entries:
            if entry.type != ENTRY_MSG_REF:
                out.append(entry)
                continue
            key = entry.tail
            shard = self._shards[shard_of(group_of_body(key), self.shards)]
            with shard.env.begin(db=shard.bodies) as txn:
                raw = txn.get(key)
            if raw is None:
                out.append(InboxEntry(entry.seq, ENTRY_MSG_REF, 0, entry.created, b"", key))
            else:
                out.append(InboxEntry(entry.seq, ENTRY_MSG, MSG_FIELDS, entry.created, raw[_BODY_HEAD.size :], key))
        return out

    def get_group(self, group: str) -> GroupInfo | None:
        shard = self._shard(group)
        with shard.env.begin(db=shard.groups) as txn:
            raw = txn.get(group.encode())
        return None if raw is None else _decode_group(group, raw)

    def body_refs(self, key: bytes) -> tuple[int, bool] | None:
        """(references, complete) of a group message body, or None; for tests and operators."""
        shard = self._shard(group_of_body(key))
        with shard.env.begin(db=shard.bodies) as txn:
            raw = txn.get(key)
        if raw is None:
            return None
        refs, _created, complete = _BODY_HEAD.unpack_from(raw)
        return refs, bool(complete)

    def prekey_count(self, user: str, device: int) -> int:
        """One-time prekeys stored for (user, device): keys.count."""
        shard = self._shard(user)
        with shard.env.begin(db=shard.prekeys) as txn:
            raw = txn.get(_prekey_head_key(user, device))
        return 0 if raw is None else _PREKEY_HEAD.unpack_from(raw)[1]

    def signed_prekey(self, user: str, device: int) -> SignedPrekey | None:
        """The signed prekey stored for (user, device), or None; for tests and operators."""
        shard = self._shard(user)
        with shard.env.begin(db=shard.prekeys) as txn:
            raw = txn.get(_prekey_head_key(user, device))
        return None if raw is None else _decode_prekey_head(raw)[0]

    def pending(self, user: str, device: int) -> int:
        shard = self._shard(user)
        with shard.env.begin(db=shard.meta) as txn:
            raw = txn.get(device_prefix(user, device))
        return 0 if raw is None else _META.unpack(raw)[1]

    def stats(self) -> dict[str, Any]:
        """Entry counts per database, for tests and operators."""
        out: dict[str, Any] = {}
        for i, shard in enumerate(self._shards):
            with shard.env.begin() as txn:
                out[f"shard-{i:03d}"] = {
                    name: txn.stat(db)["entries"]
                    for name, db in (
                        ("users", shard.users),
                        ("inbox", shard.inbox),
                        ("meta", shard.meta),
                        ("idem", shard.idem),
                        ("groups", shard.groups),
                        ("bodies", shard.bodies),
                        ("fanout", shard.fanout),
                        ("prekeys", shard.prekeys),
                    )
                }
        return out

    # --- writes (one transaction per batch, in a worker thread) -------------

    def apply_batch(self, shard_index: int, ops: list[WriteOp]) -> list[object]:
        """Apply ``ops`` in one transaction; return a result or exception per op.

        An op that raises leaves nothing behind (ops check before they
        write), and the others still commit. If the commit itself fails
        (map or disk full) every op gets :class:`StoreFullError` and nothing
        of the batch is stored.
        """
        shard = self._shards[shard_index]
        results: list[object] = []
        try:
            with shard.env.begin(write=True) as txn:
                writer = _WriteTxn(shard, txn, self._inbox_writer(txn, shard.inbox, shard.meta), self._msg_tail)
                for op in ops:
                    try:
                        results.append(writer.apply(op))
                    except FrameError as exc:
                        results.append(exc)
                writer.flush()
            shard.devices.update(writer.devices_read)
        except lmdb.MapFullError as exc:
            full = StoreFullError(f"store full: {exc}")
            return [full] * len(ops)
        except lmdb.DiskError as exc:
            full = StoreFullError(f"disk error: {exc}")
            return [full] * len(ops)
        except lmdb.Error as exc:
            error = StoreError(f"store error: {exc}")
            return [error] * len(ops)
        except Exception as exc:
            # A bug in an op: the transaction is aborted (nothing of the batch
            # is stored), every op reports it, and the shard keeps serving.
            log.exception("write batch failed on shard %d", shard_index)
            error = StoreError(f"internal store error: {type(exc).__name__}")
            return [error] * len(ops)
        return results


class _WriteTxn:
    """The write operations, applied inside one LMDB write transaction."""

    def __init__(
        self,
        shard: _Shard,
        txn: lmdb.Transaction,
        inbox: inbox_writer.InboxWriter,
        msg_tail: Callable[[bytes, str, int, str | None, int, bytes], bytes],
    ) -> None:
        self.shard = shard
        self.txn = txn
        self.msg_tail = msg_tail
        # Appends and deletes in the inboxes; keeps each touched device's
        # counters until flush(), so a batch reads and writes them once.
        self.inbox = inbox
        self.devices_read: dict[str, dict[int, bytes]] = {}

    def flush(self) -> None:
        self.inbox.flush()

    def apply(self, op: WriteOp) -> object:
        # One dict lookup instead of a chain of isinstance checks: ops are
        # plain dataclasses, never subclassed.
        handler = _HANDLERS.get(type(op))
        if handler is None:
            raise TypeError(f"unknown write op {op!r}")
        return handler(self, op)

    def _devices(self, user: str) -> dict[int, bytes] | None:
        devices = self.shard.devices.get(user)
        if devices is not None:
            return devices
        raw = self.txn.get(user.encode(), db=self.shard.users)
        if raw is None:
            return None
        devices = self.devices_read[user] = _decode_user(user, raw).devices
        return devices

    def register(self, op: RegisterUser) -> bool:
        key = op.user.encode()
        if self.txn.get(key, db=self.shard.users) is not None:
            raise FrameError(CONFLICT, "user taken")
        record = {"devices": {1: op.identity_key}, "created": op.created}
        self.txn.put(key, msgpack.packb(record, use_bin_type=True), db=self.shard.users)
        return True

    def store_message(self, op: StoreMessage) -> Stored:
        idem_key = op.to.encode() + b"\x00" + device_prefix(op.sender, op.sender_device) + op.msg_id
        txn = self.txn
        idem = self.shard.idem
        # One descent for the usual case (a new msg_id): insert unless present.
        if not txn.put(idem_key, _U64.pack(op.ts), db=idem, overwrite=False):
            previous = txn.get(idem_key, db=idem)
            assert previous is not None
            return Stored(_U64.unpack(previous)[0], True, ())
        devices = self._devices(op.to)
        error = None
        if devices is None:
            error = FrameError(NOT_FOUND, f"no such user {op.to}", ref=op.msg_id)
        elif op.payloads.keys() != devices.keys():
            expected = set(devices)
            if op.to == op.sender:
                # A note to self goes to the user's other devices only.
                expected.discard(op.sender_device)
            if set(op.payloads) != expected:
                missing = sorted(expected - set(op.payloads))
                extra = sorted(set(op.payloads) - expected)
                error = FrameError(CONFLICT, f"missing {missing}; extra {extra}", ref=op.msg_id)
        if error is not None:
            txn.delete(idem_key, db=idem)
            raise error
        entries = []
        msg_id, sender, sender_device, to, ts = op.msg_id, op.sender, op.sender_device, op.to, op.ts
        append, msg_tail = self.inbox.append, self.msg_tail
        for device, payload in op.payloads.items():
            tail = msg_tail(msg_id, sender, sender_device, None, ts, payload)
            seq = append(device_prefix(to, device), ENTRY_MSG, MSG_FIELDS, ts, tail)
            entries.append((device, InboxEntry(seq, ENTRY_MSG, MSG_FIELDS, ts, tail)))
        return Stored(ts, False, tuple(op.payloads), tuple(entries))

    def append_entries(self, op: AppendEntries) -> Appended:
        devices: Iterable[int]
        if op.devices is None:
            known = self._devices(op.user)
            if known is None:
                return Appended(())
            skip = op.skip_device
            devices = known if skip is None else [d for d in known if d != skip]
        else:
            devices = op.devices
        user, type_, count, created, tails = op.user, op.type, op.count, op.created, op.tails
        append_many = self.inbox.append_many
        made = []
        for device in devices:
            seq = append_many(device_prefix(user, device), type_, count, created, tails)
            made.extend([(device, InboxEntry(seq + i, type_, count, created, tail)) for i, tail in enumerate(tails)])
        return Appended(tuple(made))

    def delete_up_to(self, op: DeleteUpTo) -> int:
        return self.inbox.delete_up_to(device_prefix(op.user, op.device), op.seq)

    def drop_fan_out_marker(self, op: DropFanOutMarker) -> bool:
        return bool(self.txn.delete(op.body_key, db=self.shard.fanout))

    # --- groups -------------------------------------------------------------

    def _group(self, group: str) -> tuple[GroupInfo, int] | None:
        raw = self.txn.get(group.encode(), db=self.shard.groups)
        if raw is None:
            return None
        created = msgpack.unpackb(raw, raw=False)[4]
        return _decode_group(group, raw), created

    def create_group(self, op: CreateGroup) -> GroupInfo:
        key = op.info.group.encode()
        if self.txn.get(key, db=self.shard.groups) is not None:
            raise FrameError(CONFLICT, "group id taken")
        self.txn.put(key, _encode_group(op.info, op.created), db=self.shard.groups)
        return op.info

    def change_group(self, op: ChangeGroup) -> tuple[GroupInfo, tuple[str, ...]]:
        found = self._group(op.group)
        if found is None:
            raise FrameError(NOT_FOUND, f"no such group {op.group}")
        info, created = found
        changed, notify = apply_change(info, op.actor, op.op, op.args, op.max_members)
        if changed is not info:
            key = op.group.encode()
            if changed.members:
                self.txn.put(key, _encode_group(changed, created), db=self.shard.groups)
            else:
                self.txn.delete(key, db=self.shard.groups)
        return changed, notify

    def prepare_group_message(self, op: PrepareGroupMessage) -> GroupPrepared:
        key = body_key(op.group, op.sender, op.sender_device, op.msg_id)
        found = self._group(op.group)
        raw = self.txn.get(key, db=self.shard.bodies)
        if raw is not None:
            _refs, created, complete = _BODY_HEAD.unpack_from(raw)
            members = () if complete or found is None else found[0].members
            return GroupPrepared(key, created, bool(complete), members, b"" if complete else bytes(raw[_BODY_HEAD.size :]))
        done = self.txn.get(_sent_group_key(key), db=self.shard.idem)
        if done is not None:
            # Delivered and acked by everyone: a retry gets the original SENT.
            return GroupPrepared(key, _U64.unpack(done)[0], True, ())
        if found is None:
            raise FrameError(NOT_FOUND, f"no such group {op.group}", ref=op.msg_id)
        info = found[0]
        if op.sender not in info.members:
            raise FrameError(FORBIDDEN, "not a member of that group", ref=op.msg_id)
        tail = self.msg_tail(op.msg_id, op.sender, op.sender_device, op.group, op.ts, op.payload)
        self.txn.put(key, _BODY_HEAD.pack(0, op.ts, 0) + tail, db=self.shard.bodies)
        return GroupPrepared(key, op.ts, False, info.members, tail)

    def fan_out(self, op: FanOut) -> FannedOut:
        marker = self.txn.get(op.body_key, db=self.shard.fanout)
        if marker is not None:
            return FannedOut(_FANOUT.unpack(marker)[0], ())
        refs = 0
        made: list[tuple[str, tuple[tuple[int, InboxEntry], ...]]] = []
        key, tail, created = op.body_key, op.body_tail, op.created
        for user in op.users:
            devices = self._devices(user)
            if not devices:
                continue
            entries = tuple(
                (device, self._append_ref(user, device, created, key, tail))
                for device in devices
                if not (user == op.sender and device == op.sender_device)
            )
            refs += len(entries)
            # Without the body at hand the pumps read the references back.
            made.append((user, entries if tail else ()))
        self.txn.put(key, _FANOUT.pack(refs, created), db=self.shard.fanout)
        return FannedOut(refs, tuple(made))

    def _append_ref(self, user: str, device: int, created: int, body_key: bytes, body_tail: bytes) -> InboxEntry:
        """A reference to ``body_key`` in one inbox; returned as the MSG it stands for."""
        seq = self.inbox.append(device_prefix(user, device), ENTRY_MSG_REF, 0, created, body_key)
        return InboxEntry(seq, ENTRY_MSG, MSG_FIELDS, created, body_tail, body_key)

    def complete_group_message(self, op: CompleteGroupMessage) -> bool:
        raw = self.txn.get(op.body_key, db=self.shard.bodies)
        if raw is None:
            return False
        refs, created, _complete = _BODY_HEAD.unpack_from(raw)
        refs += op.refs
        if refs <= 0:
            self._drop_body(op.body_key, created)
        else:
            self.txn.put(op.body_key, _BODY_HEAD.pack(refs, created, 1) + raw[_BODY_HEAD.size :], db=self.shard.bodies)
        return True

    def _drop_body(self, key: bytes, created: int) -> None:
        """Delete a complete body whose last reference is gone, keeping its
        idempotency record (swept with the retention period like a SEND's)."""
        self.txn.delete(key, db=self.shard.bodies)
        self.txn.put(_sent_group_key(key), _U64.pack(created), db=self.shard.idem)

    def release_bodies(self, op: ReleaseBodies) -> int:
        deleted = 0
        for key, count in op.counts.items():
            raw = self.txn.get(key, db=self.shard.bodies)
            if raw is None:
                continue
            refs, created, complete = _BODY_HEAD.unpack_from(raw)
            refs -= count
            if complete and refs <= 0:
                self._drop_body(key, created)
                deleted += 1
            else:
                # Incomplete: the fan-out's CompleteGroupMessage adds its refs later.
                self.txn.put(key, _BODY_HEAD.pack(refs, created, complete) + raw[_BODY_HEAD.size :], db=self.shard.bodies)
        return deleted

    # --- the key directory ----------------------------------------------------

    def publish_keys(self, op: PublishKeys) -> int:
        devices = self._devices(op.user)
        if devices is None or op.device not in devices:
            raise FrameError(NOT_FOUND, f"no such device {op.user}/{op.device}")
        txn, db = self.txn, self.shard.prekeys
        head_key = _prekey_head_key(op.user, op.device)
        raw = txn.get(head_key, db=db)
        stored, count = (None, 0) if raw is None else _decode_prekey_head(raw)
        prefix = device_prefix(op.user, op.device) + _OPK
        if op.replace:
            # Checked before by the caller: replace comes with a signed prekey.
            stored, count = None, 0
        spk = op.signed_prekey
        if spk is None:
            if stored is None:
                raise FrameError(CONFLICT, "no signed prekey stored for this device: publish signed_prekey with the prekeys")
            spk = stored
        elif stored is not None and spk.id == stored.id and spk.key != stored.key:
            raise FrameError(CONFLICT, f"signed prekey id {spk.id} is already stored with another key")
        seen: set[int] = set()
        repeated: set[int] = set()
        for prekey_id, _ in op.prekeys:
            (repeated if prekey_id in seen else seen).add(prekey_id)
        if repeated:
            raise FrameError(CONFLICT, f"prekey ids repeated in the request: {_id_list(sorted(repeated))}")
        fresh = []
        taken = []
        for prekey_id, key in op.prekeys:
            current = None if op.replace else txn.get(prefix + _U32.pack(prekey_id), db=db)
            if current is None:
                fresh.append((prekey_id, key))
            elif current != key:
                taken.append(prekey_id)
        if taken:
            raise FrameError(CONFLICT, f"prekey ids already stored with another key: {_id_list(sorted(taken))}")
        total = count + len(fresh)
        if total > op.max_stored:
            raise FrameError(
                TOO_LARGE, f"{count} prekeys stored + {len(fresh)} would exceed {op.max_stored} per device"
            )
        if op.replace:
            cursor = txn.cursor(db=db)
            positioned = cursor.set_range(prefix)
            while positioned and bytes(cursor.key()).startswith(prefix):
                positioned = cursor.delete() and len(cursor.key()) > 0
        for prekey_id, key in fresh:
            txn.put(prefix + _U32.pack(prekey_id), key, db=db)
        txn.put(head_key, _encode_prekey_head(spk, total), db=db)
        return total

    def fetch_bundles(self, op: FetchBundles) -> Bundles:
        devices = self._devices(op.user)
        if devices is None:
            raise FrameError(NOT_FOUND, f"no such user {op.user}")
        wanted = sorted(devices if op.devices is None else set(op.devices) & devices.keys())
        txn, db = self.txn, self.shard.prekeys
        cursor = txn.cursor(db=db)
        bundles: list[Bundle] = []
        events: list[tuple[int, InboxEntry]] = []
        for device in wanted:
            if op.user == op.requester and device == op.requester_device:
                continue  # no session with oneself: keep its prekeys for the others
            head_key = _prekey_head_key(op.user, device)
            raw = txn.get(head_key, db=db)
            if raw is None:
                continue  # never published: nothing to start a session with
            spk, count = _decode_prekey_head(raw)
            prekey = None
            prefix = device_prefix(op.user, device) + _OPK
            if cursor.set_range(prefix) and cursor.key()[: len(prefix)] == prefix:
                prekey = (_U32.unpack_from(cursor.key(), len(prefix))[0], bytes(cursor.value()))
                cursor.delete()
                before, count = count, max(count - 1, 0)
                txn.put(head_key, _encode_prekey_head(spk, count), db=db)
                if count < op.low_threshold <= before:
                    events.append((device, self._append_event(op.user, device, "keys.low", {"count": count}, op.created)))
            bundles.append(Bundle(device, devices[device], spk, prekey))
        return Bundles(tuple(bundles), tuple(events))

    def _append_event(self, user: str, device: int, kind: str, body: dict[str, Any], created: int) -> InboxEntry:
        tail = event_tail(kind, body, created)
        seq = self.inbox.append(device_prefix(user, device), ENTRY_EVENT, EVENT_FIELDS, created, tail)
        return InboxEntry(seq, ENTRY_EVENT, EVENT_FIELDS, created, tail)

    def expire(self, op: ExpireEntries) -> tuple[bytes | None, int]:
        """Sweep up to ``op.limit`` inbox keys, then the idempotency records."""
        txn = self.txn
        cursor = txn.cursor(db=self.shard.inbox)
        deleted = 0
        seen = 0
        pending_drop: dict[bytes, int] = {}
        positioned = cursor.set_range(op.resume) if op.resume else cursor.first()
        while positioned:
            if seen >= op.limit:
                resume: bytes | None = bytes(cursor.key())
                break
            seen += 1
            key, value = cursor.item()
            created = _ENTRY_HEAD.unpack_from(value)[2]
            if created < op.cutoff:
                prefix = bytes(key[:-8])
                pending_drop[prefix] = pending_drop.get(prefix, 0) + 1
                deleted += 1
                # delete() moves to the next record and returns True even when
                # there is none: past the end the cursor's key is empty.
                positioned = cursor.delete() and len(cursor.key()) > 0
                continue
            positioned = cursor.next()
        else:
            resume = None
        for prefix, count in pending_drop.items():
            self.inbox.forget(prefix, count)
        if resume is None:
            # Idempotency records live as long as the messages they guard.
            idem = txn.cursor(db=self.shard.idem)
            positioned = idem.first()
            while positioned:
                if _U64.unpack(idem.value())[0] < op.cutoff:
                    positioned = idem.delete() and len(idem.key()) > 0
                else:
                    positioned = idem.next()
            # Group bodies and fan-out markers go with the references to them.
            for db, head in ((self.shard.bodies, _BODY_HEAD), (self.shard.fanout, _FANOUT)):
                cur = txn.cursor(db=db)
                positioned = cur.first()
                while positioned:
                    if head.unpack_from(cur.value())[1] < op.cutoff:
                        positioned = cur.delete() and len(cur.key()) > 0
                    else:
                        positioned = cur.next()
        return resume, deleted


_HANDLERS: dict[type, Callable[[_WriteTxn, Any], object]] = {
    StoreMessage: _WriteTxn.store_message,
    DeleteUpTo: _WriteTxn.delete_up_to,
    AppendEntries: _WriteTxn.append_entries,
    RegisterUser: _WriteTxn.register,
    FanOut: _WriteTxn.fan_out,
    ReleaseBodies: _WriteTxn.release_bodies,
    PrepareGroupMessage: _WriteTxn.prepare_group_message,
    CompleteGroupMessage: _WriteTxn.complete_group_message,
    DropFanOutMarker: _WriteTxn.drop_fan_out_marker,
    ChangeGroup: _WriteTxn.change_group,
    CreateGroup: _WriteTxn.create_group,
    ExpireEntries: _WriteTxn.expire,
    PublishKeys: _WriteTxn.publish_keys,
    FetchBundles: _WriteTxn.fetch_bundles,
}


def _id_list(ids: list[int], shown: int = 10) -> str:
    """``[1, 2, 3]``, or the first ``shown`` and how many more (reasons stay short)."""
    if len(ids) <= shown:
        return str(ids)
    return f"{ids[:shown]} and {len(ids) - shown} more"

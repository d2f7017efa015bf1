"""The default client: every message end-to-end encrypted, profile ``relay-v1``.

:func:`open_client` connects a device like :func:`relay.client.client.open_transport`
and puts :class:`SecureClient` on top. The transport never sees a plaintext:

- **1:1** — :meth:`SecureClient.send` hands the transport the plaintext map;
  the transport's outbox asks :meth:`SecureClient.seal` for one ciphertext per
  recipient device when the SEND is built, so each device gets its own Double
  Ratchet message. A device without a session holds the SEND back while
  :meth:`SecureClient.start_sessions` fetches its bundle (``keys.fetch``),
  checks the bundle's identity key against ``devices.list`` and runs X3DH. A
  409 refreshes the device set and seals for the new devices only.
- **Groups** — :meth:`SecureClient.send_group` keeps one Sender Keys chain per
  group; before the first message, and to every member device added later,
  the chain goes out as an ``skdm`` plaintext over the pairwise sessions, and
  the group message waits for their SENT. A member or device gone from the
  group since the last send starts a new chain.
- **Receiving** — the transport calls :meth:`SecureClient.open` on each new
  entry before it can be acked: it decrypts, saves the new state and the
  plaintext (:class:`relay.client.keystore.KeyStore`), then hands it out. A
  redelivered entry is handed out from the saved plaintext, or swallowed if
  it was handed out before. An entry that cannot be decrypted is handed out
  with ``error`` set, never dropped.

Errors: :class:`relay.client.errors.SendError` when a recipient cannot be
encrypted to; decryption failures are reported on the :class:`Message`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from relay.e2ee import pairwise, plaintext
from relay.e2ee.errors import DecodeError, E2EEError, NoSessionError
from relay.e2ee.prekeys import OPK_BATCH
from relay.e2ee.safety import format_safety_number, safety_number
from relay.e2ee.sender_keys import OwnChain, SenderChains
from relay.e2ee.x3dh import Bundle

from .bookkeeping import SealError
from .client import RelayClient, open_transport
from .errors import ClientError, ConnectionClosed, RequestError, SendError
from .identity import DeviceIdentity
from .keystore import KeyStore, OwnGroup, Received
from .types import Entry, Event, GroupInfo, Message, Receipt

__all__ = ["SecureClient", "open_client"]

log = logging.getLogger("relay.client")

#: Refill one-time prekeys when the relay holds fewer than this at connect.
_LOW_PREKEYS = 10
#: Rounds of "hand the chain out, check the members" before a group send.
_GROUP_ATTEMPTS = 3
#: Group messages kept per sender device while its key has not come.
_WAITING_MAX = 1000
#: How often a long-lived client checks whether its signed prekey is due.
_ROTATE_CHECK_S = 3600.0


def now_ms() -> int:
    return int(time.time() * 1000)


class SecureClient:
    """A connected device whose messages are end-to-end encrypted.

    Use it like :class:`relay.client.RelayClient` (which it wraps as
    ``transport``); :meth:`send` and :meth:`send_group` take a text or a
    plaintext map, and :meth:`entries` yields :class:`Message` entries with
    ``plaintext`` (or ``error``) set.
    """

    def __init__(self, identity: DeviceIdentity, keys: KeyStore) -> None:
        self.identity = identity
        self.keys = keys
        self._transport: RelayClient | None = None
        self._group_locks: dict[str, trio.Lock] = {}
        self._persist_lock = trio.Lock()
        self._publish_lock = trio.Lock()
        # Held group messages opened when their key came, to hand out.
        self._ready: deque[Message] = deque()

    @property
    def transport(self) -> RelayClient:
        assert self._transport is not None, "not connected yet"
        return self._transport

    @property
    def user(self) -> str:
        return self.identity.user

    @property
    def device(self) -> int:
        return self.identity.device

    # ------------------------------------------------------------- sending

    async def send(
        self, to: str, message: str | Mapping[str, Any], *, timeout: float | None = None
    ) -> tuple[bytes, int]:
        """Encrypt ``message`` (a text, or a plaintext map with ``type``) for
        every device of user ``to`` and wait for SENT; returns ``(msg_id, ts)``.

        Raises :class:`SendError` (e.g. 404 unknown user, or no session could
        be set up with a device), :class:`ValueError` for a bad plaintext map."""
        msg_id = await self.submit(to, message)
        return msg_id, await self.transport.wait_sent(msg_id, timeout=timeout)

    async def submit(self, to: str, message: str | Mapping[str, Any]) -> bytes:
        """Like :meth:`send` without waiting for SENT (see :meth:`wait_sent`)."""
        return await self.transport.submit(to, _encode(message))

    async def wait_sent(self, msg_id: bytes, *, timeout: float | None = None) -> int:
        """The SENT ts of ``msg_id`` from :meth:`submit`; see ``RelayClient.wait_sent``."""
        return await self.transport.wait_sent(msg_id, timeout=timeout)

    async def send_group(
        self, group: str, message: str | Mapping[str, Any], *, timeout: float | None = None
    ) -> tuple[bytes, int]:
        """Encrypt ``message`` with this device's sender key for ``group`` and
        send it once for all members; returns ``(msg_id, ts)``.

        First makes sure every other member device holds the current chain
        (``skdm`` over the pairwise sessions, waiting for their SENT), and
        starts a new chain if a member or device left since the last send.
        Raises :class:`RequestError` 403/404 when not a member or no such
        group, :class:`SendError` as :meth:`send`."""
        data = _encode(message)
        async with self._group_locks.setdefault(group, trio.Lock()):
            for _ in range(_GROUP_ATTEMPTS):
                own, handed_out = await self._prepare_group(group, timeout)
                if not handed_out:
                    break
                # Only a round that had to hand the chain out asks again:
                # someone removed meanwhile must not be left holding it.
                members = (await self.transport.group_info(group))["members"]
                if all(m in members for m in own.members):
                    break
            payload = own.chain.encrypt(group, data)
            self.keys.dirty = True
        return await self.transport.send_group(group, payload, timeout=timeout)

    async def _prepare_group(self, group: str, timeout: float | None) -> tuple[OwnGroup, bool]:
        """This device's chain for ``group``, new if someone left, and
        whether it had to be handed to some member device now."""
        info = await self.transport.group_info(group)
        members = list(info["members"])
        me = (self.user, self.device)
        devices: set[tuple[str, int]] = set()
        for user in members:
            devices.update((user, d) for d in await self.devices_of(user) if (user, d) != me)
        own = self.keys.own_groups.get(group)
        if own is None or any(m not in members for m in own.members) or not own.devices <= devices:
            # First send, or someone left: a chain the leaver never saw.
            previous = () if own is None else (own.chain.chain_id,)
            own = OwnGroup(OwnChain.generate(avoid=previous))
            self.keys.own_groups[group] = own
        own.members, own.devices = members, devices
        self.keys.dirty = True
        missing = devices - own.distributed
        if missing:
            skdm = plaintext.encode(own.chain.distribution(group, now_ms()))
            users = sorted({user for user, _ in missing})
            msg_ids = [await self.transport.submit(user, skdm) for user in users]
            for msg_id in msg_ids:
                self.keys.sent_control(msg_id)
            for msg_id in msg_ids:
                await self.transport.wait_sent(msg_id, timeout=timeout)
            # One SEND reaches every device of its user.
            own.distributed |= {dev for dev in devices if dev[0] in users}
            self.keys.dirty = True
        return own, bool(missing)

    async def devices_of(self, user: str) -> tuple[int, ...]:
        """The devices of ``user`` (cached; ``devices.list`` when unknown)."""
        return await self.transport.known_devices(user)

    # ------------------------------------------------- EndToEnd (transport)

    @property
    def dirty(self) -> bool:
        # A write in flight counts: its snapshot cleared the flag, but what
        # the writer is about to send may depend on it being on disk.
        return self.keys.dirty or self._persist_lock.locked()

    def seal(self, to: str, device: int, payload: bytes) -> bytes | None:
        peer = self.keys.peers.get((to, device))
        if peer is None:
            return None
        try:
            sealed = pairwise.encrypt(peer, payload)
        except E2EEError as exc:
            raise SealError(0, f"cannot encrypt for {to} device {device}: {exc}") from None
        self.keys.dirty = True
        return sealed

    async def persist(self) -> None:
        # Serialized here, written in a thread; the lock keeps an older
        # snapshot from landing after a newer one.
        async with self._persist_lock:
            data = self.keys.snapshot()
            if data is not None:
                await trio.to_thread.run_sync(self.keys.write, data)

    async def start_sessions(self, user: str, devices: set[int]) -> None:
        result = await self.transport.request(
            "keys.fetch", {"user": user, "devices": sorted(devices)}, retry=True
        )
        got: set[int] = set()
        try:
            entries = result["devices"]
            for entry in entries:
                device = int(entry["device"])
                if device not in devices:
                    continue
                bundle = Bundle.from_wire(entry)
                known = self.keys.contacts.get((user, device))
                if bundle.identity_key != known:
                    raise SendError(
                        0,
                        f"{user} device {device}: the key bundle's identity key is not the "
                        "one devices.list gives; not encrypting to it",
                    )
                self.keys.peers[(user, device)] = pairwise.start_session(
                    self.identity.signing_key, bundle, self.keys.peers.get((user, device))
                )
                self.keys.dirty = True
                got.add(device)
        except (KeyError, TypeError, ValueError) as exc:
            raise SendError(0, f"malformed keys.fetch answer for {user!r}: {exc!r}") from None
        except E2EEError as exc:
            raise SendError(0, f"cannot start a session with {user!r}: {exc}") from None
        if devices - got:
            raise SendError(
                404, f"{user} device(s) {sorted(devices - got)} published no keys; cannot encrypt to them"
            )

    def on_devices(self, user: str, devices: list[dict[str, Any]]) -> None:
        for entry in devices:
            try:
                device, key = int(entry["device"]), bytes(entry["identity_key"])
            except (KeyError, TypeError, ValueError):
                continue
            if self.keys.see_identity(user, device, key):
                log.warning("the identity key of %s device %d changed: check the safety number", user, device)

    def handed_out(self, entry: Entry) -> None:
        if isinstance(entry, Message):
            self.keys.mark_taken((entry.from_user, entry.from_device, entry.msg_id))

    async def open(self, entry: Message | Receipt | Event) -> Entry | None:
        if isinstance(entry, Event):
            if entry.kind == "keys.low":
                self.transport.spawn(self._refill_quietly)
            return entry
        if isinstance(entry, Receipt):
            return None if entry.msg_id in self.keys.control_sent else entry
        key = (entry.from_user, entry.from_device, entry.msg_id)
        seen = self.keys.received.get(key)
        if seen is not None:
            # Opened before a crash or reconnect: show it once, from what was saved.
            return None if seen.taken else self._message(entry, seen)
        try:
            data = await self._decrypt(entry)
        except NoSessionError as exc:
            if entry.group is None or not self._hold(entry):
                received = Received(None, f"cannot decrypt: {type(exc).__name__}: {exc}")
            else:
                # Held until the sender's key comes; a redelivery is swallowed.
                self.keys.remember(key, Received(None, taken=True))
                await self.persist()
                return None
        except E2EEError as exc:
            received = Received(None, f"cannot decrypt: {type(exc).__name__}: {exc}")
        else:
            received = Received(data)
            try:
                message = plaintext.decode(data)
            except DecodeError:
                message = None
            if message is not None and message["type"] in plaintext.CONTROL_TYPES:
                try:
                    self._apply_control(entry, message)
                    received = Received(None, taken=True)
                except E2EEError as exc:
                    received = Received(None, f"bad {message['type']}: {type(exc).__name__}: {exc}")
        self.keys.remember(key, received)
        await self.persist()
        return None if received.taken else self._message(entry, received)

    async def _decrypt(self, entry: Message) -> bytes:
        sender = (entry.from_user, entry.from_device)
        if entry.group is not None:
            chains = self.keys.sender_chains.get((entry.group, *sender))
            if chains is None:
                raise NoSessionError(f"no sender key from {sender[0]} device {sender[1]} in this group")
            data = chains.decrypt(entry.group, entry.payload)
            self.keys.dirty = True
            return data
        claimed = _prekey_identity(entry.payload)
        if claimed is not None and self.keys.contacts.get(sender) != claimed:
            # A prekey message: its IK_A must be the sender's registered key.
            await self._refresh_devices(entry.from_user)
        known = self.keys.contacts.get(sender, b"")
        result = pairwise.decrypt(
            self.identity.signing_key,
            self.keys.peers.get(sender),
            entry.payload,
            known,
            self.keys.prekeys,
            now_ms(),
        )
        self.keys.peers[sender] = result.peer
        if result.used_one_time_prekey is not None:
            self.keys.prekeys.remove_one_time_prekey(result.used_one_time_prekey)
        self.keys.dirty = True
        return result.plaintext

    def _apply_control(self, entry: Message, message: dict[str, Any]) -> None:
        if message["type"] == "skdm":
            if entry.group is not None:
                log.warning("skdm from %s arrived as a group message; ignored", entry.from_user)
                return
            key = (message["group"], entry.from_user, entry.from_device)
            chains = self.keys.sender_chains.get(key)
            if chains is None:
                chains = self.keys.sender_chains[key] = SenderChains()
            chains.add(message)
            self.keys.dirty = True
            self._release_waiting(key, chains)

    def _hold(self, entry: Message) -> bool:
        """Keep a group message whose sender key has not come yet (the
        profile does not order the skdm before the message). False when the
        sender already has that many waiting: it is shown as undecryptable."""
        assert entry.group is not None
        waiting = self.keys.waiting.setdefault((entry.group, entry.from_user, entry.from_device), [])
        if len(waiting) >= _WAITING_MAX:
            return False
        waiting.append([entry.msg_id, entry.ts, entry.payload])
        self.keys.dirty = True
        return True

    def _release_waiting(self, key: tuple[str, str, int], chains: SenderChains) -> None:
        """Open the messages held for this sender key; they are handed out by
        :meth:`ready` (they were acked when they were held)."""
        group, user, device = key
        for msg_id, ts, payload in self.keys.waiting.pop(key, []):
            try:
                received = Received(chains.decrypt(group, payload))
            except E2EEError as exc:
                received = Received(None, f"cannot decrypt: {type(exc).__name__}: {exc}")
            message_key = (user, device, msg_id)
            self.keys.remember(message_key, received)
            self._ready.append(Message(0, msg_id, user, device, group, ts, payload))
        self.keys.dirty = True

    def ready(self) -> Entry | None:
        while self._ready:
            entry = self._ready.popleft()
            received = self.keys.received.get((entry.from_user, entry.from_device, entry.msg_id))
            if received is not None and not received.taken:
                return self._message(entry, received)
        return None

    def _message(self, entry: Message, received: Received) -> Message:
        decoded: dict[str, Any] | None = None
        error = received.error
        if received.plaintext is not None:
            try:
                decoded = dict(plaintext.decode(received.plaintext))
            except DecodeError as exc:
                error = f"undecodable plaintext: {exc}"
        return Message(
            entry.seq,
            entry.msg_id,
            entry.from_user,
            entry.from_device,
            entry.group,
            entry.ts,
            entry.payload,
            plaintext=decoded,
            error=error,
            identity_changed=(entry.from_user, entry.from_device) in self.keys.changed,
        )

    async def _refresh_devices(self, user: str) -> None:
        """``devices.list`` of ``user`` into the contacts. A failure is raised
        (:class:`RequestError`), not taken as a mismatch: the entry being
        opened is not acked and is opened again by the next receive()."""
        result = await self.transport.request("devices.list", {"user": user}, retry=True)
        try:
            self.on_devices(user, result["devices"])
        except (KeyError, TypeError) as exc:
            raise RequestError(0, f"malformed devices.list answer for {user!r}: {exc!r}") from None

    # ------------------------------------------------------------- prekeys

    async def publish_keys(self, *, refill: bool = False) -> None:
        """Publish what the relay lacks: a new signed prekey when the current
        one is a week old (or none), and one-time prekeys (a new batch with
        ``refill``).

        The private halves are saved before the relay sees the public ones,
        and each one-time prekey is sent at most once: it counts as published
        before the request goes out and the request is never resent (a
        resend could put back one the relay has handed out meanwhile). A
        publish whose answer is lost leaves the relay with fewer prekeys,
        which ``keys.count`` at the next connect or ``keys.low`` makes up.
        The first publish from this state carries ``replace``, with a fresh
        batch each time until one is answered: whatever the relay held for
        this device before has no private half here."""
        async with self._publish_lock:
            keys, prekeys = self.keys, self.keys.prekeys
            now = now_ms()
            prekeys.expire(now)
            if prekeys.needs_rotation(now):
                prekeys.new_signed_prekey(self.identity.signing_key, now)
                keys.dirty = True
            spk = prekeys.current_signed_prekey
            assert spk is not None
            replace = not keys.replace_confirmed
            if replace or refill:
                prekeys.new_one_time_prekeys(OPK_BATCH)
            fresh = prekeys.one_time_prekeys_after(keys.published_opk)
            if spk.id == keys.published_spk and not fresh and not replace:
                return
            args: dict[str, Any] = {"signed_prekey": spk.public(), "prekeys": [p.public() for p in fresh]}
            if replace:
                args["replace"] = True
            keys.published_spk = spk.id
            if fresh:
                keys.published_opk = max(p.id for p in fresh)
            keys.dirty = True
            await self.persist()
            try:
                await self.transport.request("keys.publish", args)
            except ConnectionClosed as exc:
                log.info("keys.publish may not have reached the relay (%s); keys.count will tell", exc)
                return
            if replace:
                keys.replace_confirmed = True
                keys.dirty = True
                await self.persist()

    async def _refill_quietly(self) -> None:
        try:
            await self.publish_keys(refill=True)
        except ClientError as exc:
            log.warning("could not refill one-time prekeys: %s", exc)

    async def _start(self) -> None:
        """After READY: publish keys the relay lacks, refill if it runs low."""
        await self.publish_keys()
        count = await self.transport.request("keys.count", {}, retry=True)
        if isinstance(count, int) and count < _LOW_PREKEYS:
            await self.publish_keys(refill=True)

    async def _rotate_forever(self) -> None:
        """A client that stays connected for weeks still rotates its signed
        prekey weekly (publish_keys does nothing until it is due)."""
        while True:
            await trio.sleep(_ROTATE_CHECK_S)
            try:
                await self.publish_keys()
            except ClientError as exc:
                log.warning("could not rotate the signed prekey: %s", exc)

    # ---------------------------------------------------------- safety numbers

    async def safety_numbers(self, user: str) -> list[tuple[int, str]]:
        """``(device, "12345 67890 …")`` for each device of ``user``: the 60
        digits both sides compare to rule out a relay in the middle."""
        result = await self.transport.request("devices.list", {"user": user}, retry=True)
        self.on_devices(user, result["devices"])
        out = []
        for entry in result["devices"]:
            digits = safety_number(
                self.identity.identity_key, self.user, bytes(entry["identity_key"]), user
            )
            out.append((int(entry["device"]), format_safety_number(digits)))
        return out

    def accept_identity(self, user: str) -> None:
        """Clear the 'identity changed' flag of ``user``'s devices (after the
        safety number was compared)."""
        for key in [k for k in self.keys.changed if k[0] == user]:
            self.keys.changed.discard(key)
            self.keys.dirty = True

    def identity_changed(self, user: str) -> list[int]:
        """Devices of ``user`` whose identity key changed since first seen."""
        return sorted(d for u, d in self.keys.changed if u == user)

    # ------------------------------------------------- the transport's API

    def entries(self) -> AsyncIterator[Entry]:
        """:class:`Message` (decrypted), :class:`Receipt`, :class:`Event` and
        ``Signal`` entries as they arrive; see ``RelayClient.entries``."""
        return self.transport.entries()

    async def receive(self) -> Entry:
        return await self.transport.receive()

    async def mark_read(self, sender: str, msg_ids: Iterable[bytes]) -> None:
        await self.transport.mark_read(sender, msg_ids)

    async def signal(self, to: str, kind: str) -> None:
        await self.transport.signal(to, kind)

    async def request(self, op: str, args: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return await self.transport.request(op, args, **kwargs)

    async def create_group(self, name: str, members: Iterable[str] = ()) -> GroupInfo:
        return await self.transport.create_group(name, members)

    async def group_info(self, group: str) -> GroupInfo:
        return await self.transport.group_info(group)

    async def add_members(self, group: str, members: Iterable[str]) -> GroupInfo:
        return await self.transport.add_members(group, members)

    async def remove_members(self, group: str, members: Iterable[str]) -> GroupInfo:
        return await self.transport.remove_members(group, members)

    async def promote(self, group: str, members: Iterable[str]) -> GroupInfo:
        return await self.transport.promote(group, members)

    async def demote(self, group: str, members: Iterable[str]) -> GroupInfo:
        return await self.transport.demote(group, members)

    async def rename_group(self, group: str, name: str) -> GroupInfo:
        return await self.transport.rename_group(group, name)

    async def leave_group(self, group: str) -> GroupInfo:
        return await self.transport.leave_group(group)


def _encode(message: str | Mapping[str, Any]) -> bytes:
    """A text or a plaintext map as the profile's plaintext bytes (``ts`` added)."""
    if isinstance(message, str):
        return plaintext.encode(plaintext.text(message, now_ms()))
    if not isinstance(message, Mapping):
        raise TypeError(f"a message is a text (str) or a plaintext map with 'type', not {type(message).__name__}")
    body = dict(message)
    body.setdefault("ts", now_ms())
    return plaintext.encode(body)


def _prekey_identity(payload: bytes) -> bytes | None:
    """IK_A of a prekey-form pairwise payload, else None."""
    try:
        decoded = pairwise.decode_payload(payload)
    except DecodeError:
        return None  # pairwise.decrypt reports it
    return None if decoded.prekey is None else decoded.prekey.identity_key


@asynccontextmanager
async def open_client(
    identity: DeviceIdentity,
    state_dir: str | os.PathLike[str] | None = None,
    *,
    keys: KeyStore | None = None,
    connect_timeout: float = 10.0,
    **options: Any,
) -> AsyncIterator[SecureClient]:
    """Connect ``identity`` with end-to-end encryption; yields a
    :class:`SecureClient` once READY arrived and the relay has its keys.

    The end-to-end state is ``keys``, or the one in ``state_dir``
    (``e2ee.state`` beside ``state.json``, locked while the client runs:
    :class:`ValueError` if another process has it). One of them is required:
    state kept only in memory loses every session and prekey at exit, and
    whatever waits for the device then cannot be decrypted; for throwaway
    identities pass ``keys=KeyStore.open(None)`` explicitly. If the relay
    does not answer the key requests after READY within ``connect_timeout``:
    :class:`ConnectionClosed`. ``connect_timeout``
    and the other options (``register``, ``token``, ``reconnect``,
    ``window``, ...) and the errors are those of ``open_transport``."""
    if keys is None and state_dir is None:
        raise ValueError("open_client needs state_dir or keys (KeyStore.open(None) keeps them in memory)")
    store = keys if keys is not None else KeyStore.open(state_dir)
    try:
        secure = SecureClient(identity, store)
        async with open_transport(identity, connect_timeout=connect_timeout, e2e=secure, **options) as transport:
            secure._transport = transport
            with trio.move_on_after(connect_timeout if connect_timeout else math.inf) as scope:
                await secure._start()
            if scope.cancelled_caught:
                raise ConnectionClosed(0, f"the relay did not answer the key requests within {connect_timeout} s")
            transport.spawn(secure._rotate_forever)
            yield secure
            await secure.persist()
    finally:
        if keys is None:
            store.close()

"""A group of three in one process: create it, write once to everyone, count
receipts per member device ("delivered to 2 of 2, read by 2").

    python -m relay serve --port 8765 --data /tmp/relay-data &
    python examples/group_chat.py ws://127.0.0.1:8765/v1

Payloads here are plain msgpack text maps; a real app encrypts them with its
group's Sender Keys first (profile relay-v1 of PROTOCOL.md; not in the library yet).
"""

from __future__ import annotations

import secrets
import sys
import time

import msgpack
import trio

from relay.client import (
    DeviceIdentity,
    Event,
    Message,
    Receipt,
    ReceiptTally,
    RelayClient,
    open_client,
)


def text(body: str) -> bytes:
    return msgpack.packb({"type": "text", "body": body, "ts": int(time.time() * 1000)})


async def main(url: str) -> None:
    suffix = secrets.token_hex(3)  # fresh names, so the example can run again
    alice, bob, carol = (
        DeviceIdentity.generate(url, f"{name}-{suffix}") for name in ("alice", "bob", "carol")
    )
    for ident in (alice, bob, carol):
        async with open_client(ident, register=True):
            pass  # REGISTER -> READY: the account exists (a real app saves ident)

    async with open_client(alice) as a, open_client(bob) as b, open_client(carol) as c:
        info = await a.create_group("friends", [bob.user, carol.user])
        group = info["group"]
        print(f"{alice.user} created {info['name']!r} ({group}): members {info['members']}")

        # The devices the message goes to: every device of every member, minus ours.
        expected = sum([len(await a.devices(user)) for user in info["members"]]) - 1

        tally = ReceiptTally()
        msg_id, ts = await a.send_group(group, text("hi both!"))
        tally.track(msg_id, expected=expected)
        print(f"{alice.user} -> {group}: stored by the relay at {ts} (✓)")

        async def member(client: RelayClient, name: str) -> None:
            async for entry in client.entries():  # taking an entry acks it: delivered
                if isinstance(entry, Event) and entry.kind == "group.changed":
                    print(f"{name} sees version {entry.body['version']} of {entry.body['name']!r}")
                elif isinstance(entry, Message) and entry.group == group:
                    body = msgpack.unpackb(entry.payload)["body"]
                    print(f"{name} got {body!r} from {entry.from_user} in {entry.group}")
                    await client.mark_read(entry.from_user, [entry.msg_id])  # blue ✓✓
                    return

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(member, b, bob.user)
                nursery.start_soon(member, c, carol.user)

        with trio.fail_after(10):
            async for entry in a.entries():
                if isinstance(entry, Receipt) and tally.add(entry):
                    counts = tally.counts(msg_id)
                    print(f"{alice.user}: {counts.describe()}")
                    if counts.read == expected:
                        break
    print("done")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/group_chat.py ws://HOST:PORT/v1")
    trio.run(main, sys.argv[1])

"""A group of three in one process: create it, write once to everyone, count
receipts per member device ("delivered to 2 of 2, read by 2").

    python -m relay serve --port 8765 --data /tmp/relay-data &
    python3 examples/group_chat.py ws://127.0.0.1:8765/v1

Group messages are encrypted once with the sender's Sender Keys chain, which
the library first hands every member device over the pairwise sessions
(profile relay-v1, docs/e2e.md). State is kept in memory here (throwaway users).
"""

from __future__ import annotations

import secrets
import sys

import trio

from relay.client import (
    ClientError,
    DeviceIdentity,
    Event,
    KeyStore,
    Message,
    Receipt,
    ReceiptTally,
    SecureClient,
    open_client,
)


async def main(url: str) -> None:
    suffix = secrets.token_hex(3)  # fresh names, so the example can run again
    alice, bob, carol = (
        DeviceIdentity.generate(url, f"{name}-{suffix}") for name in ("alice", "bob", "carol")
    )
    keys = {ident.user: KeyStore.open(None) for ident in (alice, bob, carol)}  # in memory
    for ident in (alice, bob, carol):
        async with open_client(ident, keys=keys[ident.user], register=True):
            pass  # REGISTER -> READY: the account exists (a real app saves ident)

    async with (
        open_client(alice, keys=keys[alice.user]) as a,
        open_client(bob, keys=keys[bob.user]) as b,
        open_client(carol, keys=keys[carol.user]) as c,
    ):
        info = await a.create_group("friends", [bob.user, carol.user])
        group = info["group"]
        print(f"{alice.user} created {info['name']!r} ({group}): members {info['members']}")

        # The devices the message goes to: every device of every member, minus ours.
        expected = sum([len(await a.devices_of(user)) for user in info["members"]]) - 1

        tally = ReceiptTally()
        msg_id, ts = await a.send_group(group, "hi both!")
        tally.track(msg_id, expected=expected)
        print(f"{alice.user} -> {group}: stored by the relay at {ts} (✓)")

        async def member(client: SecureClient, name: str) -> None:
            async for entry in client.entries():  # taking an entry acks it: delivered
                if isinstance(entry, Event) and entry.kind == "group.changed":
                    print(f"{name} sees version {entry.body['version']} of {entry.body['name']!r}")
                elif isinstance(entry, Message) and entry.group == group:
                    body = entry.plaintext["body"] if entry.plaintext else entry.error
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
        sys.exit("usage: python3 examples/group_chat.py ws://HOST:PORT/v1")
    try:
        trio.run(main, sys.argv[1])
    except (ClientError, OSError, ValueError) as exc:
        sys.exit(f"group_chat.py: {exc}")

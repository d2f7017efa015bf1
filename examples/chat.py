"""Two users in one process: register alice and bob, send, receive, read receipts.

    python -m relay serve --port 8765 --data /tmp/relay-data &
    python3 examples/chat.py [ws://127.0.0.1:8765/v1]

Payloads here are plain msgpack text maps; a real app encrypts them first
(profile relay-v1 of PROTOCOL.md; not in the library yet).
"""

from __future__ import annotations

import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import trio

from relay.client import DeviceIdentity, Message, Receipt, open_client


def text(body: str) -> bytes:
    return msgpack.packb({"type": "text", "body": body, "ts": int(time.time() * 1000)})


async def main(url: str) -> None:
    state = Path(tempfile.mkdtemp(prefix="relay-chat-"))
    try:
        await chat(url, state)
    finally:
        shutil.rmtree(state, ignore_errors=True)  # the keys of throwaway users


async def chat(url: str, state: Path) -> None:
    suffix = secrets.token_hex(3)  # fresh names, so the example can run again
    alice = DeviceIdentity.generate(url, f"alice-{suffix}")
    bob = DeviceIdentity.generate(url, f"bob-{suffix}")
    for ident in (alice, bob):
        async with open_client(ident, register=True):
            pass  # REGISTER -> READY: the account exists, this key is device 1
        ident.save(state / ident.user)
        print(f"registered {ident.user} (device {ident.device}), state in {state / ident.user}")

    # Later runs would start from the saved state:
    alice = DeviceIdentity.load(state / alice.user)
    bob = DeviceIdentity.load(state / bob.user)

    async with open_client(alice) as a, open_client(bob) as b:
        msg_id, ts = await a.send(bob.user, text("hi bob!"))
        print(f"alice -> bob {msg_id.hex()[:8]}: stored by the relay at {ts} (✓)")

        with trio.fail_after(10):
            async for entry in b.entries():  # taking an entry acks it: delivered
                if isinstance(entry, Message):
                    body = msgpack.unpackb(entry.payload)["body"]
                    print(f"bob got {body!r} from {entry.from_user}")
                    await b.mark_read(entry.from_user, [entry.msg_id])
                    break

        seen: set[str] = set()
        with trio.fail_after(10):
            async for entry in a.entries():
                if isinstance(entry, Receipt) and entry.msg_id == msg_id:
                    mark = "✓✓" if entry.status == Receipt.DELIVERED else "✓✓ (blue)"
                    print(f"alice sees {entry.status_name} by {entry.by_user} {mark}")
                    seen.add(entry.status_name)
                    if seen >= {"delivered", "read"}:
                        break
    print("done")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        sys.exit("usage: python3 examples/chat.py [ws://HOST:PORT/v1]")
    trio.run(main, sys.argv[1] if len(sys.argv) == 2 else "ws://127.0.0.1:8765/v1")

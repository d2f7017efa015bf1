"""Two users in one process: register alice and bob, send, receive, read receipts.

    python -m relay serve --port 8765 --data /tmp/relay-data &
    python3 examples/chat.py [ws://127.0.0.1:8765/v1]

Every message is end-to-end encrypted (profile relay-v1, docs/e2e.md): the
relay stores and forwards ciphertext only. Each user's keys and sessions live
in its state directory (state.json and e2ee.state).
"""

from __future__ import annotations

import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import trio

from relay.client import ClientError, DeviceIdentity, Message, Receipt, open_client


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
        async with open_client(ident, state / ident.user, register=True):
            pass  # REGISTER -> READY, prekeys published: the account exists, this key is device 1
        ident.save(state / ident.user)
        print(f"registered {ident.user} (device {ident.device}), keys in {state / ident.user} (removed at exit)")

    # Later runs would start from the saved state:
    alice = DeviceIdentity.load(state / alice.user)
    bob = DeviceIdentity.load(state / bob.user)

    async with (
        open_client(alice, state / alice.user) as a,
        open_client(bob, state / bob.user) as b,
    ):
        msg_id, ts = await a.send(bob.user, "hi bob!")  # X3DH, then one ciphertext per device
        print(f"alice -> bob {msg_id.hex()[:8]}: stored by the relay at {ts} (✓)")

        with trio.fail_after(10):
            async for entry in b.entries():  # taking an entry acks it: delivered
                if isinstance(entry, Message):
                    body = entry.plaintext["body"] if entry.plaintext else entry.error
                    print(f"bob got {body!r} from {entry.from_user} (decrypted on bob's side)")
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
    url = sys.argv[1] if len(sys.argv) == 2 else "ws://127.0.0.1:8765/v1"
    try:
        trio.run(main, url)
    except (ClientError, OSError, ValueError) as exc:
        sys.exit(f"chat.py: {exc}")

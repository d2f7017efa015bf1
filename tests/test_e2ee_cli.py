"""The CLI always encrypts: the README tour against a real relay process,
then every file the relay wrote and its log are scanned for the plaintexts
and for the private keys in the clients' state; and a client killed with
``kill -9`` between decrypting a message and acking it shows the message
exactly once after it restarts, with its session intact.
"""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from relay.client.identity import DeviceIdentity
from tests.relayproc import REPO_ROOT, spawn_relay
from tests.test_cli_groups import Cli

pytestmark = pytest.mark.slow

SECRET_1 = "hello bob: the vault code is 7f3a9c21"
SECRET_2 = "hi both: meet at the old mill 55e1"
SECRET_3 = "reply: the mill burned down 0b44"


#: Paths in e2ee.state whose 32-byte values are secrets (the others there,
#: such as their_identity_key, dhr, ik, ek, contacts, are public keys).
SECRET_PATH = re.compile(r"^e2ee\.prekeys\.|\.(rk|dhs|cks|ckr|chain_key|signing_seed)$|skipped")


def private_keys(state: Path) -> dict[str, bytes]:
    """Every private value a client holds: the identity seed and its X25519
    form, prekey privates, root, chain and ratchet keys, sender-key chains."""
    ident = DeviceIdentity.load(state)
    out = {
        "identity seed": bytes(ident.signing_key),
        "identity x25519": bytes(ident.signing_key.to_curve25519_private_key()),
    }
    raw = msgpack.unpackb((state / "e2ee.state").read_bytes(), raw=False, strict_map_key=False)

    def walk(path: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{path}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{path}[{i}]", v)
        elif isinstance(value, bytes) and len(value) == 32 and SECRET_PATH.search(path):
            out[path] = value

    walk("e2ee", raw)
    return out


def scan(paths: list[Path], needles: dict[str, bytes]) -> list[str]:
    found = []
    for path in paths:
        data = path.read_bytes()
        for name, needle in needles.items():
            for form in (needle, base64.b64encode(needle), needle.hex().encode()):
                if form in data:
                    found.append(f"{name} in {path}")
    return found


def relay_files(data: Path, log: Path) -> list[Path]:
    return [p for p in data.rglob("*") if p.is_file()] + [log]


async def test_tour_is_encrypted_and_the_relay_holds_no_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    async with spawn_relay(data) as relay:
        cli = Cli(capsys, relay.url, tmp_path)
        await cli.register("alice", "bob", "carol")
        sent = (await cli("send", "--state", cli.state("alice"), "--to", "bob", SECRET_1)).one
        assert sent["status"] == "sent"

        # While bob is offline the message waits in the relay's store: as ciphertext.
        plaintexts = {"secret 1": SECRET_1.encode()}
        assert scan(relay_files(data, relay.log_path), plaintexts) == []

        got = await cli.recv("bob", 1, "--read")
        assert got[0]["text"] == SECRET_1 and got[0]["from"] == "alice"
        receipts = await cli.recv("alice", 2)
        assert [r["status"] for r in receipts] == ["delivered", "read"]

        group = (await cli.group("create", "alice", "--name", "friends", "--members", "bob,carol")).one["group"]
        await cli.send_group("alice", group, SECRET_2)
        carol = await cli.recv("carol", 2)
        assert carol[0]["kind"] == "group.changed" and carol[1]["text"] == SECRET_2
        bob = await cli.recv("bob", 2)
        assert bob[1]["text"] == SECRET_2 and bob[1]["group"] == group

        monkeypatch.setattr(sys, "stdin", io.StringIO(SECRET_3 + "\n"))  # as echo writes it
        assert (await cli("send", "--state", cli.state("bob"), "--to", "alice", "-")).one["status"] == "sent"
        # Her own group.changed, the two delivered receipts of her group message, bob's reply.
        entries = await cli.recv("alice", 4)
        assert [e["type"] for e in entries] == ["event", "receipt", "receipt", "message"], entries
        assert entries[3]["text"] == SECRET_3 and entries[3]["from"] == "bob"

        number_a = (await cli("safety-number", "--state", cli.state("alice"), "--with", "bob")).one
        number_b = (await cli("safety-number", "--state", cli.state("bob"), "--with", "alice")).one
        assert number_a["safety_number"] == number_b["safety_number"]
        groups = number_a["safety_number"].split(" ")
        assert len(groups) == 12 and all(len(g) == 5 and g.isdigit() for g in groups)
        log_path = relay.log_path
    plaintexts.update({"secret 2": SECRET_2.encode(), "secret 3": SECRET_3.encode()})
    secrets = dict(plaintexts)
    for user in ("alice", "bob", "carol"):
        for name, value in private_keys(Path(cli.state(user))).items():
            secrets[f"{user} {name}"] = value
    assert len(secrets) > 20  # identity, prekeys, sessions and chains of three users
    assert scan(relay_files(data, log_path), secrets) == []


KILLER = """
import os, signal, sys
import relay.client.keystore as keystore

write = keystore.KeyStore.write

def write_then_die(self, data):
    write(self, data)
    if data is not None and any(r.plaintext is not None and not r.taken for r in self.received.values()):
        os.kill(os.getpid(), signal.SIGKILL)  # decrypted and saved, not yet shown or acked

keystore.KeyStore.write = write_then_die
from relay.cli import main
sys.exit(main(sys.argv[1:]))
"""


async def test_client_killed_between_decrypt_and_ack_shows_the_message_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import trio

    async with spawn_relay(tmp_path / "data") as relay:
        cli = Cli(capsys, relay.url, tmp_path)
        await cli.register("alice", "bob")
        await cli("send", "--state", cli.state("alice"), "--to", "bob", "exactly once")

        def killed_recv() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-c", KILLER, "recv", "--state", cli.state("bob"), "--count", "1"],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            )

        crashed = await trio.to_thread.run_sync(killed_recv)
        assert crashed.returncode == -9, crashed.stderr
        assert "exactly once" not in crashed.stdout

        shown = await cli.recv("bob", 1)
        assert shown[0]["text"] == "exactly once"
        # Shown once: nothing more waits, and the session still works.
        again = await cli("recv", "--state", cli.state("bob"), "--count", "1", "--timeout", "1")
        assert again.code == 1 and again.lines == []
        await cli("send", "--state", cli.state("alice"), "--to", "bob", "and then")
        assert (await cli.recv("bob", 1))[0]["text"] == "and then"
        await cli("send", "--state", cli.state("bob"), "--to", "alice", "back")
        # Alice: a delivered receipt for each of her two messages (once each), then the reply.
        entries = await cli.recv("alice", 3)
        assert [e["type"] for e in entries] == ["receipt", "receipt", "message"], entries
        assert entries[2]["text"] == "back"


async def test_a_group_of_five_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = ["ann", "ben", "cat", "dan", "eve"]
    async with spawn_relay(tmp_path / "data") as relay:
        cli = Cli(capsys, relay.url, tmp_path)
        await cli.register(*names)
        group = (await cli.group("create", "ann", "--name", "five", "--members", ",".join(names[1:]))).one["group"]
        for name in names:
            assert (await cli.send_group(name, group, f"{name} says hi")).one["status"] == "sent"
        for name in names:
            run = await cli("recv", "--state", cli.state(name), "--timeout", "1")
            assert run.code == 0, run.err
            texts = {line["text"] for line in run.lines if line["type"] == "message"}
            assert texts == {f"{n} says hi" for n in names if n != name}, run.lines
            assert not [line for line in run.lines if "error" in line]
        # ann removes eve; eve gets the event and none of what follows.
        await cli.group("remove", "ann", group, "eve")
        await cli.send_group("ben", group, "after eve left")
        cat = await cli("recv", "--state", cli.state("cat"), "--timeout", "1")
        assert [e["text"] for e in cat.lines if e["type"] == "message"] == ["after eve left"]
        eve = await cli("recv", "--state", cli.state("eve"), "--timeout", "1")
        assert [line["kind"] for line in eve.lines if line["type"] == "event"] == ["group.changed"]
        assert not [line for line in eve.lines if line["type"] == "message"]

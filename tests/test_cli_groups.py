"""The group commands of the CLI against an in-process relay: ``relay group
create|info|add|remove|promote|demote|rename|leave``, ``relay send --group``
and what ``relay recv`` prints for group messages, group.changed events and
the receipts of a group message.

Each command runs ``relay.cli.main(argv)`` in a worker thread (it calls
``trio.run`` itself) while the relay fixture serves on this test's trio loop;
stdout and stderr come from ``capsys``. Commands run one at a time.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from relay.cli import main
from relay.protocol.frames import is_group
from tests.relayproc import REPO_ROOT, spawn_relay


@dataclass
class Run:
    code: int
    lines: list[dict[str, Any]]
    err: str

    @property
    def one(self) -> dict[str, Any]:
        assert self.code == 0, self.err
        assert len(self.lines) == 1, self.lines
        return self.lines[0]


class Cli:
    def __init__(self, capsys: pytest.CaptureFixture[str], url: str, tmp: Path) -> None:
        self.capsys = capsys
        self.url = url
        self.tmp = tmp

    def state(self, user: str) -> str:
        return str(self.tmp / user)

    async def __call__(self, *argv: str) -> Run:
        def run() -> int:
            try:
                return main(list(argv))
            except SystemExit as exc:  # argparse errors
                return int(exc.code or 0)

        with trio.fail_after(30):
            code = await trio.to_thread.run_sync(run)
        out, err = self.capsys.readouterr()
        assert "Traceback" not in err, err
        return Run(code, [json.loads(line) for line in out.splitlines()], err)

    async def register(self, *users: str) -> None:
        for user in users:
            run = await self(
                "register", "--server", self.url, "--user", user, "--state", self.state(user)
            )
            assert run.one["user"] == user

    async def group(self, action: str, user: str, *args: str) -> Run:
        return await self("group", action, "--state", self.state(user), *args)

    async def send_group(self, user: str, group: str, text: str) -> Run:
        return await self("send", "--state", self.state(user), "--group", group, text)

    async def recv(self, user: str, count: int, *extra: str) -> list[dict[str, Any]]:
        run = await self(
            "recv", "--state", self.state(user), "--count", str(count), "--timeout", "5", *extra
        )
        assert run.code == 0, run.err
        entries = [line for line in run.lines if line["type"] != "signal"]
        assert len(entries) == count, entries
        return entries


@pytest.fixture
def cli(relay, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys, relay.url, tmp_path)


def info_of(run: Run) -> dict[str, Any]:
    info = run.one
    assert set(info) == {"group", "name", "version", "members", "admins"}, info
    return info


def changed(entry: dict[str, Any]) -> dict[str, Any]:
    """The body of a group.changed line, after checking the line's shape."""
    assert entry["type"] == "event" and entry["kind"] == "group.changed", entry
    assert isinstance(entry["ts"], int)
    # Strict JSON all the way down (no NaN, no bytes): it survived json.loads,
    # and it dumps back without allow_nan.
    json.dumps(entry, allow_nan=False)
    return entry["body"]


async def test_group_lifecycle(cli: Cli) -> None:
    await cli.register("ann", "ben", "cat")

    info = info_of(await cli.group("create", "ann", "--name", "team", "--members", "ben"))
    g = info["group"]
    assert is_group(g)
    assert info == {
        "group": g,
        "name": "team",
        "version": 1,
        "members": ["ann", "ben"],
        "admins": ["ann"],
    }

    info = info_of(await cli.group("add", "ann", g, "cat"))
    assert (info["version"], info["members"]) == (2, ["ann", "ben", "cat"])
    info = info_of(await cli.group("rename", "ann", g, "the team"))
    assert (info["version"], info["name"]) == (3, "the team")
    info = info_of(await cli.group("promote", "ann", g, "ben", "cat"))
    assert (info["version"], info["admins"]) == (4, ["ann", "ben", "cat"])
    info = info_of(await cli.group("demote", "ann", g, "cat"))
    assert (info["version"], info["admins"]) == (5, ["ann", "ben"])
    # A change that changes nothing keeps the version.
    assert info_of(await cli.group("add", "ann", g, "cat"))["version"] == 5
    assert info_of(await cli.group("info", "cat", g)) == info

    sent = (await cli.send_group("ann", g, "hello team")).one
    assert sent["status"] == "sent" and sent["group"] == g
    assert isinstance(sent["ts"], int) and len(sent["msg_id"]) == 32

    # cat joined at version 2: it sees every change from then on, then the message.
    entries = await cli.recv("cat", 5)
    bodies = [changed(e) for e in entries[:4]]
    assert [b["version"] for b in bodies] == [2, 3, 4, 5]
    assert bodies[-1] == {**info, "actor": "ann"}
    message = entries[4]
    assert message["type"] == "message" and message["group"] == g
    assert (message["from"], message["device"], message["text"]) == ("ann", 1, "hello team")
    assert message["msg_id"] == sent["msg_id"]

    # ben was there from the start: version 1 too.
    entries = await cli.recv("ben", 6, "--read")
    assert [changed(e)["version"] for e in entries[:5]] == [1, 2, 3, 4, 5]
    assert entries[5]["text"] == "hello team" and entries[5]["group"] == g

    # Removed members get the event of their removal; a leaver gets its own.
    info = info_of(await cli.group("remove", "ann", g, "cat"))
    assert (info["version"], info["members"], info["admins"]) == (6, ["ann", "ben"], ["ann", "ben"])
    info = info_of(await cli.group("leave", "ben", g))
    assert (info["version"], info["members"], info["admins"]) == (7, ["ann"], ["ann"])
    (removal,) = await cli.recv("cat", 1)
    assert changed(removal)["members"] == ["ann", "ben"] and changed(removal)["actor"] == "ann"
    removal, left = await cli.recv("ben", 2)
    assert changed(removal)["version"] == 6
    assert changed(left) == {**info, "actor": "ben"}
    assert info_of(await cli.group("info", "ann", g)) == info

    # ann's inbox: the seven changes and, in between, receipts for "hello
    # team" from the two member devices (cat's delivered; ben's delivered and
    # read), one per device and status: "delivered to 2 of 2, read by 1".
    entries = await cli.recv("ann", 10)
    events = [e for e in entries if e["type"] == "event"]
    assert [changed(e)["version"] for e in events] == [1, 2, 3, 4, 5, 6, 7]
    receipts = [e for e in entries if e["type"] != "event"]
    assert all(r["type"] == "receipt" and r["msg_id"] == sent["msg_id"] for r in receipts)
    delivered = {(r["by"], r["device"]) for r in receipts}
    read = {(r["by"], r["device"]) for r in receipts if r["status"] == "read"}
    assert (delivered, read) == ({("ben", 1), ("cat", 1)}, {("ben", 1)})


async def test_group_refusals(cli: Cli) -> None:
    await cli.register("ann", "ben", "dan")
    g = info_of(await cli.group("create", "ann", "--name", "team", "--members", "ben"))["group"]

    def refused(run: Run, code: int, command: str) -> None:
        assert run.code == 1 and run.lines == [], run
        line = run.err.strip()
        assert "\n" not in line and line.startswith(f"relay: {command}: "), line
        assert line.endswith(f"({code})"), line

    # A member who is not an admin cannot add, rename, promote or remove.
    refused(await cli.group("add", "ben", g, "dan"), 403, "group add")
    refused(await cli.group("rename", "ben", g, "x"), 403, "group rename")
    refused(await cli.group("promote", "ben", g, "ben"), 403, "group promote")
    refused(await cli.group("remove", "ben", g, "ann"), 403, "group remove")
    # Demoting the last admin is refused too.
    refused(await cli.group("demote", "ann", g, "ann"), 403, "group demote")
    # A non-member can neither look, nor send, nor leave.
    refused(await cli.group("info", "dan", g), 403, "group info")
    refused(await cli.group("leave", "dan", g), 403, "group leave")
    refused(await cli.send_group("dan", g, "let me in"), 403, "send")
    # Unknown groups and users are 404.
    refused(await cli.group("info", "ann", "g." + "A" * 22), 404, "group info")
    refused(await cli.group("add", "ann", g, "ghost"), 404, "group add")
    refused(
        await cli.group("create", "ann", "--name", "x", "--members", "ghost"), 404, "group create"
    )
    # Nothing of that changed the group.
    assert info_of(await cli.group("info", "ann", g))["version"] == 1

    # Bad arguments are exit code 2, before any connection.
    for argv in (
        ("group", "info", "--state", cli.state("ann"), "g.short"),
        ("group", "add", "--state", cli.state("ann"), g, "Not-A-User"),
        ("group", "create", "--state", cli.state("ann"), "--name", "x", "--members", "a,B"),
        ("group", "add", "--state", cli.state("ann"), g),  # no USER
        ("group", "--state", cli.state("ann")),  # no action
        ("send", "--state", cli.state("ann"), "--group", "nope", "hi"),
        ("send", "--state", cli.state("ann"), "--group", g, "--to", "ben", "hi"),
        ("send", "--state", cli.state("ann"), "hi"),  # neither --to nor --group
    ):
        run = await cli(*argv)
        assert run.code == 2 and run.lines == [], (argv, run)
        assert run.err.strip(), argv

    # A missing state directory is one line and exit 1.
    run = await cli("group", "info", "--state", cli.state("nobody"), g)
    assert run.code == 1 and "relay register" in run.err


async def test_send_to_still_works_and_has_no_group(cli: Cli) -> None:
    await cli.register("ann", "ben")
    sent = (await cli("send", "--state", cli.state("ann"), "--to", "ben", "hi")).one
    assert set(sent) == {"msg_id", "status", "ts"}
    (message,) = await cli.recv("ben", 1)
    assert "group" not in message and message["text"] == "hi"
    refused = await cli("send", "--state", cli.state("ann"), "--to", "ghost", "hi")
    assert refused.code == 1 and refused.err.strip().endswith("(404)"), refused


async def test_as_processes(tmp_path: Path) -> None:
    """The real entry point in its own processes: exit codes and stderr as a
    shell sees them (one relay process, pure fast path, for speed)."""

    async def relay_cmd(*argv: str) -> tuple[int, str, str]:
        proc = await trio.run_process(
            [sys.executable, "-m", "relay", *argv],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=str(REPO_ROOT),
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        return proc.returncode, proc.stdout.decode(), proc.stderr.decode()

    async with spawn_relay(tmp_path / "data", fastpath="pure") as relay:
        with trio.fail_after(60):
            for user in ("ann", "ben"):
                code, _, err = await relay_cmd(
                    "register",
                    "--server",
                    relay.url,
                    "--user",
                    user,
                    "--state",
                    str(tmp_path / user),
                )
                assert code == 0, err
            code, out, err = await relay_cmd(
                "group",
                "create",
                "--state",
                str(tmp_path / "ann"),
                "--name",
                "t",
                "--members",
                "ben",
            )
            assert code == 0, err
            g = json.loads(out)["group"]
            code, out, err = await relay_cmd(
                "group", "add", "--state", str(tmp_path / "ben"), g, "ann"
            )
            assert (code, out) == (1, "")
            assert err.count("\n") == 1 and err.endswith("(403)\n") and "Traceback" not in err
            code, out, err = await relay_cmd(
                "send", "--state", str(tmp_path / "ben"), "--group", g, "hi"
            )
            assert code == 0, err
            assert json.loads(out)["group"] == g

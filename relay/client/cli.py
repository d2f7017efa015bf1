"""The client commands of ``relay``: register, send, recv, group, safety-number.

``relay/cli.py`` calls :func:`add_commands` on its subparsers; each command
sets ``handler`` (``handler(args) -> int``). Output is one JSON object per
line on stdout; errors are one line on stderr and a non-zero exit code
(1 for errors, 2 for bad arguments), never a traceback.

Every message is end-to-end encrypted (profile ``relay-v1``, see
``docs/e2e.md``): the commands use :func:`relay.client.open_client` with the
state directory's ``e2ee.state``. There is no plaintext mode.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import math
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import trio

from .errors import AuthError, ClientError, ConnectionClosed, RequestError, SendError
from .identity import STATE_FILE, DeviceIdentity, valid_user
from .keystore import KeyStore
from .secure import SecureClient, open_client
from .types import Entry, Event, GroupInfo, Message, Receipt, Signal

__all__ = ["add_commands", "entry_to_json", "parse_members"]

#: How long a command tries to reach the relay before it says it cannot.
CONNECT_TIMEOUT_S = 5.0


class _CommandError(Exception):
    """A failure with a one-line message for stderr."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _jsonable(value: Any) -> Any:
    """msgpack values -> strict JSON: bytes become base64 strings, map keys
    strings, msgpack extension types ``{"ext": code, "data": base64}``,
    non-finite floats strings (``"nan"``, ``"inf"``); anything else unknown
    its ``repr``."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {_json_key(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, msgpack.ExtType):  # a namedtuple: before the tuple case
        return {"ext": value.code, "data": base64.b64encode(value.data).decode("ascii")}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return repr(value)


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        return base64.b64encode(key).decode("ascii")
    return str(key)


def entry_to_json(entry: Entry) -> dict[str, Any]:
    """The JSON line ``relay recv`` prints for ``entry``."""
    if isinstance(entry, Message):
        out: dict[str, Any] = {
            "type": "message",
            "from": entry.from_user,
            "device": entry.from_device,
            "msg_id": entry.msg_id.hex(),
            "ts": entry.ts,
        }
        if entry.group is not None:
            out["group"] = entry.group
        message = entry.plaintext
        if entry.error is not None or message is None:
            out["error"] = entry.error or "no plaintext"
        elif message.get("type") == "text" and isinstance(message.get("body"), str):
            out["text"] = message["body"]
        elif message.get("type") == "media":
            out["media"] = _jsonable({k: v for k, v in message.items() if k not in ("type", "ts")})
        else:
            out["unsupported"] = str(message.get("type"))
            out["plaintext"] = _jsonable(message)
        if entry.identity_changed:
            out["identity_changed"] = True
        return out
    if isinstance(entry, Receipt):
        return {
            "type": "receipt",
            "msg_id": entry.msg_id.hex(),
            "by": entry.by_user,
            "device": entry.by_device,
            "status": entry.status_name,
            "ts": entry.ts,
        }
    if isinstance(entry, Event):
        return {"type": "event", "kind": entry.kind, "body": _jsonable(entry.body), "ts": entry.ts}
    return {"type": "signal", "from": entry.from_user, "to": entry.to, "kind": entry.kind}


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False), flush=True)


def _load(state: str) -> DeviceIdentity:
    try:
        return DeviceIdentity.load(state)
    except FileNotFoundError:
        raise _CommandError(
            f"no {STATE_FILE} in {state!r}: run `relay register --state {state} ...` first"
        ) from None
    except (ValueError, OSError) as exc:
        raise _CommandError(f"cannot read the state in {state!r}: {exc}") from None


@asynccontextmanager
async def _connect(
    identity: DeviceIdentity, state: str | Path, timeout: float, *, fresh: bool = False, **options: Any
) -> AsyncIterator[SecureClient]:
    """``open_client`` on the state directory (``fresh``: ignoring an
    ``e2ee.state`` already there), giving up on an unreachable relay after a
    few seconds rather than the whole command's timeout."""
    try:
        keys = KeyStore.open(state, fresh=fresh)
    except ValueError as exc:
        raise _CommandError(str(exc)) from None
    try:
        async with open_client(identity, keys=keys, connect_timeout=min(timeout, CONNECT_TIMEOUT_S), **options) as client:
            yield client
    finally:
        keys.close()


async def _changed_identity(client: SecureClient, user: str) -> list[int]:
    """Devices of ``user`` whose identity key changed (devices.list is asked
    first, so a change made since the last run shows too)."""
    with contextlib.suppress(RequestError):  # the send reports an unknown user itself
        await client.transport.devices(user)
    return client.identity_changed(user)


def _describe(exc: ClientError) -> str:
    if isinstance(exc, AuthError):
        what = {
            401: "authentication failed (unknown user or device, or wrong key)",
            403: "registration refused (token missing or wrong)",
            409: "user name is already taken",
            400: "request refused as malformed (check the user name)",
        }.get(exc.code, "refused")
        return f"{what}: {exc.reason} ({exc.code})" if exc.reason else f"{what} ({exc.code})"
    if isinstance(exc, ConnectionClosed) and exc.code == 4409:
        return "this device connected again elsewhere (4409)"
    if isinstance(exc, ConnectionClosed) and exc.reason.startswith("cannot connect to "):
        return exc.reason.split(": ", 1)[0]
    if isinstance(exc, RequestError | SendError) and exc.code in _REFUSED:
        what = _REFUSED[exc.code]
        return f"{what}: {exc.reason} ({exc.code})" if exc.reason else f"{what} ({exc.code})"
    return str(exc)


#: What a refused request or send means, for the stderr line.
_REFUSED = {
    400: "refused as malformed",
    403: "not allowed",
    404: "not found",
    409: "conflict",
    413: "too large",
    429: "rate limited",
    500: "relay error",
    503: "relay overloaded",
}


def _run(main: Callable[[], Awaitable[None]], timeout: float | None = None) -> int:
    """trio.run ``main`` under an overall deadline; map errors to one stderr line."""

    async def guarded() -> None:
        with trio.fail_after(timeout if timeout else math.inf):
            await main()

    try:
        trio.run(guarded)
    except _CommandError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return exc.exit_code
    except ClientError as exc:
        print(f"relay: {_describe(exc)}", file=sys.stderr)
        return 1
    except trio.TooSlowError:
        print(f"relay: timed out after {timeout} s", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:  # should not happen: open_client unwraps
        if group.subgroup(KeyboardInterrupt) is not None:
            return 130
        first = group.exceptions[0] if group.exceptions else group
        print(f"relay: {type(first).__name__}: {first}", file=sys.stderr)
        return 1
    return 0


def _setup_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="relay: %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# ------------------------------------------------------------------ register


def register_handler(args: argparse.Namespace) -> int:
    """``relay register``: new key, REGISTER, save the state; prints one JSON line."""
    _setup_logging(args)
    state = Path(args.state)
    if (state / STATE_FILE).exists():
        print(
            f"relay: {state / STATE_FILE} already exists; refusing to replace its key",
            file=sys.stderr,
        )
        return 1
    try:
        identity = DeviceIdentity.generate(args.server, args.user)
    except ValueError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        # A fresh key store: an e2ee.state left by an earlier failed
        # registration holds prekeys of another identity key.
        async with _connect(identity, state, args.timeout, fresh=True, register=True, token=args.token):
            pass
        path = identity.save(state)
        _print_json(
            {
                "user": identity.user,
                "device": identity.device,
                "server": identity.server_url,
                "identity_key": identity.identity_key.hex(),
                "state": str(path),
            }
        )

    return _run(main, args.timeout * 2)


# ---------------------------------------------------------------------- send


def send_handler(args: argparse.Namespace) -> int:
    """``relay send``: one text message to a user (``--to``, SEND) or a group
    (``--group``, SEND_GROUP); prints ``{"msg_id", "status": "sent", "ts"}``
    (plus ``"group"``) once the relay stored it (SENT)."""
    _setup_logging(args)
    if args.group is not None and not _GROUP_RE.fullmatch(args.group):
        print(f"relay: invalid group id {args.group!r} (g. + 22 characters)", file=sys.stderr)
        return 2
    if args.to is not None and not valid_user(args.to):
        print(f"relay: invalid user name {args.to!r}", file=sys.stderr)
        return 2

    # From stdin, one trailing newline is the shell's (echo), not the text's.
    text = sys.stdin.read().removesuffix("\n") if args.text == "-" else args.text

    async def main() -> None:
        identity = _load(args.state)
        async with _connect(identity, args.state, args.timeout) as client:
            try:
                if args.group is not None:
                    msg_id, ts = await client.send_group(args.group, text)
                else:
                    changed = await _changed_identity(client, args.to)
                    if changed:
                        print(
                            f"relay: warning: the identity key of {args.to} device(s) {changed} "
                            "changed; compare `relay safety-number` before trusting it",
                            file=sys.stderr,
                        )
                    msg_id, ts = await client.send(args.to, text)
            except (SendError, RequestError) as exc:
                raise _CommandError(f"send: {_describe(exc)}") from None
            out: dict[str, Any] = {"msg_id": msg_id.hex(), "status": "sent", "ts": ts}
            if args.group is not None:
                out["group"] = args.group
            _print_json(out)

    return _run(main, args.timeout)


# ---------------------------------------------------------------------- recv


def recv_handler(args: argparse.Namespace) -> int:
    """``relay recv``: print entries as JSON lines until ``--count`` entries were
    printed or ``--timeout`` seconds passed without one (0: wait forever).
    Signals are printed too but not counted. ``--read`` sends READ for every
    message printed. Everything printed is acked on exit."""
    _setup_logging(args)
    if args.count is not None and args.count < 1:
        print("relay: --count must be at least 1", file=sys.stderr)
        return 2
    idle = math.inf if args.timeout <= 0 else args.timeout

    printed = 0

    async def main() -> None:
        nonlocal printed
        identity = _load(args.state)
        async with _connect(identity, args.state, min(idle, 10.0)) as client:
            entries = client.entries()
            while args.count is None or printed < args.count:
                entry = None
                with trio.move_on_after(idle):
                    try:
                        entry = await entries.__anext__()
                    except StopAsyncIteration:
                        break
                if entry is None:
                    break
                _print_json(entry_to_json(entry))
                if isinstance(entry, Signal):
                    continue
                printed += 1
                if args.read and isinstance(entry, Message):
                    await client.mark_read(entry.from_user, [entry.msg_id])

    code = _run(main)
    if code == 0 and args.count is not None and printed < args.count:
        waited = "" if math.isinf(idle) else f" within {args.timeout:g} s"
        print(f"relay: only {printed} of {args.count} entries arrived{waited}", file=sys.stderr)
        return 1
    return code


# ------------------------------------------------------------- safety-number


def safety_number_handler(args: argparse.Namespace) -> int:
    """``relay safety-number``: the 60 digits (groups of 5) to compare with
    USER, one JSON line per device of USER,
    ``{"with", "device", "safety_number"}``; ``--accept`` clears the flag of
    a changed identity key once they match."""
    _setup_logging(args)
    if not valid_user(args.with_user):
        print(f"relay: invalid user name {args.with_user!r}", file=sys.stderr)
        return 2

    async def main() -> None:
        identity = _load(args.state)
        async with _connect(identity, args.state, args.timeout) as client:
            try:
                numbers = await client.safety_numbers(args.with_user)
            except RequestError as exc:
                raise _CommandError(f"safety-number: {_describe(exc)}") from None
            changed = client.identity_changed(args.with_user)
            for device, digits in numbers:
                _print_json({"with": args.with_user, "device": device, "safety_number": digits})
            if changed and args.accept:
                client.accept_identity(args.with_user)
            elif changed:
                print(
                    f"relay: the identity key of {args.with_user} device(s) {changed} changed; "
                    "compare these digits, then run again with --accept",
                    file=sys.stderr,
                )

    return _run(main, args.timeout)


# --------------------------------------------------------------------- group

_GROUP_RE = re.compile(r"g\.[A-Za-z0-9_-]{22}")

#: ``relay group ACTION`` -> what it does with the client.
_GroupAction = Callable[[SecureClient, argparse.Namespace], Awaitable[GroupInfo]]


def parse_members(text: str) -> list[str]:
    """``"a,b, c"`` -> ``["a", "b", "c"]`` (empty items dropped)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _group_actions() -> dict[str, _GroupAction]:
    def on_members(
        method: Callable[[SecureClient, str, list[str]], Awaitable[GroupInfo]],
    ) -> _GroupAction:
        return lambda client, args: method(client, args.group, args.users)

    return {
        "create": lambda c, a: c.create_group(a.name, parse_members(a.members)),
        "info": lambda c, a: c.group_info(a.group),
        "leave": lambda c, a: c.leave_group(a.group),
        "add": on_members(SecureClient.add_members),
        "remove": on_members(SecureClient.remove_members),
        "promote": on_members(SecureClient.promote),
        "demote": on_members(SecureClient.demote),
        "rename": lambda c, a: c.rename_group(a.group, a.name),
    }


def group_handler(args: argparse.Namespace) -> int:
    """``relay group ACTION``: one ``group.*`` request; prints the group's info
    after it, ``{"group", "name", "version", "members", "admins"}``, as one
    JSON line. A refusal is one stderr line with the relay's code, exit 1."""
    _setup_logging(args)
    group = getattr(args, "group", None)
    if group is not None and not _GROUP_RE.fullmatch(group):
        print(f"relay: invalid group id {group!r} (g. + 22 characters)", file=sys.stderr)
        return 2
    users = list(getattr(args, "users", None) or [])
    if args.action == "create":
        users = parse_members(args.members)
    bad = [u for u in users if not valid_user(u)]
    if bad:
        print(f"relay: invalid user name {bad[0]!r}", file=sys.stderr)
        return 2
    action = _group_actions()[args.action]

    async def main() -> None:
        identity = _load(args.state)
        async with _connect(identity, args.state, args.timeout) as client:
            try:
                info = await action(client, args)
            except RequestError as exc:
                raise _CommandError(f"group {args.action}: {_describe(exc)}") from None
            _print_json(dict(info))

    return _run(main, args.timeout)


def _add_group_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    group_parser = subparsers.add_parser(
        "group", help="create and manage groups (prints the group's info as JSON)"
    )
    actions = group_parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_text)
        p.add_argument("--state", required=True, help="directory with state.json")
        p.add_argument(
            "--timeout", type=float, default=30.0, help="seconds for the whole request (default 30)"
        )
        p.add_argument("-v", "--verbose", action="store_true", help="log connection events")
        p.set_defaults(handler=group_handler)
        return p

    p = action("create", "create a group; you are its first member and admin")
    p.add_argument("--name", required=True, help="group name (1-128 characters)")
    p.add_argument("--members", default="", help="the other members, comma-separated: a,b,c")
    p = action("info", "show a group's name, version, members and admins")
    p.add_argument("group", metavar="GROUP", help="group id (g.…)")
    p = action("leave", "leave a group")
    p.add_argument("group", metavar="GROUP", help="group id (g.…)")
    for name, help_text in (
        ("add", "add members (admins only)"),
        ("remove", "remove members (admins only)"),
        ("promote", "make members admins (admins only)"),
        ("demote", "make admins plain members (admins only)"),
    ):
        p = action(name, help_text)
        p.add_argument("group", metavar="GROUP", help="group id (g.…)")
        p.add_argument("users", nargs="+", metavar="USER", help="user names")
    p = action("rename", "rename a group (admins only)")
    p.add_argument("group", metavar="GROUP", help="group id (g.…)")
    p.add_argument("name", metavar="NAME", help="new name (1-128 characters)")


# ------------------------------------------------------------------ wiring


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``register``, ``send``, ``recv``, ``group`` and ``safety-number``
    to ``relay``'s subparsers."""
    p = subparsers.add_parser("register", help="create an account (device 1) and save its key")
    p.add_argument("--server", required=True, help="relay URL, e.g. ws://127.0.0.1:8765/v1")
    p.add_argument("--user", required=True, help="user name: 1-64 of [a-z0-9._-]")
    p.add_argument("--state", required=True, help="directory for state.json (the device key)")
    p.add_argument("--token", help="registration token, if the relay requires one")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to connect (default 10)")
    p.add_argument("-v", "--verbose", action="store_true", help="log connection events")
    p.set_defaults(handler=register_handler)

    p = subparsers.add_parser("send", help="send an encrypted text message and wait for SENT")
    p.add_argument("--state", required=True, help="directory with state.json")
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--to", help="recipient user")
    to.add_argument("--group", help="recipient group id (g.…): one SEND_GROUP to all members")
    p.add_argument("text", help="message text; - reads it from standard input")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds for the whole send (default 30)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log connection events")
    p.set_defaults(handler=send_handler)

    p = subparsers.add_parser("recv", help="print inbox entries as JSON lines")
    p.add_argument("--state", required=True, help="directory with state.json")
    p.add_argument("--count", type=int, help="stop after N entries")
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="stop after S seconds without an entry (default 5; 0 waits forever)",
    )
    p.add_argument("--read", action="store_true", help="send read receipts for printed messages")
    p.add_argument("-v", "--verbose", action="store_true", help="log connection events")
    p.set_defaults(handler=recv_handler)

    _add_group_commands(subparsers)

    p = subparsers.add_parser(
        "safety-number", help="print the safety number to compare with another user"
    )
    p.add_argument("--state", required=True, help="directory with state.json")
    p.add_argument("--with", dest="with_user", required=True, metavar="USER", help="the other user")
    p.add_argument(
        "--accept", action="store_true", help="the digits match: clear the 'identity changed' flag"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds in all (default 30)")
    p.add_argument("-v", "--verbose", action="store_true", help="log connection events")
    p.set_defaults(handler=safety_number_handler)

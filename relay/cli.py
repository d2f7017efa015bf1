"""``relay``: the command line. ``relay serve`` runs the relay; the client
commands (register, send, recv, ...) come from :mod:`relay.client.cli`.

``main(argv) -> int`` never raises for bad input: it prints one line to
stderr and returns a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

import trio

from relay import __version__
from relay.config import SYNC_MODES, Settings
from relay.errors import ConfigError

log = logging.getLogger("relay")


def _add_serve(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("serve", help="run the relay (WebSocket at /v1)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--data", help="data directory (default ./relay-data)")
    p.add_argument("--shards", type=int, help="LMDB shards, fixed when the data dir is created (default 4)")
    p.add_argument(
        "--sync",
        choices=SYNC_MODES,
        help="durable (default): SENT only after fsync; none: leave flushing to the OS",
    )
    p.add_argument("--server-name", help="name in HELLO and in the AUTH signature (default relay)")
    p.add_argument("--registration-token", help="require this token in REGISTER")
    p.add_argument("--window", type=int, help="un-acked entries in flight per connection (default 256)")
    p.add_argument("--idle-timeout", type=float, dest="idle_timeout_s", help="seconds (default 120)")
    p.add_argument("--retention", type=float, dest="retention_s", help="seconds entries wait (default 30 days)")
    p.add_argument("--max-message-bytes", type=int, help="WebSocket message limit (default 1 MiB)")
    p.add_argument("--map-size", type=int, dest="map_size_bytes", help="LMDB map size per shard in bytes")
    p.add_argument("--fastpath", choices=("cython", "pure"), help="force a fast path (default: compiled unless RELAY_PURE=1)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug output")
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from relay.server.app import RelayServer
    from relay.server.memory import tune_gc

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    overrides = {
        name: getattr(args, name)
        for name in (
            "host", "port", "data", "shards", "sync", "server_name", "registration_token", "window",
            "idle_timeout_s", "retention_s", "max_message_bytes", "map_size_bytes", "fastpath",
        )
    }
    settings = Settings.from_env(**overrides)
    server = RelayServer(settings)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            tune_gc()
            print(f"listening ws://{settings.host}:{port}/v1", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("signal %s: shutting down", signal.Signals(signum).name)
                    server.shutdown()
                    break

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        # Binding the port or resolving the host failed inside the task tree:
        # report the OSError itself (main() prints it on one line).
        oserrors = group.subgroup(OSError)
        if oserrors is None:
            raise
        leaf = _first_leaf(oserrors)
        assert isinstance(leaf, OSError)
        where = f"{settings.host}:{settings.port}"
        raise OSError(leaf.errno, f"cannot listen on {where}: {leaf.strerror or leaf}") from None
    return 0


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="End-to-end encrypted messaging relay")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(subparsers)
    try:
        from relay.client.cli import add_commands
    except ImportError:  # pragma: no cover - the client commands are part of the package
        pass
    else:
        add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(handler(args))
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"relay: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run() -> None:
    sys.exit(main())

"""``restart``: how soon a relay with 1M queued entries serves again.

1. ``--senders`` recipients are registered and disconnect.
2. Baseline: the relay (nearly empty store) is stopped with SIGTERM and started
   again on the same port and data directory, while a client connects in a
   loop (a refused connect is retried after 2 ms); timed from just before the
   new process is created to the client's READY (AUTH as recipient 0), and on
   to its first MSG.
3. Build: ``--senders`` fresh senders each send ``--per-sender`` messages to
   their offline recipient (default 100 × 10,000 = 1,000,000 entries; the
   scenario's default ``--sync none`` builds faster, the queued entries are
   the same). Build time and rate are reported on their own.
4. ``--restarts`` times: clean stop (SIGTERM; its duration reported), the
   entries counted in the relay's LMDB files while it is down, start again,
   client loop to READY as in 2. READY's ``pending`` must be the recipient's
   queued count; the first MSG must be message 1 of its sender.

Only for relays this bench starts (fast, pure): it stops and relaunches the
process. The page cache stays warm (the files were just written); the
figures are "time to serve", not a cold-disk start.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from nacl.signing import SigningKey

from bench.inbox import fill
from bench.proto import (
    MSG,
    close_sessions,
    finish_auth,
    next_frames,
    open_connection,
    open_sessions,
    send_auth,
)
from bench.scenarios.common import pct, us
from bench.storeprobe import entry_counts
from bench.system import REPO_ROOT
from bench.targets import Running, TargetError, relaunch, stop_process
from bench.wsclient import HandshakeError

DESCRIPTION = "restart with 1M queued entries: process start → first READY (client connecting in a loop)"
HEADLINE = ("ready_ms", "ms to READY (lower is better)")
DEFAULT_TARGETS = "fast,pure"
WANTS_RUNNING = True
_PAY = struct.Struct("<qIQ")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--senders", type=int, default=100, help="senders = recipients (default 100)")
    parser.add_argument("--per-sender", type=int, default=10_000, help="entries per recipient (default 10,000)")
    parser.add_argument("--window", type=int, default=64, help="SENDs without SENT per sender while building (default 64)")
    parser.add_argument("--restarts", type=int, default=3, help="restarts with the full queue; the median is reported")
    parser.add_argument("--build-timeout", type=float, default=900.0, help="limit for building the queue (default 900 s)")
    parser.add_argument("--stall-timeout", type=float, default=30.0, help="abort the build if nothing happens this long")
    parser.add_argument("--setup-timeout", type=float, default=120.0, help="registering users (default 120 s)")
    parser.add_argument("--token", help="registration token, for a relay that requires one")
    parser.set_defaults(sync="none")


def _python_startup(code: str, core: int | None, repeat: int = 3) -> float:
    """Fastest of ``repeat`` runs of ``python -c code`` on the relay's core, in
    seconds: the floor under any READY time."""
    return min(_python_once(code, core) for _ in range(repeat))


def _python_once(code: str, core: int | None) -> float:
    preexec = None
    if core is not None:
        def preexec() -> None:
            os.sched_setaffinity(0, {core})
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", code], cwd=str(REPO_ROOT), preexec_fn=preexec, check=True, timeout=60,
                   capture_output=True)
    return time.monotonic() - t0


def restart_once(running: Running, user: str, key: SigningKey, timeout: float) -> dict[str, Any]:
    """Stop, count entries, relaunch, connect in a loop until READY, read the first MSG."""
    code, stop_s = stop_process(running)
    assert running.data_dir is not None
    counts = entry_counts(running.data_dir)
    t0, _offset = relaunch(running)
    deadline = t0 + timeout
    attempts = 0
    while True:
        try:
            hs = open_connection(running.url, user, key, timeout=max(0.1, deadline - time.monotonic()))
            break
        except (ConnectionRefusedError, ConnectionResetError, HandshakeError) as exc:
            attempts += 1
            if time.monotonic() > deadline:
                raise TargetError(f"no READY within {timeout:.0f} s of the restart: {exc}") from exc
            if running.proc is not None and running.proc.poll() is not None:
                raise TargetError(f"relay exited with {running.proc.returncode} after the restart\n{running.log_tail()}") from exc
            time.sleep(0.002)
    t_connect = time.monotonic()
    try:
        send_auth(hs, register=False, deadline=deadline)
        session = finish_auth(hs, deadline)
        t_ready = time.monotonic()
        first: Any = None
        while first is None and session.pending:
            for fr in next_frames(session, deadline):
                if fr[0] == MSG:
                    first = fr
                    break
        t_msg = time.monotonic()
        close_sessions([session])
    except BaseException:
        hs.sock.close()
        raise
    out: dict[str, Any] = {
        "previous_exit_code": code,
        "stop_seconds": round(stop_s, 3),
        "entries_in_store": None if counts is None else counts["inbox"],
        "connect_attempts": attempts,
        "connect_ms": round((t_connect - t0) * 1e3, 1),
        "ready_ms": round((t_ready - t0) * 1e3, 1),
        "first_msg_ms": round((t_msg - t0) * 1e3, 1) if first is not None else None,
        "pending": session.pending,
    }
    if first is not None:
        _t, _idx, k = _PAY.unpack_from(first[7])
        out["first_msg_counter"] = k
    return out


def run(
    url: str,
    relay_pid: int | None,
    args: argparse.Namespace,
    alive: Callable[[], bool] | None = None,
    running: Running | None = None,
) -> dict[str, Any]:
    if running is None or running.proc is None or running.data_dir is None:
        raise ValueError("restart stops and relaunches the relay itself: only for targets it spawns (not --url)")
    if running.name == "naive":
        raise ValueError("the naive relay keeps nothing across a restart (in-memory only)")
    timeout = args.start_timeout
    n, per = args.senders, args.per_sender
    run_id = os.urandom(4).hex()
    recipients = [f"x{run_id}r{i}" for i in range(n)]
    senders = [f"x{run_id}s{i}" for i in range(n)]
    sessions = open_sessions(running.url, recipients, register=True, timeout=args.setup_timeout, token=args.token)
    keys = [s.key for s in sessions]
    close_sessions(sessions)
    out: dict[str, Any] = {
        "python_startup_ms": round(_python_startup("pass", running.core) * 1e3, 1),
        "import_relay_ms": round(_python_startup("import relay.cli, relay.server.app", running.core) * 1e3, 1),
    }
    out["baseline"] = restart_once(running, recipients[0], keys[0], timeout)
    build = fill(running.url, args, running.pid, senders, recipients, per, args.window, alive, args.build_timeout)
    out["build"] = {k: build[k] for k in ("messages", "seconds", "sent_per_s", "cpu_us_per_msg", "register_seconds", "run_totals")}
    out["build"]["relay_cpu_share"] = build["cpu"].get("relay_cpu_share")
    runs = [restart_once(running, recipients[0], keys[0], timeout) for _ in range(args.restarts)]
    out["restarts"] = runs
    out["ready_ms"] = statistics.median(r["ready_ms"] for r in runs)
    firsts = [r["first_msg_ms"] for r in runs if r["first_msg_ms"] is not None]
    out["first_msg_ms"] = statistics.median(firsts) if firsts else None
    out["queued_entries"] = runs[0]["entries_in_store"]
    out["params"] = {"senders": n, "per_sender": per, "window": args.window, "sync": args.sync, "restarts": args.restarts}
    anomalies = []
    if build["run_totals"].get("errors"):
        anomalies.append(f"build: {build['run_totals']['errors']} ERROR frames, e.g. {build['error_samples'][:2]}")
    for i, r in enumerate(runs):
        if r["pending"] != per:
            anomalies.append(f"restart {i + 1}: READY pending {r['pending']}, expected {per}")
        if r.get("first_msg_counter") != 1:
            anomalies.append(f"restart {i + 1}: first MSG is message {r.get('first_msg_counter')} of its sender, expected 1")
        if r["previous_exit_code"] not in (0, -15):
            anomalies.append(f"restart {i + 1}: the relay exited with {r['previous_exit_code']} on SIGTERM")
        expected_entries = n * per
        if r["entries_in_store"] is not None and r["entries_in_store"] < expected_entries:
            anomalies.append(f"restart {i + 1}: {r['entries_in_store']} inbox entries in the store, expected {expected_entries}")
    out["anomalies"] = anomalies
    return out


def _ms_list(runs: list[dict[str, Any]], key: str) -> str:
    return " / ".join("n/a" if r.get(key) is None else f"{r[key]:g}" for r in runs)


def table(result: dict[str, Any]) -> list[tuple[str, str]]:
    b = result["build"]
    base = result["baseline"]
    runs = result["restarts"]
    return [
        ("queued entries (in the store)", f"{result['queued_entries']:,}" if result["queued_entries"] is not None else "n/a"),
        ("build: seconds, SENT/s", f"{b['seconds']:.1f} s, {b['sent_per_s']:,.0f}/s (relay {pct(b['relay_cpu_share'])})"),
        ("build: relay CPU µs per message", us(b.get("cpu_us_per_msg"))),
        ("READY ms after start (median)", f"{result['ready_ms']:g}"),
        ("READY ms, every restart", _ms_list(runs, "ready_ms")),
        ("first MSG ms, every restart", _ms_list(runs, "first_msg_ms")),
        ("TCP+upgrade accepted ms", _ms_list(runs, "connect_ms")),
        ("SIGTERM → exit s", _ms_list(runs, "stop_seconds")),
        ("baseline (empty store) READY ms", f"{base['ready_ms']:g}"),
        ("python startup / import relay ms", f"{result['python_startup_ms']:g} / {result['import_relay_ms']:g}"),
    ]

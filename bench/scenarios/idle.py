"""``idle``: relay memory per idle authenticated connection.

1. ``max(--connections)`` users are registered first, over short-lived
   connections in pipelined batches of ``--register-batch`` (so a batch's
   freed connection memory is all the relay can keep from this phase).
2. Baseline: the relay's memory once it has settled (no connection open).
3. Steps (default 1k, 5k, 10k, 19k in all): ``--procs`` load processes (each
   holds at most ``ceil(N / procs)`` sockets: the open-files limit is per
   process) open connections and AUTH them (pipelined in chunks of 500) until
   N are open; then, after ``--settle-min`` s (the relay parks a connection
   idle for 2 s: its task and buffers go), the relay's memory is sampled every
   0.5 s until it stops moving (two samples within 64 KiB, at most
   ``--settle-max`` s). RSS is a high-water mark: memory the relay freed when
   connections parked stays in its allocator and is reused by the next
   connections rather than returned to the system.
   ``kib_per_conn`` = (RSS at N - baseline RSS) / N; ``marginal_kib_per_conn``
   = growth since the previous step / connections added (free of whatever the
   baseline kept from phase 1). RssAnon (heap: what connections cost) and
   RssFile (mapped LMDB pages, shared with the page cache) are given apart.
4. At the end every connection is pinged and must answer (PONG): they are
   all still open and served. Connections ping every ``--keepalive`` s so a
   slow run does not meet the relay's idle timeout.

Needs the relay's PID (spawned targets, or ``--url`` with ``--relay-pid``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import multiprocessing
import multiprocessing.connection
import os
import select
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from nacl.signing import SigningKey

from bench.proto import Session, close_sessions, open_sessions
from bench.wsclient import OP_CLOSE, OP_PING, OP_PONG, ProtocolError, encode_control

DESCRIPTION = "relay RSS per idle authenticated connection at 1k/5k/10k/19k connections"
HEADLINE = ("kib_per_conn", "KiB/connection (lower is better)")
CHUNK = 500
READ_SIZE = 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--connections", default="1000,5000,10000,19000", help="cumulative connection counts to measure at"
    )
    parser.add_argument("--procs", type=int, default=2, help="load processes holding the connections (default 2)")
    parser.add_argument(
        "--register-batch", type=int, default=50, help="users registered per pipelined batch (default 50)"
    )
    parser.add_argument(
        "--settle-min",
        type=float,
        default=4.0,
        help="seconds to wait after a step before sampling (default 4: the relay parks connections idle for 2 s)",
    )
    parser.add_argument("--settle-max", type=float, default=15.0, help="seconds to wait for the RSS to settle per step")
    parser.add_argument(
        "--keepalive",
        type=float,
        default=100.0,
        help="ping every connection this often (default 100 s, under the relay's 120 s idle timeout; "
        "a ping wakes a parked connection, so it should not fall inside a measurement)",
    )
    parser.add_argument("--setup-timeout", type=float, default=120.0, help="limit per registration batch / open chunk")
    parser.add_argument("--timeout", type=float, default=900.0, help="limit for the whole scenario (default 900 s)")
    parser.add_argument("--token", help="registration token, for a relay that requires one")


def user_name(run_id: str, i: int) -> str:
    return f"i{run_id}u{i}"


def user_key(run_id: str, i: int) -> SigningKey:
    """Deterministic, so the load processes rebuild the keys instead of receiving them."""
    return SigningKey(hashlib.sha256(f"bench-idle:{run_id}:{i}".encode()).digest())


def memory(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem of ``pid`` in KiB, plus fds and threads."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"):
            out[name] = int(value.split()[0])
    with contextlib.suppress(psutil.Error):
        out["fds"] = psutil.Process(pid).num_fds()
    return out


def settle(pid: int, limit: float, alive: Callable[[], bool] | None, minimum: float = 1.0) -> tuple[dict[str, int], float]:
    """After ``minimum`` seconds, sample every 0.5 s until VmRSS moves less than
    64 KiB between samples (at most ``limit`` seconds in all)."""
    t0 = time.monotonic()
    last = memory(pid)
    while time.monotonic() - t0 < limit:
        time.sleep(0.5)
        if alive is not None and not alive():
            raise RuntimeError("the relay process exited")
        now = memory(pid)
        if abs(now["VmRSS"] - last["VmRSS"]) < 64 and time.monotonic() - t0 >= minimum:
            return now, time.monotonic() - t0
        last = now
    return last, time.monotonic() - t0


# --- the load processes --------------------------------------------------------


class Holder:
    """Runs in a load process: holds authenticated connections, pings on request."""

    def __init__(self, url: str, run_id: str, keepalive: float, timeout: float) -> None:
        self.url = url
        self.run_id = run_id
        self.keepalive = keepalive
        self.timeout = timeout
        self.sessions: dict[int, Session] = {}
        self.ep = select.epoll()
        self.closed = 0
        self.last_ping = time.monotonic()

    def open(self, indices: list[int]) -> dict[str, Any]:
        t0 = time.monotonic()
        for start in range(0, len(indices), CHUNK):
            chunk = indices[start : start + CHUNK]
            sessions = open_sessions(
                self.url,
                [user_name(self.run_id, i) for i in chunk],
                register=False,
                timeout=self.timeout,
                keys=[user_key(self.run_id, i) for i in chunk],
                read_size=READ_SIZE,
            )
            for s in sessions:
                s.sock.setblocking(False)
                fd = s.sock.fileno()
                self.sessions[fd] = s
                self.ep.register(fd, select.EPOLLIN)
            self.drain(0)
        return {"open": len(self.sessions), "seconds": time.monotonic() - t0}

    def drain(self, wait: float, want_pongs: set[int] | None = None) -> None:
        """Read whatever arrived (PONGs, a close); ``want_pongs`` loses each fd that answers."""
        for fd, _ev in self.ep.poll(wait):
            s = self.sessions.get(fd)
            if s is None:
                continue
            try:
                data = s.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            closed = not data
            if data:
                try:
                    for op, _payload in s.parser.feed(data):
                        if op == OP_PONG and want_pongs is not None:
                            want_pongs.discard(fd)
                        elif op == OP_CLOSE:
                            closed = True
                        elif op == OP_PING:
                            s.sock.send(encode_control(OP_PONG, _payload))
                except (ProtocolError, OSError):
                    closed = True
            if closed:
                self.ep.unregister(fd)
                s.sock.close()
                del self.sessions[fd]
                self.closed += 1

    def ping(self, timeout: float) -> dict[str, Any]:
        """PING every connection; count those that answer within ``timeout``."""
        frame = encode_control(OP_PING, b"idle")
        waiting: set[int] = set()
        for fd, s in list(self.sessions.items()):
            try:
                s.sock.send(frame)
                waiting.add(fd)
            except OSError:
                pass
        asked = len(waiting)
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            self.drain(0.05, waiting)
        self.last_ping = time.monotonic()
        return {"asked": asked, "answered": asked - len(waiting), "closed_by_relay": self.closed}

    def idle(self, pipe: multiprocessing.connection.Connection) -> None:
        """Wait for the next command, keeping connections alive meanwhile."""
        while not pipe.poll(0.2):
            self.drain(0)
            if self.sessions and time.monotonic() - self.last_ping > self.keepalive:
                self.ping(5.0)

    def close(self) -> None:
        close_sessions(list(self.sessions.values()))
        self.sessions.clear()
        self.ep.close()


def holder_main(pipe: multiprocessing.connection.Connection, url: str, run_id: str, keepalive: float, timeout: float) -> None:
    holder = Holder(url, run_id, keepalive, timeout)
    try:
        while True:
            holder.idle(pipe)
            cmd, arg = pipe.recv()
            try:
                if cmd == "open":
                    pipe.send(("ok", holder.open(arg)))
                elif cmd == "ping":
                    pipe.send(("ok", holder.ping(arg)))
                elif cmd == "close":
                    holder.close()
                    pipe.send(("ok", {}))
                    return
            except Exception as exc:  # reported to the parent, which stops the run
                pipe.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        holder.close()


class Holders:
    def __init__(self, procs: int, url: str, run_id: str, keepalive: float, timeout: float) -> None:
        ctx = multiprocessing.get_context("fork")
        self.pipes: list[multiprocessing.connection.Connection] = []
        self.procs: list[Any] = []
        for _ in range(procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=holder_main, args=(child, url, run_id, keepalive, timeout), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    def call(self, requests: list[tuple[str, Any]], timeout: float) -> list[dict[str, Any]]:
        """One request per process, concurrently; raises on the first error."""
        for pipe, req in zip(self.pipes, requests, strict=True):
            pipe.send(req)
        out = []
        deadline = time.monotonic() + timeout
        for i, pipe in enumerate(self.pipes):
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"load process {i} did not answer {requests[i][0]!r} within {timeout:.0f} s")
            status, value = pipe.recv()
            if status != "ok":
                raise RuntimeError(f"load process {i}: {value}")
            out.append(value)
        return out

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("close", None))
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


# --- the scenario ------------------------------------------------------------------


def run(url: str, relay_pid: int | None, args: argparse.Namespace, alive: Callable[[], bool] | None = None) -> dict[str, Any]:
    if relay_pid is None:
        raise ValueError("idle measures the relay's memory: it needs the relay's PID (--relay-pid with --url)")
    steps = sorted({int(x) for x in str(args.connections).split(",") if x.strip()})
    total = steps[-1]
    procs = max(1, args.procs)
    if math.ceil(total / procs) > 18_000:
        raise ValueError(f"{total} connections over {procs} processes exceeds 18,000 sockets per process: use more --procs")
    t_end = time.monotonic() + args.timeout
    run_id = os.urandom(4).hex()
    out: dict[str, Any] = {"params": {"connections": steps, "procs": procs, "register_batch": args.register_batch}}

    # 1. Register every user over short-lived connections.
    t0 = time.monotonic()
    for start in range(0, total, args.register_batch):
        idx = range(start, min(total, start + args.register_batch))
        sessions = open_sessions(
            url, [user_name(run_id, i) for i in idx], register=True, timeout=args.setup_timeout,
            token=args.token, keys=[user_key(run_id, i) for i in idx], read_size=READ_SIZE,
        )
        close_sessions(sessions)
        if time.monotonic() > t_end:
            raise TimeoutError("registration exceeded --timeout")
    out["register_seconds"] = round(time.monotonic() - t0, 3)
    out["register_per_s"] = round(total / (time.monotonic() - t0), 1)

    # 2. Baseline.
    time.sleep(1.0)  # the last batch's connections close
    base, waited = settle(relay_pid, args.settle_max, alive)
    out["baseline"] = dict(base, settle_seconds=round(waited, 2))

    # 3. Steps.
    holders = Holders(procs, url, run_id, args.keepalive, args.setup_timeout)
    results: list[dict[str, Any]] = []
    out["steps"] = results
    anomalies: list[str] = []
    try:
        opened = 0
        prev = base
        prev_n = 0
        for n in steps:
            if time.monotonic() > t_end:
                anomalies.append(f"stopped before {n} connections: --timeout reached")
                break
            new = list(range(opened, n))
            share = [new[i::procs] for i in range(procs)]  # user i goes to process i % procs
            t0 = time.monotonic()
            try:
                holders.call([("open", s) for s in share], timeout=max(30.0, t_end - time.monotonic()))
            except (RuntimeError, TimeoutError) as exc:
                out["ok"] = False
                out["error"] = f"opening connections {opened}..{n}: {exc}"
                break
            open_s = time.monotonic() - t0
            opened = n
            mem, waited = settle(relay_pid, args.settle_max, alive, args.settle_min)
            step = {
                "connections": n,
                "open_seconds": round(open_s, 2),
                "auth_per_s": round(len(new) / open_s, 1) if open_s > 0 else None,
                "settle_seconds": round(waited, 2),
                "memory_kib": mem,
                "kib_per_conn": round((mem["VmRSS"] - base["VmRSS"]) / n, 2),
                "anon_kib_per_conn": round((mem["RssAnon"] - base["RssAnon"]) / n, 2),
                "marginal_kib_per_conn": round((mem["VmRSS"] - prev["VmRSS"]) / (n - prev_n), 2),
                "marginal_anon_kib_per_conn": round((mem["RssAnon"] - prev["RssAnon"]) / (n - prev_n), 2),
            }
            results.append(step)
            prev, prev_n = mem, n
        # 4. Every connection still open and served?
        if opened:
            pongs = holders.call([("ping", 20.0)] * procs, timeout=60.0)
            out["ping_check"] = {
                "asked": sum(p["asked"] for p in pongs),
                "answered": sum(p["answered"] for p in pongs),
                "closed_by_relay": sum(p["closed_by_relay"] for p in pongs),
            }
            pc = out["ping_check"]
            if pc["answered"] != opened or pc["closed_by_relay"]:
                anomalies.append(
                    f"ping check: {pc['answered']} of {opened} connections answered, {pc['closed_by_relay']} closed by the relay"
                )
    finally:
        holders.stop()
    if results:
        last = results[-1]
        out["connections"] = last["connections"]
        out["kib_per_conn"] = last["kib_per_conn"]
        out["anon_kib_per_conn"] = last["anon_kib_per_conn"]
        out["relay_rss_kib"] = last["memory_kib"]["VmRSS"]
    else:
        out["kib_per_conn"] = None
    out["anomalies"] = anomalies
    return out


def table(result: dict[str, Any]) -> list[tuple[str, str]]:
    base = result["baseline"]
    rows = [
        ("register users/s", f"{result['register_per_s']:,.0f}"),
        ("baseline RSS (anon / file) KiB", f"{base['VmRSS']:,} ({base['RssAnon']:,} / {base['RssFile']:,})"),
    ]
    for s in result["steps"]:
        n = s["connections"]
        m = s["memory_kib"]
        rows += [
            (f"[{n}] relay RSS (anon / file) KiB", f"{m['VmRSS']:,} ({m['RssAnon']:,} / {m['RssFile']:,})"),
            (f"[{n}] KiB/conn RSS (anon)", f"{s['kib_per_conn']:.2f} ({s['anon_kib_per_conn']:.2f})"),
            (f"[{n}] marginal KiB/conn RSS (anon)", f"{s['marginal_kib_per_conn']:.2f} ({s['marginal_anon_kib_per_conn']:.2f})"),
            (f"[{n}] AUTHs/s while opening", f"{s['auth_per_s']:,.0f}"),
        ]
    pc = result.get("ping_check")
    if pc:
        rows.append(("ping check answered / asked", f"{pc['answered']:,} / {pc['asked']:,}"))
    return rows

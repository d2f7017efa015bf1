"""What ``pairs`` and ``latency`` share: fresh users, the engine, the measured window."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from bench.engine import ConnectionLost, Engine
from bench.proto import open_sessions
from bench.stats import summarize_ns
from bench.system import CpuMeter
from bench.workload import Receiver, Sender, Shared


class StallError(Exception):
    """No cycle completed for too long: the relay stopped answering."""


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=int, default=100, help="sender→receiver pairs (default 100)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured interval (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up before measuring (default 2)")
    parser.add_argument(
        "--ack",
        choices=("message", "read"),
        default="message",
        help="one cumulative ACK per received WebSocket message (default), or one per socket read",
    )
    parser.add_argument(
        "--framing",
        choices=("packed", "single"),
        default="packed",
        help="frames written together go in one WebSocket message (default), or one WebSocket message each",
    )
    parser.add_argument(
        "--max-unreceipted",
        type=int,
        default=4096,
        help="per sender, messages sent but not yet receipted before it pauses (bounds relay inboxes)",
    )
    parser.add_argument("--stall-timeout", type=float, default=10.0, help="abort if nothing completes this long")
    parser.add_argument("--token", help="registration token, for a relay that requires one")
    parser.add_argument("--setup-timeout", type=float, default=60.0, help="registering all users (default 60 s)")


class PairsHarness:
    """``n`` fresh sender users and ``n`` fresh receiver users on one relay."""

    def __init__(self, url: str, args: argparse.Namespace, window: int, closed_loop: bool) -> None:
        self.url = url
        self.args = args
        self.shared = Shared()
        self.engine = Engine()
        self.senders: list[Sender] = []
        self.receivers: list[Receiver] = []
        self.window = window
        self.closed_loop = closed_loop
        self.setup_seconds = 0.0

    def setup(self) -> None:
        n = self.args.pairs
        run_id = os.urandom(4).hex()
        receivers = [f"b{run_id}r{i}" for i in range(n)]
        senders = [f"b{run_id}s{i}" for i in range(n)]
        ack_per_read = self.args.ack == "read"
        self.shared.single_frames = self.args.framing == "single"
        t0 = time.monotonic()
        sessions = open_sessions(
            self.url, receivers + senders, register=True, timeout=self.args.setup_timeout, token=self.args.token
        )
        self.setup_seconds = time.monotonic() - t0
        for i, session in enumerate(sessions):
            if session.early or session.pending:
                self.shared.counters.unexpected += len(session.early) + session.pending
            if i < n:
                role = Receiver(self.shared, ack_per_read)
                self.receivers.append(role)
                self.engine.add(session, role)
            else:
                sender = Sender(self.shared, i - n, receivers[i - n], self.window, self.args.max_unreceipted, ack_per_read)
                sender.closed_loop = self.closed_loop
                sender.conn = self.engine.add(session, sender)
                self.senders.append(sender)

    def setup_mqtt(self) -> None:
        """The same pairs over MQTT (target ``mosquitto``): see :mod:`bench.mqtt`."""
        from bench.mqtt import open_clients

        t0 = time.monotonic()
        self.senders, self.receivers = open_clients(  # type: ignore[assignment]
            self.url, self.engine, self.args.pairs, self.shared, self.window,
            self.args.max_unreceipted, self.args.setup_timeout,
        )
        self.setup_seconds = time.monotonic() - t0

    def measure(
        self,
        relay_pid: int | None,
        tick: Callable[[float], float | None],
        alive: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """Warm up, then measure ``args.seconds``; returns counters, latencies, CPU."""
        args = self.args
        c = self.shared.counters
        lat = self.shared.lat
        state = {"last": 0, "since": time.monotonic(), "next": time.monotonic() + 0.5}

        def guarded_tick(now: float) -> float | None:
            if now >= state["next"]:
                state["next"] = now + 0.5
                if c.completed != state["last"] or c.msgs != state.get("msgs"):
                    state["last"] = c.completed
                    state["msgs"] = c.msgs
                    state["since"] = now
                elif now - state["since"] > args.stall_timeout:
                    raise StallError(
                        f"no progress for {args.stall_timeout:.0f} s "
                        f"(sends {c.sends}, SENT {c.sent}, MSG {c.msgs}, RECEIPT {c.receipts}, errors {c.errors})"
                    )
                if alive is not None and not alive():
                    raise ConnectionLost("the relay process exited during the run")
            return tick(now)

        meter = CpuMeter(relay_pid)
        start = time.monotonic()
        self.engine.run(start + args.warmup, guarded_tick)
        before = c.snapshot()
        marks0 = lat.marks()
        cpu0 = meter.sample()
        self.engine.run(cpu0.wall + args.seconds, guarded_tick)
        cpu1 = meter.sample()
        marks1 = lat.marks()
        after = c.snapshot()
        wall = cpu1.wall - cpu0.wall
        delta = {k: after[k] - before[k] for k in after}
        quantiles = getattr(args, "quantiles", (0.5, 0.99))
        latency = {
            "send_to_msg": summarize_ns(lat.send_to_msg[marks0[1] : marks1[1]], quantiles),
            "send_to_sent": summarize_ns(lat.send_to_sent[marks0[0] : marks1[0]], quantiles),
            "send_to_receipt": summarize_ns(lat.send_to_receipt[marks0[2] : marks1[2]], quantiles),
        }
        return {
            "measured_seconds": round(wall, 3),
            "warmup_seconds": args.warmup,
            "setup_seconds": round(self.setup_seconds, 3),
            "msgs_per_s": round(delta["completed"] / wall, 1) if wall > 0 else None,
            "sends_per_s": round(delta["sends"] / wall, 1) if wall > 0 else None,
            "delivered_per_s": round(delta["msgs"] / wall, 1) if wall > 0 else None,
            "latency_ms": latency,
            "cpu": CpuMeter.shares(cpu0, cpu1),
            "window_counts": delta,
            "run_totals": after,
            "error_samples": list(c.error_samples),
        }

    def close(self) -> None:
        self.engine.close()


class Guard:
    """Stall and liveness checks for a loop: ``progress()`` returns anything that
    changes while work gets done; no change for ``stall_timeout`` seconds, or the
    relay process gone, raises. Checked at most every 0.5 s."""

    def __init__(
        self,
        progress: Callable[[], object],
        stall_timeout: float,
        alive: Callable[[], bool] | None,
        what: Callable[[], str],
    ) -> None:
        self.progress = progress
        self.stall_timeout = stall_timeout
        self.alive = alive
        self.what = what
        self.last = progress()
        self.since = time.monotonic()
        self.next = self.since + 0.5

    def reset(self) -> None:
        self.last = self.progress()
        self.since = time.monotonic()

    def check(self, now: float) -> None:
        if now < self.next:
            return
        self.next = now + 0.5
        current = self.progress()
        if current != self.last:
            self.last = current
            self.since = now
        elif now - self.since > self.stall_timeout:
            raise StallError(f"no progress for {self.stall_timeout:.0f} s ({self.what()})")
        if self.alive is not None and not self.alive():
            raise ConnectionLost("the relay process exited during the run")


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.0f}%"


def ms(d: dict[str, Any] | None, *keys: str) -> str:
    """'p50 / p99' style cell from a :func:`bench.stats.summarize_ns` result."""
    if not d:
        return "n/a"
    return " / ".join("n/a" if d.get(k) is None else f"{d[k]:g}" for k in keys)

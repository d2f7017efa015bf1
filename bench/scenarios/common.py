"""What ``pairs`` and ``latency`` share: fresh users, the engine, the measured window."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from bench.e2ee import Device, establish
from bench.engine import ConnectionLost, Engine
from bench.proto import Session, open_sessions
from bench.stats import summarize_ns
from bench.system import CpuMeter, cpu_us_per
from bench.workload import Receiver, ReceiverKeys, Sender, Shared


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
        self.e2ee = getattr(args, "e2ee", "off") == "on"
        self.e2ee_setup_seconds = 0.0

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
        if self.e2ee:
            self.setup_e2ee(sessions[n:], sessions[:n])

    def setup_e2ee(self, senders: list[Session], receivers: list[Session]) -> None:
        """A relay-v1 pairwise session per pair, made in-process (no ``keys.fetch``):
        each device's identity is the Ed25519 key it registered with, its
        prekeys are fresh; X3DH and one message each way (:func:`bench.e2ee.establish`)."""
        t0 = time.monotonic()
        for s_session, r_session, sender, receiver in zip(senders, receivers, self.senders, self.receivers, strict=True):
            a = Device.make(s_session.key)
            b = Device.make(r_session.key)
            sender.peer, peer_at_b = establish(a, b)
            receiver.keys = ReceiverKeys(b.identity, b.prekeys, peer_at_b, a.identity_key)
        self.e2ee_setup_seconds = time.monotonic() - t0

    def setup_mqtt(self) -> None:
        """The same pairs over MQTT (target ``mosquitto``, ``pairs`` and ``latency``):
        see :mod:`bench.mqtt`."""
        from bench.mqtt import open_clients

        t0 = time.monotonic()
        self.senders, self.receivers = open_clients(  # type: ignore[assignment]
            self.url, self.engine, self.args.pairs, self.shared, self.window,
            self.args.max_unreceipted, self.args.setup_timeout,
        )
        for sender in self.senders:
            sender.closed_loop = self.closed_loop
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
            # The one latency with a histogram (--plot draws its CDF); the JSON stays small.
            "send_to_msg": summarize_ns(lat.send_to_msg[marks0[1] : marks1[1]], quantiles, histogram=True),
            "send_to_sent": summarize_ns(lat.send_to_sent[marks0[0] : marks1[0]], quantiles),
            "send_to_receipt": summarize_ns(lat.send_to_receipt[marks0[2] : marks1[2]], quantiles),
        }
        cpu = CpuMeter.shares(cpu0, cpu1)
        result: dict[str, Any] = {
            "measured_seconds": round(wall, 3),
            "warmup_seconds": args.warmup,
            "setup_seconds": round(self.setup_seconds, 3),
            "msgs_per_s": round(delta["completed"] / wall, 1) if wall > 0 else None,
            "sends_per_s": round(delta["sends"] / wall, 1) if wall > 0 else None,
            "delivered_per_s": round(delta["msgs"] / wall, 1) if wall > 0 else None,
            "latency_ms": latency,
            # Relay CPU (user + sys) per full cycle completed (RECEIPT at the sender) in the interval.
            "cpu_us_per_msg": cpu_us_per(cpu, delta["completed"]),
            "cpu": cpu,
            "window_counts": delta,
            "run_totals": after,
            "error_samples": list(c.error_samples),
        }
        if self.e2ee:
            result["e2ee"] = e2ee_figures(delta, after, self.e2ee_setup_seconds)
        return result

    def close(self) -> None:
        self.engine.close()


def e2ee_figures(window: dict[str, int], totals: dict[str, int], setup_seconds: float) -> dict[str, Any]:
    """Client-side cost measured during the run (``--e2ee``): µs per encrypt
    (plaintext encode + ``pairwise.encrypt``) and per decrypt
    (``pairwise.decrypt`` + plaintext decode), over the measured interval."""
    enc_n, dec_n = window["e2ee_encrypts"], window["e2ee_decrypts"]
    enc = window["e2ee_encrypt_ns"] / enc_n / 1000 if enc_n else None
    dec = window["e2ee_decrypt_ns"] / dec_n / 1000 if dec_n else None
    return {
        "encrypt_us": None if enc is None else round(enc, 2),
        "decrypt_us": None if dec is None else round(dec, 2),
        "message_us": None if enc is None or dec is None else round(enc + dec, 2),
        "encrypts": enc_n,
        "decrypts": dec_n,
        "decrypt_failures": totals["e2ee_failures"],
        "setup_seconds": round(setup_seconds, 3),
        "sessions": "in-process X3DH between the bench's own devices (registered identity keys, fresh "
                    "prekeys, one message each way), no keys.fetch; 100-byte text plaintext, normal-form payloads",
    }


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


def us(x: float | None) -> str:
    """A µs figure such as ``cpu_us_per_msg`` (None: the relay's process is not known)."""
    return "n/a" if x is None else f"{x:,.1f}"


def ms(d: dict[str, Any] | None, *keys: str) -> str:
    """'p50 / p99' style cell from a :func:`bench.stats.summarize_ns` result."""
    if not d:
        return "n/a"
    return " / ".join("n/a" if d.get(k) is None else f"{d[k]:g}" for k in keys)

"""``latency``: open-loop 1:1 latency at a fixed offered rate.

Message j of the run is due at ``start + j / rate`` from sender ``j % pairs``
whatever the relay does (open loop: a slow relay does not slow the offered
load, so queueing shows up in the latencies instead of hiding). The loop
wakes at least every millisecond (epoll's resolution), so messages leave in
small bursts: at 10,000 msg/s about 10 per wake-up, from different senders.
Latencies are measured from the moment the SEND was written to the socket;
``schedule_lag_ms`` says how late that was against the schedule (the load
generator's own delay, which should stay far below the relay's latencies).

Target ``mosquitto``: the same schedule drives :mod:`bench.mqtt`'s clients
(PUBLISH QoS 1 → PUBACK, the broker's PUBLISH at the receiver, its QoS 1
receipt back to the sender), the cycle ``pairs`` uses against Mosquitto.
"""

from __future__ import annotations

import argparse
import time
from array import array
from collections.abc import Callable
from typing import Any

from bench.scenarios.common import PairsHarness, add_common_arguments, us
from bench.scenarios.pairs import anomalies, disturbance
from bench.stats import summarize_ns

DESCRIPTION = "open-loop 1:1 latency at a fixed offered rate (p50/p99/p999)"
HEADLINE = ("msgs_per_s", "msg/s")
SUPPORTS_MQTT = True  # target mosquitto: the same schedule over MQTT 3.1.1 QoS 1 (bench/mqtt.py)
QUANTILES = (0.5, 0.99, 0.999)


def median_by(result: dict[str, Any]) -> float:
    """With ``--repeat``, the reported round is the one with the median SEND→MSG p99."""
    p99 = result["latency_ms"]["send_to_msg"]["p99"]
    return float("inf") if p99 is None else float(p99)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--rate", type=float, default=10_000.0, help="offered msg/s over all pairs (default 10000)")


class Schedule:
    """Hands due messages to senders, round-robin, stamped when written."""

    def __init__(self, harness: PairsHarness, rate: float) -> None:
        self.harness = harness
        self.rate = rate
        self.start = time.monotonic()
        self.issued = 0
        self.lag_ns = array("q")

    def tick(self, now: float) -> float | None:
        rate = self.rate
        due = int((now - self.start) * rate)
        issued = self.issued
        if due > issued:
            senders = self.harness.senders
            p = len(senders)
            n = due - issued
            self.lag_ns.append(int((now - (self.start + (issued + 1) / rate)) * 1e9))
            base, rem = divmod(n, p)
            first = issued % p
            counters = self.harness.shared.counters
            for i in range(min(n, p)):
                sender = senders[(first + i) % p]
                count = base + (1 if i < rem else 0)
                room = sender.room()
                if count > room:
                    counters.throttled += count - room
                    count = room
                if count:
                    sender.send_now(count, time.perf_counter_ns())
            self.issued = due
        return self.start + (self.issued + 1) / rate - now


def run(url: str, relay_pid: int | None, args: argparse.Namespace, alive: Callable[[], bool] | None = None) -> dict[str, Any]:
    args.quantiles = QUANTILES
    harness = PairsHarness(url, args, window=1 << 30, closed_loop=False)
    mqtt = url.startswith("mqtt://")
    try:
        if mqtt:
            harness.setup_mqtt()
        else:
            harness.setup()
        schedule = Schedule(harness, args.rate)
        lag_mark = [0]

        def tick(now: float) -> float | None:
            if now - schedule.start < args.warmup:
                lag_mark[0] = len(schedule.lag_ns)
            return schedule.tick(now)

        result = harness.measure(relay_pid, tick, alive)
    finally:
        harness.close()
    result["offered_per_s"] = args.rate
    result["schedule_lag_ms"] = summarize_ns(schedule.lag_ns[lag_mark[0] :], QUANTILES)
    result["params"] = {"pairs": args.pairs, "rate": args.rate, "payload_bytes": 100, "ack": args.ack, "framing": args.framing}
    if mqtt:
        result["params"].update(protocol="MQTT 3.1.1", qos=1, clean_session=False, ack="PUBACK per message",
                                framing="one MQTT packet per message")
    result["anomalies"] = anomalies(result["run_totals"]) + disturbance(result["cpu"])
    if result["run_totals"].get("throttled"):
        result["anomalies"].append(
            f"{result['run_totals']['throttled']} scheduled messages not sent: --max-unreceipted reached"
        )
    return result


def table(result: dict[str, Any]) -> list[tuple[str, str]]:
    lat = result["latency_ms"]
    cpu = result["cpu"]

    def trio_(d: dict[str, Any]) -> str:
        return f"{d['p50']} / {d['p99']} / {d['p999']}"

    rows = [
        ("offered / completed msg/s", f"{result['offered_per_s']:,.0f} / {result['msgs_per_s']:,.0f}"),
        ("SEND→MSG p50/p99/p999 ms", trio_(lat["send_to_msg"])),
        ("SEND→SENT p50/p99/p999 ms", trio_(lat["send_to_sent"])),
        ("SEND→RECEIPT p50/p99/p999 ms", trio_(lat["send_to_receipt"])),
        ("schedule lag p99 / max ms", f"{result['schedule_lag_ms']['p99']} / {result['schedule_lag_ms']['max']}"),
        ("relay CPU share", _pct(cpu.get("relay_cpu_share"))),
        ("relay CPU µs per message", us(result.get("cpu_us_per_msg"))),
        ("load generator CPU share", _pct(cpu.get("loadgen_cpu_share"))),
        ("other processes CPU share", _pct(cpu.get("others_cpu_share"))),
    ]
    return rows


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.0f}%"

"""``drain``: store messages for offline recipients, then drain them on reconnect.

1. Recipients are registered (pipelined) and disconnect.
2. Store: ``--senders`` fresh senders each send ``--per-sender`` 1:1 messages
   (100-byte payloads, ``--window`` SENDs without SENT per sender) to their
   offline recipient — sender i to recipient i, or with ``--one-device`` all
   to one recipient device. ``store_msgs_per_s`` = SENTs / (first SEND →
   last SENT). Then the senders disconnect (their delivery receipts wait in
   their own inboxes).
3. Drain: every recipient connection is opened and upgraded first; then, all
   at once, each answers HELLO with AUTH and acks what it receives (one
   cumulative ACK per WebSocket message). ``drain_msgs_per_s`` = MSGs / (first
   AUTH written → last MSG read). READY's ``pending`` must equal what was
   stored; every message must arrive exactly once and in each sender's order.

Defaults follow BRIEF.md ("store 100 × 2,000 messages, then drain on
reconnect"); ``--one-device`` defaults to 100 × 1,000 = 100k entries for one
device.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from bench.inbox import drain, fill
from bench.proto import close_sessions, open_sessions
from bench.scenarios.common import ms, pct, us
from bench.scenarios.pairs import disturbance

DESCRIPTION = "offline store then drain on reconnect: store msg/s (SENT), drain msg/s (MSG)"
HEADLINE = ("drain_msgs_per_s", "msg/s drained")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--senders", type=int, default=100, help="senders (default 100)")
    parser.add_argument(
        "--per-sender", type=int, default=None, help="messages per sender (default 2000; 1000 with --one-device)"
    )
    parser.add_argument("--one-device", action="store_true", help="every sender sends to one recipient device")
    parser.add_argument("--window", type=int, default=64, help="SENDs without SENT per sender (default 64)")
    parser.add_argument("--stall-timeout", type=float, default=30.0, help="abort if nothing happens this long")
    parser.add_argument("--setup-timeout", type=float, default=120.0, help="registering/connecting users (default 120 s)")
    parser.add_argument("--timeout", type=float, default=600.0, help="limit per phase, store and drain (default 600 s)")
    parser.add_argument("--token", help="registration token, for a relay that requires one")


def run(url: str, relay_pid: int | None, args: argparse.Namespace, alive: Callable[[], bool] | None = None) -> dict[str, Any]:
    per_sender = args.per_sender if args.per_sender is not None else (1000 if args.one_device else 2000)
    n = args.senders
    run_id = os.urandom(4).hex()
    recipients = [f"d{run_id}r0"] if args.one_device else [f"d{run_id}r{i}" for i in range(n)]
    senders = [f"d{run_id}s{i}" for i in range(n)]
    t0 = time.monotonic()
    sessions = open_sessions(url, recipients, register=True, timeout=args.setup_timeout, token=args.token)
    keys = [s.key for s in sessions]
    close_sessions(sessions)
    register_s = time.monotonic() - t0
    targets = [recipients[0]] * n if args.one_device else recipients
    store = fill(url, args, relay_pid, senders, targets, per_sender, args.window, alive, args.timeout)
    time.sleep(0.5)  # the senders' connections close; nothing else is running
    total = n * per_sender
    drained = drain(url, args, relay_pid, recipients, keys, total, alive, args.timeout)
    expect_each = total if args.one_device else per_sender
    out: dict[str, Any] = {
        "store_msgs_per_s": store["sent_per_s"],
        "drain_msgs_per_s": drained["msgs_per_s"],
        # Relay CPU per message stored (SENT) and per MSG drained, each over its own phase.
        "store_cpu_us_per_msg": store["cpu_us_per_msg"],
        "drain_cpu_us_per_msg": drained["cpu_us_per_msg"],
        "messages": total,
        "recipients_register_seconds": round(register_s, 3),
        "store": store,
        "drain": drained,
        "params": {
            "senders": n,
            "per_sender": per_sender,
            "one_device": args.one_device,
            "recipients": len(recipients),
            "window": args.window,
            "payload_bytes": 100,
            "ack": "one cumulative ACK per received WebSocket message",
        },
    }
    anomalies: list[str] = []
    st = store["run_totals"]
    if st.get("errors"):
        anomalies.append(f"store: {st['errors']} ERROR frames, e.g. {store['error_samples'][:2]}")
    if st.get("unexpected") or st.get("unknown_ids"):
        anomalies.append(f"store: {st.get('unexpected', 0)} unexpected frames, {st.get('unknown_ids', 0)} unknown ids")
    dt = drained["run_totals"]
    for key, what in (
        ("errors", "ERROR frames"),
        ("duplicates", "duplicate MSGs"),
        ("gaps", "MSGs skipped in a sender's order"),
        ("unexpected", "unexpected frames (RECEIPT/EVENT to a recipient, ...)"),
    ):
        if dt.get(key):
            anomalies.append(f"drain: {dt[key]} {what}")
    if dt["msgs"] != total:
        anomalies.append(f"drain: {dt['msgs']} MSGs for {total} stored")
    pend = drained["ready_pending"]
    if pend["min"] != expect_each or pend["max"] != expect_each:
        anomalies.append(f"drain: READY pending {pend['min']}..{pend['max']}, expected {expect_each} per recipient")
    anomalies += [f"store: {a}" for a in disturbance(store["cpu"])]
    anomalies += [f"drain: {a}" for a in disturbance(drained["cpu"])]
    out["anomalies"] = anomalies
    return out


def table(result: dict[str, Any]) -> list[tuple[str, str]]:
    st, dr = result["store"], result["drain"]
    return [
        ("messages stored / drained", f"{st['run_totals']['sent']:,} / {dr['messages']:,}"),
        ("store msg/s (SENT)", f"{result['store_msgs_per_s']:,.0f}"),
        ("store seconds", f"{st['seconds']:.2f}"),
        ("store SEND→SENT p50 / p99 ms", ms(st["send_to_sent_ms"], "p50", "p99")),
        ("store relay / loadgen CPU", f"{pct(st['cpu'].get('relay_cpu_share'))} / {pct(st['cpu'].get('loadgen_cpu_share'))}"),
        ("store relay CPU µs per message", us(st.get("cpu_us_per_msg"))),
        ("drain msg/s (MSG)", f"{result['drain_msgs_per_s']:,.0f}"),
        ("drain seconds", f"{dr['seconds']:.2f}"),
        ("drain first READY / all READY / first MSG ms",
         f"{dr['first_ready_ms']:g} / {dr['all_ready_ms']:g} / {dr['first_msg_ms']:g}"),
        ("drain relay / loadgen CPU", f"{pct(dr['cpu'].get('relay_cpu_share'))} / {pct(dr['cpu'].get('loadgen_cpu_share'))}"),
        ("drain relay CPU µs per message", us(dr.get("cpu_us_per_msg"))),
        ("other processes CPU (store / drain)",
         f"{pct(st['cpu'].get('others_cpu_share'))} / {pct(dr['cpu'].get('others_cpu_share'))}"),
    ]

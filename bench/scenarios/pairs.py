"""``pairs``: closed-loop 1:1 throughput of the full message cycle.

N senders each keep up to ``--window`` SENDs without SENT in flight; every
SENT frees a slot and the next SENDs leave in the same WebSocket message as
the sender's ACKs. A message counts as complete when its RECEIPT (status 1)
reached the sender. ``msgs_per_s`` = completed cycles / measured seconds.

``--e2ee``: every SEND payload is a real relay-v1 pairwise ciphertext and
every MSG is decrypted before it is acked (sessions made in-process, see
:mod:`bench.e2ee`); ``--e2ee both`` runs every target with and without,
interleaved per round (targets ``fast`` and ``fast+e2ee``).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

from bench.scenarios.common import PairsHarness, add_common_arguments, us

DESCRIPTION = "closed-loop 1:1 throughput: SEND→SENT→MSG→ACK→RECEIPT, window per sender"
HEADLINE = ("msgs_per_s", "msg/s")
SUPPORTS_MQTT = True  # target mosquitto: the same cycle over MQTT 3.1.1 QoS 1 (bench/mqtt.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--window", type=int, default=64, help="SENDs without SENT per sender (default 64)")
    parser.add_argument(
        "--e2ee", nargs="?", const="on", default="off", choices=("off", "on", "both"),
        help="payloads are relay-v1 pairwise ciphertexts, decrypted by the receivers (sessions set up "
        "in-process); 'both': every target with and without, interleaved (default off)",
    )


def variants(args: argparse.Namespace) -> list[tuple[str, argparse.Namespace]]:
    """``--e2ee both``: each target twice per round, plain then encrypted."""
    if args.e2ee == "both":
        plain, encrypted = copy.copy(args), copy.copy(args)
        plain.e2ee, encrypted.e2ee = "off", "on"
        return [("", plain), ("e2ee", encrypted)]
    return [("e2ee" if args.e2ee == "on" else "", args)]


def run(url: str, relay_pid: int | None, args: argparse.Namespace, alive: Callable[[], bool] | None = None) -> dict[str, Any]:
    harness = PairsHarness(url, args, window=args.window, closed_loop=True)
    mqtt = url.startswith("mqtt://")
    if mqtt and args.e2ee == "on":
        raise ValueError("--e2ee: relay targets only (the MQTT client sends plain payloads)")
    try:
        if mqtt:
            harness.setup_mqtt()
        else:
            harness.setup()
        for sender in harness.senders:
            sender.send_now(sender.room(), time.perf_counter_ns())
        result = harness.measure(relay_pid, lambda now: None, alive)
    finally:
        harness.close()
    result["params"] = {"pairs": args.pairs, "window": args.window, "payload_bytes": 100, "ack": args.ack,
                        "framing": args.framing, "e2ee": args.e2ee == "on"}
    if args.e2ee == "on":
        result["params"]["payload_bytes"] = "pairwise ciphertext of a 100-byte plaintext"
    if mqtt:
        result["params"].update(protocol="MQTT 3.1.1", qos=1, clean_session=False, ack="PUBACK per message")
    result["anomalies"] = anomalies(result["run_totals"]) + disturbance(result["cpu"])
    return result


def anomalies(totals: dict[str, int]) -> list[str]:
    """Things a correct relay never does in this scenario."""
    out = []
    for key, what in (
        ("errors", "ERROR frames"),
        ("duplicates", "duplicate MSGs (redelivery without reconnect)"),
        ("gaps", "MSGs skipped in a sender's order"),
        ("unknown_ids", "SENT/RECEIPT for ids not in flight (or receipt status != 1)"),
        ("unexpected", "unexpected frames (MSG to a sender, RECEIPT to a receiver, pending at READY, ...)"),
        ("e2ee_failures", "MSG payloads that did not decrypt (--e2ee)"),
    ):
        if totals.get(key):
            out.append(f"{totals[key]} {what}")
    return out


def disturbance(cpu: dict[str, Any], limit: float = 0.1) -> list[str]:
    """A warning when other processes used noticeable CPU during the measured interval."""
    others = cpu.get("others_cpu_share")
    if others is not None and others > limit:
        names = ", ".join(f"{p['cmd'][:50]} ({p['cpu_share'] * 100:.0f}%)" for p in cpu.get("top_other_processes", [])[:3])
        return [f"other processes used {others * 100:.0f}% of a core while measuring: figures disturbed"
                + (f"; top: {names}" if names else "")]
    return []


def table(result: dict[str, Any]) -> list[tuple[str, str]]:
    lat = result["latency_ms"]
    cpu = result["cpu"]
    rows = [
        ("msg/s (full cycle)", f"{result['msgs_per_s']:,.0f}"),
        ("SEND→MSG p50 / p99 ms", f"{lat['send_to_msg']['p50']} / {lat['send_to_msg']['p99']}"),
        ("SEND→SENT p50 / p99 ms", f"{lat['send_to_sent']['p50']} / {lat['send_to_sent']['p99']}"),
        ("SEND→RECEIPT p50 / p99 ms", f"{lat['send_to_receipt']['p50']} / {lat['send_to_receipt']['p99']}"),
        ("relay CPU share", _pct(cpu.get("relay_cpu_share"))),
        ("relay CPU µs per message", us(result.get("cpu_us_per_msg"))),
        ("load generator CPU share", _pct(cpu.get("loadgen_cpu_share"))),
    ]
    e2ee = result.get("e2ee")
    if e2ee:
        rows.append(("client encrypt / decrypt µs", f"{e2ee['encrypt_us']} / {e2ee['decrypt_us']}"))
        rows.append(("decrypt failures", str(e2ee["decrypt_failures"])))
    rows.append(("other processes CPU share", _pct(cpu.get("others_cpu_share"))))
    for core in cpu.get("cores", []):
        rows.append((f"core {core['core']} busy (softirq)", f"{_pct(core['busy'])} ({_pct(core['softirq'])})"))
    return rows


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.0f}%"

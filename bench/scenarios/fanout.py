"""``fanout``: one sender, one group, every member online (one connection each).

For each group size N in ``--members`` (default 16, 256, 1024; N counts the
sender, who is the group's creator and a member, so N - 1 members receive
each message — the relay's limit is 1,024 members including the creator):

1. N fresh users are registered, pipelined (all connections, all REGISTERs,
   all READYs), and stay connected.
2. The sender creates the group (``REQ group.create {name, members}`` → RES
   with ``group``); every member (the sender too) gets EVENT ``group.changed``
   first and acks it. Timed: REQ→RES and REQ→last member has the EVENT.
3. The sender keeps ``--window`` SEND_GROUPs (100-byte payloads) without SENT
   and at most ``--max-undelivered`` messages that some member still misses;
   members ACK cumulatively per received WebSocket message; the sender acks
   the RECEIPTs (one per member and message) the same way. Warm-up, then the
   measured interval.
4. Sending stops; every message must reach every member exactly once and in
   order (checked per member from a counter in the payload).
5. Store check (spawned relays, or ``--url`` with ``--relay-pid`` on this
   machine): with the relay idle, the members hold their ACKs, the sender
   sends ``--store-check`` messages, and the relay's LMDB files are read
   (read-only, from this process) before and after: bodies added per message
   (1 when the body is stored once) and inbox entries added per message
   (N - 1 references). Then the members ack and the bodies must go.

``deliveries_per_s`` = MSGs received by members in the measured interval /
its length (the headline is the largest group's); ``sends_per_s`` = SENTs.
Latencies per message: SEND_GROUP→SENT, →first member, →last member.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from bench.engine import Conn, Engine
from bench.groups import GroupSender, Member, Tracker
from bench.proto import open_sessions
from bench.scenarios.common import Guard, ms, pct, us
from bench.scenarios.pairs import disturbance
from bench.stats import summarize_ns
from bench.storeprobe import data_dir_of, entry_counts
from bench.system import CpuMeter, cpu_us_per
from bench.wsclient import encode_binary

DESCRIPTION = "group fan-out: one sender, groups of 16/256/1024 members all online; deliveries/s, SEND_GROUP→last member"
HEADLINE = ("deliveries_per_s", "deliveries/s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--members",
        default="16,256,1024",
        help="comma-separated group sizes, the sender included (default 16,256,1024; the relay allows 1024)",
    )
    parser.add_argument("--window", type=int, default=32, help="SEND_GROUPs without SENT (default 32)")
    parser.add_argument(
        "--max-undelivered",
        type=int,
        default=512,
        help="messages some member does not have yet before the sender pauses (default 512)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured interval per group size (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up per group size (default 2)")
    parser.add_argument("--stall-timeout", type=float, default=10.0, help="abort if nothing arrives this long")
    parser.add_argument("--setup-timeout", type=float, default=120.0, help="registering the users (default 120 s)")
    parser.add_argument(
        "--store-check",
        type=int,
        default=8,
        help="messages for the body-stored-once check (default 8; 0 skips it)",
    )
    parser.add_argument("--token", help="registration token, for a relay that requires one")


def run(url: str, relay_pid: int | None, args: argparse.Namespace, alive: Callable[[], bool] | None = None) -> dict[str, Any]:
    sizes = [int(x) for x in str(args.members).split(",") if x.strip()]
    if not sizes or min(sizes) < 2:
        raise ValueError("--members: group sizes of at least 2 (the sender and one member)")
    data_dir = data_dir_of(relay_pid)
    by_size: list[dict[str, Any]] = []
    anomalies: list[str] = []
    for size in sizes:
        one = run_size(url, relay_pid, args, size, alive, data_dir)
        by_size.append(one)
        anomalies.extend(f"{size} members: {a}" for a in one["anomalies"])
    largest = max(by_size, key=lambda r: r["members"])
    return {
        "deliveries_per_s": largest["deliveries_per_s"],
        "sends_per_s": largest["sends_per_s"],
        "headline_members": largest["members"],
        "by_size": by_size,
        "anomalies": anomalies,
        "params": {
            "members": sizes,
            "window": args.window,
            "max_undelivered": args.max_undelivered,
            "payload_bytes": 100,
            "seconds": args.seconds,
            "warmup": args.warmup,
            "ack": "one cumulative ACK per received WebSocket message (members and sender)",
        },
    }


def run_size(
    url: str,
    relay_pid: int | None,
    args: argparse.Namespace,
    size: int,
    alive: Callable[[], bool] | None,
    data_dir: Any,
) -> dict[str, Any]:
    run_id = os.urandom(4).hex()
    sender_name = f"f{run_id}s"
    member_names = [f"f{run_id}m{i}" for i in range(size - 1)]
    tracker = Tracker(size - 1)
    c = tracker.c
    engine = Engine()
    out: dict[str, Any] = {"members": size, "receivers": size - 1}
    try:
        t0 = time.monotonic()
        sessions = open_sessions(
            url, [sender_name, *member_names], register=True, timeout=args.setup_timeout, token=args.token
        )
        out["register_seconds"] = round(time.monotonic() - t0, 3)
        sender = GroupSender(tracker, args.window, args.max_undelivered)
        sender.conn = engine.add(sessions[0], sender)
        members: list[tuple[Member, Conn]] = []
        for session in sessions[1:]:
            member = Member(tracker, sender)
            members.append((member, engine.add(session, member)))
        c.unexpected += sum(len(s.early) + s.pending for s in sessions)

        def what() -> str:
            return (f"sends {c.sends}, SENT {c.sent}, deliveries {c.deliveries}, complete {c.completed}, "
                    f"receipts {c.receipts}, events {c.events}, errors {c.errors}")

        guard = Guard(lambda: (c.sent, c.deliveries, c.receipts, c.events), args.stall_timeout, alive, what)

        def idle_tick(now: float) -> float | None:
            guard.check(now)
            return None

        # Group creation: RES to the sender, EVENT group.changed to everyone.
        t0 = time.monotonic()
        sender.create_group("bench fan-out", member_names)
        engine.run(
            t0 + args.setup_timeout,
            idle_tick,
            until=lambda: sender.create_result is not None and sender.events >= 1 and all(m.joined for m, _ in members),
        )
        res = sender.create_result
        if res is None or not res[2] or sender.group is None:
            raise RuntimeError(f"group.create failed: {res!r:.300}")
        out["group_create_ms"] = round(sender.create_ns / 1e6, 3)
        missing = sum(1 for m, _ in members if not m.joined)
        if missing:
            raise RuntimeError(f"{missing} members got no group.changed EVENT within {args.setup_timeout:.0f} s")
        out["group_ready_ms"] = round((time.monotonic() - t0) * 1e3, 3)
        out["group"] = sender.group

        # Warm-up, then the measured interval.
        def tick(now: float) -> float | None:
            guard.check(now)
            if sender.room() > 0:
                sender.refill()
            return None

        sender.sending = True
        sender.refill()
        guard.reset()
        meter = CpuMeter(relay_pid)
        start = time.monotonic()
        engine.run(start + args.warmup, tick)
        before = c.snapshot()
        marks0 = tracker.marks()
        cpu0 = meter.sample()
        engine.run(cpu0.wall + args.seconds, tick)
        cpu1 = meter.sample()
        marks1 = tracker.marks()
        after = c.snapshot()
        wall = cpu1.wall - cpu0.wall
        delta = {k: after[k] - before[k] for k in after}

        # Stop sending; everything sent must reach every member.
        sender.sending = False
        engine.run(
            time.monotonic() + args.stall_timeout,
            idle_tick,
            until=lambda: c.completed >= sender.k and not sender.sent_at,
        )
        totals = c.snapshot()
        cpu = CpuMeter.shares(cpu0, cpu1)
        out.update(
            deliveries_per_s=round(delta["deliveries"] / wall, 1),
            # Per delivery (one MSG to one member), not per SEND_GROUP.
            cpu_us_per_delivery=cpu_us_per(cpu, delta["deliveries"]),
            sends_per_s=round(delta["sent"] / wall, 1),
            completed_per_s=round(delta["completed"] / wall, 1),
            receipts_per_s=round(delta["receipts"] / wall, 1),
            measured_seconds=round(wall, 3),
            latency_ms={
                "send_to_sent": summarize_ns(tracker.to_sent[marks0[0] : marks1[0]]),
                "send_to_first_member": summarize_ns(tracker.to_first[marks0[1] : marks1[1]]),
                # A message is delivered when its last member has it: the CDF --plot draws.
                "send_to_last_member": summarize_ns(tracker.to_last[marks0[2] : marks1[2]], histogram=True),
            },
            cpu=cpu,
            window_counts=delta,
            run_totals=totals,
            error_samples=list(c.error_samples),
            reorder_samples=list(c.reorder_samples),
            missing_deliveries=sum(m.missing(sender.k) for m, _ in members),
        )
        out["anomalies"] = anomalies(totals, sender.k, len(sender.sent_at), size - 1) + disturbance(out["cpu"])
        if out["missing_deliveries"]:
            out["anomalies"].append(f"{out['missing_deliveries']} deliveries missing after the run (member, message)")
        loadgen = out["cpu"].get("loadgen_cpu_share")
        if loadgen is not None and loadgen > 0.85:
            out["anomalies"].append(f"load generator at {loadgen * 100:.0f}% of its core: it may be the bottleneck")
        if args.store_check > 0 and c.completed >= sender.k and not sender.sent_at:
            out["store_check"] = store_check(engine, sender, members, tracker, args, data_dir, idle_tick)
            sc = out["store_check"]
            if sc.get("bodies_per_message") is not None and sc["bodies_per_message"] != 1:
                out["anomalies"].append(f"store check: {sc['bodies_per_message']} bodies per group message (expected 1)")
            if sc.get("bodies_left_after_acks"):
                out["anomalies"].append(f"store check: {sc['bodies_left_after_acks']} bodies left after every member acked")
        return out
    finally:
        engine.close()


def anomalies(totals: dict[str, int], sent_total: int, unsent: int, receivers: int) -> list[str]:
    out = []
    for key, what in (
        ("errors", "ERROR frames"),
        ("duplicates", "duplicate MSGs (a member got a message twice)"),
        ("reordered", "MSGs that reached a member before an earlier SEND_GROUP of the same sender (send order broken)"),
        ("seq_regressions", "MSGs whose seq did not increase on their connection"),
        ("wrong_group", "MSGs with another group field"),
        ("unknown_ids", "SENT for ids not in flight, or RECEIPT status != 1"),
        ("unexpected", "unexpected frames (MSG to the sender, RECEIPT to a member, pending at READY, ...)"),
    ):
        if totals.get(key):
            out.append(f"{totals[key]} {what}")
    if totals["completed"] < sent_total:
        out.append(f"{sent_total - totals['completed']} of {sent_total} messages did not reach every member")
    if unsent:
        out.append(f"{unsent} SEND_GROUPs never answered with SENT")
    if totals["deliveries"] > sent_total * receivers:
        out.append(f"{totals['deliveries']} deliveries for {sent_total} messages to {receivers} members")
    return out


def store_check(
    engine: Engine,
    sender: GroupSender,
    members: list[tuple[Member, Conn]],
    tracker: Tracker,
    args: argparse.Namespace,
    data_dir: Any,
    idle_tick: Callable[[float], float | None],
) -> dict[str, Any]:
    """Bodies and inbox entries added by ``args.store_check`` messages the members hold."""
    if data_dir is None or entry_counts(data_dir) is None:
        return {"skipped": "the relay's data directory is not known or not an LMDB store (naive relay, or --url without --relay-pid)"}
    c = tracker.c

    def settle(limit: float) -> dict[str, int] | None:
        """Run the engine until the relay's entry counts stop changing (0.5 s)."""
        last = entry_counts(data_dir)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            engine.run(time.monotonic() + 0.5, idle_tick)
            now = entry_counts(data_dir)
            if now == last:
                return now
            last = now
        return None

    base = settle(15.0)
    if base is None:
        return {"skipped": "the relay's store did not settle within 15 s"}
    for member, _conn in members:
        member.acking = False
    m = args.store_check
    first_k = sender.k + 1
    assert sender.conn is not None
    sender.conn.write(encode_binary(b"".join(sender.build(m, time.perf_counter_ns()))))
    engine.run(
        time.monotonic() + args.stall_timeout,
        idle_tick,
        until=lambda: c.completed >= sender.k and not sender.sent_at,
    )
    if c.completed < sender.k:
        return {"skipped": f"messages {first_k}..{sender.k} did not reach every member"}
    held = settle(15.0)
    if held is None:
        return {"skipped": "the relay's store did not settle within 15 s after the held messages"}
    for member, conn in members:
        member.release(conn)
    released = settle(15.0)
    bodies = held["bodies"] - base["bodies"]
    inbox = held["inbox"] - base["inbox"]
    return {
        "messages": m,
        "before": base,
        "held": held,
        "after_acks": released,
        "bodies_added": bodies,
        "inbox_entries_added": inbox,
        "bodies_per_message": round(bodies / m, 3),
        "inbox_entries_per_message": round(inbox / m, 3),
        "bodies_left_after_acks": None if released is None else released["bodies"] - base["bodies"],
    }


def table(result: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for r in result["by_size"]:
        n = r["members"]
        lat = r["latency_ms"]
        cpu = r["cpu"]
        rows += [
            (f"[{n}] deliveries/s", f"{r['deliveries_per_s']:,.0f}"),
            (f"[{n}] SEND_GROUPs/s (SENT)", f"{r['sends_per_s']:,.0f}"),
            (f"[{n}] →SENT p50 / p99 ms", ms(lat["send_to_sent"], "p50", "p99")),
            (f"[{n}] →first member p50 / p99 ms", ms(lat["send_to_first_member"], "p50", "p99")),
            (f"[{n}] →last member p50 / p99 ms", ms(lat["send_to_last_member"], "p50", "p99")),
            (f"[{n}] register / create+events", f"{r['register_seconds']:.2f} s / {r['group_ready_ms']:.0f} ms"),
            (f"[{n}] relay / loadgen / others CPU",
             f"{pct(cpu.get('relay_cpu_share'))} / {pct(cpu.get('loadgen_cpu_share'))} / {pct(cpu.get('others_cpu_share'))}"),
            (f"[{n}] relay CPU µs per delivery", us(r.get("cpu_us_per_delivery"))),
        ]
        sc = r.get("store_check")
        if sc:
            if "skipped" in sc:
                rows.append((f"[{n}] bodies / inbox entries per msg", "not checked"))
            else:
                rows.append((f"[{n}] bodies / inbox entries per msg",
                             f"{sc['bodies_per_message']:g} / {sc['inbox_entries_per_message']:g}"))
    return rows

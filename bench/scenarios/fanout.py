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

Target ``mosquitto``: the MQTT 3.1.1 analogue (:mod:`bench.mqtt`): N - 1
subscribers (clean_session=0, one client id each) SUBSCRIBE QoS 1 to one
fresh topic, one publisher that subscribes to nothing PUBLISHes QoS 1 to it
under the same ``--window`` (PUBLISHes without PUBACK) and
``--max-undelivered``; subscribers PUBACK every PUBLISH, all of one socket
read in one write. Deliveries, latencies and the broker's CPU per delivery
are counted by the same code as for the relay. No RECEIPTs (MQTT has none),
no group.create (SUBACK is the join), no store check (no relay store). The
broker's config gets ``max_inflight_messages`` = ``--mqtt-inflight`` (the
relay's per-connection delivery window, 256: the same flow control per
receiving connection; Mosquitto's default is 20) and ``max_queued_messages
0`` (its default, 1,000, drops QoS 1 messages beyond it; ``--max-undelivered``
keeps the queues below that, but a larger one must not turn into losses).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from bench.engine import Conn, Engine
from bench.groups import GroupSender, Member, Tracker
from bench.proto import open_sessions
from bench.scenarios.common import Guard, ms, pct, us
from bench.scenarios.pairs import disturbance
from bench.stats import summarize_ns
from bench.storeprobe import data_dir_of, entry_counts
from bench.system import CpuMeter, cpu_us_per
from bench.targets import ALL_TARGETS, MqttOption
from bench.wsclient import encode_binary
from relay.config import Settings

DESCRIPTION = (
    "group fan-out: one sender, groups of 16/256/1024 members all online; deliveries/s, SEND_GROUP→last member "
    "(target mosquitto: one QoS 1 topic with N - 1 subscribers)"
)
HEADLINE = ("deliveries_per_s", "deliveries/s")
SUPPORTS_MQTT = True  # target mosquitto: one topic, N - 1 QoS 1 subscribers (bench/mqtt.py)
# The relay's per-connection delivery window: the spawned relays run with the default
# (the bench passes no --window), and Mosquitto gets the same by default.
RELAY_WINDOW: int = Settings.window
FD_SLACK = 64  # descriptors this process needs besides the group's sockets (epoll, logs, psutil, ...)


class _Sender(Protocol):
    """What the measured loop needs of a sender: GroupSender or MqttGroupPublisher."""

    sending: bool
    k: int
    sent_at: dict[Any, int]

    def room(self) -> int: ...
    def refill(self) -> None: ...


class _Member(Protocol):
    def missing(self, sent: int) -> int: ...


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--members",
        default="16,256,1024",
        help="comma-separated group sizes, the sender included (default 16,256,1024; the relay allows 1024)",
    )
    parser.add_argument(
        "--window", type=int, default=32,
        help="SEND_GROUPs without SENT (default 32; target mosquitto: PUBLISHes without PUBACK)",
    )
    parser.add_argument(
        "--max-undelivered",
        type=int,
        default=512,
        help="messages some member (subscriber) does not have yet before the sender pauses (default 512)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured interval per group size (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up per group size (default 2)")
    parser.add_argument("--stall-timeout", type=float, default=10.0, help="abort if nothing arrives this long")
    parser.add_argument(
        "--setup-timeout", type=float, default=120.0,
        help="registering the users, or CONNECT+SUBSCRIBE for mosquitto (default 120 s)",
    )
    parser.add_argument(
        "--store-check",
        type=int,
        default=8,
        help="messages for the body-stored-once check (default 8; 0 skips it; relay targets only)",
    )
    parser.add_argument("--token", help="registration token, for a relay that requires one")
    parser.add_argument(
        "--mqtt-inflight",
        type=int,
        default=RELAY_WINDOW,
        help=f"target mosquitto: its max_inflight_messages, PUBLISHes without PUBACK per subscriber "
        f"(default {RELAY_WINDOW}, the relay's per-connection delivery window; 0 = unlimited; "
        "Mosquitto's own default is 20)",
    )


def mosquitto_options(args: argparse.Namespace) -> tuple[MqttOption, ...]:
    """The broker's config for this run (see the module docstring; in the result's notes)."""
    inflight = args.mqtt_inflight
    return (
        MqttOption(
            "max_inflight_messages",
            str(inflight),
            "per subscriber, PUBLISHes without PUBACK"
            + (f" = the relay's per-connection delivery window ({RELAY_WINDOW}), the same flow control"
               if inflight == RELAY_WINDOW else " (unlimited)" if inflight == 0 else " (--mqtt-inflight)")
            + "; Mosquitto's default is 20",
        ),
        MqttOption(
            "max_queued_messages",
            "0",
            "no limit on the queue beyond the in-flight ones (beyond the default, 1000, Mosquitto "
            "drops QoS 1 messages); the publisher's --max-undelivered bounds it",
        ),
    )


def run(url: str, relay_pid: int | None, args: argparse.Namespace, alive: Callable[[], bool] | None = None) -> dict[str, Any]:
    sizes = [int(x) for x in str(args.members).split(",") if x.strip()]
    if not sizes or min(sizes) < 2:
        raise ValueError("--members: group sizes of at least 2 (the sender and one member)")
    mqtt = url.startswith("mqtt://")
    check_fd_limit(max(sizes))
    if mqtt:
        if args.token:
            raise ValueError("--token: relay targets only (the MQTT clients do not register)")
        if args.mqtt_inflight < 0:
            raise ValueError("--mqtt-inflight: 0 (unlimited) or more")
    data_dir = None if mqtt else data_dir_of(relay_pid)
    by_size: list[dict[str, Any]] = []
    anomalies: list[str] = []
    for size in sizes:
        if mqtt:
            one = run_size_mqtt(url, relay_pid, args, size, alive)
        else:
            one = run_size(url, relay_pid, args, size, alive, data_dir)
        by_size.append(one)
        anomalies.extend(f"{size} members: {a}" for a in one["anomalies"])
    largest = max(by_size, key=lambda r: r["members"])
    params: dict[str, Any] = {
        "members": sizes,
        "window": args.window,
        "max_undelivered": args.max_undelivered,
        "payload_bytes": 100,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "ack": "one cumulative ACK per received WebSocket message (members and sender)",
    }
    if mqtt:
        params.update(
            protocol="MQTT 3.1.1",
            qos=1,
            clean_session=False,
            subscribers="members - 1, one topic; the publisher subscribes to nothing",
            window_counts="PUBLISHes without PUBACK at the publisher",
            ack="one PUBACK per PUBLISH, all PUBACKs of one socket read in one write",
            receipts=False,
            max_inflight_messages=args.mqtt_inflight,
            max_queued_messages=0,
        )
    return {
        "deliveries_per_s": largest["deliveries_per_s"],
        "sends_per_s": largest["sends_per_s"],
        "headline_members": largest["members"],
        "by_size": by_size,
        "anomalies": anomalies,
        "params": params,
    }


def check_fd_limit(size: int) -> None:
    """One socket per member in this process (and as many in the relay or broker,
    which inherits this limit): refuse a size the open-files limit cannot hold
    instead of failing halfway through the connections."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and size + FD_SLACK > soft:
        raise ValueError(
            f"--members {size}: needs {size} connections plus ~{FD_SLACK} other descriptors, "
            f"but the open-files limit is {soft} (ulimit -n)"
        )


def extra_ratios(results: list[dict[str, Any]]) -> dict[str, float]:
    """deliveries/s of every ordered pair of successful targets at each group size
    both ran ("fast/mosquitto@256"); the plain ratios compare the largest size only."""
    order = {name: i for i, name in enumerate(ALL_TARGETS)}
    ok = sorted((r for r in results if r.get("ok") and r.get("by_size")),
                key=lambda r: order.get(r["target"], len(order)))
    out: dict[str, float] = {}
    for i, a in enumerate(ok):
        for b in ok[i + 1 :]:
            b_by = {r["members"]: r["deliveries_per_s"] for r in b["by_size"]}
            for ra in a["by_size"]:
                vb = b_by.get(ra["members"])
                if vb:
                    out[f"{a['target']}/{b['target']}@{ra['members']}"] = round(ra["deliveries_per_s"] / vb, 2)
    return out


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

        measure(engine, sender, [m for m, _ in members], tracker, args, relay_pid, guard, idle_tick, out)
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


def run_size_mqtt(
    url: str, broker_pid: int | None, args: argparse.Namespace, size: int, alive: Callable[[], bool] | None
) -> dict[str, Any]:
    """One group size against an MQTT broker: ``size - 1`` subscribers and one
    publisher, measured exactly like :func:`run_size`."""
    from bench.mqtt import open_fanout_clients

    tracker = Tracker(size - 1)
    c = tracker.c
    engine = Engine()
    out: dict[str, Any] = {"members": size, "receivers": size - 1}
    try:
        t0 = time.monotonic()
        publisher, subscribers, topic = open_fanout_clients(
            url, engine, size - 1, tracker, args.window, args.max_undelivered, args.setup_timeout
        )
        # CONNECT + SUBSCRIBE of every client, pipelined, up to the last SUBACK:
        # the counterpart of registering the users and creating the group.
        out["connect_subscribe_seconds"] = round(time.monotonic() - t0, 3)
        out["group"] = topic

        def what() -> str:
            return (f"PUBLISHes {c.sends}, PUBACKs {c.sent}, deliveries {c.deliveries}, "
                    f"complete {c.completed}, unexpected {c.unexpected}")

        guard = Guard(lambda: (c.sent, c.deliveries), args.stall_timeout, alive, what)

        def idle_tick(now: float) -> float | None:
            guard.check(now)
            return None

        measure(engine, publisher, subscribers, tracker, args, broker_pid, guard, idle_tick, out)
        out["store_check"] = {"skipped": "not a relay: Mosquitto keeps QoS 1 messages in memory, one copy per message"}
        return out
    finally:
        engine.close()


def measure(
    engine: Engine,
    sender: _Sender,
    members: Sequence[_Member],
    tracker: Tracker,
    args: argparse.Namespace,
    relay_pid: int | None,
    guard: Guard,
    idle_tick: Callable[[float], float | None],
    out: dict[str, Any],
) -> None:
    """Warm-up, the measured interval, then drain: every message must reach every
    member. Adds the figures and ``anomalies`` to ``out``. The same code for the
    relay and the MQTT broker, so the two are counted alike."""
    c = tracker.c

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
        missing_deliveries=sum(m.missing(sender.k) for m in members),
    )
    out["anomalies"] = anomalies(totals, sender.k, len(sender.sent_at), tracker.members) + disturbance(cpu)
    if out["missing_deliveries"]:
        out["anomalies"].append(f"{out['missing_deliveries']} deliveries missing after the run (member, message)")
    loadgen = cpu.get("loadgen_cpu_share")
    if loadgen is not None and loadgen > 0.85:
        out["anomalies"].append(f"load generator at {loadgen * 100:.0f}% of its core: it may be the bottleneck")


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
            (f"[{n}] register / create+events", setup_cell(r)),
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


def setup_cell(r: dict[str, Any]) -> str:
    if "connect_subscribe_seconds" in r:  # target mosquitto: no registration, no group to create
        return f"{r['connect_subscribe_seconds']:.2f} s CONNECT+SUBSCRIBE / —"
    return f"{r['register_seconds']:.2f} s / {r['group_ready_ms']:.0f} ms"

"""The ``fanout`` scenario's ``mosquitto`` target (bench/mqtt.py, bench/scenarios/fanout.py).

The roles are checked on hand-made packets; one short run against a real
Mosquitto (skipped when it is not installed) checks that the pieces fit:
every message reaches every subscriber once, in order, and the broker got
the scenario's config. No timing is asserted.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import build_parser, run_one
from bench.groups import Tracker
from bench.mqtt import MqttGroupPublisher, MqttSubscriber, Parser, publish_head
from bench.scenarios import fanout
from bench.targets import mosquitto_config

PAY = struct.Struct("<qIQ")
TOPIC = "bench/group/t"


class FakeConn:
    """Collects what a role writes; one entry per write."""

    name = "fake"

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)


def broker_publish(pid: int, k: int, topic: str = TOPIC) -> tuple[int, bytes]:
    """A QoS 1 PUBLISH as the broker forwards it, parsed: (first byte, body)."""
    head = publish_head(topic, 100)[0]
    packet = head + struct.pack(">H", pid) + PAY.pack(0, 0, k) + bytes(80)
    [parsed] = Parser().feed(packet)
    return parsed


def test_subscriber_pubacks_one_read_in_one_write_and_checks_order() -> None:
    tracker = Tracker(2)
    publisher = MqttGroupPublisher(tracker, TOPIC, window=4, cap=16)
    publisher.build(3, 0)
    a, b = MqttSubscriber(tracker, publisher, TOPIC), MqttSubscriber(tracker, publisher, TOPIC)
    conn = FakeConn()
    a.on_packets(conn, [broker_publish(7, 1), broker_publish(8, 2)], 10)  # type: ignore[arg-type]
    assert conn.writes == [b"\x40\x02\x00\x07\x40\x02\x00\x08"]
    b.on_packets(conn, [broker_publish(1, 2), broker_publish(2, 1), broker_publish(3, 1)], 20)  # type: ignore[arg-type]
    c = tracker.c
    assert (c.deliveries, c.reordered, c.duplicates, c.completed) == (5, 1, 1, 2)
    assert a.missing(3) == 1 and b.missing(3) == 1
    b.on_packets(conn, [broker_publish(4, 3, topic="bench/other")], 30)  # type: ignore[arg-type]
    assert c.wrong_group == 1
    assert conn.writes[-1] == b"\x40\x02\x00\x04"  # acked all the same: the broker must not resend it


def test_publisher_window_and_cap() -> None:
    tracker = Tracker(1)
    publisher = MqttGroupPublisher(tracker, TOPIC, window=4, cap=6)
    conn = FakeConn()
    publisher.conn = conn  # type: ignore[assignment]
    publisher.sending = True
    publisher.refill()
    assert publisher.k == 4 and len(Parser().feed(conn.writes[0])) == 4
    publisher.on_packets(conn, [(0x40, b"\x00\x01"), (0x40, b"\x00\x02"), (0x40, b"\x00\x09")], 5)  # type: ignore[arg-type]
    assert tracker.c.sent == 2 and tracker.c.unknown_ids == 1
    assert publisher.k == 6  # the cap: 6 messages no subscriber has yet
    with pytest.raises(ValueError, match="packet ids"):
        MqttGroupPublisher(tracker, TOPIC, window=70_000, cap=1)


def test_mosquitto_config_options_replace_defaults() -> None:
    options = fanout.mosquitto_options(build_parser().parse_args(["fanout", "--targets", "mosquitto"]))
    conf = mosquitto_config(1883, "127.0.0.1", Path("/tmp/x"), options).splitlines()
    assert "max_inflight_messages 256" in conf and "max_inflight_messages 64" not in conf
    assert conf.count("max_queued_messages 0") == 1


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not installed")
def test_fanout_against_mosquitto() -> None:
    args = build_parser().parse_args(
        ["fanout", "--targets", "mosquitto", "--members", "2,5", "--seconds", "0.3", "--warmup", "0.1", "--nice", "0"]
    )
    result: dict[str, Any] = run_one("mosquitto", fanout, args, None, lambda *a: None, "")
    assert result["ok"], result.get("error")
    assert any("max_inflight_messages 256" in note for note in result["notes"])
    for size in result["by_size"]:
        assert size["deliveries_per_s"] > 0
        assert size["missing_deliveries"] == 0
        totals = size["run_totals"]
        assert totals["deliveries"] == totals["sends"] * (size["members"] - 1)
        assert not [a for a in size["anomalies"] if not a.startswith(("other processes", "load generator"))]

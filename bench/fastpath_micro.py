"""Micro-benchmark of the fast path twins: ``FrameParser.feed`` throughput.

Parses masked binary frames (client to server, as the relay sees them), fed
64 frames per ``feed`` call, for 100-byte and 1 KiB payloads, with both the
pure and the compiled implementation. Prints JSON: frames parsed per second
(best of several rounds) and the compiled/pure speedup.

    python -m bench.fastpath_micro [--seconds 0.3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from types import ModuleType
from typing import Any

from relay.fastpath import load

FRAMES_PER_FEED = 64
SIZES = {"100B": 100, "1KiB": 1024}
MASK = b"\x37\xfa\x21\x3d"


def frames_per_second(mod: ModuleType, size: int, seconds: float, rounds: int) -> float:
    """Best-of-``rounds`` rate of parsing ``size``-byte masked frames, 64 per feed."""
    payload = bytes(i & 0xFF for i in range(size))
    chunk = mod.encode_frame(mod.OP_BINARY, payload, MASK) * FRAMES_PER_FEED
    parser = mod.FrameParser(1 << 20, require_mask=True)
    # Sanity check, and warm-up.
    out = parser.feed(chunk)
    assert len(out) == FRAMES_PER_FEED and out[0] == (mod.OP_BINARY, payload), "bad parse"
    feed = parser.feed
    # Calibrate a batch that takes ~1/20 of a round.
    batch = 1
    while True:
        start = time.perf_counter()
        for _ in range(batch):
            feed(chunk)
        if time.perf_counter() - start >= seconds / 20:
            break
        batch *= 2
    best = 0.0
    for _ in range(rounds):
        feeds = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            for _ in range(batch):
                feed(chunk)
            feeds += batch
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, feeds * FRAMES_PER_FEED / (now - start))
    assert parser.buffered() == 0
    return best


def run(seconds: float = 0.3, rounds: int = 5) -> dict[str, Any]:
    results: dict[str, Any] = {
        "benchmark": "FrameParser.feed, masked binary frames, "
        f"{FRAMES_PER_FEED} frames per feed, frames/s (best of {rounds} x {seconds}s)",
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    for name in ("pure", "cython"):
        try:
            mod = load(name)
        except ImportError as exc:
            results[name] = {"error": f"not available: {exc}"}
            continue
        results[name] = {
            label: round(frames_per_second(mod, size, seconds, rounds))
            for label, size in SIZES.items()
        }
    if "error" not in results["pure"] and "error" not in results["cython"]:
        results["speedup"] = {
            label: round(results["cython"][label] / results["pure"][label], 1) for label in SIZES
        }
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.3, help="length of one round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best one counts")
    args = parser.parse_args(argv)
    if os.environ.get("RELAY_PURE") == "1":
        print(
            "note: RELAY_PURE=1 only changes the default; both twins are measured", file=sys.stderr
        )
    print(json.dumps(run(args.seconds, args.rounds), indent=2))


if __name__ == "__main__":
    main()

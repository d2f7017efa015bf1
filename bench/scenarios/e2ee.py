"""``e2ee``: what relay-v1 end-to-end encryption costs the client, µs per operation.

No relay is involved (the scenario runs once, as target ``client``, on the
load generator's core). Every figure is the median over ``--rounds`` rounds
of the mean time of ``--iterations`` operations (``time.perf_counter_ns``
around the loop; around each call where two parties alternate), after one
warm-up round; the rounds of all figures are interleaved. Devices, prekeys and sessions are made in-process
(:mod:`bench.e2ee`); the plaintext is a 100-byte ``text`` map.

* **primitives**: X25519 key generation and DH, Ed25519 sign/verify,
  XChaCha20-Poly1305 on 100 bytes, HMAC-SHA-256, HKDF, one chain step
  (``ratchet.kdf_ck``) -- the floor under everything else;
* **session setup**: ``x3dh.initiate`` / ``x3dh.respond``, and what a client
  really runs: ``pairwise.start_session`` (initiator) and the responder's
  decrypt of the first prekey message (X3DH, DH ratchet step, decrypt);
* **1:1 ratchet step**: ``pairwise.encrypt`` / ``pairwise.decrypt`` of the
  100-byte plaintext in an established session, the same direction (no DH
  step) and alternating (each message turns the ratchet: a new key pair and
  a DH at the sender, a DH at the receiver); the bare ``ratchet.Session``
  calls for comparison; and the same direction while the session holds
  ``--skipped`` skipped message keys;
* **group**: ``OwnChain.encrypt``, ``SenderChains.decrypt`` (Ed25519 check
  included);
* **plaintext**: ``plaintext.encode`` / ``decode`` of the text map.

The headline ``message_us`` is encode + encrypt + decrypt + decode of one
1:1 message in the same direction, against BRIEF.md's 100 µs.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgpack
import nacl

from bench.e2ee import Device, establish, now_ms, text_plaintext
from bench.scenarios.pairs import disturbance
from bench.system import CpuMeter
from relay.e2ee import pairwise, primitives, ratchet, x3dh
from relay.e2ee import plaintext as pt
from relay.e2ee.sender_keys import OwnChain, SenderChains

DESCRIPTION = "client-side cost of relay-v1 E2EE (no relay): X3DH, ratchet steps, Sender Keys, plaintext, µs per op"
HEADLINE = ("message_us", "µs")
NO_RELAY = True  # bench/__main__.py runs it once as target "client", spawning nothing
DEFAULT_TARGETS = "client"  # (--targets and --url are ignored)
TARGET_US = 100.0  # BRIEF.md: encrypt + decrypt of a 1:1 message at the client

perf_counter_ns = time.perf_counter_ns
# fn(n) -> {name: (nanoseconds, operations)} for one round of n iterations.
Round = Callable[[int], dict[str, tuple[int, int]]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iterations", type=int, default=200,
                        help="operations per round (default 200; a quarter of it for the 0.1-0.4 ms calls)")
    parser.add_argument("--rounds", type=int, default=11,
                        help="rounds per figure, interleaved across figures; the median is reported (default 11)")
    parser.add_argument(
        "--skipped", type=int, default=1000,
        help="skipped message keys held for the 'with skipped keys' rows (default 1000, at most 2000; "
        "0: leave them out)",
    )


def implementation() -> str:
    return f"PyNaCl {nacl.__version__}, msgpack {'.'.join(map(str, msgpack.version))}"


def measure(fns: list[tuple[Round, int]], rounds: int) -> dict[str, dict[str, Any]]:
    """Per name: median / min / max µs per operation over ``rounds`` rounds.

    ``fns`` are (round function, iterations); after one warm-up each, the
    rounds are interleaved (round 1 of every function, then round 2, ...), so
    a burst of noise on the shared machine lands on one round of many
    figures rather than on every round of one figure."""
    for fn, n in fns:
        fn(max(1, n // 4))
    per: dict[str, list[float]] = {}
    count: dict[str, int] = {}
    for _ in range(rounds):
        for fn, n in fns:
            for name, (ns, ops) in fn(n).items():
                per.setdefault(name, []).append(ns / ops / 1000)
                count[name] = ops
    return {
        name: {
            "median_us": round(statistics.median(v), 2),
            "min_us": round(min(v), 2),
            "max_us": round(max(v), 2),
            "ops_per_round": count[name],
        }
        for name, v in per.items()
    }


def loop(call: Callable[[], object], name: str) -> Round:
    """``call()`` n times inside one timed loop."""
    def fn(n: int) -> dict[str, tuple[int, int]]:
        r = range(n)
        t0 = perf_counter_ns()
        for _ in r:
            call()
        return {name: (perf_counter_ns() - t0, n)}
    return fn


def group_id() -> str:
    return "g." + base64.urlsafe_b64encode(os.urandom(16)).decode()[:22]


def primitive_rounds(plain: bytes) -> list[Round]:
    a = primitives.X25519KeyPair.generate()
    b = primitives.X25519KeyPair.generate()
    signer = Device.make().identity
    signature = primitives.sign(signer, plain)
    signer_pk = bytes(signer.verify_key)
    key = os.urandom(32)
    ad = os.urandom(64 + ratchet.HEADER_BYTES)
    sealed = primitives.aead_encrypt(key, plain, ad)
    return [
        loop(primitives.X25519KeyPair.generate, "x25519_keygen"),
        loop(lambda: primitives.dh(a.private, b.public), "x25519_dh"),
        loop(lambda: primitives.sign(signer, plain), "ed25519_sign_100B"),
        loop(lambda: primitives.verify(signer_pk, plain, signature), "ed25519_verify_100B"),
        loop(lambda: primitives.aead_encrypt(key, plain, ad), "aead_encrypt_100B"),
        loop(lambda: primitives.aead_decrypt(key, sealed, ad), "aead_decrypt_100B"),
        loop(lambda: primitives.hmac_sha256(key, b"\x01"), "hmac_sha256"),
        loop(lambda: primitives.hkdf(key, ratchet.MSG_INFO, 32, salt=b""), "hkdf_32B"),
        loop(lambda: ratchet.kdf_ck(key), "ratchet_chain_step"),
    ]


def setup_rounds(plain: bytes) -> list[Round]:
    a, b = Device.make(), Device.make()
    bundle = b.bundle()
    started = x3dh.initiate(a.identity, bundle)
    spk = b.prekeys.signed_prekey(bundle.spk_id)
    assert bundle.opk_id is not None
    opk = b.prekeys.one_time_prekey(bundle.opk_id)
    # A prekey message B can decrypt again and again: pairwise.decrypt changes
    # neither the peer (None here) nor the prekey store.
    peer = pairwise.start_session(a.identity, bundle, None)
    prekey_message = pairwise.encrypt(peer, plain)
    ik_a = a.identity_key
    now = now_ms()
    check = pairwise.decrypt(b.identity, None, prekey_message, ik_a, b.prekeys, now)
    assert check.plaintext == plain and check.used_one_time_prekey == opk.id
    return [
        loop(lambda: x3dh.initiate(a.identity, bundle), "x3dh_initiate"),
        loop(lambda: x3dh.respond(b.identity, ik_a, started.ephemeral.public, spk.key_pair, opk.key_pair),
             "x3dh_respond"),
        loop(lambda: pairwise.start_session(a.identity, bundle, None), "session_start_initiator"),
        loop(lambda: pairwise.decrypt(b.identity, None, prekey_message, ik_a, b.prekeys, now),
             "session_start_responder"),
    ]


class Pair:
    """An established session between two fresh devices, both views kept current."""

    def __init__(self) -> None:
        self.a, self.b = Device.make(), Device.make()
        self.at_a, self.at_b = establish(self.a, self.b)
        self.now = now_ms()
        self.failures = 0

    def a_to_b(self, payload: bytes) -> bytes:
        got = pairwise.decrypt(self.b.identity, self.at_b, payload, self.a.identity_key, self.b.prekeys, self.now)
        self.at_b = got.peer
        return got.plaintext

    def b_to_a(self, payload: bytes) -> bytes:
        got = pairwise.decrypt(self.a.identity, self.at_a, payload, self.b.identity_key, self.a.prekeys, self.now)
        self.at_a = got.peer
        return got.plaintext


def one_way(pair: Pair, plain: bytes, prefix: str, reverse: bool = False) -> Round:
    """n messages encrypted (one timed loop), then decrypted in order (another)."""
    def fn(n: int) -> dict[str, tuple[int, int]]:
        sender = pair.at_b if reverse else pair.at_a
        encrypt = pairwise.encrypt
        t0 = perf_counter_ns()
        payloads = [encrypt(sender, plain) for _ in range(n)]
        t1 = perf_counter_ns()
        deliver = pair.b_to_a if reverse else pair.a_to_b
        out = [deliver(p) for p in payloads]
        t2 = perf_counter_ns()
        pair.failures += sum(1 for x in out if x != plain)
        return {f"{prefix}_encrypt": (t1 - t0, n), f"{prefix}_decrypt": (t2 - t1, n)}
    return fn


def alternating(pair: Pair, plain: bytes) -> Round:
    """A→B, B→A, ...: every message starts a new sending chain (DH ratchet step)."""
    def fn(n: int) -> dict[str, tuple[int, int]]:
        enc = dec = 0
        encrypt = pairwise.encrypt
        for _ in range(n):
            t0 = perf_counter_ns()
            p = encrypt(pair.at_a, plain)
            t1 = perf_counter_ns()
            x = pair.a_to_b(p)
            t2 = perf_counter_ns()
            q = encrypt(pair.at_b, plain)
            t3 = perf_counter_ns()
            y = pair.b_to_a(q)
            t4 = perf_counter_ns()
            enc += (t1 - t0) + (t3 - t2)
            dec += (t2 - t1) + (t4 - t3)
            pair.failures += (x != plain) + (y != plain)
        return {"alternating_encrypt": (enc, 2 * n), "alternating_decrypt": (dec, 2 * n)}
    return fn


def bare_ratchet(plain: bytes) -> Round:
    """ratchet.Session.encrypt / decrypt alone: no payload encoding, no PeerSessions copies."""
    pair = Pair()
    sa, sb = pair.at_a.session, pair.at_b.session
    now = pair.now

    def fn(n: int) -> dict[str, tuple[int, int]]:
        t0 = perf_counter_ns()
        msgs = [sa.encrypt(plain) for _ in range(n)]
        t1 = perf_counter_ns()
        out = [sb.decrypt(h, c, now) for h, c in msgs]
        t2 = perf_counter_ns()
        pair.failures += sum(1 for x in out if x != plain)
        return {"bare_ratchet_encrypt": (t1 - t0, n), "bare_ratchet_decrypt": (t2 - t1, n)}
    fn.pair = pair  # type: ignore[attr-defined]
    return fn


def hold_skipped(pair: Pair, plain: bytes, count: int) -> None:
    """Leave ``count`` skipped message keys in B's session: A sends, B reads
    only the last message of each chain (at most ``ratchet.MAX_SKIP`` skipped
    per chain; B answers once between chains so that A starts a new one)."""
    if not 0 <= count <= ratchet.MAX_SKIPPED_KEYS:
        raise ValueError(f"--skipped: 0 .. {ratchet.MAX_SKIPPED_KEYS} (the session's bound)")
    left = count
    while left > 0:
        chunk = min(left, ratchet.MAX_SKIP)
        held = [pairwise.encrypt(pair.at_a, plain) for _ in range(chunk + 1)]
        assert pair.a_to_b(held[-1]) == plain
        left -= chunk
        if left > 0:
            assert pair.b_to_a(pairwise.encrypt(pair.at_b, plain)) == plain
    assert pair.at_b.session.skipped_count == count


def with_skipped(plain: bytes, skipped: int) -> tuple[list[Round], list[Pair]]:
    """Same-direction steps while the session holds ``skipped`` skipped keys:
    once at the receiver (every decrypt), once at the sender (every encrypt)."""
    rx = Pair()  # B holds the skipped keys and keeps receiving from A
    hold_skipped(rx, plain, skipped)
    tx = Pair()  # B holds the skipped keys and keeps sending to A
    hold_skipped(tx, plain, skipped)
    return [
        one_way(rx, plain, "skipped_at_receiver"),
        one_way(tx, plain, "skipped_at_sender", reverse=True),
    ], [rx, tx]


def group_rounds(plain: bytes) -> tuple[Round, list[int]]:
    group = group_id()
    own = OwnChain.generate()
    chains = SenderChains()
    chains.add(own.distribution(group, now_ms()))
    failures = [0]

    def fn(n: int) -> dict[str, tuple[int, int]]:
        encrypt, decrypt = own.encrypt, chains.decrypt
        t0 = perf_counter_ns()
        payloads = [encrypt(group, plain) for _ in range(n)]
        t1 = perf_counter_ns()
        out = [decrypt(group, p) for p in payloads]
        t2 = perf_counter_ns()
        failures[0] += sum(1 for x in out if x != plain)
        return {"group_encrypt": (t1 - t0, n), "group_decrypt": (t2 - t1, n)}
    return fn, failures


def run(url: str, relay_pid: int | None, args: argparse.Namespace, alive: Callable[[], bool] | None = None) -> dict[str, Any]:
    n, rounds = args.iterations, args.rounds
    plain = text_plaintext()
    message = pt.text(pt.decode(plain)["body"], now_ms())
    meter = CpuMeter(None)
    cpu0 = meter.sample()
    slow = max(1, n // 4)  # the calls of 0.1-0.4 ms: session setup, a DH step per message
    fns: list[tuple[Round, int]] = [(fn, n) for fn in primitive_rounds(plain)]
    fns += [(fn, slow) for fn in setup_rounds(plain)]
    same, alt = Pair(), Pair()
    bare = bare_ratchet(plain)
    fns += [(one_way(same, plain, "same_direction"), n), (alternating(alt, plain), slow), (bare, n)]
    pairs = [same, alt, bare.pair]  # type: ignore[attr-defined]
    if args.skipped > 0:
        skipped_fns, held = with_skipped(plain, args.skipped)
        fns += [(fn, n) for fn in skipped_fns]
        pairs += held
    group, group_failures = group_rounds(plain)
    fns += [
        (group, n),
        (loop(lambda: pt.encode(message), "plaintext_encode"), n),
        (loop(lambda: pt.decode(plain), "plaintext_decode"), n),
    ]
    ops = measure(fns, rounds)

    def med(name: str) -> float:
        return float(ops[name]["median_us"])

    codec = med("plaintext_encode") + med("plaintext_decode")
    summary = {
        "same_direction": med("same_direction_encrypt") + med("same_direction_decrypt"),
        "alternating": med("alternating_encrypt") + med("alternating_decrypt"),
        "group": med("group_encrypt") + med("group_decrypt"),
        "session_setup": med("session_start_initiator") + med("session_start_responder"),
    }
    failures = sum(p.failures for p in pairs) + group_failures[0]
    result: dict[str, Any] = {
        "implementation_detail": implementation(),
        "plaintext_bytes": len(plain),
        "payload_bytes": {
            "pairwise_normal": len(pairwise.encrypt(same.at_a, plain)),
            "group": len(OwnChain.generate().encrypt(group_id(), plain)),
        },
        "ops_us": ops,
        # encrypt + decrypt only (the BRIEF's measure), and with the plaintext codec.
        "per_message_us": {k: round(v, 2) for k, v in summary.items()},
        "per_message_with_codec_us": {
            k: round(v + codec, 2) for k, v in summary.items() if k != "session_setup"
        },
        "message_us": round(summary["same_direction"] + codec, 2),
        "target_us": TARGET_US,
        "target_met": {
            k: v + codec <= TARGET_US for k, v in summary.items() if k != "session_setup"
        },
        "round_trip_failures": failures,
        "params": {"iterations": n, "rounds": rounds, "skipped": args.skipped,
                   "setup_iterations": slow, "alternating_iterations": slow},
        "cpu": CpuMeter.shares(cpu0, meter.sample()),
        "wall_seconds": round(time.monotonic() - cpu0.wall, 2),
    }
    result["anomalies"] = ([f"{failures} messages did not round-trip"] if failures else []) + disturbance(result["cpu"])
    if failures:
        result["ok"] = False
        result["error"] = f"{failures} messages did not decrypt to what was sent"
    return result


ROWS = [
    ("X25519 key pair / DH", ("x25519_keygen", "x25519_dh")),
    ("Ed25519 sign / verify (100 B)", ("ed25519_sign_100B", "ed25519_verify_100B")),
    ("XChaCha20-Poly1305 enc / dec (100 B)", ("aead_encrypt_100B", "aead_decrypt_100B")),
    ("HMAC-SHA-256 / HKDF-32 / chain step", ("hmac_sha256", "hkdf_32B", "ratchet_chain_step")),
    ("X3DH initiate / respond", ("x3dh_initiate", "x3dh_respond")),
    ("session start: initiator / responder", ("session_start_initiator", "session_start_responder")),
    ("1:1 same direction: enc / dec", ("same_direction_encrypt", "same_direction_decrypt")),
    ("1:1 alternating (DH step): enc / dec", ("alternating_encrypt", "alternating_decrypt")),
    ("bare ratchet.Session: enc / dec", ("bare_ratchet_encrypt", "bare_ratchet_decrypt")),
    ("skipped keys at receiver: enc / dec", ("skipped_at_receiver_encrypt", "skipped_at_receiver_decrypt")),
    ("skipped keys at sender: enc / dec", ("skipped_at_sender_encrypt", "skipped_at_sender_decrypt")),
    ("group: enc / dec (Ed25519 check)", ("group_encrypt", "group_decrypt")),
    ("plaintext encode / decode (100 B)", ("plaintext_encode", "plaintext_decode")),
]


def table(result: dict[str, Any]) -> list[tuple[str, str]]:
    ops = result["ops_us"]
    rows = []
    for label, names in ROWS:
        if all(n in ops for n in names):
            rows.append((label + " µs", " / ".join(f"{ops[n]['median_us']:g}" for n in names)))
    per = result["per_message_us"]
    codec = result["per_message_with_codec_us"]
    met = result["target_met"]
    for key, label in (("same_direction", "1:1 same direction"), ("alternating", "1:1 alternating"),
                       ("group", "group")):
        rows.append((f"{label}: enc+dec (+codec) µs",
                     f"{per[key]:g} ({codec[key]:g}) {'≤' if met[key] else '>'} {result['target_us']:g}"))
    rows.append(("session setup, both sides µs", f"{per['session_setup']:g}"))
    rows.append(("payload bytes: pairwise / group", f"{result['payload_bytes']['pairwise_normal']} / "
                 f"{result['payload_bytes']['group']} (plaintext {result['plaintext_bytes']})"))
    rows.append(("round-trip failures", str(result["round_trip_failures"])))
    cpu = result["cpu"]
    rows.append(("bench / other processes CPU share",
                 f"{cpu['loadgen_cpu_share'] * 100:.0f}% / {cpu['others_cpu_share'] * 100:.0f}%"))
    return rows

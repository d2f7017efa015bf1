"""``python -m bench SCENARIO [options]``: run a scenario against one or more relays.

The relay runs pinned to core 0, this load generator pins itself to core 1
(when two cores are allowed). Prints a JSON document on stdout and a readable
table on stderr (``--json-only``: the JSON alone).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.plot import PlotUnavailable, plot_document, require_matplotlib
from bench.system import machine_info, pick_cores, pin_self, set_niceness
from bench.targets import (
    ALL_TARGETS,
    TARGETS,
    Running,
    TargetError,
    external,
    mosquitto_available,
    spawn,
    stop,
)

# Scenarios whose module sets SUPPORTS_MQTT (target mosquitto), for help and errors;
# read from the modules so that the help cannot fall behind them.
MQTT_SCENARIOS = tuple(n for n in scenarios.SCENARIOS if getattr(scenarios.load(n), "SUPPORTS_MQTT", False))
CLIENT_ONLY = "client"  # the one "target" of a NO_RELAY scenario: nothing is spawned


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for name in scenarios.SCENARIOS:
        module = scenarios.load(name)
        p = sub.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION)
        default_targets = getattr(module, "DEFAULT_TARGETS", ",".join(TARGETS))
        p.add_argument(
            "--targets",
            default=default_targets,
            help=f"comma-separated subset of {','.join(ALL_TARGETS)} (default: {default_targets}, in that order; "
            f"mosquitto: {', '.join(MQTT_SCENARIOS)} only, needs the Debian package: apt-get install mosquitto)",
        )
        p.add_argument("--url", help="ws://HOST:PORT/v1 of a running relay (instead of spawning targets)")
        p.add_argument("--relay-pid", type=int, help="with --url: PID of that relay, to measure its CPU share")
        p.add_argument("--sync", default="durable", choices=("durable", "none"), help="relay --sync (default durable)")
        p.add_argument("--no-pin", action="store_true", help="do not pin the relay and the load generator to cores")
        p.add_argument(
            "--nice",
            type=int,
            default=-10,
            help="niceness of the load generator and the spawned relays (default -10, needs root; "
            "the machine may be shared); --nice 0 to leave it",
        )
        p.add_argument("--start-timeout", type=float, default=60.0, help="seconds for a relay to print 'listening'")
        p.add_argument("--repeat", type=int, default=1, help="runs per target, interleaved; the median run is reported")
        p.add_argument("--json-only", action="store_true", help="print only the JSON document")
        p.add_argument("--output", help="also write the JSON document to this file")
        p.add_argument(
            "--plot",
            metavar="FILE.png",
            help="after the run, draw the JSON document into this PNG: latency CDF, throughput per round, "
            "relay CPU per message, as the scenario has them (needs matplotlib: pip install -e '.[bench]')",
        )
        module.add_arguments(p)
    return parser


def ratios(results: list[dict[str, Any]], key: str) -> dict[str, float]:
    """headline(a) / headline(b) for every ordered pair of successful targets,
    the faster-path one first (fast/pure, fast/naive, pure/naive)."""
    order = {name: i for i, name in enumerate(ALL_TARGETS)}
    ok: list[tuple[str, float]] = [
        (r["target"], float(r[key])) for r in results if r.get("ok") and r.get(key)
    ]
    ok.sort(key=lambda item: order.get(item[0], len(order)))
    out = {}
    for i, (a, va) in enumerate(ok):
        for b, vb in ok[i + 1 :]:
            out[f"{a}/{b}"] = round(va / vb, 2)
    return out


def run_target(module: Any, running: Running, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = running.describe()
    try:
        if getattr(module, "WANTS_RUNNING", False):  # e.g. restart: stops and relaunches the relay
            figures = module.run(running.url, running.pid, args, alive=running.alive, running=running)
        else:
            figures = module.run(running.url, running.pid, args, alive=running.alive)
    except Exception as exc:  # one target failing must not lose the others' figures
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        if not running.alive() or running.proc is not None:
            tail = running.log_tail()
            if tail:
                result["relay_log_tail"] = tail
        return result
    result["ok"] = True
    result.update(figures)  # a scenario may report ok=False with its figures
    if not running.alive():
        result["ok"] = False
        result["error"] = "relay exited during the run"
    return result


def print_table(doc: dict[str, Any], module: Any, out: Any) -> None:
    results = doc["results"]
    m = doc["machine"]
    print(f"\n{doc['scenario']} — {m['cpu_model']}, {m['cores']} cores, Python {m['python']}, "
          f"Linux {m['kernel']}, {m['date']}", file=out)
    columns = [r["target"] + (f" ({r['implementation']})" if r.get("implementation") else "") for r in results]
    rows: dict[str, list[str]] = {}
    for i, r in enumerate(results):
        if r.get("ok"):
            for label, value in module.table(r):
                rows.setdefault(label, [""] * len(results))[i] = value
        else:
            rows.setdefault("error", [""] * len(results))[i] = str(r.get("error", ""))[:60]
    width0 = max([len(k) for k in rows] + [10])
    widths = [max(len(c), *(len(v[i]) for v in rows.values())) for i, c in enumerate(columns)]
    print("  ".join([" " * width0] + [c.rjust(w) for c, w in zip(columns, widths, strict=True)]), file=out)
    for label, values in rows.items():
        print("  ".join([label.ljust(width0)] + [v.rjust(w) for v, w in zip(values, widths, strict=True)]), file=out)
    for name, value in doc["ratios"].items():
        print(f"ratio {name}: {value}", file=out)
    for r in results:
        for a in r.get("anomalies", []):
            print(f"! {r['target']}: {a}", file=out)
        for note in r.get("notes", []):
            print(f"  {r['target']}: {note}", file=out)


def run_one(
    name: str, module: Any, args: argparse.Namespace, relay_core: int | None, log: Any, suffix: str,
    label: str | None = None,
) -> dict[str, Any]:
    """Spawn (or attach to) one target, run the scenario, always stop the relay.
    ``label``: the result's target name when it is not ``name`` (a variant)."""
    running: Running | None = None
    t0 = time.monotonic()
    label = label or name
    try:
        if name == "url":
            running = external(args.url, args.relay_pid)
        elif name == CLIENT_ONLY:
            running = Running(CLIENT_ONLY, "", None, implementation=module.implementation())
        else:
            log(f"[bench] starting {label}{suffix} ...")
            # A scenario may need the broker configured for its workload (fanout: in-flight limits).
            options = module.mosquitto_options(args) if name == "mosquitto" and hasattr(module, "mosquitto_options") else ()
            running = spawn(name, args.sync, relay_core, args.start_timeout, mqtt_options=options)
        log(f"[bench] {label}: {running.url or 'no relay'} (pid {running.pid}, {running.implementation}); running {args.scenario}")
        result = run_target(module, running, args)
    except TargetError as exc:
        result = {"target": name, "ok": False, "error": str(exc)}
    finally:
        if running is not None:
            code = stop(running)
            if code not in (None, 0, -15):
                running.notes.append(f"relay exit code {code} after SIGTERM")
    result["notes"] = running.notes if running is not None else []
    result["target"] = label
    key, unit = module.HEADLINE
    log(f"[bench] {label}: done in {time.monotonic() - t0:.1f} s"
        + (f", {result.get(key)} {unit}" if result.get("ok") else f", FAILED: {str(result.get('error', ''))[:300]}"))
    return result


def pick_median(results: list[dict[str, Any]], key: str, median_by: Any = None) -> dict[str, Any]:
    """The run with the median figure (``median_by(result)``, default the headline;
    all runs' headlines listed in ``repeats``); a failed run wins, so failures are
    never hidden by a repeat."""
    failed = [r for r in results if not r.get("ok")]
    if failed or len(results) == 1:
        chosen = dict(failed[0] if failed else results[0])
    else:
        ordered = sorted(results, key=median_by or (lambda r: r.get(key) or 0))
        chosen = dict(ordered[(len(ordered) - 1) // 2])
    if len(results) > 1:
        chosen["repeats"] = [r.get(key) if r.get("ok") else None for r in results]
        anomalies = sorted({a for r in results for a in r.get("anomalies", [])})
        chosen["anomalies"] = anomalies
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Checked before anything runs: finding out after a long run would waste it.
    if args.plot:
        try:
            require_matplotlib()
        except PlotUnavailable as exc:
            print(exc, file=sys.stderr)
            return 2
        if not Path(args.plot).resolve().parent.is_dir():
            print(f"--plot {args.plot}: no such directory", file=sys.stderr)
            return 2
    module = scenarios.load(args.scenario)
    relay_core, gen_core = (None, None) if args.no_pin else pick_cores()
    pin_self(gen_core)
    nice_note = set_niceness(args.nice if args.nice != 0 else None)
    doc: dict[str, Any] = {
        "scenario": args.scenario,
        "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "pinning": {"relay_core": relay_core, "loadgen_core": gen_core, "nice": args.nice, "nice_note": nice_note},
        "results": [],
    }
    log = (lambda *a: None) if args.json_only else (lambda *a: print(*a, file=sys.stderr, flush=True))
    if getattr(module, "NO_RELAY", False):
        names = [CLIENT_ONLY]
    elif args.url:
        names = ["url"]
    else:
        names = [t.strip() for t in args.targets.split(",") if t.strip()]
        unknown = [t for t in names if t not in ALL_TARGETS]
        if unknown:
            raise SystemExit(f"unknown target(s) {unknown}; expected a subset of {','.join(ALL_TARGETS)}")
        if "mosquitto" in names:
            if not getattr(module, "SUPPORTS_MQTT", False):
                raise SystemExit(
                    f"target mosquitto: only {', '.join(MQTT_SCENARIOS)} drive MQTT, not {args.scenario}"
                )
            if mosquitto_available() is None:
                note = ("mosquitto is not installed (Debian: apt-get update && apt-get install -y mosquitto; "
                        "the bench starts its own broker, no service needed): target skipped")
                print(f"[bench] note: {note}", file=sys.stderr, flush=True)
                doc.setdefault("notes", []).append(note)
                names = [t for t in names if t != "mosquitto"]
    variants = module.variants(args) if hasattr(module, "variants") else [("", args)]
    labels = [(name, f"{name}+{variant}" if variant else name, vargs) for name in names for variant, vargs in variants]
    runs: dict[str, list[dict[str, Any]]] = {label: [] for _, label, _ in labels}
    headline = module.HEADLINE[0]
    for round_ in range(args.repeat):
        # Interleaved (targets, and variants within each), so slow drift of the machine hits all alike.
        for name, label, vargs in labels:
            suffix = f" (round {round_ + 1}/{args.repeat})" if args.repeat > 1 else ""
            result = run_one(name, module, vargs, relay_core, log, suffix, label)
            runs[label].append(result)
    for label in runs:
        doc["results"].append(pick_median(runs[label], headline, getattr(module, "median_by", None)))
    doc["ratios"] = ratios(doc["results"], module.HEADLINE[0])
    if hasattr(module, "extra_ratios"):  # e.g. fanout: per group size, not only the headline's
        doc["ratios"].update(module.extra_ratios(doc["results"]))
    text = json.dumps(doc, indent=2)
    print(text, flush=True)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    if not args.json_only:
        print_table(doc, module, sys.stderr)
    code = 0 if all(r.get("ok") for r in doc["results"]) else 1
    if args.plot:
        try:
            plot_document(doc, Path(args.plot))
        except OSError as exc:  # the figures are out already (stdout, --output): say so in one line
            print(f"--plot {args.plot}: {exc}", file=sys.stderr)
            return 1
        log(f"[bench] plot: {args.plot}")
    return code


if __name__ == "__main__":
    sys.exit(main())

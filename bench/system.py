"""Machine description, CPU pinning and CPU accounting."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no", "relay"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty(relay/)" if dirty else "")


def machine_info() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git": git_revision(),
    }


def pick_cores() -> tuple[int | None, int | None]:
    """(relay core, load generator core): 0 and 1 when both are allowed, else no pinning."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None, None
    if len(allowed) < 2:
        return None, None
    return allowed[0], allowed[1]


def pin_self(core: int | None) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})


def set_niceness(value: int | None) -> str | None:
    """Give this process (and what it spawns next) niceness ``value``; the machine
    may be shared, and a negative value keeps other processes from taking the
    pinned cores. Returns a note when it is not permitted (not root)."""
    if value is None:
        return None
    try:
        os.setpriority(os.PRIO_PROCESS, 0, value)
    except OSError as exc:
        return f"could not set niceness {value}: {exc}"
    return None


@dataclass
class CpuSample:
    wall: float
    self_cpu: float
    relay_cpu: float | None
    per_core: list[Any]
    processes: dict[int, tuple[str, float]]


def _all_processes(skip: set[int]) -> dict[int, tuple[str, float]]:
    """CPU seconds of every other process (kernel threads included), to name the
    ones that disturbed a run. Taken only at the edges of the measured interval."""
    out: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        if proc.pid in skip:
            continue
        t = proc.info.get("cpu_times")
        if t is None:
            continue
        cmd = " ".join(proc.info.get("cmdline") or []) or f"[{proc.info.get('name')}]"
        out[proc.pid] = (cmd[:120], t.user + t.system)
    return out


class CpuMeter:
    """CPU seconds of this process and of the relay (all its threads) over an interval,
    plus the busy share of each core (including softirq: loopback TCP is paid there)."""

    def __init__(self, relay_pid: int | None) -> None:
        self.me = psutil.Process()
        self.relay: psutil.Process | None = None
        if relay_pid is not None:
            try:
                self.relay = psutil.Process(relay_pid)
            except psutil.Error:
                self.relay = None

    def sample(self) -> CpuSample:
        t = self.me.cpu_times()
        relay_cpu = None
        if self.relay is not None:
            try:
                r = self.relay.cpu_times()
                relay_cpu = r.user + r.system
            except psutil.Error:
                relay_cpu = None
        skip = {self.me.pid} | ({self.relay.pid} if self.relay is not None else set())
        return CpuSample(
            time.monotonic(), t.user + t.system, relay_cpu, psutil.cpu_times(percpu=True), _all_processes(skip)
        )

    @staticmethod
    def shares(a: CpuSample, b: CpuSample) -> dict[str, Any]:
        wall = b.wall - a.wall
        relay_s = b.relay_cpu - a.relay_cpu if a.relay_cpu is not None and b.relay_cpu is not None else None
        out: dict[str, Any] = {
            "loadgen_cpu_share": round((b.self_cpu - a.self_cpu) / wall, 3) if wall > 0 else None,
            "relay_cpu_share": round(relay_s / wall, 3) if wall > 0 and relay_s is not None else None,
            # user + sys of the relay process (all threads) over the interval; what
            # cpu_us_per_msg divides (psutil's resolution: one clock tick, 10 ms).
            "relay_cpu_seconds": round(relay_s, 3) if relay_s is not None else None,
        }
        cores = []
        for i, (x, y) in enumerate(zip(a.per_core, b.per_core, strict=True)):
            total = sum(y) - sum(x)
            idle = (y.idle - x.idle) + (getattr(y, "iowait", 0.0) - getattr(x, "iowait", 0.0))
            softirq = getattr(y, "softirq", 0.0) - getattr(x, "softirq", 0.0)
            cores.append({
                "core": i,
                "busy": round(1 - idle / total, 3) if total > 0 else None,
                "softirq": round(softirq / total, 3) if total > 0 else None,
            })
        out["cores"] = cores
        # Busy core-seconds not explained by the relay, the load generator or softirq:
        # other processes on the machine. Much above 0 means the figures are disturbed.
        busy = sum(c["busy"] * 1.0 for c in cores if c["busy"] is not None)
        softirq_total = sum(c["softirq"] for c in cores if c["softirq"] is not None)
        known = (out["loadgen_cpu_share"] or 0.0) + (out["relay_cpu_share"] or 0.0)
        out["others_cpu_share"] = round(max(0.0, busy - softirq_total - known), 3)
        top: list[dict[str, Any]] = []
        for pid, (cmd, cpu) in b.processes.items():
            if pid in a.processes and wall > 0:
                share = (cpu - a.processes[pid][1]) / wall
                if share >= 0.02:
                    top.append({"pid": pid, "cmd": cmd, "cpu_share": round(share, 3)})
        top.sort(key=lambda x: -x["cpu_share"])
        out["top_other_processes"] = top[:5]
        return out


def cpu_us_per(cpu: dict[str, Any], count: int) -> float | None:
    """Relay CPU (user + sys, all threads) over a measured interval, in µs, per
    ``count`` units of work completed in that interval (``cpu`` is a
    :meth:`CpuMeter.shares` result). None when the relay's process is not known
    (``--url`` without ``--relay-pid``) or nothing completed."""
    seconds = cpu.get("relay_cpu_seconds")
    if seconds is None or count <= 0:
        return None
    return round(seconds * 1e6 / count, 1)

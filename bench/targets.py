"""The relays under test: spawned as subprocesses (pinned to one core) or given by URL.

Targets:

* ``fast``  -- ``python -m relay serve`` with the compiled fast path;
* ``pure``  -- the same with ``RELAY_PURE=1`` (pure-Python fast path twin);
* ``naive`` -- :mod:`bench.naive_relay`, a plain trio-websocket relay;
* ``mosquitto`` -- the Mosquitto MQTT broker (Debian package ``mosquitto``),
  persistent sessions, for ``pairs``, ``latency`` and ``fanout`` (its URL is
  ``mqtt://HOST:PORT``); not among the defaults; a scenario may change
  options of its generated config (``MqttOption``);
* ``--url`` -- a relay somebody else started (not pinned, CPU not measured
  unless ``--relay-pid`` is given).

Each spawned relay gets a fresh temporary data directory, its stdout/stderr
go to files in it (no pipe can fill up and stall it), and it is stopped by
its PID: SIGTERM, then SIGKILL after a grace period, always, also on error or
Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.system import REPO_ROOT, git_revision

TARGETS = ("fast", "pure", "naive")  # the default targets
ALL_TARGETS = (*TARGETS, "mosquitto")
LISTENING = re.compile(r"listening (ws://\S+)")


@dataclass(frozen=True)
class MqttOption:
    """A line of the generated Mosquitto config that a scenario sets, and why
    (the reason goes into the result's ``notes``)."""

    key: str
    value: str
    why: str


class TargetError(Exception):
    """A relay did not start, or died."""


@dataclass
class Running:
    name: str
    url: str
    pid: int | None
    proc: subprocess.Popen[bytes] | None = None
    data_dir: Path | None = None
    implementation: str | None = None
    command: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    git: str | None = None
    core: int | None = None

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        if self.data_dir is None:
            return ""
        out = []
        for name in ("stdout.log", "stderr.log"):
            path = self.data_dir.parent / name
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                out.append(f"--- {name} ---\n{text[-n:]}")
        return "\n".join(out)

    def describe(self) -> dict[str, Any]:
        return {
            "target": self.name,
            "url": self.url,
            "pid": self.pid,
            "implementation": self.implementation,
            "git": self.git,
            "command": " ".join(self.command) if self.command else None,
            "notes": self.notes,
        }


def _env(name: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("RELAY_PURE", None)
    if name == "pure":
        env["RELAY_PURE"] = "1"
    return env


def fastpath_implementation(env: dict[str, str]) -> str | None:
    """What ``relay.fastpath`` picks under ``env`` ("cython" or "pure")."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import relay.fastpath as f; print(f.IMPLEMENTATION)"],
            env=env, cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def command_for(name: str, data_dir: Path, sync: str, host: str) -> list[str]:
    if name == "naive":
        return [sys.executable, "-m", "bench.naive_relay", "--host", host, "--port", "0"]
    if name in ("fast", "pure"):
        return [
            sys.executable, "-m", "relay", "serve", "--host", host, "--port", "0",
            "--data", str(data_dir), "--sync", sync,
        ]
    raise ValueError(f"unknown target {name!r}; expected one of {', '.join(TARGETS)}")


def mosquitto_available() -> str | None:
    """Path of the ``mosquitto`` binary, or None."""
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    )


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def mosquitto_config(
    port: int, host: str, persistence_dir: Path, options: tuple[MqttOption, ...] = ()
) -> str:
    """Persistent sessions, QoS 1 queues without limit, 64 in flight per client,
    TCP_NODELAY; autosave settings left at their defaults (no fsync per message).
    ``options`` replace the line with the same key (or are added)."""
    lines = [
        f"listener {port} {host}",
        "allow_anonymous true",
        "persistence true",
        f"persistence_location {persistence_dir}/",
        "max_queued_messages 0",
        "max_inflight_messages 64",
        # Like the relay (trio sets TCP_NODELAY on every connection). Mosquitto's
        # default leaves Nagle on: in open loop (latency) a receipt PUBLISH to a
        # sender that has nothing to write then waits for that sender's delayed
        # ACK, ~40 ms.
        "set_tcp_nodelay true",
        "log_dest stdout",
        "log_type error",
        "log_type warning",
        "log_type notice",
    ]
    if os.geteuid() == 0:
        lines.append("user root")  # otherwise it drops to 'mosquitto', who cannot write the temp dir
    for opt in options:
        lines = [line for line in lines if line.split(" ", 1)[0] != opt.key]
        lines.append(f"{opt.key} {opt.value}")
    return "\n".join(lines) + "\n"


def spawn_mosquitto(
    core: int | None, start_timeout: float, host: str = "127.0.0.1", options: tuple[MqttOption, ...] = ()
) -> Running:
    binary = mosquitto_available()
    if binary is None:
        raise TargetError("mosquitto: not installed (Debian: apt-get update && apt-get install -y mosquitto)")
    base = Path(tempfile.mkdtemp(prefix="relay-bench-mosquitto-"))
    data_dir = base / "data"
    data_dir.mkdir()
    port = free_port(host)
    conf = base / "mosquitto.conf"
    conf.write_text(mosquitto_config(port, host, data_dir, options))
    cmd = [binary, "-c", str(conf)]
    proc = _popen(cmd, dict(os.environ), base, core, "wb")
    running = Running("mosquitto", f"mqtt://{host}:{port}", proc.pid, proc, data_dir, command=cmd,
                      git=git_revision(), core=core)
    try:
        version = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"version (\S+)", version)
        running.implementation = f"mosquitto {m.group(1)}" if m else "mosquitto"
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise TargetError(f"mosquitto exited with {proc.returncode} before listening\n{running.log_tail()}")
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TargetError(f"mosquitto: not listening within {start_timeout:.0f} s\n{running.log_tail()}")
            time.sleep(0.05)
        running.notes.append("persistence: autosave defaults, no fsync per message")
        running.notes.extend(f"config {opt.key} {opt.value}: {opt.why}" for opt in options)
        if core is not None:
            running.notes.append(f"mosquitto pinned to core {core}")
        return running
    except BaseException:
        stop(running)
        raise


def spawn(
    name: str,
    sync: str,
    core: int | None,
    start_timeout: float = 60.0,
    host: str = "127.0.0.1",
    mqtt_options: tuple[MqttOption, ...] = (),
) -> Running:
    """Start target ``name`` and wait for its ``listening ws://...`` line
    (``mqtt_options``: for ``mosquitto`` only, see :func:`mosquitto_config`)."""
    if name == "mosquitto":
        return spawn_mosquitto(core, start_timeout, host, mqtt_options)
    base = Path(tempfile.mkdtemp(prefix=f"relay-bench-{name}-"))
    data_dir = base / "data"
    data_dir.mkdir()
    env = _env(name)
    cmd = command_for(name, data_dir, sync, host)
    proc = _popen(cmd, env, base, core, "wb")
    # The tree may change between rounds (other people commit): record what this run started from.
    running = Running(name, "", proc.pid, proc, data_dir, command=cmd, git=git_revision(), core=core)
    try:
        if name in ("fast", "pure"):
            running.implementation = fastpath_implementation(env)
            if name == "fast" and running.implementation != "cython":
                running.notes.append(
                    f"relay.fastpath.IMPLEMENTATION is {running.implementation!r} without RELAY_PURE: "
                    "the compiled extension is not built, so 'fast' measures the pure path"
                )
        else:
            running.implementation = "trio-websocket"
        deadline = time.monotonic() + start_timeout
        log = base / "stdout.log"
        while True:
            text = log.read_text(errors="replace") if log.exists() else ""
            m = LISTENING.search(text)
            if m:
                running.url = m.group(1)
                break
            if proc.poll() is not None:
                raise TargetError(f"{name}: relay exited with {proc.returncode} before listening\n{running.log_tail()}")
            if time.monotonic() > deadline:
                raise TargetError(f"{name}: no 'listening' line within {start_timeout:.0f} s\n{running.log_tail()}")
            time.sleep(0.05)
        if core is not None:
            running.notes.append(f"relay pinned to core {core}")
        return running
    except BaseException:
        stop(running)
        raise


def _popen(cmd: list[str], env: dict[str, str], base: Path, core: int | None, mode: str) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with its output in ``base/stdout.log`` and ``stderr.log``."""
    stdout = open(base / "stdout.log", mode)  # noqa: SIM115 -- handed to the child
    stderr = open(base / "stderr.log", mode)  # noqa: SIM115
    preexec = None
    if core is not None:
        def preexec() -> None:
            os.sched_setaffinity(0, {core})
    try:
        return subprocess.Popen(
            cmd, cwd=str(REPO_ROOT), env=env, stdin=subprocess.DEVNULL,
            stdout=stdout, stderr=stderr, preexec_fn=preexec, start_new_session=True,
        )
    finally:
        stdout.close()
        stderr.close()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def stop_process(running: Running, grace: float = 10.0) -> tuple[int | None, float]:
    """SIGTERM the spawned relay and wait (SIGKILL after ``grace``), keeping its
    data directory. Returns (exit code, seconds it took)."""
    proc = running.proc
    if proc is None:
        raise TargetError(f"{running.name}: not a relay this bench started")
    t0 = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            running.notes.append(f"did not exit within {grace:.0f} s of SIGTERM; killed")
            proc.kill()
            proc.wait(timeout=grace)
    return proc.returncode, time.monotonic() - t0


def relaunch(running: Running) -> tuple[float, int]:
    """Start the stopped relay again: same command, same data directory, same
    port (so a client can connect in a loop), same core. Returns (the
    ``time.monotonic()`` just before the process was created, the stdout log
    offset where this run's output starts). Does not wait for anything."""
    if running.data_dir is None or running.proc is None or running.proc.poll() is None:
        raise TargetError(f"{running.name}: relaunch needs a spawned relay that has exited")
    cmd = list(running.command)
    cmd[cmd.index("--port") + 1] = str(port_of(running.url))
    base = running.data_dir.parent
    log = base / "stdout.log"
    offset = log.stat().st_size if log.exists() else 0
    env = _env(running.name)
    t0 = time.monotonic()
    proc = _popen(cmd, env, base, running.core, "ab")
    running.proc = proc
    running.pid = proc.pid
    return t0, offset


def stop(running: Running, grace: float = 5.0) -> int | None:
    """Stop a spawned relay by its PID (SIGTERM, then SIGKILL) and remove its
    temp directory. Returns the exit code; a no-op for ``--url`` targets."""
    proc = running.proc
    code = None
    try:
        if proc is not None:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    code = proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    running.notes.append(f"did not exit within {grace:.0f} s of SIGTERM; killed")
                    proc.kill()
                    code = proc.wait(timeout=grace)
                except ProcessLookupError:
                    code = proc.poll()
            else:
                code = proc.returncode
    finally:
        # Even when interrupted again (a second Ctrl-C) the relay must not outlive us.
        if proc is not None and proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        running.proc = None
        if running.data_dir is not None:
            shutil.rmtree(running.data_dir.parent, ignore_errors=True)
            running.data_dir = None
    return code


def external(url: str, pid: int | None) -> Running:
    return Running("url", url, pid, implementation=None, notes=["external relay: not spawned, not pinned"])

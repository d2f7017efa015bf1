"""Run a real relay process in a test: ``python -m relay serve --port 0 ...``.

::

    async with spawn_relay(tmp_path / "data", fastpath="pure") as relay:
        async with connect(relay.url) as client: ...
        relay.kill()            # SIGKILL, like a crash
        await relay.wait()

The process is started with ``trio.lowlevel.open_process`` (stdout piped,
stderr to a log file next to the data directory, so a failing test can show
what the relay said). ``spawn_relay`` waits, with a deadline, for the
``listening ws://HOST:PORT/v1`` line; on exit it always stops the process by
its PID (SIGTERM, then SIGKILL after a grace period) and reaps it. Each start
gets a new port (``--port 0``); restart by spawning again on the same data
directory.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
import trio

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
_spawn_counter = itertools.count(1)


class RelayStartError(RuntimeError):
    pass


class RelayProcess:
    """A running ``relay serve``: its url, pid and the ways to stop it."""

    def __init__(self, process: trio.Process, url: str, log_path: Path) -> None:
        self.process = process
        self.url = url
        self.pid: int = process.pid
        self.log_path = log_path
        self.stdout_lines: list[str] = []

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL (a crash: no shutdown code runs)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM: the relay closes connections with 1001, commits and exits 0."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float = STOP_GRACE_S) -> int:
        """Wait for the process to exit; return its exit code (negative: signal)."""
        with trio.fail_after(timeout):
            return await self.process.wait()

    def rss(self) -> int:
        """Resident set size in bytes (psutil)."""
        return int(psutil.Process(self.pid).memory_info().rss)

    def rss_anon(self) -> int:
        """Anonymous resident memory in bytes (heap, stacks: not the LMDB mmap)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


async def _stop(process: trio.Process) -> None:
    """SIGTERM, wait, SIGKILL, wait: by this process's PID, never by name."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_GRACE_S):
                await process.wait()
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
            with trio.move_on_after(STOP_GRACE_S):
                await process.wait()


async def _read_until_listening(process: trio.Process, proc_lines: list[str]) -> str:
    assert process.stdout is not None
    buffer = b""
    while True:
        chunk = await process.stdout.receive_some(4096)
        if not chunk:
            raise RelayStartError("relay exited before listening")
        buffer += chunk
        while b"\n" in buffer:
            raw, buffer = buffer.split(b"\n", 1)
            line = raw.decode(errors="replace").strip()
            proc_lines.append(line)
            if line.startswith("listening "):
                return line.split(" ", 1)[1]


async def _drain(process: trio.Process, lines: list[str]) -> None:
    """Keep reading stdout so the relay can never block on a full pipe."""
    assert process.stdout is not None
    try:
        while True:
            chunk = await process.stdout.receive_some(4096)
            if not chunk:
                return
            lines.extend(chunk.decode(errors="replace").splitlines())
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        return


@asynccontextmanager
async def spawn_relay(
    data_dir: str | os.PathLike[str],
    fastpath: str | None = None,
    extra_args: Sequence[str] = (),
    start_timeout: float = START_TIMEOUT_S,
) -> AsyncIterator[RelayProcess]:
    """Start ``relay serve`` on ``data_dir`` (a new free port) and stop it on exit."""
    data_dir = Path(data_dir)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}.relay-{next(_spawn_counter)}.log"
    args = [
        sys.executable,
        "-m",
        "relay",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--data",
        str(data_dir),
    ]
    if fastpath is not None:
        args += ["--fastpath", fastpath]
    args += list(extra_args)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "wb") as log_file:
        process = await trio.lowlevel.open_process(
            args,
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            cwd=str(REPO_ROOT),
            env=env,
        )
    try:
        lines: list[str] = []
        try:
            with trio.move_on_after(start_timeout) as start_scope:
                url = await _read_until_listening(process, lines)
            if start_scope.cancelled_caught:
                raise RelayStartError(f"relay did not print 'listening' within {start_timeout}s")
        except RelayStartError as exc:
            await _stop(process)
            try:
                log = log_path.read_text(errors="replace")[-4000:]
            except OSError:
                log = ""
            raise RelayStartError(
                f"{exc} (exit code {process.returncode}); stderr:\n{log}"
            ) from None
        relay = RelayProcess(process, url, log_path)
        relay.stdout_lines = lines
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, process, lines)
            try:
                yield relay
            finally:
                await _stop(process)
                nursery.cancel_scope.cancel()
    finally:
        await _stop(process)
        if process.stdout is not None:
            with trio.CancelScope(shield=True):
                await process.stdout.aclose()

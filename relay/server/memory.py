"""Memory policy of a relay process: the cyclic GC's pace, and giving the
heap back to the system after a burst of connections went idle.

The hot path allocates many short-lived containers (frames, ops, entries),
almost all freed by reference counting. With CPython's default thresholds
(700, 10, 10) the cyclic collector still ran so often that raising them was
worth 35-50 % of `pairs` throughput (A/B, interleaved runs): :func:`tune_gc`.

A connection that is served holds buffers, a task and its objects; once it
parks, all of that is freed, but glibc keeps freed heap pages mapped for
reuse, so the relay's RSS stays at its busiest moment. ``malloc_trim(0)``
returns the free pages (the middle of the heap too, with MADV_DONTNEED).
It walks the heap, so it runs in a thread, once the parking has been quiet
for a moment, and only after enough connections parked to be worth it.
"""

from __future__ import annotations

import ctypes
import gc
import logging
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

GC_THRESHOLDS = (200_000, 50, 1000)
QUIET_S = 1.0  # no parking for this long: the burst is over
MIN_PARKED = 256  # connections parked since the last trim


def load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS).

    Looked up among the symbols already loaded into the process (libc is),
    so no ``ctypes.util.find_library``, which runs ``ldconfig`` in a
    subprocess.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def tune_gc(thresholds: tuple[int, int, int] = GC_THRESHOLDS) -> None:
    """For the process that serves: call once it is up.

    ``gc.freeze()`` moves everything allocated at start-up out of the
    collector's view (it is never garbage), and the higher thresholds make
    collections rare. Cyclic garbage is still collected: each young
    collection after 200,000 net allocations, and :class:`HeapTrimmer` runs a
    full one after a burst. A library user (tests, an embedding program)
    keeps its own GC settings: only ``relay serve`` calls this.
    """
    gc.freeze()
    gc.set_threshold(*thresholds)


class HeapTrimmer:
    """Counts parkings; :meth:`run` trims the heap after a quiet moment."""

    def __init__(self, malloc_trim: Callable[[int], int] | None, collect: Callable[[], object] = gc.collect) -> None:
        """``malloc_trim``: :func:`load_malloc_trim`'s, a stand-in, or None for never."""
        self._trim = malloc_trim
        self._collect = collect
        self._parked_since_trim = 0
        self._last_parked = 0.0
        self._burst = trio.Event()
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def note_parked(self) -> None:
        self._parked_since_trim += 1
        self._last_parked = trio.current_time()
        if self._parked_since_trim >= MIN_PARKED:
            self._burst.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        trim = self._trim
        if trim is None:
            return
        while True:
            await self._burst.wait()
            # Wait for the burst to end: every parking moves the moment on.
            while (quiet_at := self._last_parked + QUIET_S) > trio.current_time():
                await trio.sleep_until(quiet_at)
            self._parked_since_trim = 0
            self._burst = trio.Event()
            # The burst's cyclic garbage first (with raised GC thresholds it
            # could wait a long time in an idle relay), then its free pages.
            self._collect()
            # ctypes releases the GIL for the call: the event loop goes on.
            released = await trio.to_thread.run_sync(trim, 0)
            self.trims += 1
            log.debug("heap trimmed after a burst of parked connections (released: %s)", bool(released))

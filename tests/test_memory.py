"""The heap trimmer: after a burst of parkings, once quiet, one malloc_trim."""

from __future__ import annotations

import gc

import trio
import trio.testing

from relay.server import memory
from relay.server.memory import GC_THRESHOLDS, MIN_PARKED, QUIET_S, HeapTrimmer, tune_gc


async def until_trimmed(trimmer: HeapTrimmer, count: int) -> None:
    # The trim runs in a worker thread, which the autojump clock does not
    # wait for: poll in small virtual steps until it reported back.
    for _ in range(100_000):
        if trimmer.trims >= count:
            return
        await trio.sleep(0.001)
    raise AssertionError("the trim never finished")


class FakeTrim:
    def __init__(self) -> None:
        self.calls: list[int] = []  # runs in a worker thread: no trio calls here

    def __call__(self, pad: int) -> int:
        self.calls.append(pad)
        return 1


async def test_trims_once_after_a_quiet_burst(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeTrim()
    collections: list[int] = []
    trimmer = HeapTrimmer(fake, collect=lambda: collections.append(len(fake.calls)))
    async with trio.open_nursery() as nursery:
        await nursery.start(trimmer.run)
        for _ in range(MIN_PARKED):
            trimmer.note_parked()
            await trio.sleep(0.01)  # still one burst: each gap is below QUIET_S
        await trio.sleep(QUIET_S * 0.9)
        assert fake.calls == []  # not quiet long enough yet
        await until_trimmed(trimmer, 1)
        assert fake.calls == [0]
        assert collections == [0]  # a full collection, before the trim
        assert trimmer.trims == 1
        await trio.sleep(10 * QUIET_S)
        assert len(fake.calls) == 1  # nothing parked since
        nursery.cancel_scope.cancel()


async def test_few_parkings_do_not_trim(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeTrim()
    trimmer = HeapTrimmer(fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(trimmer.run)
        for _ in range(MIN_PARKED - 1):
            trimmer.note_parked()
        await trio.sleep(100 * QUIET_S)
        assert fake.calls == []
        trimmer.note_parked()  # the burst reaches MIN_PARKED
        await until_trimmed(trimmer, 1)
        assert fake.calls == [0]
        nursery.cancel_scope.cancel()


async def test_without_malloc_trim_the_task_ends() -> None:
    trimmer = HeapTrimmer(None)
    assert not trimmer.available
    with trio.fail_after(1):
        await trimmer.run()
    for _ in range(MIN_PARKED):
        trimmer.note_parked()  # still safe to call


def test_glibc_malloc_trim_is_found_here() -> None:
    # This machine (and CI) run glibc; elsewhere the trimmer turns itself off.
    trim = memory.load_malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)


def test_tune_gc_raises_thresholds_and_freezes() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
        assert gc.isenabled()  # slower, never off: cyclic garbage is still collected
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)

"""One suite for both inbox writer twins: ``relay.store._inbox_py`` and ``relay.store._inbox``.

Every test taking ``iw`` runs once per implementation, on a real LMDB
environment in a temp dir. The compiled one must be built: if it is missing
its tests FAIL, unless ``RELAY_NO_EXT=1`` says the build was skipped on
purpose. The differential test at the end runs random operation sequences on
both and compares every key and value they leave.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.store.inbox_writer import load
from tests.twins import load_twin_or_fail

U64 = struct.Struct(">Q")

FAST = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _load(name: str) -> ModuleType:
    return load_twin_or_fail(load, name, "relay.store._inbox")


@pytest.fixture(params=["pure", "cython"], scope="module")
def iw(request: pytest.FixtureRequest) -> ModuleType:
    return _load(request.param)


class Env:
    def __init__(self, path: Path) -> None:
        self.env = lmdb.open(str(path), map_size=1 << 26, max_dbs=4, sync=False)
        self.inbox = self.env.open_db(b"inbox")
        self.meta = self.env.open_db(b"meta")

    def write(self, module: ModuleType) -> Any:
        return _Write(self, module)

    def dump(self) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
        with self.env.begin() as txn:
            inbox = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self.inbox)]
            meta = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self.meta)]
        return inbox, meta


class _Write:
    """``with env.write(module) as writer``: one committed write transaction."""

    def __init__(self, env: Env, module: ModuleType) -> None:
        self.env = env
        self.module = module

    def __enter__(self) -> Any:
        self.txn = self.env.env.begin(write=True)
        self.writer = self.module.InboxWriter(self.txn, self.env.inbox, self.env.meta)
        return self.writer

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is None:
            self.writer.flush()
            self.txn.commit()
        else:
            self.txn.abort()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path / "db")
    yield e
    e.env.close()


A1 = b"alice\x00\x01"
A2 = b"alice\x00\x02"
AB1 = b"alicebob\x00\x01"


def test_layout_of_keys_values_and_counters(iw: ModuleType, env: Env) -> None:
    with env.write(iw) as w:
        assert w.append(A1, 13, 6, 1_700_000_000_000, b"tail-1") == 1
        assert w.append(A1, 15, 5, 2**64 - 1, b"") == 2
        assert w.append(A2, 22, 3, 0, b"x" * 300) == 1
    inbox, meta = env.dump()
    assert inbox == [
        (A1 + U64.pack(1), bytes((13, 6)) + U64.pack(1_700_000_000_000) + b"tail-1"),
        (A1 + U64.pack(2), bytes((15, 5)) + U64.pack(2**64 - 1)),
        (A2 + U64.pack(1), bytes((22, 3)) + U64.pack(0) + b"x" * 300),
    ]
    assert meta == [(A1, U64.pack(3) + U64.pack(2)), (A2, U64.pack(2) + U64.pack(1))]


def test_counters_carry_over_between_transactions(iw: ModuleType, env: Env) -> None:
    with env.write(iw) as w:
        for _ in range(3):
            w.append(A1, 13, 6, 1, b"a")
    with env.write(iw) as w:
        assert w.append(A1, 13, 6, 1, b"b") == 4
    _, meta = env.dump()
    assert meta == [(A1, U64.pack(5) + U64.pack(4))]


def test_append_many_is_appends_in_order(iw: ModuleType, env: Env) -> None:
    with env.write(iw) as w:
        assert w.append(A1, 15, 5, 9, b"first") == 1
        assert w.append_many(A1, 15, 5, 10, [b"a", b"", b"c" * 300]) == 2
        assert w.append_many(A2, 15, 5, 10, []) == 1
        assert w.append(A1, 15, 5, 11, b"last") == 5
    inbox, meta = env.dump()
    assert inbox == [
        (A1 + U64.pack(1), bytes((15, 5)) + U64.pack(9) + b"first"),
        (A1 + U64.pack(2), bytes((15, 5)) + U64.pack(10) + b"a"),
        (A1 + U64.pack(3), bytes((15, 5)) + U64.pack(10)),
        (A1 + U64.pack(4), bytes((15, 5)) + U64.pack(10) + b"c" * 300),
        (A1 + U64.pack(5), bytes((15, 5)) + U64.pack(11) + b"last"),
    ]
    assert meta == [(A1, U64.pack(6) + U64.pack(5)), (A2, U64.pack(1) + U64.pack(0))]


def test_delete_up_to_stays_inside_its_prefix(iw: ModuleType, env: Env) -> None:
    with env.write(iw) as w:
        for prefix in (A1, A2, AB1):
            for _ in range(5):
                w.append(prefix, 13, 6, 1, b"t")
    with env.write(iw) as w:
        assert w.delete_up_to(A1, 3) == 3
        assert w.delete_up_to(A1, 3) == 0  # already gone
        assert w.delete_up_to(A2, 2**64 - 1) == 5
        assert w.delete_up_to(b"nobody\x00\x01", 10) == 0
        assert w.delete_up_to(AB1, 0) == 0
    inbox, meta = env.dump()
    assert [k for k, _ in inbox] == [A1 + U64.pack(4), A1 + U64.pack(5)] + [AB1 + U64.pack(s) for s in range(1, 6)]
    # pending went down by what was deleted; next_seq never goes back.
    assert dict(meta) == {
        A1: U64.pack(6) + U64.pack(2),
        A2: U64.pack(6) + U64.pack(0),
        AB1: U64.pack(6) + U64.pack(5),
    }


def test_delete_then_append_in_one_transaction(iw: ModuleType, env: Env) -> None:
    with env.write(iw) as w:
        w.append(A1, 13, 6, 1, b"1")
        w.append(A1, 13, 6, 1, b"2")
        assert w.delete_up_to(A1, 2) == 2
        assert w.append(A1, 13, 6, 1, b"3") == 3
        assert w.delete_up_to(A1, 2) == 0
    inbox, meta = env.dump()
    assert [k for k, _ in inbox] == [A1 + U64.pack(3)]
    assert meta == [(A1, U64.pack(4) + U64.pack(1))]


def test_delete_at_the_end_of_the_database(iw: ModuleType, env: Env) -> None:
    # The last key of the database: delete() leaves the cursor past the end.
    with env.write(iw) as w:
        w.append(AB1, 13, 6, 1, b"1")
        w.append(AB1, 13, 6, 1, b"2")
    with env.write(iw) as w:
        assert w.delete_up_to(AB1, 9) == 2
    assert env.dump() == ([], [(AB1, U64.pack(3) + U64.pack(0))])


def test_forget_never_goes_below_zero(iw: ModuleType, env: Env) -> None:
    with env.write(iw) as w:
        w.append(A1, 13, 6, 1, b"1")
        w.forget(A1, 5)
        w.forget(A2, 1)
    _, meta = env.dump()
    assert meta == [(A1, U64.pack(2) + U64.pack(0)), (A2, U64.pack(1) + U64.pack(0))]


def test_bad_arguments_are_errors_and_write_nothing(iw: ModuleType, env: Env) -> None:
    with env.write(iw) as w:
        with pytest.raises(ValueError):
            w.append(A1, 256, 6, 1, b"t")
        with pytest.raises(ValueError):
            w.append(A1, 13, -1, 1, b"t")
        with pytest.raises(OverflowError):
            w.append(A1, 13, 6, -1, b"t")
        with pytest.raises(OverflowError):
            w.append(A1, 13, 6, 2**64, b"t")
        with pytest.raises(OverflowError):
            w.delete_up_to(A1, -1)
        with pytest.raises(OverflowError):
            w.forget(A1, -1)
        with pytest.raises(TypeError):
            w.append("alice", 13, 6, 1, b"t")
        with pytest.raises(TypeError):
            w.append(A1, 13, 6, 1, "tail")
        with pytest.raises(TypeError):
            w.append(None, 13, 6, 1, b"t")
        with pytest.raises(TypeError):
            w.append(A1, 13, 6, 1, None)
        with pytest.raises(TypeError):
            w.append_many(A1, 13, 6, 1, [b"ok", "not bytes"])
        with pytest.raises(TypeError):
            w.append_many(A1, 13, 6, 1, None)
        with pytest.raises(ValueError):
            w.append_many(A1, 300, 6, 1, [b"t"])
        with pytest.raises(TypeError):
            w.delete_up_to(None, 1)
        with pytest.raises(TypeError):
            w.forget(None, 1)
    assert env.dump() == ([], [])


def test_a_corrupt_counter_record_is_an_error(iw: ModuleType, env: Env) -> None:
    with env.env.begin(write=True) as txn:
        txn.put(A1, b"short", db=env.meta)
    with pytest.raises(Exception, match="16 bytes"), env.write(iw) as w:
        w.append(A1, 13, 6, 1, b"t")
    assert env.dump() == ([], [(A1, b"short")])


PREFIXES = st.sampled_from([A1, A2, AB1, b"b\x00\x01", b"\x00\x00\x00"])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), PREFIXES, st.integers(0, 255), st.integers(0, 15), st.integers(0, 2**64 - 1), st.binary(max_size=40)),
        st.tuples(st.just("many"), PREFIXES, st.integers(0, 255), st.integers(0, 15), st.integers(0, 2**64 - 1), st.lists(st.binary(max_size=20), max_size=5)),
        st.tuples(st.just("delete"), PREFIXES, st.integers(0, 40)),
        st.tuples(st.just("forget"), PREFIXES, st.integers(0, 5)),
        st.tuples(st.just("commit")),
    ),
    max_size=60,
)


@FAST
@given(ops=OPS)
def test_both_twins_leave_the_same_store(tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[Any, ...]]) -> None:
    dumps = []
    results = []
    for name in ("pure", "cython"):
        module = _load(name)
        e = Env(tmp_path_factory.mktemp(name))
        out: list[object] = []
        try:
            txn = e.env.begin(write=True)
            w = module.InboxWriter(txn, e.inbox, e.meta)
            for op in ops:
                if op[0] == "append":
                    out.append(w.append(*op[1:]))
                elif op[0] == "many":
                    out.append(w.append_many(*op[1:]))
                elif op[0] == "delete":
                    out.append(w.delete_up_to(*op[1:]))
                elif op[0] == "forget":
                    w.forget(*op[1:])
                else:
                    w.flush()
                    txn.commit()
                    txn = e.env.begin(write=True)
                    w = module.InboxWriter(txn, e.inbox, e.meta)
            w.flush()
            txn.commit()
            dumps.append(e.dump())
            results.append(out)
        finally:
            e.env.close()
    assert results[0] == results[1]
    assert dumps[0] == dumps[1]

"""The reactor's system calls, compiled and pure: one suite for both twins."""

from __future__ import annotations

import select
import socket
import struct
from types import ModuleType

import pytest

from relay.server.reactor import load_io
from tests.twins import load_twin_or_fail


@pytest.fixture(params=["pure", "cython"])
def io(request: pytest.FixtureRequest) -> ModuleType:
    return load_twin_or_fail(load_io, request.param, "relay.server._io")


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_read_some_returns_what_is_there_none_when_empty_and_empty_at_eof(io: ModuleType, pair) -> None:
    a, b = pair
    assert io.read_some(a.fileno(), 100) is None
    b.send(b"hello world")
    assert io.read_some(a.fileno(), 5) == b"hello"
    assert io.read_some(a.fileno(), 100) == b" world"
    assert io.read_some(a.fileno(), 100) is None
    b.shutdown(socket.SHUT_WR)
    assert io.read_some(a.fileno(), 100) == b""


def test_read_some_raises_the_errno_subclass_on_a_reset(io: ModuleType) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    server.setblocking(False)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    try:
        with pytest.raises(ConnectionResetError):
            for _ in range(1000):
                io.read_some(server.fileno(), 100)
    finally:
        server.close()
        listener.close()


def test_sizes_that_are_not_positive_are_refused(io: ModuleType, pair) -> None:
    with pytest.raises(ValueError):
        io.read_some(pair[0].fileno(), 0)
    epoll = select.epoll()
    try:
        with pytest.raises(ValueError):
            io.ready(epoll, 0)
    finally:
        epoll.close()


def test_read_some_bad_descriptor_is_an_oserror(io: ModuleType) -> None:
    with pytest.raises(OSError):
        io.read_some(-1, 10)


def test_write_some_writes_what_the_socket_takes_and_zero_when_full(io: ModuleType, pair) -> None:
    a, b = pair
    assert io.write_some(a.fileno(), b"") == 0
    assert io.write_some(a.fileno(), b"abc") == 3
    assert b.recv(10) == b"abc"
    chunk = b"x" * 65536
    total = 0
    while True:
        n = io.write_some(a.fileno(), chunk)
        if n == 0:
            break
        total += n
    assert total > 0
    assert io.write_some(a.fileno(), b"more") == 0, "a full socket takes nothing"


def test_write_some_to_a_closed_peer_raises(io: ModuleType, pair) -> None:
    a, b = pair
    b.close()
    with pytest.raises(OSError):
        for _ in range(10):
            io.write_some(a.fileno(), b"x" * 1000)


def test_ready_lists_ready_descriptors_without_waiting(io: ModuleType, pair) -> None:
    a, b = pair
    c, d = socket.socketpair()
    epoll = select.epoll()
    try:
        epoll.register(a.fileno(), select.EPOLLIN)
        epoll.register(c.fileno(), select.EPOLLIN)
        assert io.ready(epoll, 16) == []
        b.send(b"1")
        d.send(b"2")
        got = io.ready(epoll, 16)
        assert sorted(fd for fd, _ in got) == sorted([a.fileno(), c.fileno()])
        assert all(events & select.EPOLLIN for _, events in got)
        assert len(io.ready(epoll, 1)) == 1, "at most max_events"
    finally:
        epoll.close()
        c.close()
        d.close()


def test_the_twins_agree_on_the_implementation_name(io: ModuleType) -> None:
    assert io.IMPLEMENTATION in ("pure", "cython")

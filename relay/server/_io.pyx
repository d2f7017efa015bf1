# cython: language_level=3
"""Compiled twin of :mod:`relay.server._io_py` (same API): the reactor's
system calls made holding the GIL. See the pure module for why."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_SetFromErrno
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint32_t


cdef extern from "errno.h":
    int EWOULDBLOCK


cdef extern from "unistd.h":
    ssize_t c_read "read"(int fd, void *buf, size_t count)
    ssize_t c_write "write"(int fd, const void *buf, size_t count)


cdef extern from "sys/epoll.h":
    ctypedef union epoll_data_t:
        int fd
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)


IMPLEMENTATION = "cython"

DEF READ_BUFFER = 262144
DEF MAX_EVENTS = 4096

cdef char _buffer[READ_BUFFER]
cdef epoll_event _events[MAX_EVENTS]


def read_some(int fd, Py_ssize_t size):
    cdef ssize_t n
    if size <= 0:
        raise ValueError("size must be positive")
    if size > READ_BUFFER:
        size = READ_BUFFER
    while True:
        n = c_read(fd, _buffer, <size_t>size)
        if n >= 0:
            return PyBytes_FromStringAndSize(_buffer, n)
        if errno == EINTR:
            continue
        if errno == EAGAIN or errno == EWOULDBLOCK:
            return None
        PyErr_SetFromErrno(OSError)


def write_some(int fd, bytes data):
    cdef ssize_t n
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    if size == 0:
        return 0
    while True:
        n = c_write(fd, PyBytes_AS_STRING(data), <size_t>size)
        if n >= 0:
            return n
        if errno == EINTR:
            continue
        if errno == EAGAIN or errno == EWOULDBLOCK:
            return 0
        PyErr_SetFromErrno(OSError)


def ready(epoll, int max_events):
    cdef int epfd = epoll.fileno()
    cdef int n, i
    if max_events <= 0:
        raise ValueError("max_events must be positive")
    if max_events > MAX_EVENTS:
        max_events = MAX_EVENTS
    while True:
        n = epoll_wait(epfd, _events, max_events, 0)
        if n >= 0:
            break
        if errno == EINTR:
            continue
        PyErr_SetFromErrno(OSError)
    return [(_events[i].data.fd, _events[i].events) for i in range(n)]

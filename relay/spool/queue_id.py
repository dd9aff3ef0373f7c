"""Queue id generation: short, unique, time-sortable identifiers safe in SMTP replies and paths."""

from __future__ import annotations

import os
import threading
import time
import weakref

# Crockford's base32 alphabet: no I, L, O, U (no confusion when read aloud from a log), and
# its characters are in ascending ASCII order, so string order equals numeric order.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_LENGTH = 16  # 16 x 5 = 80 bits
_RANDOM_BITS = 28  # below 52 bits of microseconds since the epoch (good until year 2112)
_RANDOM_MASK = (1 << _RANDOM_BITS) - 1
_MAX = (1 << (5 * _LENGTH)) - 1
# Random bits come from os.urandom in blocks: one getrandom() call per id cost ~20 µs of
# the event loop on the benchmark VM (three ids per message: the queue id and two events).
_POOL_BYTES = 4096


# Every pair of digits (10 bits) spelt out: an id is eight lookups (~0.5 µs, where a loop over
# its 16 digits, or base64's base32, written in Python, took ~1.3).
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]


def encode(value: int) -> str:
    """The fixed-width base32 text of an 80-bit integer, most significant digit first."""
    if not 0 <= value <= _MAX:
        raise ValueError("queue id value out of range")
    p = _PAIRS
    return (p[value >> 70] + p[(value >> 60) & 1023] + p[(value >> 50) & 1023]
            + p[(value >> 40) & 1023] + p[(value >> 30) & 1023] + p[(value >> 20) & 1023]
            + p[(value >> 10) & 1023] + p[value & 1023])


def decode(text: str) -> int:
    """The integer behind a queue id (ValueError if it is not one)."""
    if len(text) != _LENGTH:
        raise ValueError("queue id has the wrong length")
    value = 0
    for ch in text:
        digit = _ALPHABET.find(ch)
        if digit < 0:
            raise ValueError("queue id has a character outside the alphabet")
        value = (value << 5) | digit
    return value


class QueueIdFactory:
    """Makes ids from the clock plus random bits; strictly increasing within one process, so
    two ids never collide here even within the same microsecond, and random bits keep ids from
    different nodes apart."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()
        self._pool = b""
        self._pos = 0
        # A forked child starts with an empty pool, so that two processes never share one
        # (a getpid() per id instead cost a system call each: three per message).
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget_pool(ref))

    def _random_bits(self) -> int:
        """28 random bits from the pool (under the lock)."""
        if self._pos + 4 > len(self._pool):
            self._pool = os.urandom(_POOL_BYTES)
            self._pos = 0
        value = int.from_bytes(self._pool[self._pos : self._pos + 4], "big") & _RANDOM_MASK
        self._pos += 4
        return value

    def __call__(self) -> str:
        micros = time.time_ns() // 1000
        with self._lock:
            value = (micros << _RANDOM_BITS) | self._random_bits()
            if value <= self._last:
                value = self._last + 1
            self._last = value
        return encode(value)


def _forget_pool(ref: weakref.ref[QueueIdFactory]) -> None:
    factory = ref()
    if factory is not None:
        factory._pool = b""
        factory._pos = 0


new_queue_id = QueueIdFactory()


def is_queue_id(text: str) -> bool:
    """True when text has the shape of a queue id (cheap validation for CLI/API input)."""
    try:
        decode(text)
    except ValueError:
        return False
    return True

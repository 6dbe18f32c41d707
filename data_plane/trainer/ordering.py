"""Per-model sequencing: ops run strictly in ``seq_id`` order starting at 0, never skipping a
gap; an op whose seq was already executed (or is already waiting) is a duplicate."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class SeqBuffer(Generic[T]):
    def __init__(self, next_seq: int = 0) -> None:
        self._next = next_seq
        self._waiting: dict[int, T] = {}

    @property
    def next_seq(self) -> int:
        """The seq the model waits for."""
        return self._next

    @property
    def has_ready(self) -> bool:
        """Whether ``next_seq`` can run now."""
        return self._next in self._waiting

    @property
    def waiting(self) -> list[int]:
        """Buffered seqs that cannot run yet (they wait for ``next_seq``)."""
        return sorted(self._waiting)

    def add(self, seq: int, item: T) -> bool:
        """Buffer ``item``; False (and nothing buffered) for a duplicate or an already-run seq."""
        if seq < self._next or seq in self._waiting:
            return False
        self._waiting[seq] = item
        return True

    def ready(self) -> Iterator[tuple[int, T]]:
        """Pop the consecutive run starting at ``next_seq``. ``next_seq`` advances as each item
        is yielded, i.e. once the consumer takes it, whatever the op's outcome."""
        while self._next in self._waiting:
            seq = self._next
            item = self._waiting.pop(seq)
            self._next = seq + 1
            yield seq, item

    def take_waiting(self) -> list[tuple[int, T]]:
        """Remove and return everything still waiting (e.g. to fail it on shutdown)."""
        items = sorted(self._waiting.items())
        self._waiting.clear()
        return items

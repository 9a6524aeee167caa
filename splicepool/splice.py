"""The ``Splice`` handle: what users hold of one splice, and read.

A ``Splice`` is the engine's record of the splice (``state.Record``) seen
through its documented attributes: ``source``, ``drain``, ``max``, ``idle``,
``state``, ``reason``, ``error``, ``transferred``, ``dropped``, ``taken``,
``worker``, ``zero_copy``, ``in_flight``. Users read them; only the splice's
worker writes them. It is one object rather than a handle wrapping a record:
a proxied connection is two splices, and a second object each would cost
about 3 MiB per 9000 connections.
"""

from __future__ import annotations

from . import engine
from .state import LIVE, EndReason, Record, SpliceState, SpliceStateError

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any

#: The public states of a splice that has not ended.
LIVE_STATES = frozenset(phase.public for phase in LIVE)

__all__ = ["LIVE_STATES", "EndReason", "Splice", "SpliceState", "SpliceStateError", "is_live"]


def is_live(sp: Splice) -> bool:
    """True until the splice has stopped taking from its source."""
    return sp.phase in LIVE


class Splice(Record):
    """One running (or ended) splice: ``source`` into ``drain``.

    Created by ``SplicePool.splice()``; never instantiate it yourself. Counters
    are exact: ``transferred`` counts bytes the drain accepted, ``dropped``
    bytes taken from the source that the drain never accepted.
    """

    __slots__ = ("source", "drain", "__weakref__")

    def __init__(self, source: Any, drain: Any, max: int, idle: float | None, owner: Any,
                 copy: bool) -> None:
        Record.__init__(self, max, idle, owner, copy)
        self.source = source
        self.drain = drain

    # -- read-only views -------------------------------------------------
    @property
    def state(self) -> SpliceState:
        """Where it is in its life (FreeBSD's states)."""
        return self.phase.public

    @property
    def worker(self) -> int:
        """The index of its worker thread (a worker that crashed is replaced at the same index)."""
        owner = self.owner
        return owner.index if owner is not None else -1  # -1: a bare handle, in a unit test

    @property
    def zero_copy(self) -> bool:
        """True on the zero-copy path (bulk moves with os.splice, never entering Python; reads
        under ``small_copy`` bytes are copied), False on the copy path."""
        return not self.copy

    @property
    def in_flight(self) -> int:
        """Bytes taken from the source that the drain has not accepted yet (the pipe leftover)."""
        mover = self.mover
        return mover.pending if mover is not None else 0

    def __repr__(self) -> str:
        src = self.src.label if self.src is not None else repr(self.source)
        dst = self.dst.label if self.dst is not None else repr(self.drain)
        end = f" reason={self.reason.name}" if self.reason else ""
        return (
            f"<Splice source {src} -> drain {dst} worker={self.worker} state={self.state.name}"
            f" transferred={self.transferred}{end}>"
        )

    # -- waiting and stopping ------------------------------------------------
    def wait(self, timeout: float | None = None) -> EndReason:
        """Block until the splice has ended and return its ``reason``.

        Raises ``TimeoutError`` if it is still running after ``timeout`` seconds.
        """
        if not self._wait_done(timeout):
            raise TimeoutError(f"splice still running after {timeout} s: {self!r}")
        assert self.reason is not None
        return self.reason

    def unsplice(self) -> None:
        """Stop this splice: same as ``pool.splice(splice.source, -1)``."""
        engine.unsplice(self)

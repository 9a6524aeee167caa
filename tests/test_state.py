"""The transition table (splicepool.state): every legal move, and only those.

The first tests read the table itself; ``test_real_splices_make_every_move_of_the_table``
walks it from the outside: real sockets, the public API only, and a tracer that
records each move the workers make.
"""

from __future__ import annotations

import socket
import threading

import pytest
from conftest import (
    HAVE_SPLICE,
    Link,
    fill_send_buffer,
    payload,
    recv_exact,
    reset,
    shrink,
    thread_backend_only,
    until,
)

from splicepool import EndReason, SplicePool, SpliceState, state
from splicepool.state import TABLE, Event, Phase, Record, SpliceStateError, move

P, E, S = Phase, Event, SpliceState


def _record() -> Record:
    return Record(max=0, idle=None, owner=None, copy=False)


def _paths() -> dict[Phase, list[Event]]:
    """The shortest event sequence from INIT to each phase (breadth-first over TABLE)."""
    paths: dict[Phase, list[Event]] = {P.INIT: []}
    frontier = [P.INIT]
    while frontier:
        nxt = []
        for phase in frontier:
            for (old, event), new in TABLE.items():
                if old is phase and new not in paths:
                    paths[new] = paths[phase] + [event]
                    nxt.append(new)
        frontier = nxt
    return paths


def test_every_phase_is_reachable_closed_is_terminal_and_each_maps_to_a_public_state():
    paths = _paths()
    assert set(paths) == set(Phase)
    assert not [key for key in TABLE if key[0] is P.CLOSED]
    assert {p.public for p in Phase} == set(SpliceState)
    assert {p for p in Phase if p.public in (S.INIT, S.IDLE, S.QUEUED, S.RUNNING)} == state.LIVE
    # Waiting for the source and waiting for the drain are phases, not flags.
    assert P.WAIT_SOURCE.public is P.WAIT_DRAIN.public is S.IDLE


@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.name)
@pytest.mark.parametrize("event", list(Event), ids=lambda e: e.name)
def test_a_move_happens_exactly_when_the_table_has_it(phase, event):
    rec = _record()
    for step in _paths()[phase]:
        move(rec, step)
    assert rec.phase is phase
    if (phase, event) in TABLE:
        assert move(rec, event) is TABLE[phase, event] is rec.phase
    else:
        with pytest.raises(SpliceStateError, match=f"{event.name} in {phase.name}"):
            move(rec, event)
        assert rec.phase is phase  # an illegal move changes nothing


def test_an_illegal_move_on_a_real_splice_raises_and_changes_nothing():
    with SplicePool(workers=1) as pool, _link() as ln:
        sp = pool.splice(ln.src, ln.dst)
        assert until(lambda: sp.phase is P.WAIT_SOURCE, 5)
        with pytest.raises(SpliceStateError, match="FLUSH in WAIT_SOURCE"):
            move(sp, E.FLUSH)
        assert sp.phase is P.WAIT_SOURCE and sp.state is S.IDLE
        ln.peer_src.sendall(b"still moving")
        assert recv_exact(ln.peer_dst, 12) == b"still moving"


class _link:
    def __enter__(self) -> Link:
        self.ln = Link()
        return self.ln

    def __exit__(self, *exc: object) -> None:
        self.ln.close()


# Moves the walk below cannot make on purpose, and why.
UNFORCED = {
    # An event arriving while the splice is already queued, or before its worker took it
    # up: whether one does is a matter of timing between threads.
    **{(p, e): "timing" for p in (P.QUEUED, P.QUEUED_READ, P.QUEUED_DRAIN, P.QUEUED_CHECK)
       for e in (E.READ, E.READ_HUP, E.DRAIN_ERROR)},
    (P.INIT, E.READ): "timing",
    (P.INIT, E.READ_HUP): "timing",
    # Ended while queued, before its pass: an unsplice message or an idle deadline handled in
    # the same wakeup as the event that queued it.
    **{(p, e): "timing" for p in (P.QUEUED, P.QUEUED_READ, P.QUEUED_DRAIN, P.QUEUED_CHECK)
       for e in (E.CUT, E.END)},
    (P.CLOSING_QUEUED, E.FINISH): "timing: its idle deadline or pool.close()'s grace ran out first",
    (P.CLOSING_QUEUED, E.DRAIN_ERROR): "timing",
    (P.WAIT_DRAIN, E.READ_HUP): "timing",
    # A source waiting for its drain is not watched for data (the epoll hub mutes it): its
    # data is reported there only by an event taken before the wait began.
    (P.WAIT_DRAIN, E.READ): "timing",
    # No end by itself leaves a leftover (EOF, MAX and errors come with nothing in flight;
    # IDLE and a bug drop it), so an EXCEPTION never waits for the drain.
    (P.EXCEPTION_WAIT, E.WRITABLE): "no leftover",
    (P.EXCEPTION_WAIT, E.DRAIN_ERROR): "no leftover",
    (P.EXCEPTION_QUEUED, E.DRAIN_ERROR): "no leftover",
    (P.EXCEPTION_QUEUED, E.FLUSH): "no leftover",
    (P.EXCEPTION_QUEUED, E.FINISH): "no leftover",
    (P.RUNNING, E.CUT): "a bug or a crash in a pass (tests/test_regressions.py, test_7)",
    **{(p, E.ABANDON): "only when ending a splice fails (a bug)" for p in Phase if p is not P.CLOSED},
    (P.INIT, E.FINISH): "a splice ended before its worker took it up (pool.close() racing)",
    (P.CLOSING_WAIT, E.DRAIN_ERROR): "timing",
}


@thread_backend_only
@pytest.mark.skipif(not HAVE_SPLICE, reason="the walk uses the zero-copy path: needs Linux os.splice")
def test_real_splices_make_every_move_of_the_table():
    seen: set[tuple[Phase, Event]] = set()
    lock = threading.Lock()

    def record(rec, old, event, new):
        with lock:
            seen.add((old, event))

    state.trace(record)
    try:
        with SplicePool(workers=1, hub="epoll") as pool:
            _walk(pool)
    finally:
        state.trace(None)
    assert set(UNFORCED) <= set(TABLE)  # every excuse names a real move
    missing = {key for key in TABLE if key not in seen and key not in UNFORCED}
    assert not missing, "\n".join(sorted(f"{p.name} --{e.name}-->" for p, e in missing))


def _walk(pool: SplicePool) -> None:
    # Taken up with nothing to read; one small read at the event; a read that fills the small
    # buffer (MORE), then a queued pass; a FIN; EOF.
    with _link() as ln:
        sp = pool.splice(ln.src, ln.dst)
        assert until(lambda: sp.phase is P.WAIT_SOURCE, 5)
        ln.peer_src.sendall(b"hello")
        assert recv_exact(ln.peer_dst, 5) == b"hello"
        assert until(lambda: sp.phase is P.WAIT_SOURCE, 5)
        big = payload(256 * 1024, 1)
        ln.peer_src.sendall(big)
        assert recv_exact(ln.peer_dst, len(big)) == big
        assert until(lambda: sp.phase is P.WAIT_SOURCE, 5)  # so the FIN is an event of its own
        ln.peer_src.shutdown(socket.SHUT_WR)
        assert sp.wait(5) is EndReason.EOF
    # A full drain (WAIT_DRAIN), more data meanwhile, space again (QUEUED_DRAIN), then a
    # bulk of several budgets (REQUEUE).
    with _link() as ln:
        shrink(ln.dst, ln.peer_dst)
        ln.dst.setblocking(False)
        filler = fill_send_buffer(ln.dst)
        sp = pool.splice(ln.src, ln.dst)
        ln.peer_src.sendall(b"x" * 100_000)
        assert until(lambda: sp.phase is P.WAIT_DRAIN, 5)
        ln.peer_src.sendall(b"y" * 1000)
        total = len(filler) + 101_000
        got = recv_exact(ln.peer_dst, total)
        assert got == filler + b"x" * 100_000 + b"y" * 1000
        sp.unsplice()  # CUT from WAIT_SOURCE
        assert sp.reason is EndReason.UNSPLICED
    # A bulk of many budgets (REQUEUE): small pipes make a small budget (512 KiB a pass).
    with _link() as ln, SplicePool(workers=1, pipe_size=65536) as small:
        sp = small.splice(ln.src, ln.dst)
        bulk = payload(32 << 20, 2)
        sender = threading.Thread(target=ln.peer_src.sendall, args=(bulk,))
        sender.start()
        assert recv_exact(ln.peer_dst, len(bulk), timeout=30) == bulk
        sender.join(10)
        assert sp.transferred == len(bulk)
    # MAX, IDLE.
    with _link() as ln:
        sp = pool.splice(ln.src, ln.dst, max=10)
        ln.peer_src.sendall(b"0123456789abc")
        assert sp.wait(5) is EndReason.MAX
        sp = pool.splice(ln.src, ln.dst, idle=0.05)
        assert sp.wait(5) is EndReason.IDLE
    # IDLE while waiting for a full drain; an error on a drain waited for.
    for how in ("idle", "reset"):
        with _link() as ln:
            shrink(ln.dst, ln.peer_dst)
            ln.dst.setblocking(False)
            fill_send_buffer(ln.dst)
            sp = pool.splice(ln.src, ln.dst, idle=0.2 if how == "idle" else None)
            ln.peer_src.sendall(b"v" * 100_000)
            assert until(lambda sp=sp: sp.phase is P.WAIT_DRAIN, 5)
            if how == "reset":
                reset(ln.peer_dst)
            assert sp.wait(5) is (EndReason.IDLE if how == "idle" else EndReason.ERROR)
    # Unspliced with a leftover: the pool's idea of the drain's space goes stale when the user
    # fills the drain, so a small read at the event keeps what the drain refused (WAIT_DRAIN).
    # Unspliced, it waits (CLOSING_WAIT), is woken by space (CLOSING_QUEUED), flushed, done.
    with _link() as ln:
        shrink(ln.dst, ln.peer_dst)
        sp = pool.splice(ln.src, ln.dst)
        ln.peer_src.sendall(b"hello")
        assert recv_exact(ln.peer_dst, 5) == b"hello"
        assert until(lambda: sp.phase is P.WAIT_SOURCE, 5)
        filler = fill_send_buffer(ln.dst)  # non-blocking: the pool's dup shares the file
        msg = payload(8000, 3)
        ln.peer_src.sendall(msg)
        assert until(lambda: sp.phase is P.WAIT_DRAIN and sp.in_flight, 5)
        pool.unsplice(ln.src)
        assert sp.phase is P.CLOSING_WAIT and sp.state is S.CLOSING
        moved = sp.transferred - 5 + sp.in_flight
        assert recv_exact(ln.peer_dst, len(filler) + moved) == filler + msg[:moved]
        assert sp.wait(5) is EndReason.UNSPLICED and sp.phase is P.CLOSED
        assert sp.transferred == 5 + moved and sp.dropped == 0
    # The drain's peer resets: an error event on the drain (QUEUED_CHECK), the splice ends.
    with _link() as ln:
        sp = pool.splice(ln.src, ln.dst)
        assert until(lambda: sp.phase is P.WAIT_SOURCE, 5)
        reset(ln.peer_dst)
        assert sp.wait(5) is EndReason.ERROR
    # Waiting for the drain when the pool closes: CUT from WAIT_DRAIN; a queued splice cut.
    with _link() as ln:
        shrink(ln.dst, ln.peer_dst)
        ln.dst.setblocking(False)
        fill_send_buffer(ln.dst)
        sp = pool.splice(ln.src, ln.dst)
        ln.peer_src.sendall(b"w" * 200_000)
        assert until(lambda: sp.phase is P.WAIT_DRAIN, 5)
        pool.close(grace=0)
        assert sp.wait(5) is EndReason.POOL_CLOSED

"""The Splice handle (splicepool.splice): its views, its done signal, its contract."""

from __future__ import annotations

import pytest
from conftest import Link, recv_exact, until

from splicepool import EndReason, SplicePool, SpliceState
from splicepool.splice import LIVE_STATES, Splice, is_live
from splicepool.state import Event as E
from splicepool.state import Phase, finish, move

S = SpliceState


def _bare() -> Splice:
    return Splice(0, 1, max=0, idle=None, owner=None, copy=False)  # a bare handle: no worker


def test_end_reasons_and_states_are_the_contract():
    assert [r.name for r in EndReason] == ["EOF", "MAX", "IDLE", "UNSPLICED", "ERROR", "POOL_CLOSED"]
    assert [s.name for s in SpliceState] == [
        "INIT", "IDLE", "QUEUED", "RUNNING", "CLOSING", "CLOSED", "EXCEPTION",
    ]
    assert LIVE_STATES == {S.INIT, S.IDLE, S.QUEUED, S.RUNNING}


def test_a_bare_handle_reads_as_new():
    sp = _bare()
    assert (sp.state, sp.worker, sp.zero_copy, sp.in_flight, sp.transferred) == (S.INIT, -1, True, 0, 0)
    assert is_live(sp) and not sp.done() and sp.reason is None


def test_callbacks_run_once_and_a_raising_callback_is_logged(caplog):
    sp = _bare()
    calls: list[int] = []
    sp.add_done_callback(lambda s: calls.append(1))
    sp.add_done_callback(lambda s: 1 / 0)
    sp.add_done_callback(lambda s: calls.append(2))
    sp.reason = EndReason.EOF
    finish(sp)  # INIT --FINISH--> CLOSED: ended before it was taken up
    assert calls == [1, 2]
    assert sp.done() and sp.state is S.CLOSED and not is_live(sp)
    assert "ZeroDivisionError" in caplog.text
    sp.add_done_callback(lambda s: calls.append(3))  # already ended: runs at once
    assert calls == [1, 2, 3]
    assert sp.wait(0) is EndReason.EOF
    with pytest.raises(Exception, match="FINISH in CLOSED"):
        move(sp, E.FINISH)


def test_wait_times_out_on_a_running_splice():
    sp = _bare()
    with pytest.raises(TimeoutError, match="still running"):
        sp.wait(0.05)
    assert not sp.done()


def test_a_live_handle_shows_its_worker_path_and_addresses():
    ln = Link()
    try:
        with SplicePool(workers=2) as pool:
            sp = pool.splice(ln.src, ln.dst)
            assert until(lambda: sp.phase is Phase.WAIT_SOURCE, 5)
            assert sp.state is S.IDLE and sp.worker == 0 and sp.source is ln.src and sp.drain is ln.dst
            text = repr(sp)
            assert f"source fd {sp.src.fd}" not in text or "->" in text
            assert "state=IDLE" in text and "worker=0" in text
            ln.peer_src.sendall(b"abc")
            assert recv_exact(ln.peer_dst, 3) == b"abc"
            sp.unsplice()
            assert sp.reason is EndReason.UNSPLICED and "reason=UNSPLICED" in repr(sp)
            with pytest.raises(OSError, match="not spliced"):
                sp.unsplice()
    finally:
        ln.close()

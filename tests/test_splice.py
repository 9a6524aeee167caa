"""The Splice handle and its state table."""

from __future__ import annotations

import pytest

from splicepool import EndReason, SplicePool, SpliceState
from splicepool.splice import LIVE_STATES, TRANSITIONS, Splice, SpliceStateError

S = SpliceState


def _fresh(pool: SplicePool) -> Splice:
    return Splice(pool, 0, 1, max=0, idle=None, owner=None)  # a bare handle: no worker


def _path_to(target: SpliceState) -> list[SpliceState]:
    """The shortest legal walk from INIT to ``target`` (breadth-first over TRANSITIONS)."""
    paths = {S.INIT: [S.INIT]}
    frontier = [S.INIT]
    while frontier:
        nxt = []
        for state in frontier:
            for new in TRANSITIONS[state]:
                if new not in paths:
                    paths[new] = paths[state] + [new]
                    nxt.append(new)
        frontier = nxt
    return paths[target]


def test_every_state_is_reachable_and_closed_is_terminal():
    assert set(TRANSITIONS) == set(SpliceState)
    for state in SpliceState:
        assert _path_to(state)[-1] is state
    assert TRANSITIONS[S.CLOSED] == frozenset()
    assert LIVE_STATES == {S.INIT, S.IDLE, S.QUEUED, S.RUNNING}


@pytest.mark.parametrize("old", list(SpliceState))
@pytest.mark.parametrize("new", list(SpliceState))
def test_each_transition_is_allowed_exactly_when_the_table_says(old, new):
    with SplicePool(workers=1) as pool:
        sp = _fresh(pool)
        for step in _path_to(old)[1:]:
            sp._set_state(step)
        assert sp.state is old
        if new in TRANSITIONS[old]:
            sp._set_state(new)
            assert sp.state is new
        else:
            with pytest.raises(SpliceStateError, match=f"{old.name} -> {new.name}"):
                sp._set_state(new)
            assert sp.state is old


def test_end_reasons_are_the_contract():
    assert [r.name for r in EndReason] == ["EOF", "MAX", "IDLE", "UNSPLICED", "ERROR", "POOL_CLOSED"]
    assert [s.name for s in SpliceState] == [
        "INIT", "IDLE", "QUEUED", "RUNNING", "CLOSING", "CLOSED", "EXCEPTION",
    ]


def test_callbacks_run_once_and_a_raising_callback_is_logged(caplog):
    with SplicePool(workers=1) as pool:
        sp = _fresh(pool)
        calls: list[int] = []
        sp.add_done_callback(lambda s: calls.append(1))
        sp.add_done_callback(lambda s: 1 / 0)
        sp.add_done_callback(lambda s: calls.append(2))
        sp.reason = EndReason.EOF
        sp._signal_done()
        assert calls == [1, 2]
        assert sp.done() and sp.state is S.CLOSED
        assert "ZeroDivisionError" in caplog.text
        sp.add_done_callback(lambda s: calls.append(3))  # already ended: runs at once
        assert calls == [1, 2, 3]
        assert sp.wait(0) is EndReason.EOF


def test_wait_times_out_on_a_running_splice():
    with SplicePool(workers=1) as pool:
        sp = _fresh(pool)
        with pytest.raises(TimeoutError):
            sp.wait(0.05)
        assert not sp.done()

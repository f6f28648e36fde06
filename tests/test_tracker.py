"""CompletionTracker: committable positions under out-of-order completion, against a model."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ponder.runtime.tracker import CompletionTracker, OutOfOrderOffset


class Model:
    """Reference: per partition, the offsets received (in order) and the set done.

    committable[tp] = one past the last offset of the longest fully-done prefix of the received
    offsets; absent when the first received offset is not done yet.
    """

    def __init__(self) -> None:
        self.received: dict[tuple[str, int], list[int]] = {}
        self.done: dict[tuple[str, int], set[int]] = {}

    def receive(self, tp: tuple[str, int], offset: int) -> None:
        self.received.setdefault(tp, []).append(offset)
        self.done.setdefault(tp, set())

    def finish(self, tp: tuple[str, int], offset: int) -> None:
        self.done[tp].add(offset)

    def committable(self) -> dict[tuple[str, int], int]:
        out = {}
        for tp, offsets in self.received.items():
            nxt = None
            for o in offsets:
                if o not in self.done[tp]:
                    break
                nxt = o + 1
            if nxt is not None:
                out[tp] = nxt
        return out


# A partition's offsets: strictly increasing, with random holes (compaction, txn markers).
offsets_st = st.lists(st.integers(1, 5), min_size=1, max_size=25).map(
    lambda gaps: [sum(gaps[: i + 1]) - 1 for i in range(len(gaps))]
)
partitions_st = st.dictionaries(
    st.tuples(st.sampled_from(["orders", "telemetry"]), st.integers(0, 3)),
    st.tuples(st.integers(0, 1000), offsets_st),
    min_size=1,
    max_size=5,
)


@settings(max_examples=120, deadline=None)
@given(parts=partitions_st, rnd=st.randoms(use_true_random=False))
def test_committable_matches_model_with_interleaved_receive_and_done(parts, rnd: random.Random):
    # every partition starts at a random base offset and has holes between offsets
    streams = {tp: [base + o for o in offs] for tp, (base, offs) in parts.items()}
    t, m = CompletionTracker(), Model()
    next_i = {tp: 0 for tp in streams}
    outstanding: list[tuple[tuple[str, int], int]] = []
    total = sum(len(v) for v in streams.values())
    finished = 0
    while finished < total:
        can_receive = [tp for tp, i in next_i.items() if i < len(streams[tp])]
        if can_receive and (not outstanding or rnd.random() < 0.5):
            tp = rnd.choice(can_receive)
            o = streams[tp][next_i[tp]]
            next_i[tp] += 1
            t.received(tp[0], tp[1], o)
            m.receive(tp, o)
            outstanding.append((tp, o))
        else:
            tp, o = outstanding.pop(rnd.randrange(len(outstanding)))
            t.done(tp[0], tp[1], o)
            m.finish(tp, o)
            finished += 1
            assert t.committable() == m.committable()
    # everything done: each partition commits one past its last offset
    assert t.committable() == {tp: offs[-1] + 1 for tp, offs in streams.items()}


@settings(max_examples=120, deadline=None)
@given(parts=partitions_st, rnd=st.randoms(use_true_random=False))
def test_committable_matches_model_all_received_first(parts, rnd: random.Random):
    streams = {tp: [base + o for o in offs] for tp, (base, offs) in parts.items()}
    t, m = CompletionTracker(), Model()
    for tp, offs in streams.items():
        for o in offs:
            t.received(tp[0], tp[1], o)
            m.receive(tp, o)
    assert t.committable() == {}
    order = [(tp, o) for tp, offs in streams.items() for o in offs]
    rnd.shuffle(order)
    for tp, o in order:
        t.done(tp[0], tp[1], o)
        m.finish(tp, o)
        assert t.committable() == m.committable()
    assert t.committable() == {tp: offs[-1] + 1 for tp, offs in streams.items()}


def test_docstring_example_non_contiguous():
    t = CompletionTracker()
    for o in (5, 6, 9):
        t.received("t", 0, o)
    assert t.committable() == {}
    t.done("t", 0, 6)
    assert t.committable() == {}
    t.done("t", 0, 5)
    assert t.committable() == {("t", 0): 7}
    t.done("t", 0, 9)
    assert t.committable() == {("t", 0): 10}


def test_in_flight_counts_received_but_not_done():
    """in_flight() is the number of received events not yet done (like the worker's own
    `_inflight`): an event that is done but blocked behind a slow one is no longer in flight."""
    t = CompletionTracker()
    assert t.in_flight() == 0
    for o in range(3):
        t.received("a", 0, o)
    t.received("b", 1, 10)
    assert t.in_flight() == 4
    t.done("a", 0, 0)
    assert t.in_flight() == 3
    t.done("b", 1, 10)
    assert t.in_flight() == 2
    t.done("a", 0, 2)  # done, though blocked behind offset 1
    assert t.committable() == {("a", 0): 1, ("b", 1): 11}
    assert t.in_flight() == 1
    t.done("a", 0, 1)
    assert t.in_flight() == 0
    assert t.committable() == {("a", 0): 3, ("b", 1): 11}


def test_progress_is_kept_after_the_pending_queue_empties():
    t = CompletionTracker()
    t.received("t", 0, 0)
    t.done("t", 0, 0)
    assert t.committable() == {("t", 0): 1}
    t.received("t", 0, 4)  # a hole: 1..3 never arrive
    assert t.committable() == {("t", 0): 1}  # 4 not done yet: nothing past 1
    t.done("t", 0, 4)
    assert t.committable() == {("t", 0): 5}


@pytest.mark.parametrize("second", [3, 2])
def test_out_of_order_received_raises_naming_topic_and_partition(second):
    t = CompletionTracker()
    t.received("orders", 7, 3)
    with pytest.raises(OutOfOrderOffset) as ei:
        t.received("orders", 7, second)
    msg = str(ei.value)
    assert msg == f"orders[7]: offset {second} received after 3"
    assert isinstance(ei.value, ValueError)
    # the bad offset was not recorded: the partition still commits as before
    t.done("orders", 7, 3)
    assert t.committable() == {("orders", 7): 4}
    assert t.in_flight() == 0


def test_out_of_order_is_per_partition():
    t = CompletionTracker()
    t.received("orders", 0, 10)
    t.received("orders", 1, 0)  # another partition starts lower: fine
    t.received("payments", 0, 0)  # another topic too
    with pytest.raises(OutOfOrderOffset, match=r"^orders\[1\]: offset 0 received after 0$"):
        t.received("orders", 1, 0)


def test_forget_drops_a_partition():
    t = CompletionTracker()
    for o in range(3):
        t.received("t", 0, o)
        t.received("t", 1, o)
    t.done("t", 0, 0)
    t.done("t", 1, 0)
    assert t.committable() == {("t", 0): 1, ("t", 1): 1}
    assert t.in_flight() == 4
    t.forget("t", 0)
    assert t.committable() == {("t", 1): 1}
    assert t.in_flight() == 2
    # reassigned later: it starts afresh, so offsets below the old ones are accepted
    t.received("t", 0, 0)
    assert t.committable() == {("t", 1): 1}
    t.done("t", 0, 0)
    assert t.committable() == {("t", 0): 1, ("t", 1): 1}
    # forgetting an unknown partition is a no-op
    t.forget("nope", 9)
    assert t.committable() == {("t", 0): 1, ("t", 1): 1}

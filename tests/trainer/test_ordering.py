from data_plane.trainer.ordering import SeqBuffer


def test_in_order():
    b: SeqBuffer[str] = SeqBuffer()
    assert b.add(0, "a")
    assert list(b.ready()) == [(0, "a")]
    assert b.add(1, "b")
    assert list(b.ready()) == [(1, "b")]
    assert b.next_seq == 2


def test_out_of_order_waits_for_the_gap():
    b: SeqBuffer[str] = SeqBuffer()
    assert b.add(2, "c") and b.add(3, "d")
    assert list(b.ready()) == []
    assert b.waiting == [2, 3]
    assert b.add(0, "a")
    assert list(b.ready()) == [(0, "a")]  # 1 is still missing: 2 and 3 keep waiting
    assert b.waiting == [2, 3] and b.next_seq == 1
    assert b.add(1, "b")
    assert list(b.ready()) == [(1, "b"), (2, "c"), (3, "d")]
    assert b.waiting == [] and b.next_seq == 4


def test_duplicates_are_ignored():
    b: SeqBuffer[str] = SeqBuffer()
    assert b.add(0, "a")
    assert not b.add(0, "a-again")  # duplicate of a waiting seq: the first one wins
    assert list(b.ready()) == [(0, "a")]
    assert not b.add(0, "a-late")  # already executed
    assert b.add(2, "c")
    assert not b.add(2, "c-dup")
    assert b.add(1, "b")
    assert list(b.ready()) == [(1, "b"), (2, "c")]


def test_consumer_stopping_midway_keeps_the_rest():
    b: SeqBuffer[int] = SeqBuffer()
    for s in (0, 1, 2):
        b.add(s, s)
    it = b.ready()
    assert next(it) == (0, 0)
    # the consumer stops after one item (e.g. shutdown); 1 and 2 stay buffered
    assert b.next_seq == 1 and b.waiting == [1, 2]

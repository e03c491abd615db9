"""The training loader's background thread: order kept, errors delivered, and it lets go on close."""

import threading

import pytest

from weatherkd.data.stream import _ahead


def _threads() -> int:
    return sum(t.name == "weatherkd-batches" for t in threading.enumerate())


def test_batches_come_in_order_prepared_and_the_thread_ends_with_its_consumer():
    before = _threads()
    batches = _ahead(iter(range(100)), lambda b: b * 2, depth=2)
    assert [next(batches) for _ in range(10)] == list(range(0, 20, 2))
    assert _threads() == before + 1
    batches.close()  # mid-stream, with the queue full: the thread must still end
    assert _threads() == before
    assert list(_ahead(iter(range(5)), lambda b: b)) == [0, 1, 2, 3, 4]  # and an end is an end


def test_an_error_in_the_loader_or_in_prepare_reaches_the_consumer():
    def failing():
        yield 1
        raise OSError("worker died")

    batches = _ahead(failing(), lambda b: b)
    assert next(batches) == 1
    with pytest.raises(OSError, match="worker died"):
        next(batches)

    def prepare(b):
        if b == 3:
            raise ValueError("bad batch 3")
        return b

    with pytest.raises(ValueError, match="bad batch 3"):
        list(_ahead(iter(range(10)), prepare))
